"""The model outside its blocks: token ids -> block-0 inputs (+ the kwargs every block is called with), and
last-block outputs -> logits.

Both ends run the library's own forward code: the block list is swapped for a one-element stand-in that
catches the hidden states entering block 0 (with the position embeddings and mask the model built), or that
replays stored last-block outputs so the final norm and head are applied exactly as in transformers.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from streamq.forward import batched_kwargs, run_block  # noqa: F401 (moved to forward.py; re-exported)
from streamq.io.blocks import ModelLayout, materialize
from streamq.io.checkpoint import Checkpoint


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records its inputs and stops the forward pass."""

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden, self.kwargs = hidden_states, kwargs
        raise _Caught


class _Replay(nn.Module):
    """Stands in for the whole block stack: returns a stored last-block output."""

    value: torch.Tensor

    def forward(self, hidden_states, *args, **kwargs):
        return self.value


@contextlib.contextmanager
def _blocks_replaced(layout: ModelLayout, stand_in: nn.Module):
    original = layout.decoder.layers
    layout.decoder.layers = nn.ModuleList([stand_in])
    try:
        yield
    finally:
        layout.decoder.layers = original


class ModelEnds:
    """Embeddings (and, with_head, final norm + lm_head) materialized on device; blocks stay on meta."""

    def __init__(self, layout: ModelLayout, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
                 with_head: bool):
        self.layout, self.device, self.with_head = layout, device, with_head
        self.module = layout.model if with_head else layout.decoder
        prefix = "" if with_head else next(n for n, m in layout.model.named_modules() if m is layout.decoder) + "."
        with _blocks_replaced(layout, nn.Identity()):
            materialize(self.module, prefix, ckpt, layout, device, dtype)

    @torch.no_grad()
    def block_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """input_ids [1, seq] -> (hidden [1, seq, hidden] in the compute dtype, kwargs for every block)."""
        catcher = _Catcher()
        with _blocks_replaced(self.layout, catcher), contextlib.suppress(_Caught):
            self.module(input_ids=input_ids.to(self.device), use_cache=False)
        kwargs = {k: v for k, v in catcher.kwargs.items() if k not in ("past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        return catcher.hidden, kwargs

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """input_ids [1, seq], last_hidden [1, seq, hidden] -> logits [1, seq, vocab] fp32."""
        assert self.with_head, "ModelEnds(with_head=True) is needed for logits"
        replay = _Replay()
        replay.value = last_hidden.to(self.device)
        with _blocks_replaced(self.layout, replay):
            out = self.module(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()

    def release(self) -> None:
        with _blocks_replaced(self.layout, nn.Identity()):
            self.module.to("meta")
