"""SpQR layer kernels (layout: streamq/formats/spqr.py): dequantize the weight, and the fused dequant-matvec of
batch-1 decoding. Each Triton kernel (kernels/spqr_triton.py) sits beside its plain-torch reference, which is also
the fallback wherever Triton does not run (kernels/launch.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.formats.spqr import dequantize_spqr
from streamq.kernels.launch import triton_available, use_triton  # noqa: F401 (the launchers' choice, re-exported)

# Rows per program and input positions per tile; dequantization runs one program per (rows, tile) pair, the
# matvec one per BLOCK_OUT rows walking all inputs. NUM_WARPS: tools/gpu_check.py times alternatives on a GPU.
BLOCK_OUT, BLOCK_IN, BLOCK_NNZ, NUM_WARPS = 16, 64, 16, 4


def matvec_reference(x: Tensor, tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """y = W x for x: [in] (any float dtype) -> [out] in x's dtype, via dequantize_spqr (computed in fp32)."""
    return (dequantize_spqr(tensors, cfg) @ x.float()).to(x.dtype)


def spqr_dequantize(tensors: dict[str, Tensor], cfg: QuantConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """W: [out, in] in dtype from one Linear's packed tensors (Triton: computed in fp32, the dense part rounded to
    dtype once and the outliers added in dtype; the torch reference: dequantize_spqr, then cast)."""
    if not use_triton(tensors["qweight"]):
        return dequantize_spqr(tensors, cfg).to(dtype)
    out_features, in_features = tensors["outlier_row_ptr"].numel() - 1, tensors["perm"].numel()
    W = torch.empty(out_features, in_features, dtype=dtype, device=tensors["qweight"].device)
    _launch(tensors, cfg, W, W, matvec=False)
    return W


def spqr_matvec(x: Tensor, tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """y = W x for x: [in] -> [out] in x's dtype (fp32 accumulation; Triton or the torch reference)."""
    if not use_triton(tensors["qweight"]):
        return matvec_reference(x, tensors, cfg)
    y = torch.zeros(tensors["outlier_row_ptr"].numel() - 1, dtype=torch.float32, device=x.device)
    _launch(tensors, cfg, x.contiguous(), y, matvec=True)
    return y.to(x.dtype)


def _launch(t: dict[str, Tensor], cfg: QuantConfig, x: Tensor, out: Tensor, matvec: bool) -> None:
    from streamq.kernels import spqr_triton as k  # imports Triton: see kernels/launch.py

    out_features, in_features = t["outlier_row_ptr"].numel() - 1, t["perm"].numel()
    gs = in_features if cfg.group_size == -1 else cfg.group_size
    qq = cfg.qq_scale_bits is not None
    q = t["qweight"]
    stats = ([t[key] for key in ("scale_codes", "zero_codes", "scale_qq_scale", "scale_qq_zero", "zero_qq_scale",
                                 "zero_qq_zero")] if qq else [q, q, t["scales"], t["scales"], t["scales"], t["scales"]])
    rows = -(-out_features // BLOCK_OUT)
    grid = (rows,) if matvec else (rows, -(-in_features // BLOCK_IN))
    k.dense_kernel[grid](
        q, *stats, t["qzeros"] if not qq else q, t["perm"], x, out, out_features, in_features,
        BITS=cfg.bits, GS=gs, QQ=qq, QS_BITS=cfg.qq_scale_bits or 0, QZ_BITS=cfg.qq_zero_bits or 0,
        QQG=cfg.qq_groupsize, MATVEC=matvec, BLOCK_OUT=BLOCK_OUT, BLOCK_IN=BLOCK_IN, num_warps=NUM_WARPS)
    if t["outlier_col"].numel():
        k.outlier_kernel[(rows,)](
            t["outlier_row_ptr"], t["outlier_col"], t["outlier_val"], x, out, out_features, in_features,
            MATVEC=matvec, BLOCK_OUT=BLOCK_OUT, BLOCK_NNZ=BLOCK_NNZ, num_warps=NUM_WARPS)
