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

from streamq.calib.capture import run_block
from streamq.config import QuantConfig
from streamq.quant.gptq import gptq_quantize
from streamq.quant.grid import QuantResult
from streamq.quant.hessian import HessianAccumulator, relative_output_error
from streamq.quant.rtn import rtn_quantize
from streamq.quant.spqr import SpQRResult, spqr_quantize

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
def collect_hessians(block: nn.Module, inputs: list[list[str]], samples: Samples, kwargs: dict,
                     device: torch.device, hessian_device: torch.device) -> dict[str, torch.Tensor]:
    """One pass over the samples (block forward on device); returns H [in, in] fp32 on hessian_device per
    named Linear. inputs: Linears grouped by the tensor they read (linear_groups): one accumulation per
    group, at its first Linear, shared by all of them; the forward stops once every group's input is seen."""
    modules = dict(block.named_modules())
    accs = [HessianAccumulator(modules[names[0]].in_features, hessian_device) for names in inputs]
    pending: set[int] = set()

    def hook_for(k):
        def pre_hook(module, args):
            accs[k].add(args[0])
            pending.discard(k)
            if not pending:
                raise _StopForward
        return pre_hook

    hooks = [modules[names[0]].register_forward_pre_hook(hook_for(k)) for k, names in enumerate(inputs)]
    try:
        for x in samples():
            pending.update(range(len(inputs)))
            try:
                run_block(block, x.to(device), kwargs)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {n: acc.H for acc, names in zip(accs, inputs) for n in names}


def quantize_linear(linear: nn.Linear, H: torch.Tensor | None,
                    cfg: QuantConfig) -> tuple[QuantResult | SpQRResult, LayerReport]:
    """Solve one layer and write its fake-quantized weight back into the module (SpQRResult for method spqr)."""
    start = time.perf_counter()
    W = linear.weight.detach().float() if H is None else linear.weight.detach().to(H.device, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cfg.method == "rtn":
            result, loss, damp = rtn_quantize(W, cfg), 0.0, 0.0
            error = ((W - result.weight).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30)).item()
        elif cfg.method == "spqr":
            result = spqr_quantize(W, H, cfg)
            loss, damp = result.loss, result.damp
            error = relative_output_error(W, result.weight, H)
        else:
            out = gptq_quantize(W, H, cfg)
            result, loss, damp = out.result, out.loss, out.damp
            error = relative_output_error(W, result.weight, H)
    linear.weight.data = result.weight.to(linear.weight.device, linear.weight.dtype)
    note = "; ".join(str(w.message) for w in caught)
    return result, LayerReport(error, loss, damp, time.perf_counter() - start, note)


@torch.no_grad()
def quantize_block(block: nn.Module, samples: Samples, kwargs: dict, cfg: QuantConfig, device: torch.device,
                   hessian_device: torch.device | None = None, emit: Callable[[torch.Tensor], None] | None = None,
                   ) -> dict[str, tuple[QuantResult | SpQRResult, LayerReport]]:
    """Quantize every Linear of block (on device) in true-sequential groups. Returns results by Linear name.

    hessian_device: where the Hessians are accumulated and each layer solved (default: device); the CPU
    when the block's forward fits the GPU but the Hessian work does not. emit: called with the quantized
    block's output [1, seq, hidden] on each sample, in order (the next block's inputs)."""
    modules = dict(block.named_modules())
    if cfg.method == "rtn":  # data-free: no Hessians, no passes
        return {n: quantize_linear(m, None, cfg) for n, m in modules.items() if isinstance(m, nn.Linear)}
    first = next(iter(samples())).to(device)
    groups = linear_groups(block, first, kwargs)
    passes = [[g] for g in groups] if cfg.true_sequential else [groups]
    results = {}
    for inputs in passes:
        hessians = collect_hessians(block, inputs, samples, kwargs, device, hessian_device or device)
        for name in (n for names in inputs for n in names):
            results[name] = quantize_linear(modules[name], hessians.pop(name), cfg)
    if emit is not None:
        for x in samples():
            emit(run_block(block, x.to(device), kwargs))
    return results
