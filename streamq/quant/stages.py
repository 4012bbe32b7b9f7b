"""Each stage of a block computed once in true-sequential GPTQ: which module outputs to keep and replay.

Pass j of quantize_block collects the Hessians of group j (groups of Linears that read one tensor, in call
order) with groups < j already quantized, and stops at group j's input; the last pass produces the block's
outputs. Without help every pass re-runs the block from its input. Here, a module whose output no longer
changes (every Linear called before it ends is quantized: it is *final*) is run once more at most: its output,
per sample, is kept the first time it is computed final and replayed by a stand-in in later passes. A module
that returns its last Linear's output as is (attention returning o_proj's, an MLP returning down_proj's: a
*tail*) is built without running it at all: after its Linear is solved, from the Linear's input that the
Hessian pass already holds. A module without Linears whose output only replayed modules read in a pass (a
norm feeding replayed attention) is skipped in that pass: a stand-in returns its input unread. All of it found
by tracing one forward with hooks at module boundaries and a torch function mode that sees which module reads
each module output, so it works for any block transformers builds; replayed outputs are the very tensors the
block computed, so the result is bit-identical to re-running it.

A block's streamed routed experts (quant/expert_stage.py StreamedExperts) are one leaf here, like a Linear: a
group of its own whose pass keeps its inputs, and a tail of itself whose output its solve builds.

trace() records one forward; plan() decides what to keep within a byte budget (dropping the largest items
first; with nothing kept every pass recomputes, as without this module).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from streamq.forward import run_hooked
from streamq.moe import parallel_key
from streamq.quant.expert_stage import StreamedExperts

# Most bytes of block intermediates kept between passes, all samples together (footprint.py counts them): at
# SmolLM2-135M width (32 x 512 tokens) everything fits (~140 MB fp32); at 7B width (128 x 2048, bf16) the
# attention output is kept and the MLP recomputed in the output pass.
KEEP_BYTES = 1 << 30
# Most bytes of routed experts' Hessians collected in one pass (fp32 [in, in] each; footprint.py counts them):
# at Mixtral width all 8 experts' gate/up share a pass (8 x 64 MB); at DeepSeek-V3 width (256 experts, 7168
# wide) 5 experts' gate/up do, so the block runs 52 + 4 expert passes instead of holding 52 GB of Hessians.
EXPERT_PASS_BYTES = 1 << 30


@dataclass
class Trace:
    """One forward of a block, by module name (the block itself excluded)."""

    start: dict[str, int]  # event index at which each module's first call starts / ends
    end: dict[str, int]
    calls: dict[str, int]  # forward calls per module
    linears: list[str]  # Linears in call order
    groups: list[list[str]]  # Linears grouped by the tensor they read, in call order
    tails: dict[str, str]  # module -> the Linear whose output it returns as is (other outputs None)
    tail_len: dict[str, int]  # module -> length of the tuple it returns (0: a bare tensor)
    out_bytes: dict[str, int]  # bytes of the tensors a module returns, per sample
    in_bytes: dict[str, int]  # Linear -> bytes of its input, per sample
    in_features: dict[str, int] = field(default_factory=dict)  # Linear -> in_features (its Hessian's side)
    n_events: int = 0
    parallel: dict[str, str] = field(default_factory=dict)  # MoE expert Linear -> its key (streamq/moe.py)
    readers: dict[str, set[str]] = field(default_factory=dict)  # module -> modules running when an op read its
    # output ("": the block's own code); only for modules without Linears returning one fresh tensor (skippable)


@torch.no_grad()
def trace(block: nn.Module, x: torch.Tensor, kwargs: dict) -> Trace:
    """Run block on one sample x [1, seq, hidden] with hooks on every submodule."""
    modules = {n: m for n, m in block.named_modules() if n}
    t = Trace({}, {}, {}, [], [], {}, {}, {}, {})
    inputs, outputs, order = {}, {}, []  # tensors kept alive so ids stay distinct
    reads = _Readers()

    def pre(name, module, args):
        with reads.paused():
            t.calls[name] = t.calls.get(name, 0) + 1
            t.start.setdefault(name, len(order))
            order.append(name)
            reads.running.append(name)
            if isinstance(module, (nn.Linear, StreamedExperts)):  # a leaf: streamed experts are solved as one
                t.linears.append(name)
                t.in_features[name] = module.in_features
                inputs[name] = args[0] if isinstance(module, nn.Linear) else name  # a leaf is a group of its own
                t.in_bytes[name] = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

    def post(name, module, args, kwargs, out):
        with reads.paused():
            reads.running.pop()
            t.end.setdefault(name, len(order))
            order.append(name)
            parts = out if isinstance(out, tuple) else (out,)
            t.out_bytes[name] = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
            reads.produced(name, out, (args, kwargs), linear_free=not any(isinstance(m, (nn.Linear, StreamedExperts))
                                                                       for m in module.modules()))
            if isinstance(module, nn.Linear):
                outputs[name] = out
                return
            if isinstance(module, StreamedExperts):  # its output is built by its solve (expert_stage.py)
                t.tails[name], t.tail_len[name] = name, 0
                return
            inner = [n for n in t.linears if t.start[n] > t.start[name]]
            if inner and isinstance(parts[0], torch.Tensor) and parts[0] is outputs.get(inner[-1]) \
                    and all(p is None for p in parts[1:]):
                t.tails[name] = inner[-1]
                t.tail_len[name] = len(out) if isinstance(out, tuple) else 0

    hooks = []
    for name, m in modules.items():
        hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: pre(name, m, a)))
        hooks.append(m.register_forward_hook(lambda m, a, k, o, name=name: post(name, m, a, k, o),
                                             with_kwargs=True))
    with reads:
        y = run_hooked(block, x, kwargs, hooks)
    reads.read(y, "")  # the block returns it
    t.readers = reads.result(t.calls)
    t.n_events = len(order)
    by_input: dict[int, list[str]] = {}
    for name in t.linears:
        if name not in by_input.setdefault(id(inputs[name]), []):
            by_input[id(inputs[name])].append(name)
    t.groups = list(by_input.values())
    t.parallel = {n: k for n in t.linears if (k := parallel_key(n, block)) is not None}
    return t


class _Readers(TorchFunctionMode):
    """During trace(): which modules were running (innermost; "" the block's own code) when a torch op read a
    module's output. Tracked for modules without Linears that return one tensor of their own; a module whose
    output is its input or another module's tensor is not tracked (it could not be told apart)."""

    def __init__(self):
        super().__init__()
        self.running: list[str] = []
        self._by_id: dict[int, str] = {}  # id of a tracked output -> its module
        self._alive: list = []  # every output, so no id is reused during the trace
        self._untracked: set[str] = set()
        self._readers: dict[str, set[str]] = {}
        self._paused = 0

    def produced(self, name: str, out, inputs, linear_free: bool) -> None:
        """Module `name` returned `out` from `inputs` (its args and kwargs)."""
        self._alive.append(out)
        ids = {id(a) for a in tree_leaves(inputs) if isinstance(a, torch.Tensor)}
        for p in (p for p in tree_leaves(out) if isinstance(p, torch.Tensor)):
            if id(p) in ids or id(p) in self._by_id:  # passed through: whose output it is stays unclear
                self._untracked.update({name, self._by_id.pop(id(p), name)})
        if linear_free and isinstance(out, torch.Tensor) and id(out) not in ids and name not in self._untracked:
            self._by_id[id(out)] = name
        else:
            self._untracked.add(name)

    def read(self, value, where: str) -> None:
        """The tensors in `value` (any nesting) were read by module `where`."""
        for a in tree_leaves(value):
            if isinstance(a, torch.Tensor) and id(a) in self._by_id:
                self._readers.setdefault(self._by_id[id(a)], set()).add(where)

    def result(self, calls: dict[str, int]) -> dict[str, set[str]]:
        """Trace.readers: the tracked modules called once, with who read their output."""
        return {m: r for m, r in self._readers.items() if m not in self._untracked and calls[m] == 1}

    @contextlib.contextmanager
    def paused(self):
        """The trace's own bookkeeping inside: not a read."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._paused:
            self.read((args, kwargs), self.running[-1] if self.running else "")
        return func(*args, **kwargs)


@dataclass
class Plan:
    """What quantize_block keeps. Passes are numbered 0..len(passes): the last one computes the outputs."""

    passes: list[list[list[str]]]  # per Hessian pass, its input groups (each: Linears reading one tensor)
    stops: list[int]  # event index at which each pass has seen every input it needs
    record: dict[str, int] = field(default_factory=dict)  # module -> pass in which its output is kept
    build: dict[str, int] = field(default_factory=dict)  # tail module -> pass after whose solve it is built
    replay: list[list[str]] = field(default_factory=list)  # per pass, the modules replaced by stand-ins
    skip: list[list[str]] = field(default_factory=list)  # per pass, modules whose output only replayed ones read
    peak_bytes: int = 0  # most bytes kept at once, per sample


def plan(t: Trace, true_sequential: bool, budget: int | None) -> Plan:
    """Choose what to keep so each part of the block runs as few times as possible within budget bytes per
    sample (None: no limit); a module called more than once, or a block whose Linears are, is never replayed."""
    passes = sequential_passes(t) if true_sequential else [t.groups]
    stops = [max(t.start[g[0]] for g in p) for p in passes] + [t.n_events]
    if any(t.calls[n] != 1 for n in t.linears):
        return Plan(passes, stops, replay=[[] for _ in stops])
    forbidden: set[str] = set()
    while True:
        p = _simulate(t, passes, stops, forbidden)
        p.peak_bytes = _peak(t, p)
        if budget is None or p.peak_bytes <= budget:
            return p
        kept = list(p.record) + list(p.build)
        forbidden.add(max(kept, key=lambda m: t.out_bytes[m] + (t.in_bytes[t.tails[m]] if m in p.build else 0)))


def sequential_passes(t: Trace, budget: int = EXPERT_PASS_BYTES) -> list[list[list[str]]]:
    """One pass per input group, except that consecutive groups of routed experts with one key (the experts'
    gate/up, then their downs) share a pass, as many as have Hessians within budget bytes: their inputs do
    not depend on each other."""
    passes: list[list[list[str]]] = []
    held = 0
    for g in t.groups:
        key, h = t.parallel.get(g[0]), 4 * t.in_features[g[0]] ** 2
        if key is not None and passes and t.parallel.get(passes[-1][-1][0]) == key and held + h <= budget:
            passes[-1].append(g)
            held += h
        else:
            passes.append([g])
            held = h
    return passes


def _simulate(t: Trace, passes, stops, forbidden: set[str]) -> Plan:
    group_of = {n: j for j, p in enumerate(passes) for g in p for n in g}
    groups = {n: g for p in passes for g in p for n in g}
    candidates = [m for m in t.start if t.calls[m] == 1 and m not in forbidden
                  and any(t.start[m] <= t.start[n] < t.end[m] for n in t.linears)]

    def final_from(m: str) -> int:  # first pass in which every Linear called before m ends is quantized
        before = [n for n in t.linears if t.start[n] < t.end[m]]
        return 1 + max(group_of[n] for n in before) if before else 0

    def input_final(lin: str, j: int) -> bool:  # lin's input is computed from quantized Linears in pass j
        return all(group_of[n] < j for n in t.linears if t.start[n] < t.start[lin] and n not in groups[lin])

    def inside(m: str, outer: str) -> bool:
        return m != outer and t.start[outer] < t.start[m] and t.end[m] < t.end[outer]

    avail, p = {}, Plan(passes, stops)
    for j, stop in enumerate(stops):
        running = [m for m, a in avail.items() if a <= j and t.start[m] < stop]
        replayed = [m for m in running if not any(inside(m, o) for o in running)]
        p.replay.append(replayed)
        covered = lambda m: m in replayed or any(inside(m, r) for r in replayed)  # noqa: E731
        dead = [m for m, readers in t.readers.items() if t.start[m] < stop and not covered(m)
                and all(c and covered(c) for c in readers)]  # ("": the block's own code reads it)
        p.skip.append([m for m in dead if not any(inside(m, o) for o in dead)])
        for m in candidates:
            if m not in avail and final_from(m) <= j and t.end[m] < stop and not covered(m):
                p.record[m], avail[m] = j, j + 1
        if j < len(passes):
            for m, lin in t.tails.items():
                if (m in candidates and m not in avail and group_of[lin] == j and final_from(m) == j + 1
                        and input_final(lin, j) and t.start[m] <= stop and not covered(m)):
                    p.build[m], avail[m] = j, j + 1
    used = {m for r in p.replay for m in r}
    p.record = {m: j for m, j in p.record.items() if m in used}
    p.build = {m: j for m, j in p.build.items() if m in used}
    return p


def _peak(t: Trace, p: Plan) -> int:
    """Most bytes per sample held at once: a kept output from the pass that makes it to its last replay; a tail's Linear
    input during the pass that builds it."""
    last = {m: max(j for j, r in enumerate(p.replay) if m in r) for m in [*p.record, *p.build]}
    peak = 0
    for j in range(len(p.replay)):
        held = sum(t.out_bytes[m] for m, r in p.record.items() if r <= j <= last[m])
        held += sum(t.out_bytes[m] for m, b in p.build.items() if b < j <= last[m])
        held += sum(t.in_bytes[t.tails[m]] for m, b in p.build.items() if b == j)
        peak = max(peak, held)
    return peak


class Replay(nn.Module):
    """Stands in for a module: returns the kept output of the current sample (`at[0]`), cloned (unless the list
    reads back fresh tensors) so an in-place op of the block cannot alter it. Attributes it lacks are looked up
    on the module it replaces."""

    def __init__(self, original: nn.Module, outputs: list, at: list[int]):
        super().__init__()
        object.__setattr__(self, "_original", original)
        self.outputs, self.at = outputs, at

    def forward(self, *args, **kwargs):
        out = self.outputs[self.at[0]]
        return out if getattr(self.outputs, "fresh", False) else clone_output(out)  # kept.py's SpilledList: a new copy

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


class Skip(Replay):
    """Stands in for a module whose output nothing reads in this pass (Plan.skip): returns its first input, unread."""

    def __init__(self, original: nn.Module):
        super().__init__(original, [], [0])

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


def clone_output(out):
    """A module output (a tensor or a tuple of tensors / None) with its tensors copied."""
    if isinstance(out, tuple):
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
    return out.clone()


def swap(block: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where block's submodule `name` is; returns the module it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
