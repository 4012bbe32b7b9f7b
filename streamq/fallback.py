"""Out-of-memory fallback for one block's work: retry it leaner on the same device, then on the CPU.

A block's work is a function compute(device, lean) that starts from the block's source weights (it
re-materializes them), so a failed attempt leaves nothing behind but the other store slot, which the next
attempt overwrites. lean means: smaller chunks where the method has them (AutoRound: half the samples per
forward pass, the same samples per step) and the Hessian work (accumulation and solve) on the CPU, while the
block's forward passes stay on the device.
"""
from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from streamq.errors import StreamqError

T = TypeVar("T")
CPU = torch.device("cpu")


def attempts(device: torch.device) -> list[tuple[torch.device, bool]]:
    """(device, lean) pairs to try in order: as planned, lean on the same device, then lean on the CPU."""
    tries = [(device, False), (device, True)]
    if device.type != "cpu":
        tries.append((CPU, True))
    return tries


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA OOM or the CPU allocator failing to allocate. torch.cuda.OutOfMemoryError is the name torch 2.4
    (pyproject's floor) has; from 2.5 it is torch.OutOfMemoryError, the same class."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def attempt_dtype(device: torch.device, planned: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of an attempt on device for a block planned on `planned`: the run's dtype, except that
    a GPU block retried on the CPU computes in float32 (CPU 16-bit matmuls are slow, and fp16 can overflow)."""
    return torch.float32 if device.type == "cpu" and planned.type != "cpu" else dtype


def free_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks back so the next attempt starts from a clean slate."""
    if device.type == "cuda":
        gc.collect()  # reference cycles may still hold the failed attempt's tensors
        torch.cuda.empty_cache()


def with_fallback(compute: Callable[[torch.device, bool], T], device: torch.device, what: str) -> T:
    """compute(device, lean) on each of attempts(device) until one does not run out of memory.

    Each retry is announced with a warning naming `what` (e.g. "block 3/32"); when the last attempt runs out
    of memory too, raises a one-line StreamqError saying so.
    """
    tries = attempts(device)
    for k, (dev, lean) in enumerate(tries):
        try:
            return compute(dev, lean)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        # Out of the except block: its traceback (and the failed attempt's tensors in its frames) is gone now.
        free_cached(dev)
        if k + 1 == len(tries):
            raise StreamqError(f"{what}: out of memory on {dev} even in smaller chunks ({reason}); "
                               "lower --nsamples/--seqlen or give it more memory")
        nxt, nxt_lean = tries[k + 1]
        how = "in smaller chunks, Hessians on the CPU" if nxt_lean else "as planned"
        warnings.warn(f"{what}: out of memory on {dev} ({reason}); retrying on {nxt} {how}", stacklevel=2)
    raise AssertionError("unreachable")
