"""Time gptq_quantize on realistic Linear shapes, interleaved A/B against another copy of gptq.py.

    .venv/bin/python tools/bench_gptq_solve.py [--baseline OLD_GPTQ.py] [--rounds 5] [--threads N] [--with-factor]

With --baseline, the file is imported as module `baseline_gptq` (e.g. `git show HEAD~1:streamq/quant/gptq.py >
/tmp/old_gptq.py`), both solvers run alternately on the same problems and their results are compared exactly.
--with-factor times the Hessian's factor too (each call gets a copy of H, so nothing is reused; without it the
factor is computed once per shape, as the Linears sharing one input share it). Not a test: a measurement (the
machine's load shows in the figures)."""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from streamq.config import QuantConfig
from streamq.quant.gptq import gptq_quantize


def problem(out: int, inp: int, seed: int = 0):
    """W [out, in] ~ 0.02 N(0,1); H = 2/N X^T X of correlated inputs (N = 4 in)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * inp, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * 0.1 + torch.eye(inp))
    return torch.randn(out, inp, generator=g) * 0.02, 2 / X.shape[0] * X.T @ X


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="1536x576,576x1536")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--with-factor", action="store_true", help="a fresh copy of H per call: the factor is timed too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    solvers = {"new": gptq_quantize}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_gptq", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        solvers = {"old": mod.gptq_quantize, "new": gptq_quantize}
    cfg = QuantConfig(bits=4, group_size=64, act_order=True, static_groups=True)
    for shape in args.shapes.split(","):
        out, inp = map(int, shape.split("x"))
        W, H = problem(out, inp)
        times = {k: [] for k in solvers}
        results = {}
        for _ in range(args.rounds):
            for k, f in solvers.items():
                h = H.clone() if args.with_factor else H
                t = time.perf_counter()
                results[k] = f(W, h, cfg)
                times[k].append(time.perf_counter() - t)
        line = "  ".join(f"{k} median {statistics.median(v):.3f}s (min {min(v):.3f})" for k, v in times.items())
        same = ""
        if len(results) == 2:
            a, b = results["old"].result, results["new"].result
            same = "  identical" if all(torch.equal(x, y) for x, y in zip(a, b)) else "  RESULTS DIFFER"
            same += f", loss rel diff {abs(results['old'].loss - results['new'].loss) / results['old'].loss:.1e}"
        print(f"{shape} g64 act-order+static, threads {torch.get_num_threads()}: {line}{same}")


if __name__ == "__main__":
    main()
