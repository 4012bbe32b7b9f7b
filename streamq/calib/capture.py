"""The model outside its blocks: token ids -> block-0 inputs (+ the kwargs each block is called with), and
last-block outputs -> logits.

Both ends run the library's own forward code: the block list is swapped for stand-ins, one per block, that
record how the model calls each block (position embeddings, the mask of its layer type: sliding-window and
full-attention layers get different ones) and pass the hidden states on, or that replay stored last-block
outputs so the final norm, head and logit soft-capping are applied exactly as in transformers. The same run
checks that the model can be streamed: every block called once, in order, each on the previous one's output.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from streamq.calib.embed_rows import EmbeddingRows
from streamq.errors import StreamqError
from streamq.forward import batched_kwargs, run_block  # noqa: F401 (moved to forward.py; re-exported)
from streamq.io.blocks import ModelLayout, materialize
from streamq.io.checkpoint import Checkpoint


class _Caught(Exception):
    pass


class _StandIn(nn.Module):
    """Block i's place in the model's forward; `trace` does the work. Attributes the model reads off its blocks
    (an attention_type, say) are the real block's."""

    def __init__(self, trace: _Trace, i: int):
        super().__init__()
        self.__dict__["_trace"], self.__dict__["_i"] = trace, i

    def forward(self, *args, **kwargs):
        return self._trace.call(self._i, args, kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._trace.layout.layers[self._i], name)


class _Trace:
    """What the stand-ins saw. replay None: record each call, pass the hidden states on, stop after the last
    block; replay a tensor: every stand-in returns it (the last one's is what the final norm sees)."""

    def __init__(self, layout: ModelLayout, replay: torch.Tensor | None = None):
        self.layout, self.replay = layout, replay
        self.hidden, self.kwargs, self.order = None, [], []
        self.passed = None  # the tensor the previous stand-in passed on
        self.as_output = None  # hidden -> what a real block returns (a tensor, or a tuple led by it)

    def call(self, i: int, args: tuple, kwargs: dict):
        hidden, kw = bind_call(self.layout.layers[i], args, kwargs, self.layout)
        if self.as_output is None:
            self.as_output = output_structure(self.layout.layers[i], hidden, kw)
        if self.replay is None and self.order and hidden is not self.passed:
            raise StreamqError(f"{type(self.layout.decoder).__name__}.forward changes the hidden states between "
                               f"blocks {self.order[-1]} and {i}, so its blocks cannot be streamed")
        if not self.order:
            self.hidden = hidden
        self.order.append(i)
        self.kwargs.append(kw)
        if self.replay is None and i == self.layout.n_blocks - 1:
            raise _Caught
        self.passed = self.replay if self.replay is not None else hidden
        return self.as_output(self.passed)

    def check(self) -> None:
        n, where = self.layout.n_blocks, f"{type(self.layout.decoder).__name__}.forward"
        if self.order != list(range(n)):
            got = "never calls them" if not self.order else f"calls {self.order[:8]}"
            raise StreamqError(f"{where} should call the blocks in {self.layout.layers_prefix[:-1]} once each in "
                               f"order 0..{n - 1} but {got}, so its blocks cannot be streamed")


def traced_forward(layout: ModelLayout, forward, replay: torch.Tensor | None = None) -> tuple[_Trace, object]:
    """Run forward() (the model's own, on its ends) with the blocks replaced by stand-ins; returns what they
    saw (checked: every block called once, in order) and forward's result (None when it was stopped after the
    last block, without replay)."""
    trace, out = _Trace(layout, replay), None
    stand_ins = nn.ModuleList([_StandIn(trace, i) for i in range(layout.n_blocks)])
    with layout.blocks_replaced(stand_ins), contextlib.suppress(_Caught):
        out = forward()
    trace.check()
    return trace, out


