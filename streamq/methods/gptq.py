"""GPTQ (Frantar et al. 2022): Hessian-guided column-by-column rounding with error feedback (quant/gptq.py)."""
from __future__ import annotations

from streamq.methods import Method
from streamq.quant.gptq import gptq_quantize


def solve(W, H, cfg):
    out = gptq_quantize(W, H, cfg)
    return out.result, out.loss, out.damp, out.error_num


# act-order with static groups is the default (issue 14: 28.17 vs 30.71 perplexity on SmolLM2-135M w4 g64), and the
# mse grid search (27.74 vs 28.21 asym); asymmetric grids below 8 bits (27.74 vs 28.30 sym, the same bits per weight in
# the GPTQ layout; README "Results"). Symmetric where only that is read: the full-range grid, 8 bits (W8A8, GGUF Q8_0).
METHOD = Method(
    name="gptq",
    fields=("full_range", "act_order", "static_groups", "damp", "block_columns", "true_sequential", "grid_search"),
    defaults={"sym": lambda c: c["full_range"] or c["bits"] >= 8, "act_order": True,
              "static_groups": lambda c: c["act_order"], "grid_search": "mse"},
    solve=solve,
    reference="tests.reference:reference_quantize",
)
