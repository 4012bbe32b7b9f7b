"""Linears stored in a quantized layout that dequantize their weight on the fly: QuantLinear (GPTQ, through
streamq.kernels.gptq) and SpQRLinear (SpQR, through streamq.kernels.spqr).

Where the Triton kernels run (CUDA), the packed buffers feed them directly: a decoding batch takes the fused
dequant-matmul, a prefill batch one dequantization in the activations' dtype and a matmul. Elsewhere (the CPU,
layouts the kernels do not take) bit-unpacking the codes would cost several times the matmul itself, so the first
forward keeps each layer's codes unpacked at one byte per weight (plus the group statistics in fp32) and later
forwards only rebuild W from them. The packed buffers stay what state_dict() saves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamq.config import QuantConfig
from streamq.formats import spqr as spqr_format
from streamq.formats.gptq import dense_gptq, packed_shapes, unpack_gptq
from streamq.kernels.gptq import gptq_linear, kernel_fits
from streamq.kernels.launch import use_triton
from streamq.kernels.spqr import spqr_dequantize, spqr_matvec


class UnpackedCache(nn.Module):
    """Holds `unpacked` (a GPTQTensors / SpQRTensors with uint8 codes) and forgets it whenever the packed
    buffers may change: a state dict loaded, the module moved or cast."""

    unpacked = None
    fits_kernel = None  # QuantLinear: whether the Triton kernels take its layout, decided once

    def cached(self, unpack):
        """self.unpacked, made by unpack() (codes narrowed to uint8: every width here is <= 8) on first use."""
        if self.unpacked is None:
            t = unpack()
            self.unpacked = t._replace(codes=t.codes.to(torch.uint8))
        return self.unpacked

    def _load_from_state_dict(self, *args, **kwargs):
        self.unpacked = self.fits_kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.unpacked = self.fits_kernel = None
        return super()._apply(fn, *args, **kwargs)


class QuantLinear(UnpackedCache):
    """y = x @ W^T + b with W [out, in] rebuilt from qweight/qzeros/scales/g_idx (see formats/gptq.py)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for name, (shape, dt) in packed_shapes(out_features, in_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx")}

    def dequantized_weight(self) -> torch.Tensor:
        """W: [out, in] fp32, from the codes unpacked once."""
        return dense_gptq(self.cached(lambda: unpack_gptq(self.packed(), self.bits)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.qweight):
            if self.fits_kernel is None:
                self.fits_kernel = kernel_fits(self.bits, self.in_features, self.out_features, self.scales.shape[0],
                                               self.g_idx)
            if self.fits_kernel:
                y = gptq_linear(x, self.packed(), self.bits)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class SpQRLinear(UnpackedCache):
    """y = x @ W^T + b with W [out, in] rebuilt from one Linear's SpQR tensors (see formats/spqr.py); where the
    Triton kernels run, a single token (x with in_features elements) takes the fused dequant-matvec instead of
    materializing W, and more tokens a W dequantized in x's dtype.

    The outlier buffers start empty: loading a state dict resizes them to the checkpoint's (data-dependent) sizes.
    """

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        for name, (shape, dt) in spqr_format.packed_shapes(out_features, in_features, cfg).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("outlier_col", "outlier_val"):  # sized by the data: take the checkpoint's size
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != self._buffers[name].shape:
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors by name (as formats/spqr.py names them)."""
        return {k: getattr(self, k) for k in spqr_format.tensor_names(self.cfg)}

    def dequantized_weight(self) -> torch.Tensor:
        """W: [out, in] fp32."""
        if use_triton(self.qweight):
            return spqr_dequantize(self.tensors(), self.cfg)
        return spqr_format.dense_spqr(self.cached(lambda: spqr_format.unpack_spqr(self.tensors(), self.cfg)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.qweight):
            if x.numel() == self.in_features:  # batch-1 decoding, fused kernel
                y = spqr_matvec(x.reshape(-1), self.tensors(), self.cfg).reshape(*x.shape[:-1], self.out_features)
                return y if self.bias is None else y + self.bias.to(y.dtype)
            return F.linear(x, spqr_dequantize(self.tensors(), self.cfg, x.dtype), self.bias)  # W in x's dtype only
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
