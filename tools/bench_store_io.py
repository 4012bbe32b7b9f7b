"""Per-sample write time of the activation store: ActivationStore.write (its own chunk-file write) against zarr's
Array.__setitem__ of the same samples, interleaved rounds, plus a read-back check.

    python tools/bench_store_io.py [--nsamples 32 --seqlen 512 --hidden 576 --rounds 5] [--folder DIR]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from streamq.calib.store import ActivationStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--folder", default=None, help="where the store goes (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as d:
        store = ActivationStore.on_disk(f"{d}/store", args.nsamples, args.seqlen, args.hidden, torch.float32, True)
        xs = [torch.randn(1, args.seqlen, args.hidden) for _ in range(args.nsamples)]
        ms = {"ActivationStore.write": [], "zarr setitem": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            for i, x in enumerate(xs):
                store.write("a", i, x)
            ms["ActivationStore.write"].append((time.perf_counter() - start) / len(xs) * 1e3)
            start = time.perf_counter()
            for i, x in enumerate(xs):
                store._arrays["b"][i:i + 1] = x.numpy()
            ms["zarr setitem"].append((time.perf_counter() - start) / len(xs) * 1e3)
        same = all(torch.equal(store.read("a", i), x) for i, x in enumerate(xs))
        store.delete()
    mb = args.seqlen * args.hidden * 4 / 1e6
    for name, v in ms.items():
        print(f"{name:22s} median {statistics.median(v):.2f} ms a sample ({mb:.2f} MB), rounds "
              f"{', '.join(f'{t:.2f}' for t in v)}")
    print(f"read back equal: {same}")


if __name__ == "__main__":
    main()
