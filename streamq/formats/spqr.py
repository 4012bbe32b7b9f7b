"""The SpQR layer layout: streamq's own safetensors tensors per quantized Linear (there is no shared standard).

Per Linear `<name>` (out features, in features, b bits, G = in / group_size groups, qq = qq_groupsize,
bs / bz = qq_scale_bits / qq_zero_bits; columns in the quantization order `perm`):
  <name>.qweight          int32 [in*b/32, out]    codes of W[:, perm]^T, packed along the input dimension
  with second-level quantization (qq_scale_bits set):
  <name>.scale_codes      int32 [G, out*bs/32]    first-level scale codes, packed along the output dimension
  <name>.zero_codes       int32 [G, out*bz/32]    first-level zero codes, packed along the output dimension
  <name>.scale_qq_scale   fp16  [G, out/qq]       second-level scale / zero of the scales
  <name>.scale_qq_zero    fp16  [G, out/qq]
  <name>.zero_qq_scale    fp16  [G, out/qq]       second-level scale / zero of the zeros
  <name>.zero_qq_zero     fp16  [G, out/qq]
  without (GPTQ's grid):
  <name>.scales           fp16  [G, out]
  <name>.qzeros           int32 [G, out*b/32]     integer zero points (as they are, no v1 offset)
  always:
  <name>.perm             int32 [in]              original column of each quantized position
  <name>.outlier_row_ptr  int32 [out+1]           CSR over output rows (sizes depend on the data)
  <name>.outlier_col      int16 [n_outliers]      original input column, a uint16 bit pattern (in <= 65536)
  <name>.outlier_val      fp16  [n_outliers]      added to the dense value of its entry
  <name>.bias             unchanged, when the Linear has one (written by the caller)

Dequantized, in fp32 and in this order of operations (the engine's, so the weight is reproduced bit for bit):
  scale[g, r] = scale_qq_scale[g, r // qq] * (scale_code[g, r] - scale_qq_zero[g, r // qq])   (zero alike)
  W[r, perm[j]] = scale[j // gs, r] * (code[r, j] - zero[j // gs, r]),  then W[r, col] += val per outlier.
Packing is formats/gptq.py's little-endian bitstream (pack_bits) for every bit width.
A folder's config.json says how to read these: quantization_config {quant_method: "spqr", checkpoint_format:
"streamq-spqr", bits, group_size, qq_scale_bits, qq_zero_bits, qq_groupsize, outlier_threshold, ...}.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.quant.actquant import refuse_activation_quant
from streamq.formats.gptq import group_affine, pack_bits, unpack_bits
from streamq.quant.spqr import SpQRResult

_STATS_QQ = ("scale_codes", "zero_codes", "scale_qq_scale", "scale_qq_zero", "zero_qq_scale", "zero_qq_zero")
_STATS_FP = ("scales", "qzeros")
_COMMON = ("qweight", "perm", "outlier_row_ptr", "outlier_col", "outlier_val")


class SpQRTensors(NamedTuple):
    """Unpacked contents of one SpQR Linear."""

    codes: Tensor  # [out, in] int32, permuted column order
    scale: Tensor  # [G, out] fp32 dequantized first-level scales
    zero: Tensor  # [G, out] fp32 dequantized first-level zeros
    perm: Tensor  # [in] int64
    row_ptr: Tensor  # [out + 1] int64
    col: Tensor  # [n_outliers] int64 original column
    val: Tensor  # [n_outliers] fp16


def tensor_names(cfg: QuantConfig) -> tuple[str, ...]:
    """Names (suffixes after `<name>.`) of one Linear's tensors under cfg."""
    return _COMMON + (_STATS_QQ if cfg.qq_scale_bits is not None else _STATS_FP)


