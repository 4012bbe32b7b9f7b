"""Block intermediates kept between true-sequential passes (quant/stages.py), spilled to a scratch file.

A kept module output is, per sample, a tensor or a tuple of tensors / None (e.g. attention's output and its
unused weights). In RAM that is a plain list. A SpilledList has the same use (append in sample order, index or
iterate) but writes each tensor's bytes to an unnamed temporary file next to the activation store and reads
them back as fresh tensors, so only the sample in use is in memory: on SmolLM2-135M (32 x 512 tokens) that is
~140 MB of RAM less per block. The file needs no fsync: a killed run redoes the block from its inputs, and the
file, never named, vanishes with the process. Given a pool (io/scratch.py), lists reuse its files: writing into
existing pages costs a fraction of writing into fresh ones.
"""
from __future__ import annotations

import errno
from pathlib import Path

import torch

from streamq.errors import disk_full
from streamq.io.fileread import pread_tensor, pwrite_all
from streamq.io.scratch import ScratchFiles


class SpilledList:
    """Module outputs of the samples in order, in an unlinked temporary file of `where` (a folder: a file of its
    own; a ScratchFiles pool: one taken from it and given back by close()). Appending writes the bytes at once
    and indexing reads fresh tensors, so neither needs a defensive copy (`fresh`)."""

    fresh = True

    def __init__(self, where: str | Path | ScratchFiles):
        self._pool = where if isinstance(where, ScratchFiles) else None
        self.folder = where.folder if self._pool is not None else Path(where)
        self._file = (self._pool if self._pool is not None else ScratchFiles(self.folder)).take()
        self._items: list[tuple[bool, list]] = []  # per sample: (a tuple?, per part (offset, shape, dtype, device) | as is)
        self._end = 0

    def append(self, out) -> None:
        parts = out if isinstance(out, tuple) else (out,)
        meta = []
        for p in parts:
            if not isinstance(p, torch.Tensor):
                meta.append(p)
                continue
            c = p.detach().to("cpu").contiguous()
            self._write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
            meta.append((self._end - c.numel() * c.element_size(), c.shape, c.dtype, p.device))
        self._items.append((isinstance(out, tuple), meta))

    def _write(self, data: memoryview) -> None:
        try:
            self._end += pwrite_all(self._file.fileno(), data, self._end)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(self.folder / "(kept block intermediates)", len(data) - e.written) from None
            raise

    def _read(self, offset: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
        t, done = pread_tensor(self._file.fileno(), offset, shape, dtype)
        if done < t.numel() * t.element_size():
            raise OSError(errno.EIO, f"{self.folder}: kept block intermediates cut short")
        return t.to(device)

    def __getitem__(self, k: int):
        is_tuple, meta = self._items[k]
        parts = [self._read(*m) if isinstance(m, tuple) else m for m in meta]
        return tuple(parts) if is_tuple else parts[0]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def close(self) -> None:
        """Give the file back to the pool (or close it); a second close does nothing."""
        f, self._file = self._file, None
        if f is None:
            return
        if self._pool is not None:
            self._pool.give(f, self._end)
        else:
            f.close()


class BuiltOnRead:
    """A tail's outputs (quant/stages.py) built when read instead of kept: item k is `linear` applied to the kept
    input k, shaped as the tail module returns it (a tuple of n with Nones after it; n = 0: the bare tensor).
    Reading runs the same op on the same tensors the eager build would (bit-identical), and for a tail replayed in
    one pass only it saves writing its outputs to the scratch file and reading them back. Each read is a new
    tensor (`fresh`). close() closes the inputs."""

    fresh = True

    def __init__(self, linear, inputs, n: int):
        self.linear, self.inputs, self.n = linear, inputs, n

    def __getitem__(self, k: int):
        y = self.linear(self.inputs[k])
        return (y, *([None] * (self.n - 1))) if self.n else y

    def __len__(self) -> int:
        return len(self.inputs)

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def close(self) -> None:
        close_kept(self.inputs)


def new_kept(where: str | Path | ScratchFiles | None):
    """An empty per-sample list of kept outputs: in RAM (where None) or spilled (a folder, or a pool of files)."""
    return [] if where is None else SpilledList(where)


def close_kept(kept) -> None:
    if isinstance(kept, (SpilledList, BuiltOnRead)):
        kept.close()
