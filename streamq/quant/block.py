"""Quantize one decoder block in place: hooks collect each Linear's Hessian from the calibration inputs, the
method solves each layer, and the block's weights become the fake-quantized ones.

True-sequential order: Linears that read the same input tensor (q/k/v, then o, then gate/up, then down) form
a group with one shared Hessian; a group's Hessian is collected with every earlier group already quantized, as
in GPTQ's `--true-sequential`. A collection pass stops as soon as the group's input is seen, and what earlier
passes computed final is replayed rather than recomputed (stages.py): each part of the block runs about once.
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
from streamq.moe import all_tokens
from streamq.quant.expert_stage import InputsKept, StreamedExperts, dry_run, solve_experts, streamed_experts
from streamq.quant.hessian import HessianAccumulator, relative_output_error
from streamq.quant.kept import BuiltOnRead, close_kept, new_kept
from streamq.quant.spqr import SpQRResult
from streamq.quant.stages import Plan, Replay, Skip, Trace, clone_output, plan, swap
from streamq.quant.twins import twin_trace

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
    tokens: int | None = None  # MoE routed expert: calibration tokens routed to it (None: every token)


class _StopForward(Exception):
    pass


@torch.no_grad()
def run_pass(block: nn.Module, t: Trace, p: Plan, j: int, samples: Samples, kwargs: dict, device: torch.device,
             hessian_device: torch.device, kept: dict[str, list], emit: Callable | None,
             tokens: dict[str, int] | None = None, spill=None) -> dict[str, torch.Tensor]:
    """Pass j of plan p over the samples: p.replay[j] replaced by their kept outputs, the outputs p.record[j]
    and the inputs of the tails p.build[j] kept (into `kept`), pass j's Hessians collected (H [in, in] fp32 on
    hessian_device, one per input tensor, by Linear name) or, in the last pass, each output handed to emit.
    tokens: filled with the tokens each of pass j's Linears saw (a routed expert sees only its own). A
    StreamedExperts in pass j gets its call arguments per sample instead of a Hessian (kept.py list; spill: its folder)."""
    modules = dict(block.named_modules())
    groups = p.passes[j] if j < len(p.passes) else []
    accs = [InputsKept(spill) if isinstance(modules[g[0]], StreamedExperts) else
            HessianAccumulator(modules[g[0]].in_features, hessian_device) for g in groups]
    builds = [[m for m, b in p.build.items() if b == j and t.tails[m] in g and t.tails[m] != m] for g in groups]
    pending: set[int] = set()
    seen = [0] * len(groups)
    at = [0]  # the sample being run, for the stand-ins

    def hook_for(k):
        def pre_hook(module, args):
            accs[k].add(args if isinstance(accs[k], InputsKept) else args[0])
            seen[k] += args[0].numel() // max(1, args[0].shape[-1])
            for m in builds[k]:
                kept[m].append(args[0])
            pending.discard(k)
            if not pending:
                raise _StopForward
        return pre_hook

    def keep(m):
        # a RAM list keeps a copy (the block may change the tensors in place); a spilled one (kept.py) just the bytes
        return lambda module, args, out: kept[m].append(out if getattr(kept[m], "fresh", False) else clone_output(out))

    hooks = [modules[g[0]].register_forward_pre_hook(hook_for(k)) for k, g in enumerate(groups)]
    hooks += [modules[m].register_forward_hook(keep(m)) for m, r in p.record.items() if r == j]
    replaced = {m: swap(block, m, Replay(modules[m], kept[m], at)) for m in p.replay[j]}
    replaced.update({m: swap(block, m, Skip(modules[m])) for m in (p.skip[j] if p.skip else [])})
    try:
        for k, x in enumerate(samples()):
            at[0] = k
            pending.update(range(len(groups)))
            try:
                y = run_block(block, x.to(device), kwargs)
            except _StopForward:
                continue
            if emit is not None:
                emit(y)
    finally:
        for h in hooks:
            h.remove()
        for m, original in replaced.items():
            swap(block, m, original)
    if tokens is not None:
        tokens.update({n: c for c, g in zip(seen, groups) for n in g})
    return {n: acc.H for acc, g in zip(accs, groups) for n in g}


def build_tails(block: nn.Module, t: Trace, p: Plan, j: int, kept: dict[str, list], spill=None) -> None:
    """After pass j's solve: each tail built in pass j becomes its (now quantized) Linear applied to the kept
    input, shaped as the module returns it; the inputs are dropped (spill: the scratch folder of kept.py). With
    spill, a tail replayed in one pass only is built there as it is read (kept.BuiltOnRead): its outputs never
    go through the scratch file (SmolLM2-135M: the MLP's, 1.2 of the 6.7 MB a sample wrote there)."""
    for m, b in p.build.items():
        if b == j and t.tails[m] != m:  # a StreamedExperts' outputs come from its solve
            linear = block.get_submodule(t.tails[m])
            if spill is not None and sum(m in r for r in p.replay) == 1:
                kept[m] = BuiltOnRead(linear, kept[m], t.tail_len[m])
                continue
            n, outs = t.tail_len[m], new_kept(spill)
            for x in kept[m]:
                y = linear(x)
                outs.append((y, *([None] * (n - 1))) if n else y)
            close_kept(kept[m])
            kept[m] = outs


def quantize_linear(linear: nn.Linear, H: torch.Tensor | None, cfg: QuantConfig,
                    tokens: int | None = None) -> tuple[QuantResult | SpQRResult, LayerReport]:
    """Solve one layer and write its fake-quantized weight back into the module (SpQRResult for method spqr).

    tokens: a routed expert's calibration tokens; below cfg.moe_min_tokens its Hessian is replaced by the
    identity (the solve then rounds each weight to nearest on the method's grid), with a warning."""
    start = time.perf_counter()
    W = linear.weight.detach().float() if H is None else linear.weight.detach().to(H.device, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if H is not None and tokens is not None and tokens < cfg.moe_min_tokens:
            warnings.warn(f"{tokens} calibration tokens routed to this expert (< --moe-min-tokens "
                          f"{cfg.moe_min_tokens}): round-to-nearest (identity Hessian)")
            H = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
        result, loss, damp, *num = get_method(cfg.method).solve(W, H, cfg)  # the method's solver (streamq.methods)
        if H is None:  # data-free
            error = ((W - result.weight).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30)).item()
        else:
            error = relative_output_error(W, result.weight, H, num=num[0] if num else None)
    linear.weight.data = result.weight.to(linear.weight.device, linear.weight.dtype)
    note = "; ".join(str(w.message) for w in caught)
    return result, LayerReport(error, loss, damp, time.perf_counter() - start, note, tokens)


@torch.no_grad()
def quantize_block(block: nn.Module, samples: Samples, kwargs: dict, cfg: QuantConfig, device: torch.device,
                   hessian_device: torch.device | None = None, emit: Callable[[torch.Tensor], None] | None = None,
                   keep_bytes: int | None = None,
                   skip: frozenset[str] = frozenset(),
                   spill: str | None = None) -> dict[str, tuple[QuantResult | SpQRResult, LayerReport]]:
    """Quantize every Linear of block (on device) in true-sequential groups. Returns results by Linear name.

    hessian_device: where the Hessians are accumulated and each layer solved (default: device); the CPU
    when the block's forward fits the GPU but the Hessian work does not. emit: called with the quantized
    block's output [1, seq, hidden] on each sample, in order (the next block's inputs). keep_bytes: most bytes
    per sample of intermediate outputs kept between passes (None: no limit; 0: recompute everything). skip: names of
    Linears left in fp (--ignore): they run in every pass with their source weights and are not returned. spill: a
    folder: every kept output goes to a scratch file there instead (kept.py), keep_bytes is not used."""
    modules = dict(block.named_modules())
    if not get_method(cfg.method).calibrated:  # data-free (RTN): no Hessians, no passes
        results = {n: quantize_linear(m, None, cfg) for n, m in modules.items()
                   if isinstance(m, nn.Linear) and n not in skip}
        for m in streamed_experts(block).values():
            results.update(solve_experts(m, None, cfg, device, False, quantize=quantize_linear)[0])
        if emit is not None:
            for x in samples():
                emit(run_block(block, x.to(device), kwargs))
        return results
    with all_tokens(block, cfg.moe_all_tokens):
        return _quantize_passes(block, samples, kwargs, cfg, device, hessian_device, emit, keep_bytes, modules, skip,
                                spill)


def _quantize_passes(block, samples, kwargs, cfg, device, hessian_device, emit, keep_bytes, modules, skip, spill):
    """quantize_block's true-sequential passes (MoE experts in the calibration mode cfg asks for)."""
    with dry_run(block):
        t = twin_trace(block, lambda: next(iter(samples())).to(device), kwargs, device)
    p = plan(t, cfg.true_sequential, None if spill is not None else keep_bytes)
    kept = {m: new_kept(spill) for m in [*p.record, *p.build]}
    last_use = {m: max(j for j, r in enumerate(p.replay) if m in r) for m in kept}
    results, tokens = {}, {}
    try:
        for j in range(len(p.passes) + (emit is not None)):
            hessians = run_pass(block, t, p, j, samples, kwargs, device, hessian_device or device, kept, emit, tokens,
                                spill)
            for name in (n for g in p.passes[j] for n in g) if j < len(p.passes) else ():
                H = hessians.pop(name)
                if isinstance(modules[name], StreamedExperts):  # its experts solved a group at a time
                    built = p.build.get(name) == j  # its outputs are kept: the solve computes them
                    solved, outputs = solve_experts(modules[name], H, cfg, hessian_device or device, built, spill,
                                                    quantize_linear)
                    results.update(solved)
                    close_kept(H)
                    if built:
                        close_kept(kept[name])
                        kept[name] = outputs
                elif name not in skip:
                    results[name] = quantize_linear(modules[name], H, cfg,
                                                    tokens[name] if name in t.parallel else None)
                del H  # freed with its group's last Linear (and with it the solver's factor of it, gptq.py)
            build_tails(block, t, p, j, kept, spill)
            for m in [m for m, last in last_use.items() if last == j]:
                close_kept(kept.pop(m))
    finally:
        for k in kept.values():
            close_kept(k)
    return results
