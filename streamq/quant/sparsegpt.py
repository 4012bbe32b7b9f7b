"""SparseGPT (Frantar & Alistarh 2023): prune (and quantize) a Linear in one pass over its columns, pushing each
column's pruning + rounding error onto the columns not yet done through the upper Cholesky factor of H^-1.

Follows IST-DASLab/sparsegpt `fasterprune` (blocksize 128, percdamp 0.01, prunen/prunem, joint quantization):
the mask score of a weight is w^2 / diag(U)^2 (U the Cholesky factor), taken on the weights as updated so far.
  unstructured: at the start of every `block_columns`-wide block, the int(sparsity * rows * width) lowest
                scores of the whole [rows, width] block are pruned (the reference prunes those <= the score at
                that index: one more, and every tie);
  N:M:          at the start of every M consecutive input columns, the N lowest scores of each row.
Kept weights are rounded to the GPTQ grid (quant/grid.py, a group's grid fitted on its updated weights with the
already pruned ones set to 0, so a pruned weight is exactly the zero code) or, with bits 16 (prune only), to
fp16, the dense layout's dtype; the rounding error is part of the error fed forward. The reference fits one
grid per row up front. Lazy batches are cut at group starts as in quant/gptq.py.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.device import all_finite
from streamq.errors import StreamqError
from streamq.quant.gptq import batch_bounds, intra_op_threads, inverse_cholesky, working_copies
from streamq.quant.grid import dequantize, fit_grid, quantize_codes


class SparseResult(NamedTuple):
    """One pruned Linear: QuantResult's fields (None with bits 16, prune only) and the mask's size.

    Invariant (bits < 16): weight[r, c] == scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r]) in fp32;
    pruned weights are 0 (their code is the zero point)."""

    weight: Tensor  # [out, in] fp32 pruned (and dequantized) weight; bits 16: fp16-representable
    codes: Tensor | None  # [out, in] uint8 codes in [0, maxq]
    scales: Tensor | None  # [n_groups, out] fp32 (fp16-representable)
    zeros: Tensor | None  # [n_groups, out] uint8
    g_idx: Tensor | None  # [in] int32
    pruned: int  # weights the mask set to 0


class SparseGPTOutput(NamedTuple):
    result: SparseResult
    loss: float  # sum of (w - q)^2 / d^2 / 2 over all weights, as the reference's Losses
    damp: float  # damp fraction of mean diag(H) finally used


def parse_mask(spec: str) -> tuple[int, int]:
    """'0:0' -> (0, 0) (unstructured); 'N:M' -> (N, M) with 0 < N < M; else StreamqError."""
    try:
        n, m = (int(v) for v in str(spec).split(":"))
    except ValueError:
        n = m = -1
    if (n, m) != (0, 0) and not 0 < n < m:
        raise StreamqError(f"--mask-structure {spec!r}: use 0:0 (unstructured) or N:M with 0 < N < M "
                           "(N zeros in every M consecutive input columns, e.g. 2:4)")
    return n, m


def _lowest(scores: Tensor, k: int, dim: int | None = None) -> Tensor:
    """Bool mask of the k lowest entries of scores along dim (None: of all entries), ties to the lower index."""
    if dim is None:
        return _lowest(scores.reshape(1, -1), k, 1).reshape(scores.shape)
    order = torch.sort(scores, dim=dim, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(dim, order.narrow(dim, 0, k), True)


def sparsegpt_prune(W: Tensor, H: Tensor, cfg: QuantConfig) -> SparseGPTOutput:
    """Prune W: [out, in] to cfg.sparsity / cfg.mask_structure given H: [in, in] = 2/N sum x^T x (undamped),
    quantizing the kept weights to cfg.bits (16: fp16) in the same pass, on W's device.

    Computes in fp32 (fp64 when W is fp64); W and H are not modified."""
    W, H = working_copies(W, H, "SparseGPT")
    rows, cols = W.shape
    n, m = parse_mask(cfg.mask_structure)
    if m and cols % m:
        raise StreamqError(f"SparseGPT --mask-structure {cfg.mask_structure}: in_features {cols} is not a "
                           f"multiple of {m}")
    quantized = cfg.bits != 16
    gs = cols if cfg.group_size == -1 or not quantized else cfg.group_size

    dead = H.diagonal() == 0  # inputs that are always 0: their weights are 0, the first to be pruned
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = inverse_cholesky(H, cfg.damp)
    del H
    diag = Hinv.diagonal()

    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device) if quantized else None
    n_groups = math.ceil(cols / gs)
    scales, zeros = W.new_zeros(n_groups, rows), W.new_zeros(n_groups, rows)
    losses = W.new_zeros(rows)
    width = cfg.block_columns
    for i1, i2 in batch_bounds(cols, width, gs if quantized else None):
        if n == 0 and i1 % width == 0:  # a mask block starts: W[:, i1:] holds every earlier update
            e = min(i1 + width, cols)
            scores = W[:, i1:e] ** 2 / diag[i1:e] ** 2
            mask[:, i1:e] = _lowest(scores, int(scores.numel() * cfg.sparsity))
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1, d1 = torch.zeros_like(W1), Hinv1.diagonal()
        with intra_op_threads(1):
            for i in range(i2 - i1):
                c = i1 + i
                if n and c % m == 0:  # i1 is a multiple of m (cfg check), so the M columns lie in W1
                    mask[:, c:c + m] = _lowest(W1[:, i:i + m] ** 2 / d1[i:i + m] ** 2, n, dim=1)
                if quantized and c % gs == 0:  # a batch start (batch_bounds): W[:, c:] is fully updated
                    kept = torch.where(mask[:, c:c + gs], 0.0, W[:, c:c + gs])
                    scale, zero = fit_grid(kept, cfg.bits, cfg.sym, cfg.full_range, cfg.grid_search)
                    scales[c // gs], zeros[c // gs] = scale, zero
                w = W1[:, i]
                q = torch.where(mask[:, c], 0.0, w)[:, None]
                if quantized:
                    code = codes[:, c:c + 1] = quantize_codes(q, scale, zero, cfg.maxq)
                    q = dequantize(code, scale, zero)
                else:
                    q = q.half().to(q.dtype)
                Q[:, c:c + 1] = q
                err = (w - q[:, 0]) / d1[i]
                losses += err ** 2 / 2
                W1[:, i + 1:] -= err[:, None] @ Hinv1[i:i + 1, i + 1:]
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if not all_finite(Q):
        raise StreamqError("SparseGPT --bits 16: a kept weight exceeds fp16's range")
    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
    result = SparseResult(weight=Q.float(), codes=codes, scales=scales.float() if quantized else None,
                          zeros=zeros.to(torch.uint8) if quantized else None, g_idx=g_idx if quantized else None,
                          pruned=int(mask.sum()))
    return SparseGPTOutput(result, losses.sum().item(), damp)
