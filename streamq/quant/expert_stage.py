"""A block's routed experts quantized one planned group of experts at a time, never all of them in memory.

While block_work quantizes a MoE block (GPTQ or RTN), each RoutedExperts module is replaced by StreamedExperts,
which holds no weights and no nn.Linear: the true-sequential trace (quant/stages.py) sees it as one leaf that
reads (hidden_states, top_k_index, top_k_weights). The pass that reaches it keeps those inputs per sample
(spilled beside the activation store when that is on disk) and stops there, as a Hessian pass stops at its
group's input; its "solve" is solve_experts below: per group of experts (source weights + Hessians within
GROUP_BYTES), the group's Linears are read from the checkpoint, the samples are read three times (gate/up
Hessians from the routed rows; gate and up solved; down's Hessian from act(gate_q x) * up_q x; down solved;
the group's weighted outputs added into each sample's accumulator, experts in RoutedExperts.forward's order,
so the sum is bit-identical), each solved expert is saved to the block's scratch folder
(quant/expert_scratch.py) and the group is dropped. The accumulated outputs become the module's kept output,
replayed in later passes like a built tail. Without true-sequential, down's Hessian comes from the source
gate/up (one loop). Wherever the block still runs the module itself (a pass past it without its kept output:
--no-true-sequential, the lean out-of-memory retry), forward computes RoutedExperts.forward one expert at a
time: source weights before the expert is solved, its saved quantized weights after. Experts already in the
scratch (a resumed run) are read back instead of solved; their outputs are recomputed from the saved weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from streamq.config import QuantConfig
from streamq.io.checkpoint import Checkpoint
from streamq.moe import RoutedExperts, add_expert_output, expert_mid, routed_rows
from streamq.quant.expert_scratch import ExpertScratch
from streamq.quant.hessian import HessianAccumulator
from streamq.quant.kept import close_kept, new_kept

# Most bytes of one group of experts materialized together: their weights in the compute dtype plus their
# fp32 Hessians (footprint.py counts one group). At DeepSeek-V3 width (7168 / 2048, fp32 on the CPU) that
# is 2 experts, each ~0.4 GB; at Mixtral width (4096 / 14336) one.
GROUP_BYTES = 1 << 30
STREAMED_METHODS = ("gptq", "rtn")  # methods whose result is a plain QuantResult (expert_scratch.py saves it)


def streams_experts(cfg: QuantConfig) -> bool:
    """Whether a MoE block's routed experts are streamed under cfg (else the block is materialized whole:
    SpQR / SparseGPT results, AutoRound's whole-block tuning, SmoothQuant's folding into the experts, static
    activation / KV-cache scales observed on the whole quantized block)."""
    static_scales = (cfg.act_bits is not None and not cfg.act_dynamic) or cfg.kv_cache is not None
    return cfg.method in STREAMED_METHODS and cfg.smooth_alpha is None and not static_scales


def expert_bytes(hidden: int, inter: int, c: int) -> int:
    """Bytes one expert holds while its group is solved: weights [inter, hidden] x 3 in the compute dtype
    (itemsize c) and its two fp32 Hessians (gate/up [hidden, hidden], down [inter, inter])."""
    return 3 * hidden * inter * c + 4 * (hidden ** 2 + inter ** 2)


def experts_per_group(hidden: int, inter: int, c: int) -> int:
    return max(1, GROUP_BYTES // expert_bytes(hidden, inter, c))


class StreamedExperts(nn.Module):
    """Stands in for a RoutedExperts (its skeleton module, on the meta device, is `meta`) while block i is
    quantized. forward: as RoutedExperts.forward, materializing one expert at a time (see the module
    docstring); inside dry_run() it returns zeros of the right shape (the trace needs shapes only)."""

    in_features = 0  # the trace's Hessian size of a leaf: this one has none of its own

    def __init__(self, meta: RoutedExperts, prefix: str, ckpt: Checkpoint, source_name: Callable[[str], str],
                 scratch: ExpertScratch, device: torch.device, dtype: torch.dtype, skip: frozenset[str]):
        super().__init__()
        object.__setattr__(self, "meta", meta)  # not a submodule: its Linears must stay out of hooks and traces
        self.prefix, self.ckpt, self.source_name, self.scratch = prefix, ckpt, source_name, scratch
        self.device, self.dtype, self.skip = device, dtype, skip
        self.names, self.act_fn, self.n_experts = meta.names, meta.act_fn, meta.n_experts
        self.all_tokens = False
        self.dry = False

    def linear_names(self, e: int) -> list[str]:
        """Block-relative names of expert e's Linears (gate, up, down), e.g. "mlp.experts.3.w1"."""
        return [f"{self.prefix}{e}.{n}" for n in self.names]

    def shape(self, e: int) -> tuple[int, int]:
        """(hidden, inter) of expert e."""
        gate = getattr(self.meta._modules[str(e)], self.names[0])
        return gate.in_features, gate.out_features

    def groups(self) -> list[list[int]]:
        """Consecutive experts, as many per group as fit GROUP_BYTES (at least one)."""
        hidden, inter = self.shape(0)
        per = experts_per_group(hidden, inter, self.dtype.itemsize)
        return [list(range(k, min(k + per, self.n_experts))) for k in range(0, self.n_experts, per)]

    def materialize(self, e: int) -> nn.Module:
        """Expert e with real weights: its source weights, then those it has in the scratch (quantized)."""
        expert = self.meta._modules[str(e)]
        for full, name in zip(self.linear_names(e), self.names):
            source = self.source_name(full + ".weight")
            if e in self.scratch.done and full in self.scratch.done[e]:
                if self.ckpt.digests is not None and source not in self.ckpt.digests:
                    self.ckpt.get(source)  # hashed as read: the manifest lists every source tensor a block reads
                w = self.scratch.weight(e, full).to(self.device, self.dtype)
            else:
                w = self.ckpt.get(source, self.device).to(self.dtype)
            getattr(expert, name).weight = nn.Parameter(w, requires_grad=False)
        return expert

    def release(self, e: int) -> None:
        self.meta._modules[str(e)].to("meta")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if self.dry:
            return out
        for e in range(self.n_experts):
            expert = self.materialize(e)
            token, slot, x = routed_rows(hidden_states, top_k_index, e, self.all_tokens)
            add_expert_output(out, expert, self.names, expert_mid(expert, self.names, self.act_fn, x), token, slot,
                              top_k_weights, self.all_tokens)
            self.release(e)
        return out


