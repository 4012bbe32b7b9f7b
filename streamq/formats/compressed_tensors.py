"""The compressed-tensors `pack-quantized` layout (llm-compressor's output, vLLM's native wNa16 format),
written with the compressed-tensors library's own packer and config classes (`pip install streamq[formats]`).

Per quantized Linear `<name>` (out features, in features, b bits, G groups, o = 2^(b-1)):
  <name>.weight_packed      int32 [out, ceil(in*b/32)]  pack_to_int32 of the signed codes q - o, along rows
  <name>.weight_scale       fp16  [out, G]              the scales as streamq computed them (possibly signed)
  <name>.weight_zero_point  int32 [ceil(out*b/32), G]   asym only: pack_to_int32 of the signed true zero z - o,
                                                        packed along the output dimension
  <name>.weight_shape       int64 [2]                   (out, in)
Dequantized: W[r, c] = weight_scale[r, c // gs] * ((q[r, c] - o) - (z[r, c // gs] - o)), which is streamq's
scale * (q - z) exactly. Symmetric grids (the GPTQ one and the full-range one) have z = o: no zero point.
There is no g_idx: compressed-tensors 0.20 dropped group act-order, so act-order is stored only with static
groups (columns quantized in Hessian order, groups in column order: `actorder: static`).

W8A8 (cfg.act_bits 8: int8 symmetric per-channel weights with int8 activations) is written in the `int-quantized`
layout instead, the one vLLM's W8A8 int8 kernels and compressed-tensors read for activation quantization:
  <name>.weight             int8  [out, in]             the signed codes q - 128
  <name>.weight_scale       fp16  [out, 1]
plus the activation scales of streamq/quant/actquant.py (`input_scale`, `k_scale` / `v_scale`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from streamq.errors import StreamqError
from streamq.formats.gptq import GPTQTensors, dense_gptq
from streamq.methods import QuantResult

NAME = "compressed-tensors"
SIZED_BY_DATA = False


def _library():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        raise StreamqError("--format compressed-tensors needs the compressed-tensors package: "
                           "pip install 'streamq[formats]'") from None
    return pack_to_int32, unpack_from_int32


def check(cfg) -> None:
    from streamq.formats.dense import refuse_16_bits

    refuse_16_bits(cfg, NAME)
    if cfg.method == "spqr":
        raise StreamqError("--format compressed-tensors cannot hold SpQR's outliers and second-level statistics; "
                           "use --format spqr")
    if cfg.act_order and not cfg.static_groups and cfg.group_size != -1:
        raise StreamqError("--format compressed-tensors stores no g_idx (compressed-tensors 0.20 removed group "
                           "act-order): use --act-order with --static-groups, or --format gptq")


def _groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def int_quantized(cfg) -> bool:
    """Whether cfg is written in the int-quantized layout (W8A8) rather than pack-quantized."""
    return cfg.act_bits is not None


def linear_shapes(out_features: int, in_features: int, cfg, n_outliers: int = 0) -> dict:
    G = _groups(in_features, cfg.group_size)
    if int_quantized(cfg):
        return {"weight_scale": ((out_features, G), torch.float16), "weight": ((out_features, in_features), torch.int8)}
    shapes = {
        "weight_packed": ((out_features, -(-in_features * cfg.bits // 32)), torch.int32),
        "weight_scale": ((out_features, G), torch.float16),
        "weight_shape": ((2,), torch.int64),
    }
    if not cfg.sym:
        shapes["weight_zero_point"] = ((-(-out_features * cfg.bits // 32), G), torch.int32)
    return shapes


def tensor_names(cfg) -> tuple[str, ...]:
    if int_quantized(cfg):  # weight_scale first: it marks a quantized Linear (every Linear has a .weight)
        return ("weight_scale", "weight")
    return ("weight_packed", "weight_scale", "weight_shape") + (() if cfg.sym else ("weight_zero_point",))


def pack(result: QuantResult, cfg) -> dict[str, Tensor]:
    """QuantResult (g_idx the column order) -> the tensors above."""
    pack_to_int32, _ = _library()
    out_features, in_features = result.codes.shape
    G = result.scales.shape[0]
    offset = 1 << (cfg.bits - 1)
    plain = torch.arange(in_features, device=result.g_idx.device) // (in_features // G)
    if not torch.equal(result.g_idx.long(), plain):
        raise StreamqError("compressed-tensors has no g_idx: this layer's groups are not in column order")
    scales = result.scales.half()
    if not torch.equal(scales.float(), result.scales.float()):
        raise StreamqError("scales are not fp16-representable; the checkpoint would not reproduce the weights")
    if int_quantized(cfg):
        return {"weight_scale": scales.t().contiguous().cpu(),
                "weight": (result.codes.to(torch.int32) - offset).to(torch.int8).cpu()}
    tensors = {
        "weight_packed": pack_to_int32((result.codes.to(torch.int32) - offset).to(torch.int8).cpu(), cfg.bits),
        "weight_scale": scales.t().contiguous().cpu(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    zeros = result.zeros.to(torch.int32).cpu() - offset  # [G, out] signed
    if cfg.sym:
        if zeros.any():
            raise StreamqError("a symmetric compressed-tensors layer has zero point 2^(bits-1); this one does not")
    else:
        tensors["weight_zero_point"] = pack_to_int32(zeros.t().contiguous().to(torch.int8), cfg.bits, packed_dim=0)
    return tensors


def unpack(tensors: dict[str, Tensor], cfg) -> GPTQTensors:
    """The tensors above -> codes [out, in] int32 in [0, 2^b), scales [G, out] fp32, zeros [G, out], g_idx."""
    scale = tensors["weight_scale"]
    G = scale.shape[1]
    offset = 1 << (cfg.bits - 1)
    if int_quantized(cfg):
        out_features, in_features = tensors["weight"].shape
        zeros = torch.full((G, out_features), offset, dtype=torch.int32, device=scale.device)
        g_idx = (torch.arange(in_features, device=scale.device) // (in_features // G)).to(torch.int32)
        return GPTQTensors(tensors["weight"].to(torch.int32) + offset, scale.t().float().contiguous(), zeros, g_idx)
    _, unpack_from_int32 = _library()
    out_features, in_features = (int(v) for v in tensors["weight_shape"])
    codes = unpack_from_int32(tensors["weight_packed"], cfg.bits, torch.Size((out_features, in_features)))
    if cfg.sym:
        zeros = torch.full((G, out_features), offset, dtype=torch.int32, device=scale.device)
    else:
        zp = unpack_from_int32(tensors["weight_zero_point"], cfg.bits, torch.Size((out_features, G)), packed_dim=0)
        zeros = zp.to(torch.int32).t().contiguous() + offset
    g_idx = (torch.arange(in_features, device=scale.device) // (in_features // G)).to(torch.int32)
    return GPTQTensors(codes.to(torch.int32) + offset, scale.t().float().contiguous(), zeros, g_idx)


def dequantize(tensors: dict[str, Tensor], cfg) -> Tensor:
    return dense_gptq(unpack(tensors, cfg))


def quantization_config(cfg, quantizer: str) -> dict:
    """config.json's quantization_config, built with compressed-tensors' own config classes: one config group
    for every Linear but lm_head, int weights, pack-quantized, already compressed."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=cfg.sym,
                            strategy="channel" if cfg.group_size == -1 else "group",
                            group_size=None if cfg.group_size == -1 else cfg.group_size,
                            actorder="static" if cfg.act_order else None, scale_dtype=torch.float16)
    inputs, kv_cache = activation_args(cfg)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=inputs)
    config = QuantizationConfig(config_groups={"group_0": scheme},
                                format="int-quantized" if int_quantized(cfg) else "pack-quantized",
                                quantization_status="compressed", kv_cache_scheme=kv_cache,
                                ignore=[*cfg.ignore, *([] if cfg.quant_lm_head else ["lm_head"])])  # left dense
    q = config.model_dump(mode="json")
    q.update(quantizer=[quantizer], streamq_method=cfg.method, streamq_full_range=cfg.full_range)
    if cfg.sparsity:  # SparseGPT: the zeros are zero codes of the packed weights
        from streamq.formats.dense import sparsity_config

        q["sparsity_config"] = sparsity_config(cfg)
    return q


