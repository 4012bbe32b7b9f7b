"""Round-to-nearest: every group of columns snapped to its own min/max grid, no error feedback."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.methods import QuantResult
from streamq.quant.grid import dequantize, fit_grid, quantize_codes


def rtn_quantize(W: Tensor, cfg: QuantConfig) -> QuantResult:
    """Quantize W: [out, in] fp32 group by group (cfg.group_size consecutive columns, -1 = all)."""
    W = W.float()
    rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    n_groups = math.ceil(cols / gs)

    codes = torch.empty_like(W)
    weight = torch.empty_like(W)
    scales = W.new_empty(n_groups, rows)
    zeros = W.new_empty(n_groups, rows)
    for g, c0 in enumerate(range(0, cols, gs)):
        block = W[:, c0 : c0 + gs]
        scales[g], zeros[g] = fit_grid(block, cfg.bits, cfg.sym, cfg.full_range, cfg.grid_search)
        codes[:, c0 : c0 + gs] = quantize_codes(block, scales[g], zeros[g], cfg.maxq)
        weight[:, c0 : c0 + gs] = dequantize(codes[:, c0 : c0 + gs], scales[g], zeros[g])

    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
    return QuantResult(weight, codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx)
