"""Benchmark: what durability (fsync of shards, activation store, manifest and folders) costs a compression run.

    python tools/bench_durability.py [--layers 6 --hidden 128 --nsamples 16 --seqlen 128 --runs 3]

Builds a small random llama once (tests/conftest.py's make_tiny_model), then compresses it --runs times with
the real os.fsync and --runs times with os.fsync replaced by a no-op, alternating, all in this one process
(imports paid once), each into a fresh folder under --work. Prints seconds per run, the fsync calls per run
and the seconds spent inside them. The no-op patch lives here only; the package always fsyncs. Note that the
overhead depends on the file system and disk under --work (tmpfs: none).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="runs per mode")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="folder for model and outputs (default: a temp folder)")
    a = p.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="streamq-bench-", dir=a.work))
    try:
        bench(a, work)
    finally:
        shutil.rmtree(work)


def bench(a: argparse.Namespace, work: Path) -> None:
    import streamq
    from tests.conftest import make_tiny_model

    model = make_tiny_model(work / "model", "llama", n_layers=a.layers, shards=2, hidden=a.hidden,
                            inter=2 * a.hidden)
    real_fsync = os.fsync
    stats = {"calls": 0, "seconds": 0.0}

    def timed_fsync(fd):
        start = time.perf_counter()
        real_fsync(fd)
        stats["calls"] += 1
        stats["seconds"] += time.perf_counter() - start

    results = {"fsync": [], "no fsync": []}
    inside = []
    for run in range(2 * a.runs):
        mode = "fsync" if run % 2 == 0 else "no fsync"
        os.fsync = timed_fsync if mode == "fsync" else (lambda fd: None)
        stats.update(calls=0, seconds=0.0)
        out = work / f"out{run}"
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the per-block error lines
                streamq.compress(model, out, calib=str(model / "calib.txt"), nsamples=a.nsamples,
                                 seqlen=a.seqlen, group_size=64, shard_size=2 * a.hidden * a.hidden * a.layers,
                                 progress=False)
        finally:
            os.fsync = real_fsync
        seconds = time.perf_counter() - start
        results[mode].append(seconds)
        if mode == "fsync":
            inside.append((stats["calls"], stats["seconds"]))
        print(f"run {run + 1}: {mode:8s} {seconds:7.2f} s" + (f"  ({stats['calls']} fsyncs, "
              f"{stats['seconds']:.3f} s inside)" if mode == "fsync" else ""), flush=True)
        shutil.rmtree(out)
    fs, nofs = statistics.median(results["fsync"]), statistics.median(results["no fsync"])
    print(f"median: fsync {fs:.2f} s, no fsync {nofs:.2f} s, overhead {fs - nofs:+.2f} s "
          f"({100 * (fs / nofs - 1):+.1f}%); inside fsync {statistics.median(s for _, s in inside):.3f} s "
          f"over {inside[0][0]} calls per run")


if __name__ == "__main__":
    main()
