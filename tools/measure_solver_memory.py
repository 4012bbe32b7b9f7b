"""Measure the RAM one Linear's GPTQ solve takes beyond its weight and Hessian, against streamq/footprint.py.

    for s in "4096 4096" "11008 4096" "4096 11008" "1024 8192" "8192 1024" "2048 2048"; do
        python tools/measure_solver_memory.py $s; done

Each call is a fresh process (ru_maxrss is a process-lifetime peak): bound_heap() as compress sets it under a
budget, a random fp32 W [OUT, IN] and H [IN, IN] made first, then gptq_quantize + relative_output_error.
Prints the measured extra bytes and footprint.solver_bytes' prediction (an upper bound by construction).
"""
import json
import sys

import psutil
import torch

from streamq.config import QuantConfig
from streamq.footprint import bound_heap, solver_bytes
from streamq.memstat import peak_rss_bytes
from streamq.quant.gptq import gptq_quantize
from streamq.quant.hessian import relative_output_error


def main() -> None:
    out, inp = map(int, sys.argv[1:3])
    bound_heap()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, inp, generator=g)
    H = X.t() @ X / 256
    del X
    W = torch.randn(out, inp, generator=g) * 0.02
    base = psutil.Process().memory_info().rss
    r = gptq_quantize(W, H, QuantConfig(group_size=128))
    relative_output_error(W, r.result.weight, H)
    extra = peak_rss_bytes() - base
    print(json.dumps({"out": out, "in": inp, "measured_mb": round(extra / 2**20),
                      "predicted_mb": round(solver_bytes("gptq", out, inp, 4) / 2**20)}))


if __name__ == "__main__":
    main()
