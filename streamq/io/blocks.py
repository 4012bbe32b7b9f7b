"""The model skeleton on the meta device, and materializing one piece of it (a block, the embeddings) at a time.

The skeleton is transformers' own model class built from config.json with no weights, so attention, rotary
and MLP code are the library's. Support is decided by structure, not by a list of model types: the decoder
blocks are the largest nn.ModuleList of blocks of one class holding nn.Linear layers, which must have
num_hidden_layers entries and own their parameters; the part of the model that runs them is the innermost
module above the list whose forward takes input_ids. That the forward really calls every block once, in
order, with hidden states passed straight from one to the next, is checked where the forward first runs
(calib/capture.py). A block is materialized by assigning exactly its checkpoint tensors to it.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from streamq.errors import StreamqError
from streamq.io.checkpoint import Checkpoint, check_against_config
from streamq.moe import unfuse_experts


@dataclass
class ModelLayout:
    """A meta-device model plus the facts the pipeline needs about its decoder blocks."""

    config: object
    model: nn.Module  # transformers *ForCausalLM on the meta device
    decoder: nn.Module  # the part that runs embeddings -> blocks -> final norm (its forward takes input_ids)
    layers: nn.ModuleList  # the decoder blocks
    layers_prefix: str  # e.g. "model.layers.", "model.decoder.layers.", "transformer.h."
    decoder_prefix: str  # the decoder's name plus "." ("" when it is the model itself)
    parent: nn.Module  # the module the block list is registered in, as parent.<attr>
    attr: str
    # module parameter name -> checkpoint tensor name where they differ (MoE experts, streamq/moe.py)
    source_names: dict[str, str] = field(default_factory=dict)

    def source_name(self, name: str) -> str:
        """The checkpoint (and output) name of the model's tensor `name`."""
        return self.source_names.get(name, name)

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def block_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}{i}."

    def block_linears(self, i: int) -> dict[str, nn.Linear]:
        """The quantizable Linear layers of block i, by name relative to the block (fused ones such as Phi-3's
        qkv_proj are one Linear)."""
        return {n: m for n, m in self.layers[i].named_modules() if isinstance(m, nn.Linear)}

    @contextlib.contextmanager
    def blocks_replaced(self, stand_in: nn.Module):
        """The block list swapped for stand_in while the model's own forward runs around it."""
        self.parent._modules[self.attr] = stand_in
        try:
            yield
        finally:
            self.parent._modules[self.attr] = self.layers