def packed_shapes(out_features: int, in_features: int, cfg: QuantConfig,
                  n_outliers: int = 0) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of one Linear's tensors; the outlier sizes depend on the data (n_outliers).
    Raises StreamqError when the layer's shape cannot be packed under cfg (checked before any block runs)."""
    check_packable(out_features, in_features, cfg)
    gs = in_features if cfg.group_size == -1 else cfg.group_size
    G = in_features // gs
    shapes = {
        "qweight": ((in_features * cfg.bits // 32, out_features), torch.int32),
        "perm": ((in_features,), torch.int32),
        "outlier_row_ptr": ((out_features + 1,), torch.int32),
        "outlier_col": ((n_outliers,), torch.int16),
        "outlier_val": ((n_outliers,), torch.float16),
    }
    if cfg.qq_scale_bits is None:
        shapes["scales"] = ((G, out_features), torch.float16)
        shapes["qzeros"] = ((G, out_features * cfg.bits // 32), torch.int32)
    else:
        shapes["scale_codes"] = ((G, out_features * cfg.qq_scale_bits // 32), torch.int32)
        shapes["zero_codes"] = ((G, out_features * cfg.qq_zero_bits // 32), torch.int32)
        for name in _STATS_QQ[2:]:
            shapes[name] = ((G, out_features // cfg.qq_groupsize), torch.float16)
    return shapes


def check_packable(out_features: int, in_features: int, cfg: QuantConfig) -> None:
    """The layer's shape fits the layout: whole int32 words along both packed dimensions, whole second-level
    groups, 16-bit outlier columns."""
    if in_features * cfg.bits % 32:
        raise StreamqError(f"cannot pack {cfg.bits}-bit codes: in_features {in_features} is not a multiple of "
                           f"{32 // math.gcd(cfg.bits, 32)}")
    if in_features > 1 << 16:
        raise StreamqError(f"SpQR: in_features {in_features} does not fit the 16-bit outlier column indices")
    if cfg.qq_scale_bits is None:
        stats = (("zero", cfg.bits),)
    else:
        if out_features % cfg.qq_groupsize:
            raise StreamqError(f"SpQR: --qq-groupsize {cfg.qq_groupsize} does not divide out_features {out_features}")
        stats = (("scale", cfg.qq_scale_bits), ("zero", cfg.qq_zero_bits))
    for what, bits in stats:
        if out_features * bits % 32:
            raise StreamqError(f"cannot pack {bits}-bit {what} codes: out_features {out_features} is not a multiple "
                               f"of {32 // math.gcd(bits, 32)}")


def quantization_config(cfg: QuantConfig, quantizer: str) -> dict:
    """config.json's quantization_config of a SpQR folder: what `config_from_quantization_config` needs to load it
    (bits, group sizes, second-level bits) and how it was made. JSON-safe: an infinite outlier threshold is "inf".

    quant_method is "spqr", but the tensors are this module's layout (checkpoint_format "streamq-spqr"), not the
    one transformers' own SpQR integration reads: load the folder with `streamq.load`."""
    fields = cfg.to_dict()
    return {
        "quant_method": "spqr", "checkpoint_format": "streamq-spqr", "bits": cfg.bits, "group_size": cfg.group_size,
        "qq_scale_bits": cfg.qq_scale_bits, "qq_zero_bits": cfg.qq_zero_bits, "qq_groupsize": cfg.qq_groupsize,
        "outlier_threshold": fields["outlier_threshold"], "simplified_outliers": cfg.simplified_outliers,
        "outlier_format": "csr: outlier_row_ptr int32, outlier_col int16 (uint16 bits), outlier_val fp16",
        "permutation_order": "act_order" if cfg.act_order else "identity", "desc_act": cfg.act_order,
        "sym": cfg.sym, "damp_percent": cfg.damp, "true_sequential": cfg.true_sequential,
        "quantizer": [quantizer], "streamq_method": "spqr", "streamq_ignore": list(cfg.ignore),
    }


def config_from_quantization_config(q: dict) -> QuantConfig:
    """The method "spqr" QuantConfig written by quantization_config (the fields the layout depends on, and the
    recipe)."""
    return QuantConfig.from_dict({
        "method": "spqr", "sym": False, "bits": q["bits"], "group_size": q["group_size"],
        "qq_scale_bits": q.get("qq_scale_bits"), "qq_zero_bits": q.get("qq_zero_bits"),
        "qq_groupsize": q.get("qq_groupsize", 16), "outlier_threshold": q.get("outlier_threshold", "inf"),
        "simplified_outliers": q.get("simplified_outliers", False), "act_order": q.get("desc_act", False),
        "damp": q.get("damp_percent", 0.01), "true_sequential": q.get("true_sequential", True),
        "ignore": tuple(q.get("streamq_ignore", ())),
    })


def _fp16(t: Tensor, what: str) -> Tensor:
    h = t.half()
    if not torch.equal(h.to(t.dtype), t):
        raise StreamqError(f"SpQR {what} are not fp16-representable; the checkpoint would not reproduce the weights")
    return h.contiguous()


def pack_spqr(result: SpQRResult, cfg: QuantConfig) -> dict[str, Tensor]:
    """SpQRResult -> the tensors above (on the result's device)."""
    out_features, in_features = result.codes.shape
    tensors = {
        "qweight": pack_bits(result.codes.t(), cfg.bits, dim=0),
        "perm": result.perm.to(torch.int32).contiguous(),
        "outlier_row_ptr": result.outlier_row_ptr.to(torch.int32).contiguous(),
        # uint16 column bit pattern in int16 (safetensors has no uint16)
        "outlier_col": torch.where(result.outlier_col >= 1 << 15, result.outlier_col - (1 << 16),
                                   result.outlier_col).to(torch.int16).contiguous(),
        "outlier_val": result.outlier_val.half().contiguous(),
    }
    if cfg.qq_scale_bits is None:
        tensors["scales"] = _fp16(result.scale, "scales")
        tensors["qzeros"] = pack_bits(result.zero.to(torch.int64), cfg.bits, dim=1)
    else:
        for stat, qq, bits in (("scale", result.scale_qq, cfg.qq_scale_bits),
                               ("zero", result.zero_qq, cfg.qq_zero_bits)):
            tensors[f"{stat}_codes"] = pack_bits(qq.codes, bits, dim=1)
            tensors[f"{stat}_qq_scale"] = _fp16(qq.scale, "second-level scales")
            tensors[f"{stat}_qq_zero"] = _fp16(qq.zero, "second-level zeros")
    return tensors


def _second_level_value(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes [G, out] int, scale/zero [G, out/qq] fp16 -> scale * (codes - zero) [G, out] fp32."""
    qq = codes.shape[1] // scale.shape[1]
    return scale.float().repeat_interleave(qq, 1) * (codes.float() - zero.float().repeat_interleave(qq, 1))


def unpack_spqr(tensors: dict[str, Tensor], cfg: QuantConfig) -> SpQRTensors:
    """The tensors above -> codes, dequantized first-level statistics, permutation and outliers."""
    perm = tensors["perm"].long()
    row_ptr = tensors["outlier_row_ptr"].long()
    out_features, in_features = row_ptr.numel() - 1, perm.numel()
    codes = unpack_bits(tensors["qweight"], cfg.bits, in_features, dim=0).t().contiguous()
    if cfg.qq_scale_bits is None:
        scale = tensors["scales"].float()
        zero = unpack_bits(tensors["qzeros"], cfg.bits, out_features, dim=1).float()
    else:
        scale = _second_level_value(unpack_bits(tensors["scale_codes"], cfg.qq_scale_bits, out_features, dim=1),
                                    tensors["scale_qq_scale"], tensors["scale_qq_zero"])
        zero = _second_level_value(unpack_bits(tensors["zero_codes"], cfg.qq_zero_bits, out_features, dim=1),
                                   tensors["zero_qq_scale"], tensors["zero_qq_zero"])
    col = tensors["outlier_col"].long() & 0xFFFF
    return SpQRTensors(codes, scale, zero, perm, row_ptr, col, tensors["outlier_val"].half())


def dequantize_spqr(tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    """Packed tensors -> W: [out, in] fp32 (the plain-torch reference of kernels/spqr.py)."""
    return dense_spqr(unpack_spqr(tensors, cfg))


def dense_spqr(t: SpQRTensors) -> Tensor:
    """Unpacked tensors (codes of any integer dtype) -> W: [out, in] fp32 (see dequantize_spqr)."""
    dense = group_affine(t.codes, t.scale, t.zero)  # [out, in], permuted columns
    if torch.equal(t.perm, torch.arange(t.perm.numel(), device=t.perm.device)):
        W = dense
    else:
        W = torch.empty_like(dense)
        W[:, t.perm] = dense
    rows = torch.repeat_interleave(torch.arange(t.row_ptr.numel() - 1, device=W.device), t.row_ptr.diff())
    W[rows, t.col] += t.val.float()
    return W


def bits_per_parameter(out_features: int, in_features: int, cfg: QuantConfig, n_outliers: int) -> float:
    """Average storage bits per weight as the SpQR paper counts them, plus the permutation:

    bits (codes) + (bs + bz) / gs (first-level statistic codes) + 2 * (16 + 16) / (gs * qq) (fp16 second-level
    scale and zero of both statistics) + 32 / out (the int32 permutation) + 32 * n_outliers / (out * in)
    (fp16 value + 16-bit column per outlier). Without second-level quantization the statistics cost
    (16 + bits) / gs (fp16 scale, `bits`-bit zero). The CSR row pointers, 32 * (out + 1) bits, are left out as
    in the paper; the stored tensors' size in bits is this times out * in plus them.
    """
    gs = in_features if cfg.group_size == -1 else cfg.group_size
    if cfg.qq_scale_bits is None:
        stats = (16 + cfg.bits) / gs
    else:
        stats = (cfg.qq_scale_bits + cfg.qq_zero_bits) / gs + 2 * (16 + 16) / (gs * cfg.qq_groupsize)
    return cfg.bits + stats + 32 / out_features + 32 * n_outliers / (out_features * in_features)


# The format interface (streamq/formats/__init__.py): streamq's own layout, loaded by streamq.load only.
NAME = "spqr"
SIZED_BY_DATA = True  # the outlier tensors' lengths


def check(cfg: QuantConfig) -> None:
    refuse_activation_quant(cfg, "spqr")  # only compressed-tensors describes it (quant/actquant.py)
    if cfg.method != "spqr":
        raise StreamqError(f"--format spqr holds --method spqr's results, not {cfg.method}'s; use --format gptq")


def linear_shapes(out_features: int, in_features: int, cfg: QuantConfig, n_outliers: int = 0) -> dict:
    return packed_shapes(out_features, in_features, cfg, n_outliers)


def pack(result: SpQRResult, cfg: QuantConfig) -> dict[str, Tensor]:
    return pack_spqr(result, cfg)


def unpack(tensors: dict[str, Tensor], cfg: QuantConfig):
    raise StreamqError("a SpQR folder (outliers, second-level statistics) has no exact form in another format; "
                       "compress again with --format gptq or compressed-tensors")


def dequantize(tensors: dict[str, Tensor], cfg: QuantConfig) -> Tensor:
    return dequantize_spqr(tensors, cfg)


def matches(q: dict) -> bool:
    return q.get("quant_method") == "spqr"


config_from = config_from_quantization_config


def linear_module(in_features: int, out_features: int, cfg: QuantConfig, bias: bool, device=None, dtype=None):
    from streamq.qlinear import SpQRLinear

    return SpQRLinear(in_features, out_features, cfg, bias, device=device, dtype=dtype)
