"""Linears stored in a quantized layout that dequantize their weight on every forward: QuantLinear (GPTQ,
plain torch) and SpQRLinear (SpQR, through streamq.kernels.spqr)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamq.config import QuantConfig
from streamq.formats import spqr as spqr_format
from streamq.formats.gptq import dequantize_gptq, packed_shapes
from streamq.kernels.spqr import spqr_dequantize, spqr_matvec


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W [out, in] rebuilt from qweight/qzeros/scales/g_idx (see formats/gptq.py)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        for name, (shape, dt) in packed_shapes(out_features, in_features, bits, group_size).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        """W: [out, in] fp32."""
        return dequantize_gptq({k: getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx")}, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


class SpQRLinear(nn.Module):
    """y = x @ W^T + b with W [out, in] rebuilt from one Linear's SpQR tensors (see formats/spqr.py); a single
    token (x with in_features elements) takes the fused dequant-matvec instead of materializing W.

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
        return spqr_dequantize(self.tensors(), self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:  # batch-1 decoding
            y = spqr_matvec(x.reshape(-1), self.tensors(), self.cfg).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def replace_linears(block: nn.Module, bits: int, group_size: int, spqr: QuantConfig | None = None) -> None:
    """Swap every nn.Linear in block for a QuantLinear of the same shape (on the block's device); with spqr (a
    method "spqr" config), for a SpQRLinear."""
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            kw = dict(device=module.weight.device, dtype=module.weight.dtype)
            if spqr is not None:
                q = SpQRLinear(module.in_features, module.out_features, spqr, module.bias is not None, **kw)
            else:
                q = QuantLinear(module.in_features, module.out_features, bits, group_size, module.bias is not None,
                                **kw)
            setattr(parent, name.rpartition(".")[2], q)
