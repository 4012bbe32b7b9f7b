"""Quantize one decoder block in place: hooks collect each Linear's Hessian from the calibration inputs, the
method solves each layer, and the block's weights become the fake-quantized ones.

True-sequential order: Linears that read the same input tensor (q/k/v, then o, then gate/up, then down) form
a group; a group's Hessians are collected with every earlier group already quantized, as in GPTQ's
`--true-sequential`. A collection pass stops as soon as the group's last Linear has seen its input.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from streamq.config import QuantConfig
from streamq.forward import run_block
from streamq.methods import QuantResult, get_method
from streamq.quant.hessian import HessianAccumulator, relative_output_error
from streamq.quant.spqr import SpQRResult

Samples = Callable[[], Iterable[torch.Tensor]]  # a fresh pass over the block's inputs, each [1, seq, hidden]


@dataclass
class LayerReport:
    """What one Linear's quantization did. error: relative output error on the calibration inputs
    (GPTQ) or relative weight error ||W-Q||^2/||W||^2 (RTN, which sees no data); seconds: solve time."""

    error: float
    loss: float
    damp: float
    seconds: float
    warning: str = ""


class _StopForward(Exception):
    pass


@torch.no_grad()
def linear_groups(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Names of the block's Linears grouped by the input tensor they read, in execution order."""
    seen: list[tuple[str, torch.Tensor]] = []  # tensors kept alive so no two inputs share an id
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
             for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        run_block(block, x, kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name, t in seen:
        if name not in groups.setdefault(id(t), []):
            groups[id(t)].append(name)
    return list(groups.values())


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], samples: Samples, kwargs: dict,
                     device: torch.device, hessian_device: torch.device) -> dict[str, torch.Tensor]:
    """One pass over the samples (block forward on device); returns H [in, in] fp32 on hessian_device per
    named Linear."""
    modules = dict(block.named_modules())
    accs = {n: HessianAccumulator(modules[n].in_features, hessian_device) for n in names}
    pending: set[str] = set()

    def hook(module, args, name):
        accs[name].add(args[0])
        pending.discard(name)
        if not pending:
            raise _StopForward

    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        for x in samples():
            pending.update(names)
            try:
                run_block(block, x.to(device), kwargs)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: acc.H for n, acc in accs.items()}


def quantize_linear(linear: nn.Linear, H: torch.Tensor | None,
                    cfg: QuantConfig) -> tuple[QuantResult | SpQRResult, LayerReport]:
    """Solve one layer and write its fake-quantized weight back into the module (SpQRResult for method spqr)."""
    start = time.perf_counter()
    W = linear.weight.detach().float() if H is None else linear.weight.detach().to(H.device, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, loss, damp = get_method(cfg.method).solve(W, H, cfg)  # the method's solver (streamq.methods)
        if H is None:  # data-free
            error = ((W - result.weight).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30)).item()
        else:
            error = relative_output_error(W, result.weight, H)
    linear.weight.data = result.weight.to(linear.weight.device, linear.weight.dtype)
    note = "; ".join(str(w.message) for w in caught)
    return result, LayerReport(error, loss, damp, time.perf_counter() - start, note)


@torch.no_grad()
def quantize_block(block: nn.Module, samples: Samples, kwargs: dict, cfg: QuantConfig, device: torch.device,
                   hessian_device: torch.device | None = None,
                   ) -> dict[str, tuple[QuantResult | SpQRResult, LayerReport]]:
    """Quantize every Linear of block (on device) in true-sequential groups. Returns results by Linear name.

    hessian_device: where the Hessians are accumulated and each layer solved (default: device); the CPU
    when the block's forward fits the GPU but the Hessian work does not."""
    modules = dict(block.named_modules())
    if not get_method(cfg.method).calibrated:  # data-free (RTN): no Hessians, no passes
        return {n: quantize_linear(m, None, cfg) for n, m in modules.items() if isinstance(m, nn.Linear)}
    first = next(iter(samples())).to(device)
    groups = linear_groups(block, first, kwargs)
    if not cfg.true_sequential:
        groups = [[n for g in groups for n in g]]
    results = {}
    for group in groups:
        hessians = collect_hessians(block, group, samples, kwargs, device, hessian_device or device)
        for name in group:
            results[name] = quantize_linear(modules[name], hessians.pop(name), cfg)
    return results