def matches(q: dict) -> bool:
    return q.get("quant_method") == "compressed-tensors"


def config_from(q: dict):
    """The layout fields of a compressed-tensors quantization_config (one int weight group) as a QuantConfig."""
    from streamq.config import QuantConfig

    groups = list((q.get("config_groups") or {}).values())
    if len(groups) != 1 or q.get("format") not in ("pack-quantized", "int-quantized") \
            or not (groups[0].get("weights") or {}):
        raise StreamqError("streamq reads compressed-tensors folders with one pack-quantized or int-quantized "
                           "weight group")
    w = groups[0]["weights"]
    act_order = w.get("actorder") is not None
    ignore = q.get("ignore") or []
    return QuantConfig(bits=w["num_bits"], group_size=-1 if w.get("group_size") is None else w["group_size"],
                       sym=w.get("symmetric", True), full_range=q.get("streamq_full_range", False),
                       act_order=act_order, static_groups=act_order,
                       ignore=tuple(n for n in ignore if n != "lm_head"), quant_lm_head="lm_head" not in ignore,
                       **activation_fields(groups[0].get("input_activations"), q.get("kv_cache_scheme")))


def activation_args(cfg):
    """(input_activations, kv_cache_scheme) QuantizationArgs of cfg, None where not quantized: int8 activations per
    token (dynamic) or per tensor (static, scales in <linear>.input_scale); the KV cache int8 or fp8 (type float)
    per tensor, static, scales in <attention>.k_scale / v_scale (streamq/quant/actquant.py)."""
    from compressed_tensors.quantization import QuantizationArgs

    inputs = kv_cache = None
    if cfg.act_bits is not None:
        inputs = QuantizationArgs(num_bits=cfg.act_bits, type="int", symmetric=True, dynamic=cfg.act_dynamic,
                                  strategy="token" if cfg.act_dynamic else "tensor")
    if cfg.kv_cache is not None:
        kv_cache = QuantizationArgs(num_bits=8, type="float" if cfg.kv_cache == "fp8" else "int", symmetric=True,
                                    strategy="tensor", dynamic=False)
    return inputs, kv_cache


