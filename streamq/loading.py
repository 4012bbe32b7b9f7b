"""Load a streamq output folder (GPTQ format, or streamq's SpQR layout) as a runnable transformers model."""
from __future__ import annotations

from pathlib import Path

import torch

from streamq.errors import StreamqError
from streamq.formats.spqr import config_from_quantization_config
from streamq.io.blocks import build_layout, materialize
from streamq.io.checkpoint import Checkpoint
from streamq.device import resolve_device
from streamq.io.manifest import reading
from streamq.tokenizer import load_tokenizer
from streamq.qlinear import replace_linears


def load_quantized(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   allow_incomplete: bool = False):
    """The model of a GPTQ-format (or SpQR) folder: transformers' class, block Linears replaced by QuantLinear
    (SpQRLinear).

    Everything not quantized (embeddings, norms, head) is cast to dtype; packed tensors stay as stored.
    A folder a compress run is writing, or an unfinished one, is refused unless allow_incomplete.
    """
    with reading(folder, allow_incomplete):
        return _load_quantized(folder, device, dtype)


def _load_quantized(folder: str | Path, device: str, dtype: torch.dtype):
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
             allow_incomplete: bool = False) -> str:
    """Greedy continuation of prompt by the compressed model in folder."""
    model = load_quantized(folder, device, allow_incomplete=allow_incomplete)
    tokenizer = load_tokenizer(Path(folder))
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
