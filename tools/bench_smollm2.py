"""Benchmark: SmolLM2-135M fp vs RTN vs GPTQ (and AutoRound) perplexity, peak RSS and wall time on this machine.

    python tools/bench_smollm2.py --calib ../shared/data/austen-calib.txt --data ../shared/data/austen-test.txt

Each step runs in its own subprocess so its peak RSS (ru_maxrss) is its own. Results are appended as JSON
lines to --results and printed as a markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STEP = """
import json, sys, time
from streamq.memstat import peak_rss_bytes
import streamq
args = json.loads(sys.argv[1])
t = time.perf_counter()
extra = {}
if args["kind"] == "compress":
    out = streamq.compress(args["model"], args["out"], progress=False, **args["kw"])
    value = None
    report = json.loads((out / "streamq_report.json").read_text())
    extra = {k: report[k] for k in ("bits_per_quantized_weight", "bits_per_parameter", "outlier_share") if k in report}
else:
    value = streamq.evaluate(args["model"], args["data"], seqlen=args["seqlen"], max_windows=args["windows"],
                             progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "ppl": value,
                  "peak_rss_mb": peak_rss_bytes() / 2**20, **extra}))
"""


def step(args: dict) -> dict:
    """Run one compress/eval step in a fresh interpreter; return its seconds, perplexity and peak RSS (MB)."""
    r = subprocess.run([sys.executable, "-c", STEP, json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"step failed: {args}\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def common_arguments(p: argparse.ArgumentParser, nsamples: int) -> None:
    """Model, calibration and evaluation flags shared with tools/bench_autoround_package.py."""
    p.add_argument("--model", default=None, help="source folder (default: the cached SmolLM2, fetched if needed)")
    p.add_argument("--calib", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window (stride = seqlen)")
    p.add_argument("--windows", type=int, default=20, help="evaluation windows")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("bench-out"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, nsamples=64)
    p.add_argument("--configs", default="rtn:4,gptq:4,rtn:3,gptq:3", help="method:bits list")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON",
                   help="extra compress arguments, e.g. iters=50 batch_size=4 (AutoRound), "
                   "preset='\"near-lossless\"' (SpQR; explicit bits/group size win)")
    p.add_argument("--skip-fp", action="store_true", help="do not evaluate the source model")
    p.add_argument("--results", type=Path, default=None, help="JSON lines file (default: WORK/results.jsonl)")
    a = p.parse_args()
    if a.model is None:
        from streamq.fetch import ensure_smollm2
        a.model = str(ensure_smollm2())
    results = a.results or a.work / "results.jsonl"
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    evaluate = dict(kind="eval", data=a.data, seqlen=a.seqlen, windows=a.windows)
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    if not a.skip_fp:
        record({"config": "fp (bf16 source)", **step({**evaluate, "model": a.model})})
    for spec in a.configs.split(","):
        method, bits = spec.split(":")
        out = a.work / f"{method}-w{bits}g{a.group_size}"
        kw = dict(method=method, bits=int(bits), group_size=a.group_size, calib=a.calib, nsamples=a.nsamples,
                  seqlen=a.calib_seqlen, resume="restart", **extra)
        made = step({"kind": "compress", "model": a.model, "out": str(out), "kw": kw})
        ev = step({**evaluate, "model": str(out)})
        record({"config": f"{method} w{bits} g{a.group_size} {' '.join(a.set)}".strip(), "ppl": ev["ppl"],
                "compress_seconds": made["seconds"], "compress_peak_rss_mb": made["peak_rss_mb"],
                "eval_seconds": ev["seconds"], "eval_peak_rss_mb": ev["peak_rss_mb"],
                **{k: v for k, v in made.items() if k.startswith(("bits_", "outlier_"))}})
    print(f"\n| config | ppl ({a.windows}x{a.seqlen}) | compress s | compress peak RSS MB | eval s | eval peak RSS MB "
          "| stored bits/weight | SpQR bits/param | outlier share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spqr = (f"{r['bits_per_parameter']:.3f} | {100 * r['outlier_share']:.2f}%" if "bits_per_parameter" in r
                else " | ")
        stored = f"{r['bits_per_quantized_weight']:.3f}" if "bits_per_quantized_weight" in r else ""
        print(f"| {r['config']} | {r['ppl']:.3f} | {r.get('compress_seconds', 0):.0f} | "
              f"{r.get('compress_peak_rss_mb', 0):.0f} | {r.get('eval_seconds', r.get('seconds')):.0f} | "
              f"{r.get('eval_peak_rss_mb', r.get('peak_rss_mb')):.0f} | {stored} | {spqr} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