def activation_fields(inputs: dict | None, kv_cache: dict | None) -> dict:
    """QuantConfig's act_bits / act_dynamic / kv_cache from the config's input_activations / kv_cache_scheme;
    a scheme streamq does not run is refused in one line."""
    fields = {}
    for name, value in (("input_activations", inputs), ("kv_cache_scheme", kv_cache)):
        if value is not None and not isinstance(value, dict):
            raise StreamqError(f"compressed-tensors {name} is {value!r}, not a QuantizationArgs object")
    if inputs:
        if inputs.get("num_bits") != 8 or inputs.get("type", "int") != "int" or not inputs.get("symmetric", True) \
                or inputs.get("strategy") not in ("token", "tensor"):
            raise StreamqError(f"compressed-tensors input_activations {inputs}: streamq runs symmetric int8 per token "
                               "or per tensor only")
        fields.update(act_bits=8, act_dynamic=bool(inputs.get("dynamic", inputs.get("strategy") == "token")))
    if kv_cache:
        if kv_cache.get("num_bits") != 8 or kv_cache.get("strategy") != "tensor" \
                or kv_cache.get("type") not in ("int", "float"):
            raise StreamqError(f"compressed-tensors kv_cache_scheme {kv_cache}: streamq runs 8-bit per-tensor int or "
                               "float (fp8) caches only")
        fields["kv_cache"] = "fp8" if kv_cache["type"] == "float" else "int8"
    return fields


def linear_module(in_features: int, out_features: int, cfg, bias: bool, device=None, dtype=None):
    if int_quantized(cfg):  # the checkpoint serves <name>.weight dequantized (io/checkpoint.py): a plain Linear
        return torch.nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
    return PackedQuantizedLinear(in_features, out_features, cfg, bias, device=device, dtype=dtype)


from streamq.qlinear import UnpackedCache  # noqa: E402  (qlinear imports formats.gptq, which this module uses)


class PackedQuantizedLinear(UnpackedCache):
    """y = x @ W^T + b with W [out, in] rebuilt from one Linear's pack-quantized tensors (see above)."""

    def __init__(self, in_features: int, out_features: int, cfg, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        for name, (shape, dt) in linear_shapes(out_features, in_features, cfg).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def dequantized_weight(self) -> Tensor:
        """W: [out, in] fp32."""
        tensors = {k: getattr(self, k) for k in linear_shapes(self.out_features, self.in_features, self.cfg)}
        return dense_gptq(self.cached(lambda: unpack(tensors, self.cfg)))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
