"""HessianAccumulator.add over one block's worth of samples at each strip count (quant/hessian.py _STRIPS),
interleaved rounds; checks that every strip count gives the same bits as the first.

    python tools/bench_hessian.py [--strips 8,4,2,1] [--widths 576,1536] [--nsamples 32] [--seqlen 512] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import streamq.quant.hessian as hessian


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strips", default="8,4,2,1")
    ap.add_argument("--widths", default="576,1536")  # SmolLM2-135M: hidden, intermediate
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    strips, widths = [int(s) for s in args.strips.split(",")], [int(w) for w in args.widths.split(",")]
    g = torch.Generator().manual_seed(0)
    xs = {d: [torch.randn(1, args.seqlen, d, generator=g) for _ in range(args.nsamples)] for d in widths}
    seconds, first, same = {}, {}, {}
    for _ in range(args.rounds):
        for s in strips:
            hessian._STRIPS = s  # measurement only
            for d in widths:
                acc = hessian.HessianAccumulator(d)
                start = time.perf_counter()
                for x in xs[d]:
                    acc.add(x)
                H = acc.H
                seconds.setdefault((s, d), []).append(time.perf_counter() - start)
                first.setdefault(d, H)
                same[s, d] = same.get((s, d), True) and torch.equal(H, first[d])
    for (s, d), v in sorted(seconds.items()):
        print(f"{s} strips, width {d}: median {statistics.median(v) * 1e3:.0f} ms for {args.nsamples} x "
              f"{args.seqlen} tokens (rounds {', '.join(f'{t * 1e3:.0f}' for t in v)}); same bits: {same[s, d]}")


if __name__ == "__main__":
    main()
