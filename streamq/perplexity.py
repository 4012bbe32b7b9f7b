"""Streaming perplexity: all windows through block i (kept in the activation store), then block i+1, then the
final norm and head; the memory of one block, for source and compressed folders alike."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from streamq.calib.capture import ModelEnds, run_block
from streamq.calib.data import eval_windows
from streamq.calib.store import ActivationStore
from streamq.ignore import ignored_in_block
from streamq.io.blocks import build_layout, load_block, release_block
from streamq.io.checkpoint import Checkpoint
from streamq.device import resolve_device, resolve_dtype
from streamq.progress import iter_blocks
from streamq.quant.actquant import fake_quantized, quantizes_activations, read_scales
from streamq.tokenizer import load_tokenizer

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"  # shipped held-out text (never used for calibration)


class EvalResult(NamedTuple):
    perplexity: float
    windows: int  # windows evaluated, each of seqlen tokens
    seqlen: int

    @property
    def predicted_tokens(self) -> int:
        """Tokens whose NLL is averaged: 1..seqlen-1 of every window."""
        return self.windows * (self.seqlen - 1)

    def line(self) -> str:
        return (f"perplexity {self.perplexity:.4f} on {self.windows} windows x {self.seqlen} tokens "
                f"({self.predicted_tokens} predicted)")


def perplexity(model, data, seqlen: int = 2048, **kwargs) -> float:
    """exp(mean next-token NLL) over non-overlapping seqlen windows (stride = seqlen) of the text file `data`;
    kwargs: those of evaluate_text."""
    return evaluate_text(model, data, seqlen, **kwargs).perplexity


@torch.no_grad()
def evaluate_text(model, data=HELDOUT, seqlen: int = 2048, max_windows: int | None = None, device: str = "auto",
                  dtype: str = "auto", offload: str = "ram", progress: bool = True, label: str = "eval") -> EvalResult:
    """Perplexity of the folder `model` on the text file `data`, with the number of windows it covered.

    Each window predicts its tokens 1..seqlen-1 from the ones before, as GPTQ's evaluation does. label: the
    progress bar's name (the demo tells "eval source" from "eval compressed").
    """
    ckpt = Checkpoint(model)
    layout = build_layout(ckpt)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, ckpt)
    windows = eval_windows(load_tokenizer(ckpt.folder), str(data), seqlen, max_windows)
    n = windows.shape[0]
    ends = ModelEnds(layout, ckpt, dev, dt, with_head=True)
    with tempfile.TemporaryDirectory(prefix="streamq-eval-") as tmp:
        shape = (n, seqlen, layout.config.hidden_size, dt)
        store = ActivationStore.on_disk(tmp + "/act", *shape, create=True) if offload == "disk" \
            else ActivationStore.in_ram(*shape)
        kwargs = ends.block_kwargs(windows[:1])  # per block
        for j in range(n):
            hidden, _ = ends.block_inputs(windows[j:j + 1])
            store.write("a", j, hidden)
        slot = "a"
        act = ckpt.quant_format[1] if ckpt.quant_format and quantizes_activations(ckpt.quant_format[1]) else None
        for i in iter_blocks(range(layout.n_blocks), layout.n_blocks, label, progress):
            scales = read_scales(ckpt, layout, i, act)
            block = load_block(layout, ckpt, i, dev, dt)
            skip = ignored_in_block(layout, i, act) if act is not None else frozenset()  # --ignore: fp inputs
            with fake_quantized(block, act, scales, f"block {i}", skip):  # W8A8 / KV cache: activations as they run
                for j, x in store.iter_samples(slot):
                    store.write(store.other(slot), j, run_block(block, x.to(dev), kwargs[i]))
            release_block(layout, i)
            slot = store.other(slot)
        nll = 0.0
        for j, x in store.iter_samples(slot):
            logits = ends.logits(windows[j:j + 1], x)
            nll += F.cross_entropy(logits[0, :-1], windows[j, 1:].to(logits.device), reduction="sum").item()
    ends.release()
    return EvalResult(math.exp(nll / (n * (seqlen - 1))), n, seqlen)
