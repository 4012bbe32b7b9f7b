"""SpQR (Dettmers et al. 2023): GPTQ on small groups whose scales and zeros are themselves quantized, plus
unstructured outliers kept in fp16.

Follows the reference engine (Vahe1994/SpQR `spqr_engine.py`, `quant_groups.py`): columns quantized one by one
with inverse-Hessian error feedback in lazy batches; each group of `group_size` columns gets per-row asymmetric
min-max statistics, fitted on the error-updated weights when the group starts, leaving out the weights whose
leave-one-out error reduction exceeds the threshold; those statistics are quantized again over groups of
`qq_groupsize` output rows (the dequantized values are what the weights are quantized with); a weight whose
error ((w - q) / U[c, c])^2 exceeds tau * mean_c(Var_rows W[:, c] / U[c, c]^2) is an outlier (U: the upper
Cholesky factor of H^-1; the leave-one-out step uses the same absolute threshold).

Deliberate differences from the reference, so the packed layer (formats/spqr.py) reproduces `weight` exactly:
  1. the second-level scale/zero are rounded to fp16 (how they are stored) before the statistics' codes are
     computed; the reference computes codes with fp32 values and stores fp16 ones;
  2. an outlier is stored as an fp16 correction added to the dense value of its own code (the reference keeps
     the fp32 weight in the engine, stores it in fp16 and codes 0 there): the engine feeds back the error of
     that rounded value, and kernels add outliers with no masking of the dense part;
  3. without second-level quantization the statistics are GPTQ's grid (`grid.fit_grid`, asym: the range contains
     0, fp16 scale, integer zero), so with tau = inf SpQR is exactly streamq's GPTQ; the reference keeps its
     float-zero min-max grid there;
  4. as in gptq.py: lazy batches are cut at group starts, dead inputs get H[i, i] = 1 before damping, and damp is
     raised on a Cholesky failure.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.quant.gptq import (batch_bounds, intra_op_threads, inverse_cholesky, spread, sub_batches,
                                 working_copies)
from streamq.quant.grid import _FP16_MAX, check_group_size, dequantize, fit_grid, quantize_codes

_EPS = 1e-9  # the reference's floor for a scale in a division
_FP16_SMALLEST = 2.0**-24  # smallest positive fp16 (subnormal): keeps a stored second-level scale positive


class SecondLevel(NamedTuple):
    """A first-level statistic (scale or zero) [n_groups, out] quantized over groups of qq_groupsize rows.

    Invariant: value[g, r] == scale[g, r // qq] * (codes[g, r] - zero[g, r // qq]) in the engine's dtype.
    """

    codes: Tensor  # [n_groups, out] uint8 in [0, 2**qq_bits - 1]
    scale: Tensor  # [n_groups, out // qq_groupsize] fp16-representable
    zero: Tensor  # [n_groups, out // qq_groupsize] fp16-representable, not an integer


class SpQRResult(NamedTuple):
    """One SpQR-quantized Linear. Columns are quantized in the order perm (codes and groups follow it):

    weight[:, perm[j]] == scale[j // gs, :, None] * (codes[:, j] - zero[j // gs, :, None]) + outliers, where the
    outliers (CSR over rows, original column indices) add their fp16 value to their entry.
    """

    weight: Tensor  # [out, in] fp32 dequantized weight, original column order
    codes: Tensor  # [out, in] uint8 in [0, 2**bits - 1], permuted column order
    scale: Tensor  # [n_groups, out] first-level scales the weights were quantized with (dequantized)
    zero: Tensor  # [n_groups, out] first-level zero points (integers without second-level quantization)
    scale_qq: SecondLevel | None  # second-level quantization of scale (None: scale is stored in fp16)
    zero_qq: SecondLevel | None  # second-level quantization of zero (None: zero is stored as a `bits` integer)
    perm: Tensor  # [in] int64: position j quantized original column perm[j]
    outlier_row_ptr: Tensor  # [out + 1] int64 CSR row pointers
    outlier_col: Tensor  # [n_outliers] int64 original column, increasing within a row
    outlier_val: Tensor  # [n_outliers] fp16 added to the dense value
    loss: float  # the reference's sum of ((w - q) / U[i, i])^2 / 2 (U: upper Cholesky factor of H^-1)
    n_outliers: int
    damp: float  # damp fraction of mean diag(H) finally used


def minmax_grid(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The reference's asymmetric grid over the last dim of x: [..., n] -> (scale, zero) [...], zero not rounded.

    The range is [min, max] (not widened to contain 0); a constant slice gets [-1, 1], as in the reference.
    """
    xmin, xmax = x.min(-1).values, x.max(-1).values
    flat = xmin == xmax
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / ((1 << bits) - 1)
    return scale, -xmin / scale


def quantize_float_zero(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """clamp(round(x / scale + zero), 0, maxq) as floats; x: [..., n], scale/zero: [...] (reference `quantize`)."""
    return torch.clamp(torch.round(x / scale.clamp_min(_EPS)[..., None] + zero[..., None]), 0, maxq)


def dequantize_float_zero(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """scale * (codes - zero); codes: [..., n], scale/zero: [...]."""
    return scale[..., None] * (codes - zero[..., None])


def _second_level(stat: Tensor, bits: int, qq_groupsize: int) -> tuple[SecondLevel, Tensor]:
    """Quantize stat [out] over groups of qq_groupsize rows; returns the codes/stats and the dequantized stat [out]."""
    groups = stat.reshape(-1, qq_groupsize)
    scale, zero = minmax_grid(groups, bits)
    scale = scale.clamp(_FP16_SMALLEST, _FP16_MAX).half().to(stat.dtype)
    zero = zero.clamp(-_FP16_MAX, _FP16_MAX).half().to(stat.dtype)
    codes = quantize_float_zero(groups, scale, zero, (1 << bits) - 1)
    value = dequantize_float_zero(codes, scale, zero)
    return SecondLevel(codes.reshape(-1).to(torch.uint8), scale, zero), value.reshape(-1)


def leave_one_out_gain(w: Tensor, d: Tensor, bits: int) -> Tensor:
    """Reduction of a row's group error sum_j ((w_j - q_j) / d_j)^2 when weight j is left out of the grid fit and
    not quantized (reference `get_leave_one_out_error`). w: [out, gs] one group, d: [gs] diag of U. -> [out, gs]."""
    gs = w.shape[1]
    others = torch.arange(gs, device=w.device).repeat(gs, 1)[~torch.eye(gs, dtype=torch.bool, device=w.device)]
    others = others.reshape(gs, gs - 1)  # row j: every column but j
    loo = w[:, others]  # [out, gs, gs - 1]
    scale, zero = minmax_grid(loo, bits)
    q = dequantize_float_zero(quantize_float_zero(loo, scale, zero, (1 << bits) - 1), scale, zero)
    loo_err = ((q - loo) / d[others]).square().sum(-1)
    scale, zero = minmax_grid(w, bits)
    q = dequantize_float_zero(quantize_float_zero(w, scale, zero, (1 << bits) - 1), scale, zero)
    base_err = ((q - w) / d).square().sum(-1, keepdim=True)
    return base_err - loo_err


def fit_group(w: Tensor, d: Tensor, threshold: float,
              cfg: QuantConfig) -> tuple[Tensor, Tensor, SecondLevel | None, SecondLevel | None]:
    """Statistics of one group w: [out, gs] (error-updated weights), d: [gs] diag of U, threshold: absolute.

    Returns (scale [out], zero [out], scale_qq, zero_qq): the values to quantize with and their second level.
    """
    if math.isfinite(threshold) and not cfg.simplified_outliers:  # fit without the likely outliers
        likely = leave_one_out_gain(w, d, cfg.bits) > threshold
        keep = (~likely).to(w.dtype)
        mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
        w = torch.where(likely, mean, w)
    if cfg.qq_scale_bits is None:
        scale, zero = fit_grid(w, cfg.bits, sym=False)
        return scale, zero, None, None
    scale, zero = minmax_grid(w, cfg.bits)
    scale_qq, scale = _second_level(scale, cfg.qq_scale_bits, cfg.qq_groupsize)
    zero_qq, zero = _second_level(zero, cfg.qq_zero_bits, cfg.qq_groupsize)
    return scale, zero, scale_qq, zero_qq


def spqr_quantize(W: Tensor, H: Tensor, cfg: QuantConfig) -> SpQRResult:
    """Quantize W: [out, in] given H: [in, in] = 2/N sum x^T x (undamped), on W's device.

    Computes in fp32 (fp64 when W is fp64, for comparisons with a plain solver); W and H are not modified.
    cfg: method "spqr" fields (bits, group_size, damp, act_order, block_columns, qq_*, outlier_threshold).
    """
    W, H = working_copies(W, H, "SpQR")
    dtype = W.dtype
    rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    check_group_size(cols, gs, "SpQR")
    if cfg.qq_scale_bits is not None and rows % cfg.qq_groupsize:
        raise StreamqError(f"SpQR: --qq-groupsize {cfg.qq_groupsize} does not divide out_features {rows}")
    if cols > 1 << 16:
        raise StreamqError(f"SpQR: in_features {cols} does not fit the 16-bit outlier column indices")
    qq = cfg.qq_scale_bits is not None

    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_cholesky(H, cfg.damp)
    d = U.diagonal()
    # tau is relative to the mean over columns of Var_rows(W[:, c]) / U[c, c]^2 (reference `outlier_scale`)
    threshold = cfg.outlier_threshold * (W.var(dim=0) / d.square()).mean().item()

    n_groups = cols // gs
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    scales, zeros = W.new_zeros(n_groups, rows), W.new_zeros(n_groups, rows)
    scale_qqs: list[SecondLevel] = []
    zero_qqs: list[SecondLevel] = []
    outlier = torch.zeros_like(W, dtype=torch.bool)  # permuted order, as is residual (the outliers' fp16 values)
    residual = torch.zeros_like(W, dtype=torch.float16)
    losses = W.new_zeros(rows)
    for i1, i2 in batch_bounds(cols, cfg.block_columns, gs):
        # transposed copies, solved in GPTQ's sub-batches (gptq.py)
        W1T, U1 = W[:, i1:i2].t().clone(memory_format=torch.contiguous_format), U[i1:i2, i1:i2]
        Err1T = torch.empty_like(W1T)
        for j1, j2 in sub_batches(i2 - i1):
            for i in range(j1, j2):
                c = i1 + i
                if c % gs == 0:  # a batch start (batch_bounds cuts there): W[:, c:] has every earlier update
                    scale, zero, scale_qq, zero_qq = fit_group(W[:, c : c + gs], d[c : c + gs], threshold, cfg)
                    scales[c // gs], zeros[c // gs] = scale, zero
                    if qq:
                        scale_qqs.append(scale_qq)
                        zero_qqs.append(zero_qq)
                w = W1T[i][:, None]
                q_codes = (quantize_float_zero(w, scale, zero, cfg.maxq) if qq
                           else quantize_codes(w, scale, zero, cfg.maxq))
                q = dequantize(q_codes, scale, zero)
                if math.isfinite(threshold):  # outliers keep w, up to the fp16 rounding of their correction
                    is_out = ((w - q) / U1[i, i]).square() > threshold
                    val = torch.where(is_out, w - q, 0).half()
                    q = torch.where(is_out, q + val.to(dtype), q)
                    outlier[:, c : c + 1], residual[:, c : c + 1] = is_out, val
                codes[:, c : c + 1], Q[:, c : c + 1] = q_codes, q
                err = Err1T[i] = ((w - q) / U1[i, i])[:, 0]
                losses += err**2 / 2
                W1T[i + 1 : j2] -= U1[i, i + 1 : j2, None] * err
            with intra_op_threads(1):  # as GPTQ's loop computes it: the same bits
                spread(W1T, U1, Err1T, j1, j2)
        W[:, i2:] -= Err1T.t().contiguous() @ U[i1:i2, i2:]

    invperm = torch.argsort(perm)
    outlier, residual = outlier[:, invperm], residual[:, invperm]
    row, col = outlier.nonzero(as_tuple=True)  # row-major: sorted by (row, original column)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=W.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(row, minlength=rows), 0)
    return SpQRResult(
        weight=Q[:, invperm].float(),
        codes=codes.to(torch.uint8),
        scale=scales,
        zero=zeros,
        scale_qq=_stack(scale_qqs) if qq else None,
        zero_qq=_stack(zero_qqs) if qq else None,
        perm=perm,
        outlier_row_ptr=row_ptr,
        outlier_col=col,
        outlier_val=residual[row, col],
        loss=losses.sum().item(),
        n_outliers=int(col.numel()),
        damp=damp,
    )


def _stack(per_group: list[SecondLevel]) -> SecondLevel:
    """Per-group second levels (codes [out], scale/zero [out/qq]) -> one SecondLevel with a leading group dim."""
    return SecondLevel(*(torch.stack(field) for field in zip(*per_group)))
