"""One decoder block's work: materialize it, quantize it with the method, and run it over the calibration
samples so the other store slot holds the next block's inputs."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from streamq.calib.capture import batched_kwargs, run_block
from streamq.calib.store import ActivationStore
from streamq.config import QuantConfig
from streamq.device import cast_floats, check_finite, to_device_ahead
from streamq.fallback import CPU
from streamq.io.blocks import ModelLayout, load_block, release_block
from streamq.io.checkpoint import Checkpoint
from streamq.ignore import ignored_in_block
from streamq.methods import QuantResult, get_method
from streamq.moe import RoutedExperts
from streamq.quant.autoround import autoround_block
from streamq.quant.actquant import observing, scale_names
from streamq.quant.actquant import scales as activation_scales
from streamq.quant.block import LayerReport, quantize_block
from streamq.quant.expert_scratch import ExpertScratch
from streamq.quant.expert_stage import streaming, streams_experts
from streamq.quant.smooth import smooth_block
from streamq.quant.stages import KEEP_BYTES


def block_work(layout: ModelLayout, ckpt: Checkpoint, i: int, store: ActivationStore | None, slot: str,
               kwargs: dict, cfg: QuantConfig, device: torch.device, dtype: torch.dtype,
               lean: bool = False, scratch: Path | None = None,
               run_key: str = "") -> tuple[dict[str, tuple[QuantResult, LayerReport]], dict[str, torch.Tensor]]:
    """Block i from its source weights on device: smoothed (cfg.smooth_alpha), quantized (its Linears hold the
    fake-quantized weights) and, with a store, its outputs on the samples of `slot` written to the other slot.
    Returns (results by Linear, the other tensors the output takes from this block by block-relative name: folded
    norm weights, activation / KV-cache scales).

    lean (the out-of-memory retry, see fallback.py): Hessian work on the CPU, no block intermediates kept
    between passes (recomputed instead); AutoRound feeds half its minibatch per forward pass. Starting from the source weights makes a retry after a failure exact.

    scratch: the block's folder for solved routed experts (quant/expert_scratch.py), keyed by run_key (the run
    fingerprint). With it, a MoE block quantized with GPTQ or RTN streams its routed experts a group at a
    time (quant/expert_stage.py) and the results of those are read back from the folder when packed.
    """
    release_block(layout, i)  # a failed attempt may have left the block half-quantized on another device
    skip = ignored_in_block(layout, i, cfg)  # --ignore: these Linears run in fp and are not solved
    what = f"block {i + 1}/{layout.n_blocks}"
    observe = bool(scale_names(layout.block_linears(i), cfg, what, skip))  # static activation / KV-cache scales
    experts = [n for n, m in layout.layers[i].named_modules() if isinstance(m, RoutedExperts)]
    if not (experts and scratch is not None and streams_experts(cfg) and not observe):
        return _block_work(layout, ckpt, i, store, slot, kwargs, cfg, device, dtype, lean, skip, what, observe,
                           load_block(layout, ckpt, i, device, dtype))
    block = load_block(layout, ckpt, i, device, dtype, exclude=tuple(n + "." for n in experts))
    keep = ExpertScratch(scratch, f"{run_key} {device.type} {dtype} lean={lean}")
    with streaming(block, layout.block_prefix(i), ckpt, layout.source_name, keep, device, dtype, skip,
                   cfg.moe_all_tokens):
        return _block_work(layout, ckpt, i, store, slot, kwargs, cfg, device, dtype, lean, skip, what, observe, block)


def _block_work(layout, ckpt, i, store, slot, kwargs, cfg, device, dtype, lean, skip, what, observe, block):
    """block_work on the loaded block."""
    kwargs = cast_floats(batched_kwargs(kwargs, 1, device), dtype)  # the CPU retry of a 16-bit run computes in fp32
    samples = None if store is None else \
        lambda: (x for _, x in to_device_ahead(store.iter_samples(slot), device, dtype, store))  # noqa: E731
    extra = {}  # tensors besides the Linears' that the output takes from this block (smooth.py, actquant.py)
    if cfg.smooth_alpha is not None and samples is not None:
        extra.update(smooth_block(block, samples, kwargs, cfg.smooth_alpha, device, what, skip))
    if get_method(cfg.method).solve is None:  # tunes the whole block (AutoRound)
        fp_inputs = None
        if cfg.fp_stream:  # block 0's inputs are the same in both streams: slot holds them
            fp_inputs = slot if i == 0 else store.fp(slot)
        return autoround_step(block, store, slot, fp_inputs, kwargs, cfg, device,
                              chunk=max(1, cfg.batch_size // 2) if lean else None, skip=skip), extra
    if store is None:
        return quantize_block(block, None, kwargs, cfg, device, CPU if lean else device, skip=skip), extra
    dest, written = store.other(slot), iter(range(store.nsamples))

    def emit(y: torch.Tensor) -> None:  # the quantized block's output for the next sample: the next block's input
        j = next(written)
        y = y.to(store.dtype)
        check_finite(y, f"{what} outputs (sample {j})")
        store.write(dest, j, y)

    # kept intermediates live where the store does: on disk a scratch file beside it (quant/kept.py), in RAM
    # within KEEP_BYTES (footprint.py counts either); the out-of-memory retry recomputes them
    spill = store.spill if not lean else None
    results = quantize_block(block, samples, kwargs, cfg, device, CPU if lean else device,
                             emit=None if observe else emit, keep_bytes=0 if lean else KEEP_BYTES // store.nsamples,
                             skip=skip, spill=spill)
    if observe:  # the output pass, observing the quantized block's activations
        with torch.no_grad(), observing(block, cfg, what, skip) as absmax:
            for x in samples():
                emit(run_block(block, x, kwargs))
        extra.update(activation_scales(absmax, cfg))
    store.complete(dest)  # made durable by the pipeline before the manifest points at it (store.sync)
    return results, extra


@torch.no_grad()
def propagate(block: nn.Module, store: ActivationStore, source: str, dest: str, kwargs: dict, device: torch.device,
              targets: str | None = None, what: str = "block") -> float | None:
    """Run block over the samples in slot `source`, writing its outputs into slot `dest`.

    targets: a slot of reference outputs (it may be dest: each sample is read before it is overwritten); return
    the relative error sum ||out - ref||^2 / sum ||ref||^2 over all samples.
    """
    sse = ref = 0.0
    dtype = next(block.parameters()).dtype
    for j, x in to_device_ahead(store.iter_samples(source), device, dtype, store):
        y = run_block(block, x, kwargs).to(store.dtype)
        check_finite(y, f"{what} outputs (sample {j})")
        if targets is not None:
            t = store.read(targets, j).to(y.device, torch.float32)
            sse += (y.float() - t).pow(2).sum().item()
            ref += t.pow(2).sum().item()
        store.write(dest, j, y)
    store.complete(dest)  # made durable by the pipeline before the manifest points at it (store.sync)
    return sse / max(ref, 1e-30) if targets is not None else None


def autoround_step(block: nn.Module, store: ActivationStore, slot: str, fp_inputs: str | None, kwargs: dict,
                   cfg: QuantConfig, device: torch.device,
                   chunk: int | None = None,
                   skip: frozenset[str] = frozenset()) -> dict[str, tuple[QuantResult, LayerReport]]:
    """AutoRound on one block, streamed. The fp block's outputs are the targets: on the fp stream's inputs
    (slot fp_inputs; they go to the fp stream's other slot and are the next block's fp inputs), or with
    fp_inputs None on the quantized inputs (into the other slot, later replaced). The tuning loop reads
    minibatches of inputs (slot) and targets from the store; the quantized block's outputs on `slot` go to the
    other slot. skip: Linears left in fp (not tuned). Every Linear's report carries the block's relative output error against the targets (AutoRound
    tunes them jointly)."""
    start = time.perf_counter()
    other = store.other(slot)
    targets = store.fp(other) if fp_inputs is not None else other
    propagate(block, store, fp_inputs or slot, targets, kwargs, device)
    tuned = autoround_block(block, lambda idx: torch.cat([store.read(slot, j) for j in idx]),
                            lambda idx: torch.cat([store.read(targets, j) for j in idx]),
                            store.nsamples, kwargs, cfg, device, chunk=chunk, skip=skip)
    error = propagate(block, store, slot, other, kwargs, device, targets=targets)
    seconds = (time.perf_counter() - start) / max(1, len(tuned))
    return {name: (result, LayerReport(error, loss, 0.0, seconds)) for name, (result, loss) in tuned.items()}
