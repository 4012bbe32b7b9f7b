"""Peak RSS does not grow with depth: only one block is ever materialized (measured in a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_tiny_model

CHILD = """
import json, sys
from streamq.memstat import peak_rss_bytes
import streamq
streamq.compress(sys.argv[1], sys.argv[2], bits=4, group_size=64, calib=sys.argv[1] + "/calib.txt",
                 nsamples=2, seqlen=32, progress=False, device="cpu")
print(json.dumps({"peak_rss": peak_rss_bytes()}))
"""


def peak_rss(model, out) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest's; a user's run has none
    env.update(OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")  # as test_budget: no per-thread heap arenas in the figure
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out)], capture_output=True, text=True,
                       check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]


def shard_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def test_peak_rss_flat_in_depth(tmp_path):
    # blocks of 3.4 M fp32 parameters (14 MB): 6 extra blocks held at once would add ~80 MB. The shards are memory-
    # mapped, and the pages read stay resident in the mapping (page cache, counted in RSS): up to the 6 extra
    # blocks' file bytes more (measured: 8 blocks +38-49 MB over 2; every block held: +122 MB).
    kw = dict(arch="llama", shards=4, hidden=512, inter=1536)
    shallow = make_tiny_model(tmp_path / "b2", n_layers=2, **kw)
    deep = make_tiny_model(tmp_path / "b8", n_layers=8, **kw)
    rss2, rss8 = peak_rss(shallow, tmp_path / "o2"), peak_rss(deep, tmp_path / "o8")
    block_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1536)
    mapped = shard_bytes(deep) - shard_bytes(shallow)
    assert rss8 <= rss2 + 2 * block_bytes + mapped, (rss2, rss8, mapped)