def streamed_experts(block: nn.Module) -> dict[str, StreamedExperts]:
    return {n: m for n, m in block.named_modules() if isinstance(m, StreamedExperts)}


@contextlib.contextmanager
def dry_run(block: nn.Module):
    """While it lasts, the block's StreamedExperts return zeros without reading an expert (stages.trace)."""
    experts = list(streamed_experts(block).values())
    for m in experts:
        m.dry = True
    try:
        yield
    finally:
        for m in experts:
            m.dry = False


class InputsKept:
    """The run_pass collector of a StreamedExperts: its call arguments per sample (in RAM or spilled)."""

    def __init__(self, spill):
        self.H = new_kept(spill)  # named as HessianAccumulator's result: run_pass hands it on the same way

    def add(self, args: tuple) -> None:
        if isinstance(self.H, list):  # in RAM: copies, so an in-place op of the block cannot alter them
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        self.H.append(args)


def solve_experts(m: StreamedExperts, inputs, cfg: QuantConfig, hessian_device: torch.device,
                  want_outputs: bool, spill=None, quantize=None) -> tuple[dict, object]:
    """Quantize every routed expert of m, a group at a time. inputs: per sample (hidden [tokens, hidden],
    top_k_index [tokens, k], top_k_weights [tokens, k]) in sample order, or None for a data-free method.
    Returns (results by block-relative Linear name: (LazyResult, LayerReport) read back from the scratch, the
    experts' outputs per sample [tokens, hidden] when want_outputs else None). quantize: quant/block.py's
    quantize_linear (passed in: block.py imports this module)."""
    from streamq.quant.block import LayerReport

    results, outputs = {}, None
    for group in m.groups():
        experts = {e: m.materialize(e) for e in group}
        todo = [e for e in group if e not in m.scratch.done]
        if todo:
            _solve_group(m, {e: experts[e] for e in todo}, inputs, cfg, hessian_device, quantize)
        for e in group:
            for full, report in m.scratch.done[e].items():
                results[full] = (m.scratch.result(e, full), LayerReport(**report))
        if want_outputs:
            outputs = _add_outputs(m, experts, inputs, outputs, spill)
        for e in group:
            m.release(e)
    return results, outputs


