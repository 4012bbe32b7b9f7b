"""The mse grid search on a real model's weights: time, and rows whose grid differs from the full search (not in CI).

    .venv/bin/python tools/bench_grid_search.py MODEL_DIR [--bits 4] [--sym] [--group-size 64] [--patience 20,10]
        [--layers 2,17,28] [--repeats 2] [--pow-error]

For each --patience value (and 0 = the full search over all 80 shrinks, the reference), fits every group of every
Linear weight ("*proj.weight") of the chosen layers with fit_groups(search="mse") and reports the idle wall time,
the shrinks tried per row (the error tensor's elements / weights), and how many rows' (scale, zero) differ from
the full search. Runs interleaved, --repeats times round; the smallest time is printed. --pow-error: each patience
also with the error's power taken by torch's pow (what grid._error computed before it took exp(norm * ln|d|)),
with the rows whose grid differs from the one grid._error gives at that patience.
"""
from __future__ import annotations

import argparse
import time

import torch
from safetensors import safe_open

import streamq.quant.grid as grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--patience", default="20,10")
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pow-error", action="store_true")
    a = ap.parse_args()
    f = safe_open(f"{a.model}/model.safetensors", "pt")
    layers = {f".layers.{i}." for i in a.layers.split(",")} if a.layers else None
    weights = [f.get_tensor(n).float() for n in f.keys() if n.endswith("proj.weight")
               and (layers is None or any(k in n for k in layers))]
    patiences = [0] + [int(p) for p in a.patience.split(",")]
    counted = [0]
    errors = {"": grid._error, " (pow)": pow_error}

    def run(patience, kind):
        grid.MSE_PATIENCE = patience or len(range(int(grid.MSE_MAXSHRINK * grid.MSE_STEPS)))
        counted[0] = 0

        def counting(x, scale, zero, maxq, out):
            counted[0] += out.numel()
            return errors[kind](x, scale, zero, maxq, out)

        grid._error = counting
        start = time.perf_counter()
        fits = [grid.fit_groups(W, a.group_size, a.bits, a.sym, search="mse") for W in weights]
        return time.perf_counter() - start, counted[0], fits

    runs = [(p, k) for p in patiences for k in ([""] + [" (pow)"] * a.pow_error)]
    seconds, results = {r: [] for r in runs}, {}
    for _ in range(a.repeats):
        for r in runs:
            t, n, fits = run(*r)
            seconds[r].append(t)
            results[r] = (n, fits)
    total = sum(W.numel() for W in weights)
    rows = sum(s.numel() for s, _ in results[0, ""][1])
    print(f"{len(weights)} Linears, {total / 1e6:.1f}M weights, {rows} group rows, w{a.bits} "
          f"{'sym' if a.sym else 'asym'} g{a.group_size}")
    for p, k in runs:
        n, fits = results[p, k]
        versus = (p, "") if k else (0, "")  # pow: against exp-log at the same patience; else the full search
        differ = sum(int(((s != s0) | (z != z0)).sum()) for (s, z), (s0, z0) in zip(fits, results[versus][1]))
        print(f"patience {p or 'none (full search)'}{k}: {min(seconds[p, k]):.2f} s, {n / total:.1f} shrinks a row, "
              f"{differ} rows differ from {'the full search' if not k else 'the same patience with exp(norm * ln|d|)'}")


def pow_error(x, scale, zero, maxq, out):
    """grid._error with |d|^norm taken by torch's pow."""
    q = torch.div(x, scale, out=out).round_().add_(zero).clamp_(0, maxq)
    q.sub_(zero).mul_(scale).sub_(x).abs_().pow_(grid.MSE_NORM)
    return q.sum(dim=-1)


if __name__ == "__main__":
    main()