def bind_call(block: nn.Module, args: tuple, kwargs: dict, layout: ModelLayout) -> tuple[torch.Tensor, dict]:
    """A block call as (hidden states, every other argument by name), bound to the block's forward signature.
    Cache objects are dropped (the model runs with use_cache=False)."""
    from transformers.cache_utils import Cache

    sig = inspect.signature(block.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise StreamqError(f"{layout.layers_prefix}*: the model calls its blocks in a way their forward does not "
                           f"accept ({e})") from None
    named = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise StreamqError(f"{layout.layers_prefix}*: block forward needs {len(value)} unnamed inputs "
                                   "streamq cannot replay")
        else:
            named[name] = value
    hidden = named.pop(next(iter(sig.parameters)))
    if not isinstance(hidden, torch.Tensor):
        raise StreamqError(f"{layout.layers_prefix}*: the first block input is a {type(hidden).__name__}, "
                           "not the hidden-states tensor")
    return hidden, {k: v for k, v in named.items() if not isinstance(v, Cache)}


def output_structure(block: nn.Module, hidden: torch.Tensor, kwargs: dict):
    """hidden -> a value shaped as the block's own output, learned from one forward of the (meta-device) block
    on meta copies of its inputs: the tensor itself, or a tuple led by it (Falcon's blocks return one)."""
    if not all(t.is_meta for t in block.parameters()):
        return lambda h: h  # only reached for blocks that are materialized, which ModelEnds never has
    try:
        out = block(to_meta(hidden), **to_meta(kwargs))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: assume the common case, a tensor
        return lambda h: h
    if isinstance(out, tuple):
        rest = tuple(None for _ in out[1:])
        return lambda h: (h, *rest)
    return lambda h: h


def to_meta(v):
    """Tensors (inside tuples, lists, dicts) moved to the meta device; everything else as is."""
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, (tuple, list)):
        return type(v)(to_meta(x) for x in v)
    if isinstance(v, dict):
        return {k: to_meta(x) for k, x in v.items()}
    return v


class ModelEnds:
    """Embeddings (and, with_head, final norm + lm_head) materialized on device; blocks stay on meta. Without
    the head, the input embedding's table is not materialized: each capture gathers the rows its ids need from
    the memory-mapped checkpoint (calib/embed_rows.py), bit-identical, without the table in the compute dtype."""

    def __init__(self, layout: ModelLayout, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 with_head: bool):
        self.layout, self.device, self.with_head = layout, device, with_head
        self.module = layout.model if with_head else layout.decoder
        prefix = "" if with_head else layout.decoder_prefix
        self.rows = None if with_head else EmbeddingRows.of(self.module, prefix, ckpt, layout, device, dtype)
        with layout.blocks_replaced(nn.Identity()):
            materialize(self.module, prefix, ckpt, layout, device, dtype,
                        exclude=(self.rows.param,) if self.rows else ())

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """input_ids [1, seq] -> (hidden [1, seq, hidden] entering block 0 in the compute dtype, the kwargs of
        each block's call, by block index)."""
        with self.rows.serving() if self.rows else contextlib.nullcontext():
            trace, _ = traced_forward(self.layout, lambda: self.module(input_ids=input_ids.to(self.device),
                                                                       use_cache=False))
        return trace.hidden, trace.kwargs

    def block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """input_ids [1, seq] -> (hidden [1, seq, hidden] in the compute dtype, block 0's kwargs)."""
        hidden, kwargs = self.capture(input_ids)
        return hidden, kwargs[0]

    def block_kwargs(self, input_ids: torch.Tensor) -> list[dict]:
        """The kwargs each block is called with on windows of input_ids' length, by block index (identical
        blocks share the same tensors; layers of another attention type get their own mask)."""
        return self.capture(input_ids)[1]

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids [1, seq], last_hidden [1, seq, hidden] -> logits [1, seq, vocab] fp32."""
        assert self.with_head, "ModelEnds(with_head=True) is needed for logits"
        _, out = traced_forward(self.layout, lambda: self.module(input_ids=input_ids.to(self.device), use_cache=False),
                                replay=last_hidden.to(self.device))
        return out.logits.float()

    def release(self) -> None:
        with self.layout.blocks_replaced(nn.Identity()):
            self.module.to("meta")
