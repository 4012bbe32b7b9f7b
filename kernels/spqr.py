"""SpQR layer kernels (layout: streamq/formats/spqr.py): dequantize the weight, and the fused dequant-matvec of
batch-1 decoding. Each Triton kernel sits beside its plain-torch reference, which is also the fallback.

Launchers (`spqr_dequantize`, `spqr_matvec`) run Triton on CUDA tensors, or anywhere when TRITON_INTERPRET=1
(Triton's CPU interpreter, for tests); otherwise, or without Triton installed, the torch reference. Triton is
imported and the kernels jitted at the first launch, not at import: Triton jits its own standard library
(tl.sum, tl.max) when it is imported, so TRITON_INTERPRET=1 must be set before anything in the process
imports Triton, and a process uses one mode.

Each kernel program owns BLOCK_OUT output rows and walks the input positions in BLOCK_IN chunks: it unpacks the
codes from the packed bitstream (a value may straddle two words for 3 bits: both are read as one 64-bit field),
rebuilds each group's scale and zero (from their second-level codes, or fp16 scales and integer zeros), and
either stores scale * (code - zero) at the original column perm[j] or dots it with x[perm[j]]. A second kernel
adds the CSR outliers of the same rows (no two outliers of a row share a column, so rows never race).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.formats.spqr import dequantize_spqr

triton = tl = None  # imported by _jit at the first Triton launch (see above)

BLOCK_OUT, BLOCK_IN, BLOCK_NNZ = 16, 64, 16


def matvec_reference(x: Tensor, tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """y = W x for x: [in] (any float dtype) -> [out] in x's dtype, via dequantize_spqr (computed in fp32)."""
    return (dequantize_spqr(tensors, cfg) @ x.float()).to(x.dtype)


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (CPU-only torch builds ship without it: the torch reference serves)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: Tensor) -> bool:
    """Whether the launchers run the Triton kernels for tensors on t's device."""
    return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def spqr_dequantize(tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """W: [out, in] fp32 from one Linear's packed tensors (Triton or the torch reference dequantize_spqr)."""
    if not use_triton(tensors["qweight"]):
        return dequantize_spqr(tensors, cfg)
    out_features, in_features = tensors["outlier_row_ptr"].numel() - 1, tensors["perm"].numel()
    W = torch.empty(out_features, in_features, dtype=torch.float32, device=tensors["qweight"].device)
    _launch(tensors, cfg, W, W, matvec=False)
    return W


def spqr_matvec(x: Tensor, tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """y = W x for x: [in] -> [out] in x's dtype (fp32 accumulation; Triton or the torch reference)."""
    if not use_triton(tensors["qweight"]):
        return matvec_reference(x, tensors, cfg)
    y = torch.zeros(tensors["outlier_row_ptr"].numel() - 1, dtype=torch.float32, device=x.device)
    _launch(tensors, cfg, x.contiguous(), y, matvec=True)
    return y.to(x.dtype)


@functools.cache
def _jit(fn, interpret: bool):
    """The jitted kernel; triton.jit reads TRITON_INTERPRET now (`interpret` keys the cache on it).

    Kernel bodies resolve `tl` and their device functions in this module's globals when they run or compile,
    so the first call imports Triton and replaces the device functions by their jitted selves.
    """
    global triton, tl, _unpack, _stat
    if triton is None:
        import triton as triton_module
        import triton.language as language

        triton, tl = triton_module, language
        _unpack, _stat = triton.jit(_unpack), triton.jit(_stat)
    return triton.jit(fn)


def _launch(t: dict[str, Tensor], cfg: QuantConfig, x: Tensor, out: Tensor, matvec: bool) -> None:
    out_features, in_features = t["outlier_row_ptr"].numel() - 1, t["perm"].numel()
    gs = in_features if cfg.group_size == -1 else cfg.group_size
    qq = cfg.qq_scale_bits is not None
    q = t["qweight"]
    stats = ([t[k] for k in ("scale_codes", "zero_codes", "scale_qq_scale", "scale_qq_zero", "zero_qq_scale",
                             "zero_qq_zero")] if qq else [q, q, t["scales"], t["scales"], t["scales"], t["scales"]])
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (-(-out_features // BLOCK_OUT),)
    _jit(_dense_kernel, interpret)[grid](
        q, *stats, t["qzeros"] if not qq else q, t["perm"], x, out, out_features, in_features,
        BITS=cfg.bits, GS=gs, QQ=qq, QS_BITS=cfg.qq_scale_bits or 0, QZ_BITS=cfg.qq_zero_bits or 0,
        QQG=cfg.qq_groupsize, MATVEC=matvec, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN)
    if t["outlier_col"].numel():
        _jit(_outlier_kernel, interpret)[grid](
            t["outlier_row_ptr"], t["outlier_col"], t["outlier_val"], x, out, out_features, in_features,
            MATVEC=matvec, BLOCK_OUT=BLOCK_OUT, BLOCK_NNZ=BLOCK_NNZ)


def _unpack(ptr, word, stride, shift, mask, has_next, BITS: tl.constexpr):
    """BITS-bit values starting at bit `shift` of int32 word ptr[word] (the next word at word + stride) -> fp32."""
    field = tl.load(ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    if 32 % BITS != 0:  # 3 bits: a value may continue in the next word
        nxt = tl.load(ptr + word + stride, mask=mask & has_next, other=0)
        field = field | (nxt.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
    return ((field >> shift) & ((1 << BITS) - 1)).to(tl.float32)


def _stat(codes, words, g, r, mask, BITS: tl.constexpr):
    """Code [g, r] of a statistic packed along the output dimension (`words` int32 words per group row)."""
    bit = r.to(tl.int64) * BITS
    return _unpack(codes, g[None, :] * words + (bit // 32)[:, None], 1, (bit % 32)[:, None], mask,
                   ((bit // 32 + 1) < words)[:, None], BITS)


def _dense_kernel(qweight, scode, zcode, s_qs, s_qz, z_qs, z_qz, qzeros, perm, x, out, OUT, IN,
                  BITS: tl.constexpr, GS: tl.constexpr, QQ: tl.constexpr, QS_BITS: tl.constexpr,
                  QZ_BITS: tl.constexpr, QQG: tl.constexpr, MATVEC: tl.constexpr,
                  BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Dense part: out[r, perm[j]] = scale * (code - zero) (MATVEC=False) or out[r] = sum_j that * x[perm[j]]."""
    r = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    rmask = r < OUT
    acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for j0 in range(0, IN, BLOCK_IN):
        j = j0 + tl.arange(0, BLOCK_IN)
        jmask = j < IN
        m = rmask[:, None] & jmask[None, :]
        bit = j.to(tl.int64) * BITS  # weight codes are packed along the input dimension: word k of row r at [k, r]
        k = bit // 32
        code = _unpack(qweight, k[None, :] * OUT + r[:, None], OUT, (bit % 32)[None, :], m,
                       ((k + 1) < IN * BITS // 32)[None, :], BITS)
        g = j // GS
        if QQ:
            q = g[None, :] * (OUT // QQG) + (r // QQG)[:, None]  # second-level statistics of (group, row)
            sc = _stat(scode, OUT * QS_BITS // 32, g, r, m, QS_BITS)
            s2, z2 = tl.load(s_qs + q, mask=m, other=0).to(tl.float32), tl.load(s_qz + q, mask=m, other=0)
            scale = s2 * (sc - z2.to(tl.float32))
            zc = _stat(zcode, OUT * QZ_BITS // 32, g, r, m, QZ_BITS)
            s2, z2 = tl.load(z_qs + q, mask=m, other=0).to(tl.float32), tl.load(z_qz + q, mask=m, other=0)
            zero = s2 * (zc - z2.to(tl.float32))
        else:
            scale = tl.load(s_qs + g[None, :] * OUT + r[:, None], mask=m, other=0).to(tl.float32)
            zero = _stat(qzeros, OUT * BITS // 32, g, r, m, BITS)
        w = scale * (code - zero)
        col = tl.load(perm + j, mask=jmask, other=0)
        if MATVEC:
            xv = tl.load(x + col, mask=jmask, other=0).to(tl.float32)
            acc += tl.sum(tl.where(m, w * xv[None, :], 0.0), axis=1)
        else:
            tl.store(out + r[:, None].to(tl.int64) * IN + col[None, :], w, mask=m)
    if MATVEC:
        tl.store(out + r, acc, mask=rmask)


def _outlier_kernel(row_ptr, col, val, x, out, OUT, IN, MATVEC: tl.constexpr,
                    BLOCK_OUT: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    """CSR outliers: out[r, col] += val (MATVEC=False) or out[r] += sum val * x[col]."""
    r = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    rmask = r < OUT
    start = tl.load(row_ptr + r, mask=rmask, other=0)
    end = tl.load(row_ptr + r + 1, mask=rmask, other=0)
    acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for k0 in range(0, tl.max(end - start, axis=0), BLOCK_NNZ):
        idx = start[:, None] + k0 + tl.arange(0, BLOCK_NNZ)[None, :]
        m = idx < end[:, None]
        c = tl.load(col + idx, mask=m, other=0).to(tl.int32) & 0xFFFF  # uint16 bit pattern
        v = tl.load(val + idx, mask=m, other=0).to(tl.float32)
        if MATVEC:
            acc += tl.sum(v * tl.load(x + c, mask=m, other=0).to(tl.float32), axis=1)
        else:
            ptr = out + r[:, None].to(tl.int64) * IN + c
            tl.store(ptr, tl.load(ptr, mask=m, other=0) + v, mask=m)
    if MATVEC:
        tl.store(out + r, tl.load(out + r, mask=rmask, other=0) + acc, mask=rmask)
