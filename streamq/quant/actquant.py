"""Activation quantization: W8A8 (int8 Linear inputs, per token or per tensor) and the KV cache (int8 / fp8 k and v),
as fake quantization (quantize, then dequantize) for eval / load, and the observers that calibrate static scales.

Arithmetic (symmetric, vLLM's): int8 per token: scale = max|x_token| / 127, q = clamp(round(x / scale), -128, 127);
int8 per tensor (static): the same with a calibrated scale = max|x| over the calibration tokens / 127; fp8 (e4m3):
scale = max|x| / 448, q = float8_e4m3fn(x / scale). The KV cache is calibrated on the k/v projections' outputs,
before any rotary embedding or k-norm (vLLM quantizes the cache after them): one scale per layer for k and one
for v.

Scale tensors an output folder holds (block-relative names): `<linear>.input_scale` [1] fp32 per Linear with static
activation scales, `<attention>.k_scale` / `<attention>.v_scale` [1] fp32 with a KV cache, attention being the
module holding the Linears named k_proj / v_proj (what vLLM reads).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from streamq.errors import StreamqError

INT8_MAX = 127.0
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
KV_CACHE = ("int8", "fp8")
KV_MAX = {"int8": INT8_MAX, "fp8": FP8_MAX}
TINY = 1e-12  # smallest scale: an all-zero input quantizes to zeros


def check_activation_fields(cfg) -> None:
    """QuantConfig's SmoothQuant / activation fields (one-line StreamqError naming the flag)."""
    if cfg.smooth_alpha is not None and not 0 <= cfg.smooth_alpha <= 1:
        raise StreamqError(f"--smooth-alpha {cfg.smooth_alpha}: SmoothQuant's migration strength lies in [0, 1]")
    if cfg.act_bits is not None:
        if cfg.act_bits != 8:
            raise StreamqError(f"--act-bits {cfg.act_bits}: only 8 (int8 activations, W8A8) is supported")
        if cfg.bits != 8 or cfg.group_size != -1 or not cfg.sym:
            raise StreamqError("--act-bits 8 is W8A8: it needs int8 symmetric per-channel weights (--bits 8 "
                               "--group-size -1 --sym), what vLLM's W8A8 kernels read")
    elif not cfg.act_dynamic:
        raise StreamqError("--no-act-dynamic (static activation scales) needs --act-bits 8")
    if cfg.kv_cache is not None and cfg.kv_cache not in KV_CACHE:
        raise StreamqError(f"--kv-cache {cfg.kv_cache!r}: choose int8 or fp8")
    if cfg.method in ("autoround", "spqr") and ((cfg.act_bits and not cfg.act_dynamic) or cfg.kv_cache):
        raise StreamqError(f"--method {cfg.method} does not calibrate static activation or KV-cache scales; use "
                           "--method gptq or rtn (or dynamic activation scales without --kv-cache)")


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [..., features] -> int8-quantized-dequantized per token (last dim), in x's dtype."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / INT8_MAX).clamp(min=TINY)
    return ((xf / scale).round().clamp(-128, 127) * scale).to(x.dtype)


def fake_quant_tensor(x: torch.Tensor, scale: torch.Tensor, kind: str = "int8") -> torch.Tensor:
    """x quantized-dequantized with one scale (a 1-element tensor): int8 or fp8 (e4m3), in x's dtype."""
    xf, s = x.float(), scale.float().reshape(()).to(x.device).clamp(min=TINY)
    if kind == "fp8":
        q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    else:
        q = (xf / s).round().clamp(-128, 127)
    return (q * s).to(x.dtype)


def kv_projections(linears: dict[str, nn.Module]) -> dict[str, str]:
    """{"k": name, "v": name} of the Linears named k_proj / v_proj (block-relative names), or {} when the block
    has none (fused q/k/v Linears cannot be told apart)."""
    found = {kind: n for n in linears for kind in ("k", "v") if n.rpartition(".")[2] == f"{kind}_proj"}
    return found if len(found) == 2 else {}


