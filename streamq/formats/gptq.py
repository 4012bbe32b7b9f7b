"""The GPTQ checkpoint layout (AutoGPTQ `checkpoint_format: "gptq"`, i.e. v1).

Per quantized Linear `<name>` (out features, in features, b bits, G groups):
  <name>.qweight  int32 [in*b/32, out]  codes of W^T, packed along the input dimension
  <name>.qzeros   int32 [G, out*b/32]   zero points minus 1 (the v1 offset), packed along the output dimension
  <name>.scales   fp16  [G, out]
  <name>.g_idx    int32 [in]            group of each input column (a permutation of blocks under act-order)
  <name>.bias     unchanged, when the Linear has one (written by the caller)
Dequantized: W[r, c] = scales[g_idx[c], r] * (code[r, c] - (qzero[g_idx[c], r] + 1)).

Packing is a little-endian bitstream: along the packed dimension, each run of 32 values becomes b words;
value j of the run occupies bits [b*j, b*j + b) of the run read as one 32*b-bit little-endian integer
(word k holds bits [32k, 32k + 32)). For b = 2, 4, 8 no value crosses a word; for b = 3 values 10 and 21
straddle two words. This is exactly AutoGPTQ's `pack` loop for 2/3/4/8 bits. Words are stored as int32
(bit 31 is the sign bit).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch import Tensor

from streamq.config import PACKABLE_BITS
from streamq.errors import StreamqError
from streamq.quant.actquant import refuse_activation_quant
from streamq.methods import QuantResult

_WORD = 32


class GPTQTensors(NamedTuple):
    """Unpacked contents of one GPTQ Linear (QuantResult without the dequantized weight)."""

    codes: Tensor  # [out, in] int32 in [0, 2**bits - 1]
    scales: Tensor  # [n_groups, out] fp32 (from fp16)
    zeros: Tensor  # [n_groups, out] int32 zero points (the +1 of v1 already added back)
    g_idx: Tensor  # [in] int32


def _check_packable(n: int, bits: int, what: str) -> None:
    if bits not in PACKABLE_BITS:
        raise StreamqError(f"GPTQ format packs {', '.join(map(str, PACKABLE_BITS))} bits, not {bits}")
    if n * bits % _WORD != 0:
        multiple = _WORD // math.gcd(bits, _WORD)
        raise StreamqError(f"cannot pack {bits}-bit codes: {what} {n} is not a multiple of {multiple}")


def _run(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest run of values filling whole words: (16, 1) for 2 bits, (32, 3) for 3."""
    values = _WORD // math.gcd(bits, _WORD)
    return values, values * bits // _WORD


