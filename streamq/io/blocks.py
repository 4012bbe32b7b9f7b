"""The model skeleton on the meta device, and materializing one piece of it (a block, the embeddings) at a time.

The skeleton is transformers' own model class built from config.json with no weights, so attention, rotary
and MLP code are the library's. The decoder blocks are found from the model (`get_decoder().layers`), not by
guessing names; a block is materialized by assigning exactly its checkpoint tensors to it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from streamq.errors import StreamqError
from streamq.io.checkpoint import Checkpoint, check_against_config

# Accepted architectures (config.model_type); tests compress llama, qwen2, qwen3 and opt; mistral (llama's module
# structure) is accepted untested. Others with the same module structure may work but are refused.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "opt")


@dataclass
class ModelLayout:
    """A meta-device model plus the facts the pipeline needs about its decoder blocks."""

    config: object
    model: nn.Module  # transformers *ForCausalLM on the meta device
    decoder: nn.Module  # the base model whose `.layers` are the blocks
    layers: nn.ModuleList
    layers_prefix: str  # e.g. "model.layers." or "model.decoder.layers."

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}{i}."

    def block_linears(self, i: int) -> dict[str, nn.Linear]:
        """The quantizable Linear layers of block i, by name relative to the block."""
        return {n: m for n, m in self.layers[i].named_modules() if isinstance(m, nn.Linear)}


def build_layout(ckpt: Checkpoint, attn_implementation: str = "sdpa") -> ModelLayout:
    """Build the skeleton from the checkpoint's config (never trust_remote_code)."""
    model_type = ckpt.config["model_type"]
    if model_type not in SUPPORTED:
        raise StreamqError(
            f"{ckpt.folder}: architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    try:
        config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers' config classes reject a field with
        raise StreamqError(f"{ckpt.folder}/config.json: {first_line(e)}") from None
    config._attn_implementation = attn_implementation
    config.use_cache = False
    if len(set(getattr(config, "layer_types", None) or ["?"])) > 1:
        raise StreamqError(f"{ckpt.folder}: models mixing sliding-window and full-attention blocks are not supported yet")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a config transformers accepted but cannot build
            raise StreamqError(f"{ckpt.folder}/config.json: cannot build the model ({first_line(e)})") from None
    model.eval()
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise StreamqError(f"{ckpt.folder}: {type(decoder).__name__} has no .layers list of decoder blocks")
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    layout = ModelLayout(config, model, decoder, layers, prefix)
    check_against_config(ckpt, layout)
    return layout


def first_line(e: Exception) -> str:
    """An exception's message as one line (its type when the message is empty)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def materialize(module: nn.Module, prefix: str, ckpt: Checkpoint, layout: ModelLayout,
                device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Give a meta submodule real tensors: its checkpoint tensors (cast to dtype) and its computed buffers.

    prefix: the submodule's name in the checkpoint plus "." ("" for the whole model). Tied weights that the
    checkpoint omits (lm_head when tie_word_embeddings) are taken from their source tensor.
    """
    tied = getattr(layout.model, "all_tied_weights_keys", None) or getattr(layout.model, "_tied_weights_keys", {}) or {}
    state, loaded = {}, {}
    for name, _ in module.named_parameters(remove_duplicate=False):
        full = prefix + name
        if full not in ckpt.tensors and full in tied and getattr(layout.config, "tie_word_embeddings", False):
            full = tied[full]
        if full not in loaded:  # a tied tensor is read once and shared
            loaded[full] = ckpt.get(full, device).to(dtype)
        state[name] = loaded[full]
    for name, buf in module.named_buffers():
        full = prefix + name
        if full in ckpt.tensors:  # persistent buffers saved in the checkpoint
            state[name] = ckpt.get(full, device)
    module.load_state_dict(state, strict=False, assign=True)
    ckpt.close()
    # Buffers the checkpoint does not hold (rotary inv_freq) are computed by the library's own init code.
    for sub in module.modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            sub.to_empty(device=device, recurse=False)
            layout.model._init_weights(sub)
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.is_meta:
            raise StreamqError(f"{ckpt.folder}: tensor {prefix + name} is missing from the checkpoint")
    return module


def load_block(layout: ModelLayout, ckpt: Checkpoint, i: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Materialize decoder block i on device; returns the block module (still owned by the skeleton)."""
    return materialize(layout.layers[i], layout.block_prefix(i), ckpt, layout, device, dtype)


def release_block(layout: ModelLayout, i: int) -> None:
    """Put block i back on the meta device so its memory is freed."""
    layout.layers[i].to("meta")


def non_block_names(layout: ModelLayout, ckpt: Checkpoint) -> list[str]:
    """Checkpoint tensors outside the decoder blocks (embeddings, final norm, lm_head), in checkpoint order."""
    return [n for n in ckpt.names() if not n.startswith(layout.layers_prefix)]


def block_names(layout: ModelLayout, ckpt: Checkpoint, i: int) -> list[str]:
    prefix = layout.block_prefix(i)
    return [n for n in ckpt.names() if n.startswith(prefix)]
