"""The dense layout of pruned-only weights (`--method sparsegpt --bits 16`): a plain checkpoint whose block
Linears hold zeros.

Per pruned Linear `<name>` (out features, in features):
  <name>.weight  fp16 [out, in]   the pruned weight as SparseGPT left it (kept weights rounded to fp16 in its
                                  error feedback, so this is exactly the weight the later blocks were calibrated on)
  <name>.bias    unchanged, when the Linear has one (written by the caller)
config.json's quantization_config is compressed-tensors' description of a sparse, unquantized model (written
with the library's DenseSparsityConfig; `pip install streamq[formats]`): quant_method "compressed-tensors",
format "dense", no config_groups, and a `sparsity_config` {format: dense, sparsity_structure: "unstructured" |
"N:M", global_sparsity, targets: [Linear], ignore: [lm_head]}. transformers reads it as an ordinary fp model.
compressed-tensors 0.20 no longer has the sparse-bitmask / 2:4 compressors, so the zeros are stored as zeros.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from streamq.errors import StreamqError

NAME = "dense"
SIZED_BY_DATA = False


def check(cfg) -> None:
    if cfg.bits != 16:
        raise StreamqError(f"--format dense holds 16-bit pruned weights (--method sparsegpt --bits 16), not "
                           f"{cfg.bits}-bit codes; use --format gptq or compressed-tensors")


def refuse_16_bits(cfg, fmt: str) -> None:
    """StreamqError when cfg keeps 16-bit weights, which the quantized layout `fmt` cannot hold."""
    if cfg.bits == 16:
        raise StreamqError(f"--format {fmt} holds quantized codes; --bits 16 (prune only) keeps dense fp16 weights: "
                           "use --format dense")


def linear_shapes(out_features: int, in_features: int, cfg, n_outliers: int = 0) -> dict:
    return {"weight": ((out_features, in_features), torch.float16)}


def tensor_names(cfg) -> tuple[str, ...]:
    return ("weight",)


def pack(result, cfg) -> dict[str, Tensor]:
    """A SparseResult (bits 16) -> {weight: fp16}; its kept weights must be fp16 numbers already."""
    weight = result.weight.half()
    if not torch.equal(weight.to(result.weight.dtype), result.weight):
        raise StreamqError("pruned weights are not fp16-representable; the checkpoint would not reproduce them")
    return {"weight": weight.cpu().contiguous()}


def unpack(tensors: dict[str, Tensor], cfg):
    raise StreamqError("a dense (prune-only) folder has no quantization codes to convert; compress again with "
                       "--bits 4 or 8 for --format gptq / compressed-tensors / gguf")


def dequantize(tensors: dict[str, Tensor], cfg) -> Tensor:
    return tensors["weight"].float()


def sparsity_config(cfg) -> dict:
    """compressed-tensors' sparsity_config for cfg's mask (the target sparsity of the block Linears)."""
    try:
        from compressed_tensors.config import DenseSparsityConfig
    except ImportError:
        raise StreamqError("--format dense writes compressed-tensors' sparsity_config: pip install "
                           "'streamq[formats]'") from None
    structure = "unstructured" if cfg.mask_structure == "0:0" else cfg.mask_structure
    return DenseSparsityConfig(global_sparsity=cfg.sparsity, sparsity_structure=structure, targets=["Linear"],
                               ignore=["lm_head"]).model_dump(mode="json", exclude={"registry_requires_subclass"})


def quantization_config(cfg, quantizer: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
            "quantization_status": "compressed", "sparsity_config": sparsity_config(cfg), "quantizer": [quantizer],
            "streamq_method": cfg.method, "streamq_sparsity": cfg.sparsity,
            "streamq_mask_structure": cfg.mask_structure, "damp_percent": cfg.damp,
            "true_sequential": cfg.true_sequential}


def matches(q: dict) -> bool:
    return q.get("quant_method") == "compressed-tensors" and q.get("format") == "dense" and not q.get("config_groups")


def config_from(q: dict):
    """The QuantConfig a dense folder was written with (method sparsegpt, bits 16)."""
    from streamq.config import QuantConfig

    return QuantConfig(method="sparsegpt", bits=16, sparsity=float(q["streamq_sparsity"]),
                       mask_structure=str(q["streamq_mask_structure"]))


def linear_module(in_features: int, out_features: int, cfg, bias: bool, device=None, dtype=None):
    return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
