"""A Linear stored in the GPTQ layout that dequantizes its weight on every forward (plain torch path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from streamq.formats.gptq import dequantize_gptq, packed_shapes


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


def replace_linears(block: nn.Module, bits: int, group_size: int) -> None:
    """Swap every nn.Linear in block for a QuantLinear of the same shape (on the block's device)."""
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            q = QuantLinear(module.in_features, module.out_features, bits, group_size, module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)
            setattr(parent, name.rpartition(".")[2], q)
