"""Peak anonymous RSS does not grow with depth: only one block is ever materialized (sampled in a subprocess;
the shards' memory-mapped pages that stay resident are page cache the kernel reclaims, not held memory)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import make_tiny_model

CHILD = """
import json, sys, threading, time
import streamq

peak, done = [0], threading.Event()
def sample():  # anonymous memory, sampled: what the run materializes (mapped shard pages are page cache)
    while not done.is_set():
        with open("/proc/self/status") as f:
            anon = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:")) * 1024
        peak[0] = max(peak[0], anon)
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True)
t.start()
streamq.compress(sys.argv[1], sys.argv[2], bits=4, group_size=64, calib=sys.argv[1] + "/calib.txt",
                 nsamples=2, seqlen=32, progress=False, device="cpu")
done.set(); t.join()
print(json.dumps({"peak_rss": peak[0]}))
"""

def peak_rss(model, out) -> int:
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]


def test_peak_rss_flat_in_depth(tmp_path):
    # blocks of 3.4 M fp32 parameters (14 MB): 6 extra blocks held at once would add ~80 MB
    kw = dict(arch="llama", shards=4, hidden=512, inter=1536)
    shallow = make_tiny_model(tmp_path / "b2", n_layers=2, **kw)
    deep = make_tiny_model(tmp_path / "b8", n_layers=8, **kw)
    rss2, rss8 = peak_rss(shallow, tmp_path / "o2"), peak_rss(deep, tmp_path / "o8")
    block_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1536)
    assert rss8 <= rss2 + 2 * block_bytes, (rss2, rss8)
