"""Load a streamq output folder (GPTQ, compressed-tensors, or streamq's SpQR layout) as a runnable transformers model."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from streamq.formats import format_of_config
from streamq.ignore import ignored_in_block, quantized_head
from streamq.io.blocks import build_layout, materialize
from streamq.io.checkpoint import Checkpoint
from streamq.device import resolve_device
from streamq.io.manifest import reading
from streamq.quant.actquant import attach, quantizes_activations, read_scales
from streamq.tokenizer import load_tokenizer


def load_quantized(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   allow_incomplete: bool = False):
    """The model of a streamq output folder in any layout format (gptq, compressed-tensors, spqr):
    transformers' class, block Linears replaced by the format's dequantizing module (format.linear_module).

    Everything not quantized (embeddings, norms, head) is cast to dtype; packed tensors stay as stored.
    A folder a compress run is writing, or an unfinished one, is refused unless allow_incomplete.
    """
    with reading(folder, allow_incomplete):
        return _load_quantized(folder, device, dtype)


def _load_quantized(folder: str | Path, device: str, dtype: torch.dtype):
    ckpt = Checkpoint(folder)
    fmt = format_of_config(ckpt.config, str(folder))
    cfg = fmt.config_from(ckpt.config["quantization_config"])
    layout = build_layout(ckpt)
    make = lambda lin: fmt.linear_module(lin.in_features, lin.out_features, cfg, lin.bias is not None,  # noqa: E731
                                         device=lin.weight.device, dtype=lin.weight.dtype)
    scales = [read_scales(ckpt, layout, i, cfg) for i in range(layout.n_blocks)]  # W8A8 / KV cache (actquant.py)
    with torch.device("meta"):
        for i, block in enumerate(layout.layers):
            swap_linears(block, make, skip=ignored_in_block(layout, i, cfg))  # ignored Linears stay dense
        head = quantized_head(layout, cfg)
        if head is not None:
            swap_linears(layout.model, make, only=head[0])
    model = materialize(layout.model, "", ckpt, layout, resolve_device(device), dtype)
    if quantizes_activations(cfg):  # kept for the model's life: its Linears see int8-fake-quantized inputs
        for i, block in enumerate(layout.layers):
            attach(block, cfg, {k: v.to(resolve_device(device)) for k, v in scales[i].items()}, f"block {i}",
                   ignored_in_block(layout, i, cfg))
    model.config.use_cache = True
    return model.eval()


def swap_linears(block: nn.Module, make, skip: frozenset[str] = frozenset(), only: str | None = None) -> None:
    """Replace every nn.Linear in block by make(linear), but those named in skip (or all but `only`)."""
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip and only in (None, name):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            setattr(parent, name.rpartition(".")[2], make(module))


@torch.no_grad()
def generate(folder: str | Path, prompt: str, max_new_tokens: int = 40, device: str = "cpu",
             allow_incomplete: bool = False, stream: bool = False) -> str:
    """Greedy continuation of prompt by the compressed model in folder. stream: also print the continuation
    to stdout token by token as it is generated (transformers' TextStreamer), ending with a newline."""
    from transformers import TextStreamer

    model = load_quantized(folder, device, allow_incomplete=allow_incomplete)
    tokenizer = load_tokenizer(Path(folder))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
