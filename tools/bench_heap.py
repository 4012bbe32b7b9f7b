"""Memory allocator settings against a compress run: wall, CPU, page faults, peak RSS, disk writes (not in CI).

    .venv/bin/python tools/bench_heap.py MODEL --calib CALIB [--nsamples 32 --seqlen 512] [--repeats 2]
        [--rows trim-128k,streamq,trim-64m,thp] [-- extra compress flags]

Each row is `streamq compress MODEL OUT --calib CALIB ...` in a fresh child process with one glibc setting in its
environment: "streamq" none (footprint.bound_heap: allocations of 4 MiB or more mapped on their own, up to
TRIM_THRESHOLD of free heap kept), "trim-128k" glibc's own 128 KiB trim threshold (what bound_heap left before it
set one), "trim-16m" / "trim-64m" / "trim-256m" other trim thresholds, "thp" torch's tensors of 2 MiB or more on
transparent huge pages (THP_MEM_ALLOC_ENABLE=1; on SmolLM2-135M half the page faults, 0.6 s less system time, the
same wall and peak over 3 rounds, so streamq leaves it unset). Rows run in turn, --repeats times round
(interleaved), so load on the machine hits all rows alike; the output bytes must not depend on the row (their
sha256 is printed).
Wall is the child's; user / sys CPU seconds, minor page faults and peak RSS come from its wait4 rusage (the
peak RSS would include this small parent's at fork, which is far below a compress run's). "disk MB" is what the
device holding the run's folder wrote while the child ran (/sys/dev/block/*/stat, "-" where unreadable): the
output, the activation store and whatever else reached the disk then (the machine otherwise idle).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {
    "streamq": {},
    "trim-128k": {"MALLOC_TRIM_THRESHOLD_": str(128 << 10)},
    "trim-16m": {"MALLOC_TRIM_THRESHOLD_": str(16 << 20)},
    "trim-64m": {"MALLOC_TRIM_THRESHOLD_": str(64 << 20)},
    "trim-256m": {"MALLOC_TRIM_THRESHOLD_": str(256 << 20)},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def sectors_written(folder: Path) -> int | None:
    """512-byte sectors the block device holding folder has written since boot (None where unknown)."""
    dev = os.stat(folder).st_dev
    try:
        return int(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()[6])
    except (OSError, IndexError, ValueError):
        return None


def run(args, env: dict, out: Path) -> dict:
    cmd = [sys.executable, "-m", "streamq.cli", "compress", args.model, str(out), "--calib", args.calib,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--no-progress", *args.extra]
    os.sync()  # (earlier runs' dirty pages are not this run's writes)
    sectors, start = sectors_written(out.parent), time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    after = sectors_written(out.parent)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.decode()[-2000:]}")
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16]
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt,
            "rss_mb": usage.ru_maxrss / 1024, "disk_mb": None if after is None else (after - sectors) / 2048,
            "sha": digest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="a text file or a .npy/.pt/.jsonl of token windows")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", default="trim-128k,streamq,trim-64m,no-thp")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]  # more compress flags, after --
    rows = args.rows.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_heap_"))
    results: dict[str, list[dict]] = {r: [] for r in rows}
    try:
        for k in range(args.repeats):
            for r in rows:
                shutil.rmtree(work / "out", ignore_errors=True)
                res = run(args, ROWS[r], work / "out")
                results[r].append(res)
                print(f"# round {k + 1} {r}: {res}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| setting | wall s | user s | sys s | minor faults | peak RSS MB | disk MB | model sha256 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        rs = results[r]
        def span(key, f="{:.1f}"):  # "low–high" over the rounds (one figure when they agree)
            return "–".join(dict.fromkeys(f.format(v) for v in (min(x[key] for x in rs), max(x[key] for x in rs))))
        disk = span("disk_mb", "{:.0f}") if all(x["disk_mb"] is not None for x in rs) else "-"
        print(f"| {r} | {span('wall')} | {span('user')} | {span('sys')} | {span('minflt', '{:,}')} | "
              f"{span('rss_mb', '{:.0f}')} | {disk} | {', '.join(sorted({x['sha'] for x in rs}))} |")


if __name__ == "__main__":
    main()
