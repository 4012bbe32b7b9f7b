"""streamq GPTQ vs llm-compressor's GPTQ on the same calibration windows: perplexity, wall, peak RSS (not in CI).

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install llmcompressor torch==2.13.0   # throw-away venv
    .venv/bin/python tools/bench_peers.py --model ~/.cache/streamq/SmolLM2-135M-Instruct \\
        --calib-text /work/shared/data/austen-calib.txt --test-text /work/shared/data/austen-test.txt \\
        --peer-python /tmp/llmc/bin/python [--nsamples 32 --seqlen 512 --eval-windows 16] [--repeats 2] \\
        [--rows llmc-asym,streamq-asym-ao,streamq-sym-ao,...]

The calibration windows are drawn once (streamq's seeded sampler) and written to windows.npy; every run reads
that file (streamq: `--calib windows.npy`; llm-compressor: a datasets.Dataset of the same input_ids, not
shuffled). Each run is a fresh child process; wall and peak RSS cover loading, calibration and quantization.
Peak RSS is the child's own VmHWM (/proc/<pid>/status): wait4's ru_maxrss would inherit this parent's RSS on
Linux. streamq's is read by a wrapper that runs the CLI in-process and prints streamq.memstat.peak_rss_bytes();
llm-compressor's child reads its own before it evaluates. Perplexity: exp(mean NLL) of
tokens 1..seqlen-1 over the first --eval-windows non-overlapping windows of --test-text (streamq: `streamq
eval` on the output; llm-compressor: the same windows through its quantized model in the child). Rows run in
turn, --repeats times round (interleaved), so load on the machine hits all rows alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = {  # name -> (tool, extra flags)
    "llmc-asym": ("llmc", {"bits": 4, "sym": False}),
    "llmc-sym": ("llmc", {"bits": 4, "sym": True}),
    "streamq-asym-ao": ("streamq", ["--bits", "4", "--asym", "--act-order", "--static-groups"]),
    "streamq-sym-ao": ("streamq", ["--bits", "4", "--sym", "--act-order", "--static-groups"]),
    # GPTQ in the columns' own order (the default before act-order became it)
    "streamq-asym": ("streamq", ["--bits", "4", "--asym", "--no-act-order"]),
    "streamq-sym": ("streamq", ["--bits", "4", "--sym", "--no-act-order"]),
    "streamq-asym-ao-nots": ("streamq", ["--bits", "4", "--asym", "--act-order", "--static-groups",
                                         "--no-true-sequential"]),
    "llmc-w3-asym": ("llmc", {"bits": 3, "sym": False}),
    "streamq-w3-asym-ao": ("streamq", ["--bits", "3", "--asym", "--act-order", "--static-groups"]),
    # the grid search (quant/grid.py fit_grid), act-order + static groups
    "streamq-asym-minmax": ("streamq", ["--bits", "4", "--asym", "--act-order", "--static-groups",
                                        "--grid-search", "minmax"]),
    "streamq-asym-mse": ("streamq", ["--bits", "4", "--asym", "--act-order", "--static-groups",
                                     "--grid-search", "mse"]),
    "streamq-sym-minmax": ("streamq", ["--bits", "4", "--sym", "--act-order", "--static-groups",
                                       "--grid-search", "minmax"]),
    "streamq-sym-mse": ("streamq", ["--bits", "4", "--sym", "--act-order", "--static-groups", "--grid-search", "mse"]),
    "streamq-w3-asym-minmax": ("streamq", ["--bits", "3", "--asym", "--act-order", "--static-groups",
                                           "--grid-search", "minmax"]),
    "streamq-w3-asym-mse": ("streamq", ["--bits", "3", "--asym", "--act-order", "--static-groups",
                                        "--grid-search", "mse"]),
    "streamq-default": ("streamq", ["--bits", "4"]),  # whatever the defaults are
    "streamq-w3-default": ("streamq", ["--bits", "3"]),
    "streamq-w3-asym": ("streamq", ["--bits", "3", "--asym", "--no-act-order"]),
}

PEER = r"""
import json, math, sys, time
start = time.perf_counter()  # as streamq's wall: imports, loading, calibration and quantization
import numpy as np, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
model_dir, windows, evals, bits, group, sym = sys.argv[1:7]
w, ev = np.load(windows, allow_pickle=False), np.load(evals, allow_pickle=False)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ds = Dataset.from_dict({"input_ids": w.tolist(), "attention_mask": np.ones_like(w).tolist()})
weights = {"num_bits": int(bits), "type": "int", "symmetric": sym == "True", "strategy": "group",
           "group_size": int(group)}
