"""Round-to-nearest: data-free min/max grids per group (quant/rtn.py)."""
from __future__ import annotations

from streamq.methods import Method
from streamq.quant.rtn import rtn_quantize


def solve(W, H, cfg):
    return rtn_quantize(W, cfg), 0.0, 0.0


METHOD = Method(name="rtn", fields=("full_range", "grid_search"), solve=solve, calibrated=False, footprint="rtn", estimate="rtn",
                reference="tests.reference:reference_quantize")
