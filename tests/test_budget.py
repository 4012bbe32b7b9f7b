"""A compress run under --max-ram stays under it (ru_maxrss of a fresh process, measured)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from streamq.cli import parse_size
from tests.conftest import make_tiny_model

CHILD = """
import json, sys
from streamq.memstat import peak_rss_bytes
import streamq
from streamq.cli import main
from streamq.planner import fmt_size
model, out = sys.argv[1], sys.argv[2]
plan = streamq.plan(model, benchmark=False, nsamples=8, seqlen=64, group_size=64, device="cpu")
budget = fmt_size(plan.peak_ram_bytes + 8 * 10**6)  # + the RSS the plan itself may add before compress re-plans
code = main(["compress", model, out, "--calib", model + "/calib.txt", "--nsamples", "8", "--seqlen", "64",
             "--group-size", "64", "--no-progress", "--max-ram", budget, "--device", "cpu"])
print(json.dumps({"code": code, "budget": budget, "baseline": plan.baseline_rss_bytes,
                  "predicted": plan.peak_ram_bytes, "peak": peak_rss_bytes()}))
"""


def test_budgeted_run_stays_under_max_ram(tmp_path):
    """Blocks of 10 MB (fp32) whose down_proj solve holds ~100 MB, under --max-ram = the predicted peak: ru_maxrss
    stays under the budget, and the growth above the planning baseline is 70-100% of the predicted growth (the
    model is an upper bound that is not loose)."""
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=2, hidden=512, inter=1536)
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    assert got["peak"] <= parse_size(got["budget"]), got
    measured, predicted = got["peak"] - got["baseline"], got["predicted"] - got["baseline"]
    assert 0.7 * predicted <= measured <= predicted, (measured, predicted)
    assert json.loads((tmp_path / "out" / "streamq_manifest.json").read_text())["complete"] is True
