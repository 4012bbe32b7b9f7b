"""AutoRound: signed gradient descent on the rounding of every Linear of one decoder block.

Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs" (2023),
reference implementation intel/auto-round. Per weight a rounding offset V in [-0.5, 0.5], per group of columns
two factors alpha, beta in [0, 1] that shrink the min/max range:

    scale, zero = grid(alpha * min(W), beta * max(W))          the RTN grid of grid.py on the tuned range
    Q(W)        = scale * (clamp(round(W / scale + V) + zero, 0, maxq) - zero)

V, alpha and beta of all the block's Linears are tuned jointly to minimise the MSE between the block's output
with Q(W) and the fp block's output on the same inputs, with round() passed straight through in the backward
pass and the update p -= lr_t * sign(grad), lr_t decaying linearly from lr to 0. The iterate with the lowest
minibatch loss is kept. With V = 0 and alpha = beta = 1 (iters = 0) Q is exactly rtn_quantize.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.forward import batched_kwargs
from streamq.methods import QuantResult
from streamq.quant.grid import check_group_size, fp16_scale, full_range_scale, grid_range

Batch = Callable[[list[int]], Tensor]  # sample indices -> [len(idx), seq, hidden]


class Tunable(NamedTuple):
    """One Linear's fixed weight and its tuned parameters, columns viewed as [out, groups, group_size]."""

    W: Tensor  # [out, G, gs] fp32, the original weight
    wmin: Tensor  # [out, G] fp32, min of each group clamped to <= 0
    wmax: Tensor  # [out, G] fp32, max of each group clamped to >= 0
    V: Tensor  # [out, G, gs] fp32 rounding offsets, init 0
    alpha: Tensor  # [out, G] fp32 factor on wmin, init 1
    beta: Tensor  # [out, G] fp32 factor on wmax, init 1


def _round_ste(x: Tensor) -> Tensor:
    """round(x), with gradient 1 (straight-through) when x needs one. round(x) - x is exact in floating point,
    so both branches give the same values."""
    return x + (torch.round(x) - x).detach() if x.requires_grad else torch.round(x)


def qdq(t: Tunable, bits: int, sym: bool, full_range: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fake-quantize t.W on its tuned grid -> (weight [out, G, gs], codes [out, G, gs], scale [out, G], zero [out, G]).

    Op for op the arithmetic of grid.fit_grid / quantize_codes / dequantize (fp16-rounded scale, 0 -> smallest
    fp16 normal, asym zero clamped to [1, maxq]; full_range: grid.full_range_scale) applied to the range
    [alpha*wmin, beta*wmax] and W/scale + V.
    """
    maxq = (1 << bits) - 1
    if full_range:  # alpha, beta in [0, 1] keep alpha*wmin <= 0 <= beta*wmax
        scale = full_range_scale(t.wmin * t.alpha, t.wmax * t.beta, bits)
    else:
        xmin, xmax = grid_range(t.wmin * t.alpha, t.wmax * t.beta, sym)
        scale = fp16_scale((xmax - xmin) / maxq)
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else _round_ste(-xmin / scale).clamp(1, maxq)
    scale3, zero3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = torch.clamp(_round_ste(t.W / scale3 + t.V) + zero3, 0, maxq)
    return scale3 * (codes - zero3), codes, scale, zero


def autoround_block(block: nn.Module, inputs: Batch, targets: Batch, nsamples: int, kwargs: dict, cfg: QuantConfig,
                    device: torch.device, on_iter: Callable[[int, float], None] | None = None,
                    chunk: int | None = None,
                    skip: frozenset[str] = frozenset()) -> dict[str, tuple[QuantResult, float]]:
    """Tune and quantize every nn.Linear of block (already on device) jointly; returns {name: (result, loss)}.

    inputs(idx) / targets(idx): the block's inputs and its fp outputs for samples idx, each [len(idx), seq,
    hidden]; only one minibatch is held at a time. kwargs: the block's forward kwargs captured for one sample
    (tensors with a leading dim of 1 are expanded to the minibatch). loss: the lowest minibatch MSE seen, that
    of the returned weights; on_iter(i, loss) is called after every iteration. chunk: samples per forward pass