def scale_names(linears: dict[str, nn.Module], cfg, where: str = "block", skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """The scale tensors a block's output holds: block-relative tensor name -> what it scales (a Linear's input
    "in:<linear>", or "k:<linear>" / "v:<linear>" for the KV cache). skip: Linears left in fp (--ignore), whose
    inputs are not quantized."""
    names = {}
    if cfg.act_bits is not None and not cfg.act_dynamic:
        names.update({f"{n}.input_scale": f"in:{n}" for n in linears if n not in skip})
    if cfg.kv_cache is not None:
        kv = kv_projections(linears)
        if not kv:
            raise StreamqError(f"{where}: --kv-cache needs separate k_proj / v_proj Linears; this block has "
                               f"{', '.join(linears)}")
        for kind, n in kv.items():
            parent = n.rpartition(".")[0]
            names[f"{parent + '.' if parent else ''}{kind}_scale"] = f"{kind}:{n}"
    return names


def scale_specs(linears: dict[str, nn.Module], cfg, where: str = "block",
                skip: frozenset[str] = frozenset()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Block-relative name -> (shape, dtype) of each scale tensor (for planning the output shards)."""
    return {name: ((1,), torch.float32) for name in scale_names(linears, cfg, where, skip)}


@contextlib.contextmanager
def observing(block: nn.Module, cfg, where: str = "block", skip: frozenset[str] = frozenset()):
    """While active, record max|x| of what each scale tensor scales; yields a dict that, after the forwards,
    scales() turns into the scale tensors."""
    modules = dict(block.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    targets = scale_names(linears, cfg, where, skip)
    absmax: dict[str, float] = {t: 0.0 for t in targets}
    hooks = []
    for tensor_name, target in targets.items():
        kind, lin = target.split(":", 1)

        def record(t, key=tensor_name):
            absmax[key] = max(absmax[key], t.detach().abs().max().item())

        if kind == "in":
            hooks.append(modules[lin].register_forward_pre_hook(lambda m, a, record=record: record(a[0])))
        else:
            hooks.append(modules[lin].register_forward_hook(lambda m, a, o, record=record: record(o)))
    try:
        yield absmax
    finally:
        for h in hooks:
            h.remove()


def scales(absmax: dict[str, float], cfg) -> dict[str, torch.Tensor]:
    """Observed max|x| per scale tensor -> the scale tensors ([1] fp32): max / 127 (int8) or / 448 (fp8 KV)."""
    out = {}
    for name, m in absmax.items():
        top = KV_MAX[cfg.kv_cache] if name.endswith(("k_scale", "v_scale")) else INT8_MAX
        out[name] = torch.tensor([max(m, TINY * top) / top], dtype=torch.float32)
    return out


def attach(block: nn.Module, cfg, scale_tensors: dict[str, torch.Tensor], where: str = "block",
           skip: frozenset[str] = frozenset()) -> list:
    """Register fake-quantization hooks on block (Linear inputs with act_bits, k/v outputs with kv_cache);
    returns the hook handles. scale_tensors: the block's scale tensors by block-relative name."""
    modules = dict(block.named_modules())
    linears = {n: m for n, m in modules.items() if isinstance(m, nn.Linear) or hasattr(m, "dequantized_weight")}
    hooks = []
    if cfg.act_bits is not None:
        for n, m in ((n, m) for n, m in linears.items() if n not in skip):  # --ignore: fp inputs
            if cfg.act_dynamic:
                hooks.append(m.register_forward_pre_hook(lambda mod, a: (fake_quant_per_token(a[0]), *a[1:])))
            else:
                s = _scale(scale_tensors, f"{n}.input_scale", where)
                hooks.append(m.register_forward_pre_hook(lambda mod, a, s=s: (fake_quant_tensor(a[0], s), *a[1:])))
    if cfg.kv_cache is not None:
        for name, target in scale_names(linears, cfg, where).items():
            kind, lin = target.split(":", 1)
            if kind in ("k", "v"):
                s = _scale(scale_tensors, name, where)
                hooks.append(modules[lin].register_forward_hook(
                    lambda mod, a, o, s=s: fake_quant_tensor(o, s, cfg.kv_cache)))
    return hooks


@contextlib.contextmanager
def fake_quantized(block: nn.Module, cfg, scale_tensors: dict[str, torch.Tensor], where: str = "block",
                   skip: frozenset[str] = frozenset()):
    """attach() for the duration of a with-block."""
    hooks = attach(block, cfg, scale_tensors, where, skip) if cfg is not None else []
    try:
        yield block
    finally:
        for h in hooks:
            h.remove()


def _scale(scale_tensors: dict, name: str, where: str) -> torch.Tensor:
    if name not in scale_tensors:
        raise StreamqError(f"{where}: scale tensor {name} is missing")
    return scale_tensors[name]


def quantizes_activations(cfg) -> bool:
    """Whether cfg fake-quantizes anything at run time (activations or the KV cache)."""
    return cfg is not None and (cfg.act_bits is not None or cfg.kv_cache is not None)


def refuse_activation_quant(cfg, fmt: str) -> None:
    """One-line StreamqError when a format that cannot describe activation / KV-cache quantization is asked to."""
    if cfg.act_bits is not None or cfg.kv_cache is not None:
        raise StreamqError(f"--format {fmt} cannot describe activation or KV-cache quantization (--act-bits / "
                           "--kv-cache); use --format compressed-tensors")


def read_scales(ckpt, layout, i: int, cfg) -> dict[str, torch.Tensor]:
    """Block i's scale tensors from an output folder's checkpoint (block-relative name -> [1] fp32); {} when cfg
    quantizes no activations. layout's block i must still hold its nn.Linear modules."""
    if not quantizes_activations(cfg):
        return {}
    where = f"{ckpt.folder}: block {i}"
    from streamq.ignore import ignored_in_block

    skip = ignored_in_block(layout, i, cfg)
    return {n: ckpt.get(layout.block_prefix(i) + n) for n in scale_names(layout.block_linears(i), cfg, where, skip)}
