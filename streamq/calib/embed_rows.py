"""The input embedding served row by row from the memory-mapped checkpoint, never materialized whole.

Capturing block-0 inputs needs only the rows of the ids in a window (SmolLM2-135M: at most 512 of 49152), yet
materializing the embedding read the whole [vocab, hidden] table (bf16, 57 MB) and cast it to the compute dtype
(fp32, 113 MB), which set the run's peak RSS. Here each call of the model's embedding module gets the rows of
the ids it looks up, gathered from a memory map of the stored tensor and cast on their own, with the ids
renumbered into that small table. A lookup copies rows and a cast is elementwise, so the module's output (and
whatever its own forward adds, Gemma's scaling) equals the materialized module's bit for bit.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from streamq.errors import StreamqError
from streamq.io.checkpoint import DTYPES, Checkpoint, check_stored_finite, file_sha256


class EmbeddingRows:
    """The input embedding of `decoder` (an nn.Embedding whose weight stays on meta) and where its table lives."""

    def __init__(self, module: nn.Embedding, param: str, source: str, ckpt: Checkpoint, device, dtype):
        self.module, self.param, self.source, self.ckpt = module, param, source, ckpt
        self.device, self.dtype = device, dtype
        self.info = ckpt.tensors[source]
        if ckpt.digests is not None:  # as Checkpoint.get records it: what a resume checks again (bytes as stored)
            ckpt.digests[source] = file_sha256(*ckpt.byte_range(source))

    @staticmethod
    def of(decoder: nn.Module, prefix: str, ckpt: Checkpoint, layout, device, dtype) -> EmbeddingRows | None:
        """The decoder's input embedding served by rows, or None where it must be materialized: not a plain
        nn.Embedding lookup (max_norm renormalizes the table in place), its weight shared with another parameter,
        or not stored as such (a tied or quantized table)."""
        try:
            module = decoder.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if not isinstance(module, nn.Embedding) or module.max_norm is not None or not module.weight.is_meta:
            return None
        name = next((n for n, m in decoder.named_modules() if m is module), None)
        shared = [n for n, p in decoder.named_parameters(remove_duplicate=False) if p is module.weight]
        if name is None or len(shared) != 1:
            return None
        param = f"{name}.weight" if name else "weight"
        source = layout.source_name(prefix + param)
        info = ckpt.tensors.get(source)
        if info is None or not DTYPES[info.dtype].is_floating_point or info.shape != tuple(module.weight.shape):
            return None
        return EmbeddingRows(module, param, source, ckpt, device, dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [k] int64 -> the table's rows [k, hidden] in the compute dtype, on the device; checked finite."""
        file, begin, end = self.ckpt.byte_range(self.source)
        vocab = self.info.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise StreamqError(f"{self.ckpt.folder}: token id {int(ids.max())} is outside {self.source}'s "
                               f"{vocab} rows (tokenizer and model do not match)")
        raw = np.memmap(file, dtype=np.uint8, mode="c", offset=begin, shape=(end - begin,))  # "c": no write-back
        try:
            table = torch.from_numpy(raw).view(DTYPES[self.info.dtype]).view(self.info.shape)
            picked = table.index_select(0, ids.cpu())  # only these rows' pages are read
        finally:
            del raw
        check_stored_finite(picked, self.info.file, self.source)
        return picked.to(device=self.device, dtype=self.dtype)

    @contextlib.contextmanager
    def serving(self):
        """While inside, each call of the embedding module runs on the rows its ids need (ids renumbered into
        them); its weight is back on meta after each call. The hooks are registered and removed here only."""
        meta, padding = self.module.weight, self.module.padding_idx

        def before(module, args, kwargs):
            ids = args[0] if args else next(iter(kwargs.values()))
            unique, inverse = torch.unique(ids, return_inverse=True)
            module.weight = nn.Parameter(self.rows(unique), requires_grad=False)
            module.padding_idx = None  # only gradients read it; the small table would fail its bounds check
            if args:
                return (inverse, *args[1:]), kwargs
            return args, {**kwargs, next(iter(kwargs)): inverse}

        def after(module, args, kwargs, out):
            module.weight, module.padding_idx = meta, padding

        hooks = [self.module.register_forward_pre_hook(before, with_kwargs=True),
                 self.module.register_forward_hook(after, with_kwargs=True, always_call=True)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.module.weight, self.module.padding_idx = meta, padding