(default cfg.batch_size); a smaller chunk feeds the same batch_size * grad_accum samples per step in more
passes (the out-of-memory retry), the same gradient up to summation order. The fake-quantized weights are
    written into the block in its dtype; the block's requires_grad flags are left as found. skip: names of
    Linears left in fp (--ignore): not tuned, not returned.
    """
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    if not linears:
        return {}
    dtype = next(iter(linears.values())).weight.dtype
    tunables = {n: _init(n, m, cfg) for n, m in linears.items()}
    flags = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            loss = _tune(block, tunables, inputs, targets, nsamples, kwargs, cfg, device, dtype, on_iter,
                         chunk or cfg.batch_size)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)

    out = {}
    with torch.no_grad():
        for name, m in linears.items():
            result = _result(tunables[name], cfg)
            m.weight.data = result.weight.to(m.weight.dtype)
            out[name] = (result, loss)
    return out


def _tune(block, tunables: dict[str, Tunable], inputs: Batch, targets: Batch, nsamples: int, kwargs: dict,
          cfg: QuantConfig, device, dtype, on_iter, chunk: int) -> float:
    """Signed gradient descent on V / alpha / beta in place; leaves the best iterate in tunables. Returns its loss."""
    params = [t.V for t in tunables.values()]
    if cfg.minmax_tuning:
        params += [p for t in tunables.values() for p in (t.alpha, t.beta)]
    lr = cfg.lr if cfg.lr is not None else 1.0 / max(cfg.iters, 1)
    sampler = torch.Generator().manual_seed(cfg.seed)
    pick = min(nsamples, cfg.batch_size * cfg.grad_accum)
    amp = dtype in (torch.float16, torch.bfloat16)

    def minibatch_loss(backward: bool) -> float:
        """MSE over `pick` random samples, fed `chunk` at a time; with backward, grads summed into params."""
        idx = torch.randperm(nsamples, generator=sampler)[:pick].tolist()
        sse, count = 0.0, 0
        for b in range(0, pick, chunk):
            part = idx[b:b + chunk]
            x = inputs(part).to(device, dtype)
            y = targets(part).to(device, torch.float32)
            # 16-bit compute as the reference does it: fp32 master values (V, alpha, beta, the fp32 Q(W)) under
            # autocast, which runs matmuls in 16 bits, the ops that need range (softmax, norms) in fp32, and sends
            # fp32 gradients back to the master values.
            weights = {f"{n}.weight": qdq(t, cfg.bits, cfg.sym, cfg.full_range)[0].reshape(t.W.shape[0], -1)
                       .to(torch.float32 if amp else dtype) for n, t in tunables.items()}
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=amp):
                out = functional_call(block, weights, (x,), batched_kwargs(kwargs, len(part), device))
            out = out[0] if isinstance(out, tuple) else out
            # Backward on the sum, not the mean: sign(grad) is the same, and the mean's 2*(out - y)/numel
            # would underflow in an fp16 backward.
            err = (out.float() - y).pow(2).sum()
            if backward:
                err.backward()
            sse, count = sse + err.item(), count + y.numel()
        return sse / count

    if cfg.iters == 0:  # plain RTN; its loss is measured on one minibatch for the report
        with torch.no_grad():
            loss = minibatch_loss(backward=False)
        if on_iter is not None:
            on_iter(0, loss)
        return loss

    best_loss, best = math.inf, None
    for i in range(cfg.iters):
        loss = minibatch_loss(backward=True)
        if on_iter is not None:
            on_iter(i, loss)
        if loss < best_loss:  # the parameters that produced this loss, before the step below
            best_loss, best = loss, [p.detach().clone() for p in params]
        with torch.no_grad():
            step = lr * (1 - i / cfg.iters)  # linear decay to 0 (torch LinearLR, end_factor 0)
            for p in params:
                if p.grad is not None:
                    p.sub_(step * p.grad.sign())
                    p.grad = None
            for t in tunables.values():
                t.V.clamp_(-0.5, 0.5)
                t.alpha.clamp_(0, 1)
                t.beta.clamp_(0, 1)
    if best is None:
        raise StreamqError(f"AutoRound: the block's loss was {loss} at every iteration (overflow in its forward?)")
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    return best_loss


def _init(name: str, linear: nn.Linear, cfg: QuantConfig) -> Tunable:
    """V = 0, alpha = beta = 1 (the RTN grid) for one Linear; the range of each group taken from its weight."""
    check_group_size(linear.in_features, cfg.group_size, name)
    out_f, in_f = linear.weight.shape
    gs = in_f if cfg.group_size == -1 else cfg.group_size
    W = linear.weight.detach().float().reshape(out_f, in_f // gs, gs)
    wmin, wmax = W.amin(dim=-1).clamp(max=0), W.amax(dim=-1).clamp(min=0)
    V = torch.zeros_like(W, requires_grad=True)
    alpha = torch.ones_like(wmin, requires_grad=cfg.minmax_tuning)
    beta = torch.ones_like(wmax, requires_grad=cfg.minmax_tuning)
    return Tunable(W, wmin, wmax, V, alpha, beta)


def _result(t: Tunable, cfg: QuantConfig) -> QuantResult:
    """The tuned grid in the layout every packer reads (scales/zeros [G, out], original column order)."""
    weight, codes, scale, zero = qdq(t, cfg.bits, cfg.sym, cfg.full_range)
    out_f, G, gs = t.W.shape
    g_idx = torch.arange(G * gs, device=t.W.device, dtype=torch.int32) // gs
    return QuantResult(weight.reshape(out_f, -1), codes.reshape(out_f, -1).to(torch.uint8),
                       scale.t().contiguous(), zero.t().contiguous().to(torch.uint8), g_idx)