def _solve_group(m: StreamedExperts, experts: dict[int, nn.Module], inputs, cfg: QuantConfig, hdev, quantize):
    """Solve the experts' Linears (those not in m.skip) and save each expert to the scratch once done."""
    gate, up, down = m.names
    names = {e: dict(zip(m.names, m.linear_names(e))) for e in experts}
    solved = {e: {} for e in experts}

    def solve(e, proj, H=None, tokens=None):
        if names[e][proj] not in m.skip:
            solved[e][names[e][proj]] = quantize(getattr(experts[e], proj), H, cfg, tokens)

    if inputs is None:  # data-free
        for e in experts:
            for proj in m.names:
                solve(e, proj)
    else:
        hidden, inter = m.shape(0)
        gu = {e: HessianAccumulator(hidden, hdev) for e in experts}
        dn = {e: HessianAccumulator(inter, hdev) for e in experts}
        tokens = dict.fromkeys(experts, 0)
        for x, idx, _ in inputs:  # gate/up Hessians (and down's from the source gate/up without true-sequential)
            for e, expert in experts.items():
                rows = routed_rows(x, idx, e, m.all_tokens)[2]
                gu[e].add(rows)
                tokens[e] += rows.numel() // max(1, rows.shape[-1])
                if not cfg.true_sequential:
                    dn[e].add(expert_mid(expert, m.names, m.act_fn, rows))
        for e in experts:
            solve(e, gate, gu[e].H, tokens[e])
            solve(e, up, gu[e].H, tokens[e])
            del gu[e]
        if cfg.true_sequential:  # down's Hessian from the quantized gate/up
            for x, idx, _ in inputs:
                for e, expert in experts.items():
                    dn[e].add(expert_mid(expert, m.names, m.act_fn, routed_rows(x, idx, e, m.all_tokens)[2]))
        for e in experts:
            solve(e, down, dn[e].H, tokens[e])
            del dn[e]
    for e in experts:
        m.scratch.save(e, {n: r for n, (r, _) in solved[e].items()}, {n: rep for n, (_, rep) in solved[e].items()})
        solved[e].clear()


def _add_outputs(m: StreamedExperts, experts: dict[int, nn.Module], inputs, outputs, spill):
    """Each sample's accumulator (zeros before the first group) plus the group's weighted expert outputs."""
    new = new_kept(spill)
    for k, (x, idx, w) in enumerate(inputs):
        out = torch.zeros_like(x) if outputs is None else outputs[k].to(x.device)
        for e, expert in experts.items():
            token, slot, rows = routed_rows(x, idx, e, m.all_tokens)
            add_expert_output(out, expert, m.names, expert_mid(expert, m.names, m.act_fn, rows), token, slot, w,
                              m.all_tokens)
        new.append(out)
    if outputs is not None:
        close_kept(outputs)
    return new


@contextlib.contextmanager
def streaming(block: nn.Module, prefix: str, ckpt: Checkpoint, source_name: Callable[[str], str],
              scratch: ExpertScratch, device: torch.device, dtype: torch.dtype, skip: frozenset[str],
              all_tokens: bool):
    """While it lasts, every RoutedExperts of block (left on the meta device by load_block) is a StreamedExperts.
    prefix: the block's checkpoint prefix ("model.layers.3.")."""
    from streamq.quant.stages import swap

    swapped = {}
    for name, meta in [(n, x) for n, x in block.named_modules() if isinstance(x, RoutedExperts)]:
        stand_in = StreamedExperts(meta, name + ".", ckpt, lambda n: source_name(prefix + n), scratch, device, dtype,
                                   skip)
        stand_in.all_tokens = all_tokens
        swapped[name] = swap(block, name, stand_in)
    try:
        yield
    finally:
        for name, meta in swapped.items():
            swap(block, name, meta)
            meta.to("meta")