def _slots(bits: int) -> list[tuple[int, int, int]]:
    """(j, word, shift) of value j in a run: it starts at bit `shift` of word `word` of the run."""
    return [(j, bits * j // _WORD, bits * j % _WORD) for j in range(_run(bits)[0])]


def pack_bits(codes: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Pack integer codes [n, m] (values < 2**bits) along `dim` into int32 words (n*bits/32 along dim).

    Computed with the packed dimension last (for qweight, codes.t() packed along dim 0, that is the codes' own
    contiguous layout: no transposed copy of the codes is made)."""
    c = codes.movedim(dim, -1)
    n = c.shape[-1]
    _check_packable(n, bits, "packed dimension")
    if c.numel():
        lo, hi = torch.aminmax(c)
        if int(lo) < 0 or int(hi) >= 1 << bits:
            raise StreamqError(f"cannot pack values outside [0, {(1 << bits) - 1}] into {bits} bits")
    values, n_words = _run(bits)
    runs = c.to(torch.int64).unflatten(-1, (n // values, values))  # [..., runs, values]
    if n_words == 1:  # 2, 4, 8 bits: no value crosses a word, the bit ranges are disjoint, so a sum is an or
        shifts = torch.tensor([shift for _, _, shift in _slots(bits)], dtype=torch.int64, device=c.device)
        words = (runs << shifts).sum(dim=-1, keepdim=True)
    else:
        words = runs.new_zeros(*runs.shape[:-1], n_words)
        for j, k, shift in _slots(bits):
            words[..., k] |= (runs[..., j] << shift) & 0xFFFFFFFF
            if shift + bits > _WORD:  # the value's high bits spill into the next word
                words[..., k + 1] |= runs[..., j] >> (_WORD - shift)
    words = torch.where(words >= 2**31, words - 2**32, words)  # uint32 bit pattern as int32
    return words.flatten(-2).to(torch.int32).movedim(-1, dim).contiguous()


def unpack_bits(packed: Tensor, bits: int, n: int, dim: int = 0) -> Tensor:
    """Inverse of pack_bits: int32 words -> int32 codes with n values along `dim`."""
    _check_packable(n, bits, "unpacked dimension")
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    if p.shape[0] != n * bits // _WORD:
        raise StreamqError(f"packed dimension {p.shape[0]} does not hold {n} {bits}-bit values")
    values, n_words = _run(bits)
    words = p.reshape(n // values, n_words, *p.shape[1:])
    mask = (1 << bits) - 1
    runs = []
    for j, k, shift in _slots(bits):
        v = words[:, k] >> shift
        if shift + bits > _WORD:
            v = v | (words[:, k + 1] << (_WORD - shift))
        runs.append(v & mask)
    codes = torch.stack(runs, dim=1).reshape(n, *p.shape[1:])
    return codes.to(torch.int32).movedim(0, dim).contiguous()


def packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the packed tensors of one Linear, without quantizing it (to plan shards)."""
    _check_packable(in_features, bits, "in_features")
    _check_packable(out_features, bits, "out_features")
    n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    return {
        "qweight": ((in_features * bits // _WORD, out_features), torch.int32),
        "qzeros": ((n_groups, out_features * bits // _WORD), torch.int32),
        "scales": ((n_groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def pack_gptq(result: QuantResult, bits: int) -> dict[str, Tensor]:
    """QuantResult -> {qweight, qzeros, scales, g_idx} in the v1 layout above (CPU or the result's device)."""
    out_features, in_features = result.codes.shape
    _check_packable(in_features, bits, "in_features")
    _check_packable(out_features, bits, "out_features")
    maxq = (1 << bits) - 1
    if int(result.zeros.min()) < 1 or int(result.zeros.max()) > maxq:
        raise StreamqError(f"zero points must lie in [1, {maxq}]: the v1 format stores zero-1")
    scales = result.scales.half()
    if not torch.equal(scales.float(), result.scales.float()):
        raise StreamqError("scales are not fp16-representable; the checkpoint would not reproduce the weights")
    return {
        "qweight": pack_bits(result.codes.t(), bits, dim=0),
        "qzeros": pack_bits(result.zeros.to(torch.int64) - 1, bits, dim=1),
        "scales": scales.contiguous(),
        "g_idx": result.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, Tensor], bits: int) -> GPTQTensors:
    """{qweight, qzeros, scales, g_idx} -> codes [out, in], fp32 scales, zero points (+1 restored), g_idx."""
    scales = tensors["scales"]
    g_idx = tensors["g_idx"].to(torch.int32)
    out_features, in_features = scales.shape[1], g_idx.numel()
    codes = unpack_bits(tensors["qweight"], bits, in_features, dim=0).t().contiguous()
    zeros = unpack_bits(tensors["qzeros"], bits, out_features, dim=1) + 1
    return GPTQTensors(codes, scales.float(), zeros, g_idx)


def dequantize_gptq(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """Packed tensors -> W: [out, in] fp32, W[r, c] = scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r])."""
    return dense_gptq(unpack_gptq(tensors, bits))


def dense_gptq(t: GPTQTensors) -> Tensor:
    """Unpacked tensors (codes of any integer dtype) -> W: [out, in] fp32 (see dequantize_gptq)."""
    codes, scales, zeros, g_idx = t
    n_groups, in_features = scales.shape[0], g_idx.numel()
    if in_features % n_groups == 0 and torch.equal(g_idx.long(), torch.arange(in_features, device=g_idx.device)
                                                     // (in_features // n_groups)):
        return group_affine(codes, scales, zeros)  # groups of consecutive columns: no gather
    g = g_idx.long()
    return (scales[g].t() * (codes.float() - zeros[g].t().float())).contiguous()


def group_affine(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """scale * (codes - zero) for codes [out, in] whose columns form G equal consecutive groups, scale / zero
    [G, out]: [out, in] fp32, the same values as gathering the per-column statistics, without the gather."""
    out_features, in_features = codes.shape
    G = scale.shape[0]
    c = codes.reshape(out_features, G, in_features // G).float()
    return (scale.t().float()[:, :, None] * (c - zero.t().float()[:, :, None])).reshape(out_features, in_features)


# The format interface (streamq/formats/__init__.py). What the loaders read, checked against their sources:
# transformers' GptqHfQuantizer hands quantization_config to gptqmodel (QuantizeConfig: bits, group_size,
# desc_act, sym, checkpoint_format "gptq" = v1, zero points stored minus one); vLLM's gptq / gptq_marlin
# configs read bits, group_size, desc_act, sym (and ignore qzeros for sym, assuming 2^(bits-1)), and refuse
# desc_act with a g_idx that is not the column order. desc_act is therefore written true only when g_idx is
# a real permutation of groups (act-order without static groups); the full-range symmetric grid (signed
# scales, zero 2^(bits-1)) is the same arithmetic, scale * (q - 2^(bits-1)), and is stored as it is.
NAME = "gptq"
SIZED_BY_DATA = False


def check(cfg) -> None:
    from streamq.formats.dense import refuse_16_bits

    refuse_16_bits(cfg, NAME)
    refuse_activation_quant(cfg, "gptq")  # only compressed-tensors describes it (quant/actquant.py)
    if cfg.method == "spqr":
        raise StreamqError("--format gptq cannot hold SpQR's outliers and second-level statistics; "
                           "use --format spqr (loaded by streamq.load)")


def linear_shapes(out_features: int, in_features: int, cfg, n_outliers: int = 0) -> dict:
    return packed_shapes(out_features, in_features, cfg.bits, cfg.group_size)


def pack(result: QuantResult, cfg) -> dict[str, Tensor]:
    return pack_gptq(result, cfg.bits)


def unpack(tensors: dict[str, Tensor], cfg) -> GPTQTensors:
    return unpack_gptq(tensors, cfg.bits)


def dequantize(tensors: dict[str, Tensor], cfg) -> Tensor:
    return dequantize_gptq(tensors, cfg.bits)


def identity_g_idx(cfg) -> bool:
    """Whether g_idx is the plain column order (c // group_size): all but act-order with dynamic groups."""
    return not cfg.act_order or cfg.static_groups or cfg.group_size == -1


def quantization_config(cfg, quantizer: str) -> dict:
    """config.json's quantization_config as transformers (gptqmodel) and vLLM read a GPTQ v1 checkpoint."""
    return {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
        "desc_act": not identity_g_idx(cfg), "sym": cfg.sym, "static_groups": cfg.static_groups,
        "true_sequential": cfg.true_sequential, "damp_percent": cfg.damp,
        "quantizer": [quantizer], "streamq_method": cfg.method, "streamq_full_range": cfg.full_range,
        "streamq_act_order": cfg.act_order,
        # --ignore / --quant-lm-head (streamq/ignore.py): gptqmodel's and vLLM's `dynamic` skips a module whose
        # name a "-:" regex matches (left dense); both read `lm_head` as "the head is quantized too"
        "lm_head": cfg.quant_lm_head, "streamq_ignore": list(cfg.ignore),
        **({"dynamic": {f"-:^{re.escape(n)}$": {} for n in cfg.ignore}} if cfg.ignore else {}),
    }


def matches(q: dict) -> bool:
    return q.get("quant_method") == "gptq"


def config_from(q: dict):
    """The layout fields of a GPTQ folder's quantization_config as a QuantConfig (method gptq)."""
    from streamq.config import QuantConfig

    act_order = q.get("streamq_act_order", q.get("desc_act", False))
    return QuantConfig(bits=q["bits"], group_size=q["group_size"], sym=q.get("sym", True),
                       full_range=q.get("streamq_full_range", False), act_order=act_order,
                       static_groups=act_order and q.get("static_groups", False),
                       ignore=tuple(q.get("streamq_ignore", ())), quant_lm_head=bool(q.get("lm_head", False)))


def linear_module(in_features: int, out_features: int, cfg, bias: bool, device=None, dtype=None):
    from streamq.qlinear import QuantLinear

    return QuantLinear(in_features, out_features, cfg.bits, cfg.group_size, bias, device=device, dtype=dtype)


def tensor_names(cfg) -> tuple[str, ...]:
    return ("qweight", "qzeros", "scales", "g_idx")