def build_layout(ckpt: Checkpoint, attn_implementation: str | None = None) -> ModelLayout:
    """Build the skeleton from the checkpoint's config (never trust_remote_code) and find its blocks.

    attn_implementation: None = transformers' own default for the class (sdpa where supported, else eager)."""
    model_type = ckpt.config["model_type"]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise StreamqError(f"{ckpt.folder}: model type {model_type!r} is unknown to transformers "
                           f"{transformers.__version__} (streamq never runs a model's own remote code)")
    try:
        config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers' config classes reject a field with
        raise StreamqError(f"{ckpt.folder}/config.json: {first_line(e)}") from None
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    config.use_cache = False
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise StreamqError(f"{ckpt.folder}: model type {model_type!r} has no causal language model class "
                                   "in transformers (streamq compresses decoder-only models)") from None
            raise StreamqError(f"{ckpt.folder}/config.json: cannot build the model ({first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - a config transformers accepted but cannot build
            raise StreamqError(f"{ckpt.folder}/config.json: cannot build the model ({first_line(e)})") from None
    model.eval()
    where = f"{ckpt.folder}: {type(model).__name__}"
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    path, layers = find_blocks(model, n_layers, where)
    check_own_state(model, path, layers, where)
    decoder_name, decoder = find_decoder(model, path, where)
    parent_name, _, attr = path.rpartition(".")
    layout = ModelLayout(config, model, decoder, layers, path + ".", decoder_name + "." if decoder_name else "",
                         model.get_submodule(parent_name), attr)
    layout.source_names = unfuse_experts(model, layers, layout.layers_prefix, ckpt.names(), where)
    check_against_config(ckpt, layout)
    return layout


def first_line(e: Exception) -> str:
    """An exception's message as one line (its type when the message is empty)."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def find_blocks(model: nn.Module, n_layers: int | None, where: str) -> tuple[str, nn.ModuleList]:
    """(name, list) of the decoder blocks: the ModuleList with the most parameters among those whose entries are
    all of one class and each hold an nn.Linear; it must have num_hidden_layers entries."""
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1 \
                and all(any(isinstance(x, nn.Linear) for x in b.modules()) for b in m):
            candidates.append((sum(p.numel() for p in m.parameters()), name, m))
    if not candidates:
        raise StreamqError(f"{where} has no list of decoder blocks holding nn.Linear layers "
                           "(streamq quantizes nn.Linear only)")
    candidates.sort(key=lambda c: -c[0])
    size, name, layers = candidates[0]
    if len(candidates) > 1 and candidates[1][0] == size:
        raise StreamqError(f"{where}: two equally large block lists, {name} and {candidates[1][1]}; "
                           "which one is the decoder is ambiguous")
    if n_layers is not None and len(layers) != n_layers:
        raise StreamqError(f"{where}: the largest block list, {name}, holds {len(layers)} "
                           f"{type(layers[0]).__name__} but num_hidden_layers is {n_layers}")
    return name, layers


def check_own_state(model: nn.Module, path: str, layers: nn.ModuleList, where: str) -> None:
    """Each block must own its parameters: a block is materialized, quantized and released on its own."""
    owner = {}
    for i, block in enumerate(layers):
        for n, p in block.named_parameters(remove_duplicate=False):
            if owner.get(id(p), f"{path}.{i}.").startswith(f"{path}.{i}."):
                owner[id(p)] = f"{path}.{i}.{n}"
            else:
                raise StreamqError(f"{where}: blocks share state ({path}.{i}.{n} is also {owner[id(p)]})")
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owner and not n.startswith(path + "."):
            raise StreamqError(f"{where}: blocks share state with the rest of the model ({n} is {owner[id(p)]})")


def find_decoder(model: nn.Module, path: str, where: str) -> tuple[str, nn.Module]:
    """(name, module): the innermost module above the block list whose forward takes input_ids."""
    parts = path.split(".")
    for k in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:k])
        module = model.get_submodule(name)
        if "input_ids" in inspect.signature(module.forward).parameters:
            return name, module
    raise StreamqError(f"{where}: no module above {path} takes input_ids")


def materialize(module: nn.Module, prefix: str, ckpt: Checkpoint, layout: ModelLayout,
                device: torch.device, dtype: torch.dtype, exclude: tuple[str, ...] = ()) -> nn.Module:
    """Give a meta submodule real tensors: its checkpoint tensors (cast to dtype) and its computed buffers.

    prefix: the submodule's name in the checkpoint plus "." ("" for the whole model). Tied weights that the
    checkpoint omits (lm_head when tie_word_embeddings) are taken from their source tensor. Parameters whose
    names start with one of `exclude` stay on the meta device (streamed experts,
    quant/expert_stage.py; the input embedding, served by calib/capture.py's EmbeddingRows).
    """
    tied = getattr(layout.model, "all_tied_weights_keys", None) or getattr(layout.model, "_tied_weights_keys", {}) or {}
    state, loaded = {}, {}
    for name, _ in module.named_parameters(remove_duplicate=False):
        if name.startswith(exclude):
            continue
        full = layout.source_name(prefix + name)
        if full not in ckpt.tensors and full in tied and getattr(layout.config, "tie_word_embeddings", False):
            full = tied[full]
        if full not in loaded:  # a tied tensor is read once and shared
            loaded[full] = ckpt.get(full, device).to(dtype)
        state[name] = loaded[full]
    for name, buf in module.named_buffers():
        full = layout.source_name(prefix + name)
        if full in ckpt.tensors:  # persistent buffers saved in the checkpoint
            state[name] = ckpt.get(full, device)
    module.load_state_dict(state, strict=False, assign=True)
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.is_meta and not name.startswith(exclude):
            raise StreamqError(f"{ckpt.folder}: tensor {layout.source_name(prefix + name)} is missing from the checkpoint")
    compute_buffers(module, prefix, layout, device, str(ckpt.folder))
    return module


def compute_buffers(module: nn.Module, prefix: str, layout: ModelLayout, device: torch.device, where: str) -> None:
    """Buffers the checkpoint does not hold (rotary inv_freq, Gemma's embed_scale) computed by the library's
    own init code (`_init_weights`). It runs on a shallow copy of each such module whose parameters are meta
    stand-ins, so it cannot touch the loaded weights. A buffer it leaves unset is an error, not garbage."""
    for sub_name, sub in module.named_modules():
        missing = [n for n, b in sub.named_buffers(recurse=False) if b.is_meta]
        if not missing:
            continue
        shadow = copy.copy(sub)
        shadow._parameters = {n: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"),
                                                                     requires_grad=False)
                              for n, p in sub._parameters.items()}
        shadow._buffers = dict(sub._buffers)
        for n in missing:
            b = sub._buffers[n]
            shadow._buffers[n] = torch.full(b.shape, _UNSET.get(b.dtype, float("nan")), dtype=b.dtype, device=device)
        layout.model._init_weights(shadow)
        for n in missing:
            b = sub._buffers[n] = shadow._buffers[n]
            unset = b.isnan() if b.is_floating_point() else b == _UNSET.get(b.dtype)
            if b.numel() and b.dtype != torch.bool and unset.all():
                raise StreamqError(f"{where}: buffer {prefix}{sub_name + '.' if sub_name else ''}{n} is neither in the "
                                   f"checkpoint nor computed by {type(layout.model).__name__}._init_weights")


# The fill value that marks a buffer not yet computed: NaN for floating types, the minimum for integers.
_UNSET = {dt: torch.iinfo(dt).min for dt in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)}
_UNSET[torch.bool] = False


def load_block(layout: ModelLayout, ckpt: Checkpoint, i: int, device: torch.device, dtype: torch.dtype,
               exclude: tuple[str, ...] = ()) -> nn.Module:
    """Materialize decoder block i on device (but the parameters under `exclude`, block-relative prefixes);
    returns the block module (still owned by the skeleton)."""
    return materialize(layout.layers[i], layout.block_prefix(i), ckpt, layout, device, dtype, exclude)


def release_block(layout: ModelLayout, i: int) -> None:
    """Put block i back on the meta device so its memory is freed."""
    layout.layers[i].to("meta")


def non_block_names(layout: ModelLayout, ckpt: Checkpoint) -> list[str]:
    """Checkpoint tensors outside the decoder blocks (embeddings, final norm, lm_head), in checkpoint order."""
    return [n for n in ckpt.names() if not n.startswith(layout.layers_prefix)]


def block_names(layout: ModelLayout, ckpt: Checkpoint, i: int) -> list[str]:
    prefix = layout.block_prefix(i)
    return [n for n in ckpt.names() if n.startswith(prefix)]
