"""Streaming perplexity: all windows through block i (kept in the activation store), then block i+1, then the
final norm and head; the memory of one block, for source and compressed folders alike."""
from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from tqdm import tqdm

from streamq.calib.capture import ModelEnds, run_block
from streamq.calib.data import eval_windows
from streamq.calib.store import ActivationStore
from streamq.io.blocks import build_layout, load_block, release_block
from streamq.io.checkpoint import Checkpoint
from streamq.pipeline import load_tokenizer, resolve_device, resolve_dtype


@torch.no_grad()
def perplexity(model, data, seqlen: int = 2048, max_windows: int | None = None, device: str = "auto",
               dtype: str = "auto", offload: str = "ram", progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping seqlen windows (stride = seqlen) of the text file `data`.

    Each window predicts its tokens 1..seqlen-1 from the ones before, as GPTQ's evaluation does.
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
        for i in tqdm(range(layout.n_blocks), desc="eval blocks", disable=not progress):
            block = load_block(layout, ckpt, i, dev, dt)
            for j, x in store.iter_samples(slot):
                store.write(store.other(slot), j, run_block(block, x.to(dev), kwargs[i]))
            release_block(layout, i)
            slot = store.other(slot)
        nll = 0.0
        for j, x in store.iter_samples(slot):
            logits = ends.logits(windows[j:j + 1], x)
            nll += F.cross_entropy(logits[0, :-1], windows[j, 1:].to(logits.device), reduction="sum").item()
    ends.release()
    return math.exp(nll / (n * (seqlen - 1)))
