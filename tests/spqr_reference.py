"""A plain SpQR for tests, written from the paper and the reference engine's description: fp64, explicit inverse
Hessian eliminated column by column (no Cholesky, no lazy batches), loops instead of vectorized leave-one-out.
Shares only GPTQ's grid (`grid.fit_grid`, tested on its own) with streamq, for runs without second-level
quantization. Keeps streamq's documented storage choices (fp16 second-level statistics, outliers as fp16
corrections) so results compare exactly. Also the small test problems shared by the SpQR test files."""
from __future__ import annotations

import math

import torch

from streamq.config import QuantConfig
from streamq.quant.grid import fit_grid


def problem(out=32, inp=64, tokens=256, seed=0, dtype=torch.float32, spikes=0):
    """W [out, in] and H = 2/N X^T X for strongly correlated inputs of uneven scales; spikes: that many weights
    set to +-0.6 (12x the typical weight). Returns W, H and the flat indices of the spikes."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(inp, inp, generator=g, dtype=dtype) * torch.rand(inp, generator=g, dtype=dtype) * 2
    X = torch.randn(tokens, inp, generator=g, dtype=dtype) @ A
    W = torch.randn(out, inp, generator=g, dtype=dtype) * 0.05
    idx = torch.randperm(out * inp, generator=g)[:spikes]
    W.view(-1)[idx] = torch.sign(torch.randn(spikes, generator=g, dtype=dtype)) * 0.6
    return W, 2 / tokens * X.T @ X, idx


def spqr(**kw) -> QuantConfig:
    """A method "spqr" config: asymmetric, 3 bits, groups of 16, unless kw says otherwise."""
    return QuantConfig(**{"method": "spqr", "sym": False, "bits": 3, "group_size": 16, **kw})


QQ = dict(qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=16)  # the paper's second-level quantization


def minmax(x, bits):
    """Asymmetric grid of each row of x [rows, n]: (scale, zero) [rows], zero not rounded, constant row -> [-1, 1]."""
    lo, hi = x.min(1).values.clone(), x.max(1).values.clone()
    same = lo == hi
    lo[same], hi[same] = -1.0, 1.0
    scale = (hi - lo) / (2**bits - 1)
    return scale, -lo / scale


def quant_dequant(x, scale, zero, bits):
    """x [rows, n] -> (codes, dequantized) on the per-row grid; codes = clamp(round(x / scale + zero))."""
    codes = torch.clamp(torch.round(x / scale.clamp_min(1e-9)[:, None] + zero[:, None]), 0, 2**bits - 1)
    return codes, scale[:, None] * (codes - zero[:, None])


def quantize_stat(stat, bits, qq):
    """Second level: each run of qq rows of stat [rows] on its own grid, stored fp16 -> dequantized stat [rows]."""
    blocks = stat.reshape(-1, qq)
    scale, zero = minmax(blocks, bits)
    scale = scale.clamp(2.0**-24, 65504).half().double()
    zero = zero.clamp(-65504, 65504).half().double()
    return quant_dequant(blocks, scale, zero, bits)[1].reshape(-1)


def loo_gain(w, d, bits):
    """For each weight: group error (Hessian-weighted) with it minus without it (grid refitted without it)."""
    n = w.shape[1]
    base = (((quant_dequant(w, *minmax(w, bits), bits)[1] - w) / d) ** 2).sum(1)
    gain = torch.zeros_like(w)
    for j in range(n):
        keep = [k for k in range(n) if k != j]
        part = w[:, keep]
        err = (((quant_dequant(part, *minmax(part, bits), bits)[1] - part) / d[keep]) ** 2).sum(1)
        gain[:, j] = base - err
    return gain


def fit(w, d, threshold, cfg):
    """Per-row (scale, zero) of one group, fitted without likely outliers (replaced by the row's other mean)."""
    w = w.clone()
    if math.isfinite(threshold) and not cfg.simplified_outliers:
        likely = loo_gain(w, d, cfg.bits) > threshold
        for r in range(w.shape[0]):
            if likely[r].any():
                rest = w[r, ~likely[r]]
                w[r, likely[r]] = rest.mean() if rest.numel() else 0.0
    if cfg.qq_scale_bits is None:
        return fit_grid(w, cfg.bits, sym=False)
    scale, zero = minmax(w, cfg.bits)
    return (quantize_stat(scale, cfg.qq_scale_bits, cfg.qq_groupsize),
            quantize_stat(zero, cfg.qq_zero_bits, cfg.qq_groupsize))


def reference_spqr(W, H, cfg: QuantConfig):
    """-> (codes [out, in] in quantization order, perm, outlier mask [out, in] original order, weight, loss)."""
    W, H = W.double().clone(), H.double().clone()
    rows, n = W.shape
    gs = n if cfg.group_size == -1 else cfg.group_size
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diag(), descending=True) if cfg.act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    d, A = torch.zeros(n, dtype=H.dtype), Hinv.clone()  # d[i]^2: H^-1[i, i] once columns < i are eliminated
    for i in range(n):
        d[i] = A[i, i].sqrt()
        A -= torch.outer(A[:, i], A[i, :]) / A[i, i]
    threshold = cfg.outlier_threshold * (W.var(dim=0) / d**2).mean().item()

    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    outlier = torch.zeros_like(W, dtype=torch.bool)
    loss = 0.0
    for i in range(n):
        if i % gs == 0:
            scale, zero = fit(W[:, i : i + gs], d[i : i + gs], threshold, cfg)
        w = W[:, i].clone()
        if cfg.qq_scale_bits is None:  # GPTQ's grid: integer zero added after rounding
            c = torch.clamp(torch.round(w / scale) + zero, 0, 2**cfg.bits - 1)
            q = scale * (c - zero)
        else:
            c, q = quant_dequant(w[:, None], scale, zero, cfg.bits)
            c, q = c[:, 0], q[:, 0]
        if math.isfinite(threshold):
            outlier[:, i] = ((w - q) / d[i]) ** 2 > threshold
            q[outlier[:, i]] += (w - q)[outlier[:, i]].half().double()
        codes[:, i], Q[:, i] = c, q
        loss += (((w - q) / d[i]) ** 2 / 2).sum().item()
        W[:, i:] -= torch.outer((w - q) / Hinv[i, i], Hinv[i, i:])
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    inv = torch.argsort(perm)
    return codes, perm, outlier[:, inv], Q[:, inv], loss
