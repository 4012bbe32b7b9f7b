"""GPTQ-layout kernels (layout: streamq/formats/gptq.py): the fused dequant-matmul of decoding (up to MAX_FUSED
tokens) and the dequantization that larger batches (prefill) multiply with cuBLAS. Triton kernels
(kernels/gptq_triton.py) for 4 and 8 bits with groups of consecutive columns (static-groups order); the plain-
torch references below for everything else, and wherever Triton does not run (kernels/launch.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamq.formats.gptq import dequantize_gptq
from streamq.kernels.launch import use_triton

KERNEL_BITS = (4, 8)
MAX_FUSED = 16  # tokens per fused matmul: one BLOCK_M tile; more take dequantize + matmul
# (BLOCK_N, BLOCK_K, num_warps): tools/gpu_check.py times alternatives on a GPU
CONFIG = (64, 64, 4)


def matmul_reference(x: Tensor, tensors: dict[str, Tensor], bits: int) -> Tensor:
    """y = x @ W^T for x: [..., in] -> [..., out] in x's dtype, W dequantized in fp32 (dequantize_gptq)."""
    return F.linear(x.float(), dequantize_gptq(tensors, bits).to(x.device)).to(x.dtype)


def static_groups(g_idx: Tensor, n_groups: int) -> bool:
    """Whether g_idx is the static-groups order: column c in group c // (in / n_groups)."""
    in_features = g_idx.numel()
    if in_features % n_groups:
        return False
    return torch.equal(g_idx.long(), torch.arange(in_features, device=g_idx.device) // (in_features // n_groups))


def kernel_fits(bits: int, in_features: int, out_features: int, n_groups: int, g_idx: Tensor) -> bool:
    """Whether the Triton kernels take this layer: 4/8 bits, static-groups order, groups a multiple of 16 wide
    (the smallest tile), out_features a whole number of zero-point words. Decide once per layer (g_idx is read)."""
    gs = in_features // n_groups if in_features % n_groups == 0 else 0
    return (bits in KERNEL_BITS and gs % 16 == 0 and gs > 0 and out_features % (32 // bits) == 0
            and static_groups(g_idx, n_groups))


def gptq_linear(x: Tensor, tensors: dict[str, Tensor], bits: int, config: tuple[int, int, int] | None = None,
                split_k: int | None = None) -> Tensor:
    """y = x @ W^T, x: [..., in] (fp32/fp16/bf16) -> [..., out] in x's dtype, for a layer kernel_fits takes.

    Up to MAX_FUSED tokens: the fused kernel (W never materialized; fp32 accumulation); more: W dequantized in
    x's dtype, then one matmul. Where Triton does not run: matmul_reference.
    """
    if not use_triton(tensors["qweight"]):
        return matmul_reference(x, tensors, bits)
    in_features, out_features = x.shape[-1], tensors["scales"].shape[1]
    rows = x.reshape(-1, in_features)
    if rows.shape[0] > MAX_FUSED:
        return F.linear(x, gptq_dequantize(tensors, bits, x.dtype, config))
    rows = rows.contiguous()
    block_n, block_k, warps = config or CONFIG
    gs = in_features // tensors["scales"].shape[0]
    block_k = _tile_k(gs, block_k)
    n_tiles = -(-out_features // block_n)
    if split_k is None:  # enough programs to fill a large GPU at batch 1 (~2 per SM of 132), slices >= 4 tiles
        split_k = max(1, min(264 // n_tiles, in_features // (4 * block_k)))
    while in_features % (split_k * block_k):
        split_k -= 1
    y = (torch.zeros if split_k > 1 else torch.empty)(rows.shape[0], out_features, dtype=torch.float32,
                                                      device=x.device)
    k = _kernels()
    k.matmul_kernel[(n_tiles, split_k)](
        rows, tensors["qweight"], tensors["qzeros"], tensors["scales"], y, rows.shape[0], out_features,
        in_features, rows.stride(0), BITS=bits, GS=gs, BLOCK_M=MAX_FUSED, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, IEEE=x.dtype == torch.float32, num_warps=warps)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def gptq_dequantize(tensors: dict[str, Tensor], bits: int, dtype: torch.dtype = torch.float32,
                    config: tuple[int, int, int] | None = None) -> Tensor:
    """W: [out, in] in dtype (computed in fp32, rounded once) for a layer kernel_fits takes; Triton or
    dequantize_gptq."""
    if not use_triton(tensors["qweight"]):
        return dequantize_gptq(tensors, bits).to(dtype)
    n_groups, out_features = tensors["scales"].shape
    in_features = tensors["g_idx"].numel()
    block_n, block_k, warps = config or CONFIG
    gs = in_features // n_groups
    block_k = _tile_k(gs, block_k)
    W = torch.empty(out_features, in_features, dtype=dtype, device=tensors["qweight"].device)
    _kernels().dequant_kernel[(in_features // block_k, -(-out_features // block_n))](
        tensors["qweight"], tensors["qzeros"], tensors["scales"], W, out_features, in_features, BITS=bits, GS=gs,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return W


def _tile_k(gs: int, want: int) -> int:
    """The largest power of two <= want that divides the group width gs (>= 16 when 16 divides gs): a K tile
    never straddles two groups."""
    k = want
    while gs % k:
        k //= 2
    return k


def _kernels():
    from streamq.kernels import gptq_triton  # imports Triton: see kernels/launch.py

    return gptq_triton
