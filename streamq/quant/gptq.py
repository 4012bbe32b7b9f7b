"""GPTQ (Frantar et al. 2022): quantize columns one by one, pushing each rounding error onto the columns
not yet quantized through the upper Cholesky factor of H^-1.

Follows IST-DASLab/gptq `fasterquant` (dead inputs, act-order, static groups, damping, lazy batches).
One deliberate difference: a lazy batch never straddles a group start (non-static groups), so every
group's grid is fitted on fully updated weights. The reference fits a group that starts mid-batch on
weights still missing that batch's updates, which makes its result depend on the batch width; with the
usual group_size == block_columns == 128 both agree.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.methods import QuantResult
from streamq.quant.grid import dequantize, fit_grid, quantize_codes


class GPTQResult(NamedTuple):
    """What gptq_quantize found for one Linear."""

    result: QuantResult
    loss: float  # the reference's sum of (w - q)^2 / d^2 / 2 over all weights
    damp: float  # damp fraction of mean diag(H) finally used (cfg.damp unless raised)


def inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp x10 (to 1.0 at most) on failure.

    Holds at most two [in, in] matrices besides H at a time (each intermediate is dropped once used)."""
    mean_diag = H.diagonal().mean()
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            inverse = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        if damp >= 1.0:
            raise StreamqError("GPTQ: Hessian is not positive definite even with damp 1.0 (degenerate inputs?)")
        damp = min(damp * 10, 1.0)
        warnings.warn(f"GPTQ: Hessian not positive definite; retrying with damp {damp:g}", RuntimeWarning)


def working_copies(W: Tensor, H: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Copies of W [out, in] and H [in, in] on W's device in fp32 (fp64 when W is fp64); H must be finite."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise StreamqError(f"{method}: Hessian has non-finite entries (inf/nan in the calibration activations?)")
    return W, H


def batch_bounds(cols: int, width: int, group: int | None) -> list[tuple[int, int]]:
    """[start, end) column ranges of the lazy batches: every `width` columns, also cut at every group start."""
    starts = set(range(0, cols, width)) | (set(range(0, cols, group)) if group else set())
    s = sorted(starts)
    return list(zip(s, s[1:] + [cols]))


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op thread count set to n inside the block (restored after). The column loop's ops are a
    few [rows, <=block_columns] slices each: a hand-off to another thread costs more than it saves (10x more on
    a loaded machine), and elementwise ops and rank-1 products give the same bits on any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(W: Tensor, H: Tensor, cfg: QuantConfig) -> GPTQResult:
    """Quantize W: [out, in] given H: [in, in] = 2/N sum x^T x (undamped), on W's device.

    Computes in fp32 (fp64 when W is fp64, which tests use to compare with a naive solver exactly);
    the caller's W and H are not modified. Returns original-column-order codes, per-group grids and
    g_idx (with act_order and non-static groups, groups follow the permuted order).
    """
    W, H = working_copies(W, H, "GPTQ")
    rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    n_groups = math.ceil(cols / gs)

    dead = H.diagonal() == 0  # inputs that are always 0: any weight works, 0 is cheapest to store
    H[dead, dead] = 1
    W[:, dead] = 0

    if cfg.static_groups:  # grids from the original weights, in original column order
        grids = [fit_grid(W[:, c : c + gs], cfg.bits, cfg.sym, cfg.full_range, cfg.grid_search)
                 for c in range(0, cols, gs)]
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    if cfg.act_order:  # (the identity permutation would only copy W and H)
        W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // gs).tolist()  # static group of the column at each permuted position
    Hinv, damp = inverse_cholesky(H, cfg.damp)
    del H  # the working copy: the column loop needs only Hinv

    codes, Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device), torch.zeros_like(W)
    scales, zeros = W.new_zeros(n_groups, rows), W.new_zeros(n_groups, rows)
    losses = W.new_zeros(rows)
    for i1, i2 in batch_bounds(cols, cfg.block_columns, None if cfg.static_groups else gs):
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1, C1, d1 = torch.zeros_like(W1), torch.zeros_like(W1), Hinv1.diagonal().tolist()
        with _intra_op_threads(1):
            for i in range(i2 - i1):
                c = i1 + i
                if cfg.static_groups:
                    scale, zero = grids[group_of[c]]
                elif c % gs == 0:  # a batch start (see batch_bounds): W[:, c:] has every earlier update
                    scale, zero = fit_grid(W[:, c : c + gs], cfg.bits, cfg.sym, cfg.full_range, cfg.grid_search)
                    scales[c // gs], zeros[c // gs] = scale, zero
                w = W1[:, i : i + 1]
                code = C1[:, i : i + 1] = quantize_codes(w, scale, zero, cfg.maxq)
                q = Q[:, c : c + 1] = dequantize(code, scale, zero)
                err = Err1[:, i : i + 1] = (w - q) / d1[i]
                losses += err[:, 0] ** 2 / 2  # per column, as the reference sums it (SpQR's loss matches)
                W1[:, i + 1 :] -= err @ Hinv1[i : i + 1, i + 1 :]  # column i itself is done
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
    if cfg.static_groups:
        scales, zeros = torch.stack([s for s, _ in grids]), torch.stack([z for _, z in grids])
    elif cfg.act_order:
        g_idx[perm] = g_idx.clone()  # group i // gs belongs to original column perm[i]
    if cfg.act_order:
        invperm = torch.argsort(perm)
        Q, codes = Q[:, invperm], codes[:, invperm]
    result = QuantResult(
        weight=Q.float(),  # exact: fp16-representable scale times a small integer
        codes=codes,
        scales=scales.float(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
    )
    return GPTQResult(result, losses.sum().item(), damp)
