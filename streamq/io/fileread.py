"""A tensor's bytes straight between a file and the tensor (no memory map, no intermediate buffer)."""
from __future__ import annotations

import os

import torch


def pread_tensor(fd: int, offset: int, shape, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """A new CPU tensor of shape/dtype filled with fd's bytes from offset (preadv, continued after short reads),
    and how many bytes were read: fewer than the tensor holds only where the file ends first (the caller's error)."""
    t = torch.empty(shape, dtype=dtype)
    if not t.numel():
        return t, 0
    view, done = memoryview(t.reshape(-1).view(torch.uint8).numpy()), 0
    while done < len(view) and (n := os.preadv(fd, [view[done:]], offset + done)):
        done += n
    return t, done


def pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Write all of data at offset (pwrite, continued after short writes); returns len(data). OSError (ENOSPC on
    a full disk) propagates to the caller, which names the file, with the bytes already written as `e.written`."""
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        e.written = done
        raise
    return done
