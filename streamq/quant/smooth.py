"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, one decoder block at a time,
before the weight method runs.

A *mapping* is a group of Linears that read one tensor which a norm returned (Llama: q/k/v <- input_layernorm,
gate/up <- post_attention_layernorm; OPT: q/k/v <- self_attn_layer_norm, fc1 <- final_layer_norm), found from
the block's structure by tracing one forward with hooks, never from a list of names. Per input channel j:
    s_j = max|X_j|^alpha / max|W_{:,j}|^(1-alpha)
(max|X_j| over every calibration token, max|W| over the group's rows; the weight maximum and s clamped to
>= 1e-5, as mit-han-lab/smoothquant's smooth.py does). The norm's weight (and bias) is divided by s and the
Linears' input columns multiplied by it: (X / s) (W diag(s))^T = X W^T, so the fp block computes the same.
Linears whose input no norm returns (o_proj, down_proj) are left alone, as in the reference and llm-compressor.
Foldability is checked, not assumed: after each fold the block's output on one sample must still equal the
original's (a norm computing (1 + w) * x, Gemma's, or a norm output read by something besides its group, fails
and is left unsmoothed, with a warning).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from streamq.forward import run_block, run_hooked

MIN_SCALE = 1e-5  # the reference's clamp of max|W| and of s


@dataclass
class Mapping:
    """Linears (block-relative names) that read the output of module `norm`."""

    norm: str
    linears: list[str]


class _Stop(Exception):
    pass


@torch.no_grad()
def find_mappings(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[Mapping]:
    """The block's groups of Linears whose shared input is the output of a module holding a 1-D weight of the
    input's width (a norm), traced on one sample x [1, seq, hidden]."""
    modules = {n: m for n, m in block.named_modules() if n}
    produced, read, alive = {}, {}, []  # id(tensor) -> innermost module returning it / Linears reading it

    def post(name, module, args, out):
        if isinstance(out, torch.Tensor):
            alive.append(out)
            produced.setdefault(id(out), name)  # inner modules' hooks run first

    def pre(name, module, args):
        alive.append(args[0])
        read.setdefault(id(args[0]), []).append(name)

    hooks = []
    for name, m in modules.items():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: pre(name, m, a)))
        else:
            hooks.append(m.register_forward_hook(lambda m, a, o, name=name: post(name, m, a, o)))
    run_hooked(block, x, kwargs, hooks)
    mappings = []
    for key, linears in read.items():
        norm = produced.get(key)
        weight = getattr(modules.get(norm), "weight", None) if norm else None
        width = modules[linears[0]].in_features
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width:
            mappings.append(Mapping(norm, list(dict.fromkeys(linears))))
    return mappings


@torch.no_grad()
def activation_absmax(block: nn.Module, mappings: list[Mapping], samples: Iterable[torch.Tensor], kwargs: dict,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """Per mapped norm: max|X_j| [hidden] fp32 over every token of every sample; each forward stops once the
    last mapped norm has run."""
    absmax: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def hook(name):
        def post(module, args, out):
            m = out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
            pending.discard(name)
            if not pending:
                raise _Stop
        return post

    modules = dict(block.named_modules())
    hooks = [modules[m.norm].register_forward_hook(hook(m.norm)) for m in mappings]
    try:
        for x in samples:
            pending.update(m.norm for m in mappings)
            try:
                run_block(block, x.to(device), kwargs)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return absmax


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] fp32 from max|X| [in] and the group's weights (each [out_k, in]): the reference's formula."""
    w_absmax = torch.stack([w.detach().abs().float().amax(0) for w in weights]).amax(0).clamp(min=MIN_SCALE)
    return (act_absmax.to(w_absmax.device).pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=MIN_SCALE)


@torch.no_grad()
def fold(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the norm's weight (and bias) by s, multiply each Linear's input columns by s (computed in fp32)."""
    for p in (norm.weight, getattr(norm, "bias", None)):
        if isinstance(p, torch.Tensor):
            p.data = (p.float() / s.to(p.device)).to(p.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.float() * s.to(lin.weight.device)).to(lin.weight.dtype)


def _tolerance(dtype: torch.dtype) -> float:
    """Largest relative L2 change of the block output a fold may cause: rounding of the folded weights."""
    return 1e-3 if dtype == torch.float32 or dtype == torch.float64 else 5e-2


@torch.no_grad()
def smooth_block(block: nn.Module, samples: Callable[[], Iterable[torch.Tensor]], kwargs: dict, alpha: float,
                 device: torch.device, where: str = "block", skip: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Smooth block in place on the calibration samples (each [1, seq, hidden]); returns the folded norm
    tensors (block-relative name -> new value, in the block's dtype), which the output must carry. A mapping
    holding a Linear of skip (--ignore: copied unchanged) is left unsmoothed."""
    x0 = next(iter(samples())).to(device)
    mappings = [m for m in find_mappings(block, x0, kwargs) if not set(m.linears) & skip]
    if not mappings:
        return {}
    absmax = activation_absmax(block, mappings, samples(), kwargs, device)
    modules = dict(block.named_modules())
    reference = run_block(block, x0, kwargs).float()
    tol = _tolerance(next(block.parameters()).dtype)
    folded = {}
    for m in mappings:
        norm, linears = modules[m.norm], [modules[n] for n in m.linears]
        saved = [p.detach().clone() for p in (norm.weight, getattr(norm, "bias", None), *(l.weight for l in linears))
                 if isinstance(p, torch.Tensor)]
        s = smoothing_scales(absmax[m.norm], [lin.weight for lin in linears], alpha)
        fold(norm, linears, s)
        y = run_block(block, x0, kwargs).float()
        change = ((y - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if not change <= tol:  # not a plain elementwise-weight norm, or its output has other readers
            params = [p for p in (norm.weight, getattr(norm, "bias", None), *(l.weight for l in linears))
                      if isinstance(p, torch.Tensor)]
            for p, old in zip(params, saved):
                p.data = old
            warnings.warn(f"{where}: {m.norm} -> {', '.join(m.linears)} left unsmoothed (folding changed the "
                          f"block output by {change:.2g}, above {tol:g})", stacklevel=2)
            continue
        folded.update({f"{m.norm}.{k}": p.detach() for k, p in norm.named_parameters(recurse=False)})
    return folded
