"""Load a streamq output folder (GPTQ format, or streamq's SpQR layout) as a runnable transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from streamq.errors import StreamqError
from streamq.formats.spqr import config_from_quantization_config
from streamq.io.blocks import build_layout, materialize
from streamq.io.checkpoint import Checkpoint
from streamq.pipeline import load_tokenizer, resolve_device
from streamq.qlinear import replace_linears


def load_quantized(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model of a GPTQ-format (or SpQR) folder: transformers' class, block Linears replaced by QuantLinear
    (SpQRLinear).

    Everything not quantized (embeddings, norms, head) is cast to dtype; packed tensors stay as stored.
    """
    ckpt = Checkpoint(folder)
    q = ckpt.config.get("quantization_config") or {}
    if q.get("quant_method") not in ("gptq", "spqr"):
        raise StreamqError(f"{folder}: not a streamq output folder (config.json has no gptq or spqr "
                           "quantization_config)")
    spqr = config_from_quantization_config(q) if q["quant_method"] == "spqr" else None
    layout = build_layout(ckpt)
    with torch.device("meta"):
        for block in layout.layers:
            replace_linears(block, q["bits"], q["group_size"], spqr=spqr)
    model = materialize(layout.model, "", ckpt, layout, resolve_device(device), dtype)
    model.config.use_cache = True
    return model.eval()


@torch.no_grad()
def generate(folder: str | Path, prompt: str, max_new_tokens: int = 40, device: str = "cpu",
             stream: bool = False) -> str:
    """Greedy continuation of prompt by the compressed model in folder. stream: also print the continuation
    to stdout token by token as it is generated (transformers' TextStreamer), ending with a newline."""
    from transformers import TextStreamer

    model = load_quantized(folder, device)
    tokenizer = load_tokenizer(Path(folder))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