recipe = GPTQModifier(ignore=["lm_head"], config_groups={"g": {"targets": ["Linear"], "weights": weights}})
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(w), max_seq_length=w.shape[1],
        shuffle_calibration_samples=False)
seconds = time.perf_counter() - start
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
nll = 0.0
with torch.no_grad():
    for row in ev:
        ids = torch.from_numpy(row).long()[None]
        logits = model(ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
print(json.dumps({"seconds": seconds, "rss": rss, "ppl": math.exp(nll / (ev.shape[0] * (ev.shape[1] - 1)))}))
"""

# `streamq compress ...` in-process, then this process's peak RSS on stderr's last line
STREAMQ = """
import json, sys
from streamq.cli import main
from streamq.memstat import peak_rss_bytes
rc = main(sys.argv[1:])
print(json.dumps({"rss": peak_rss_bytes()}), file=sys.stderr)
sys.exit(rc)
"""


def streamq_run(streamq: str, args, flags: list[str], windows: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", STREAMQ, "compress", str(args.model), str(out), "--calib", str(windows),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--group-size", str(args.group_size),
           "--no-progress", *flags]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode:
        raise SystemExit(f"streamq compress failed:\n{p.stderr[-3000:]}")
    rss = json.loads(p.stderr.strip().splitlines()[-1])["rss"]
    ev = subprocess.run([streamq, "eval", str(out), "--data", str(args.test_text), "--seqlen", str(args.seqlen),
                         "--max-windows", str(args.eval_windows)], capture_output=True, text=True, check=True)
    ppl = float(ev.stdout.split("perplexity")[-1].split()[0])
    shutil.rmtree(out)
    return {"seconds": wall, "rss": rss, "ppl": ppl}


def peer_run(args, opts: dict, windows: Path, evals: Path, script: Path) -> dict:
    cmd = [args.peer_python, str(script), str(args.model), str(windows), str(evals), str(opts["bits"]),
           str(args.group_size), str(opts["sym"])]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"llm-compressor run failed:\n{p.stderr[-3000:]}")
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "wall_with_eval": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib-text", type=Path, required=True)
    ap.add_argument("--test-text", type=Path, required=True)
    ap.add_argument("--peer-python", help="python of a venv with llmcompressor (omit: streamq rows only)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rows", default="llmc-asym,streamq-asym-ao,streamq-sym-ao,streamq-asym,streamq-sym")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from streamq.calib.data import calibration_windows, eval_windows

    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if not args.peer_python:
        rows = [r for r in rows if ROWS[r][0] != "llmc"]
    streamq = str(Path(sys.executable).with_name("streamq"))
    work = Path(tempfile.mkdtemp(prefix="streamq-peers-"))
    tok = AutoTokenizer.from_pretrained(args.model)
    windows, evals, script = work / "windows.npy", work / "eval.npy", work / "peer.py"
    np.save(windows, calibration_windows(tok, str(args.calib_text), args.nsamples, args.seqlen).numpy())
    np.save(evals, eval_windows(tok, str(args.test_text), args.seqlen, args.eval_windows).numpy())
    script.write_text(PEER)
    results: dict[str, list[dict]] = {r: [] for r in rows}
    try:
        for k in range(args.repeats):
            for r in rows:
                tool, opts = ROWS[r]
                res = peer_run(args, opts, windows, evals, script) if tool == "llmc" else \
                    streamq_run(streamq, args, opts, windows, work / "out")
                results[r].append(res)
                print(f"# round {k + 1} {r}: {json.dumps(res)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.nsamples} x {args.seqlen} calibration windows, perplexity on {args.eval_windows} x {args.seqlen} "
          f"of {args.test_text.name}, g{args.group_size}, {os.cpu_count()} CPUs\n")
    print("| run | perplexity | wall | peak RSS |\n|---|---|---|---|")
    for r, rs in results.items():
        walls = [x["seconds"] for x in rs]
        wall = f"{min(walls):.0f}–{max(walls):.0f} s (mean {statistics.mean(walls):.0f})" if len(rs) > 1 \
            else f"{walls[0]:.0f} s"
        rss = max(x["rss"] for x in rs) / 1e9
        print(f"| {r} {' '.join(ROWS[r][1]) if isinstance(ROWS[r][1], list) else ROWS[r][1]} | "
              f"{statistics.mean(x['ppl'] for x in rs):.2f} | {wall} | {rss:.2f} GB |")


if __name__ == "__main__":
    main()
