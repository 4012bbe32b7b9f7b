"""One decoder block's forward on captured kwargs: shared by calibration capture, the solvers and the pipeline."""
from __future__ import annotations

import torch
from torch import nn


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block forward: hidden [1, seq, hidden] -> [1, seq, hidden] (tuple outputs unwrapped)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_hooked(block: nn.Module, hidden: torch.Tensor, kwargs: dict, hooks: list) -> torch.Tensor:
    """run_block with the hook handles `hooks` registered on block's modules, all removed afterwards (also when
    the forward raises)."""
    try:
        return run_block(block, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()


def batched_kwargs(kwargs: dict, n: int, device: torch.device) -> dict:
    """kwargs captured for one sample -> on device, for n samples (n=1: just moved). Tensors of 2+ dims with
    leading dim 1 (position ids and embeddings, [1, 1, seq, seq] masks) are expanded as views: the samples
    share positions and mask, so this is the per-sample forward computed as one batch."""
    def expand(v):
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            return v.expand(n, *v.shape[1:]) if v.dim() >= 2 and v.shape[0] == 1 else v
        if isinstance(v, tuple):
            return tuple(expand(x) for x in v)
        return v
    return {k: expand(v) for k, v in kwargs.items()}
