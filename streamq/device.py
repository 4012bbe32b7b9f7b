"""Where and in what dtype a run computes, and how samples reach the device: --device / --dtype resolved once,
peak VRAM measured per block, host->device copies overlapped with compute on CUDA."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import torch

from streamq.errors import StreamqError

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def auto_device() -> torch.device:
    """What --device auto means here: the first CUDA GPU when torch sees one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | cuda | cuda:N -> torch.device; a one-line StreamqError for a name torch does not know
    or a GPU that is not there."""
    if name == "auto":
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamqError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamqError(f"--device {name}: no CUDA GPU is visible to torch")
    return device


def resolve_dtype(name: str, device: torch.device, ckpt) -> torch.dtype:
    """--dtype -> the compute dtype. auto: float32 on the CPU; on a GPU the checkpoint's 16-bit dtype, and for an
    fp32 checkpoint bfloat16 where the GPU has it (its range cannot overflow where fp32 did not), else float16."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        stored = str(ckpt.config.get("dtype", ckpt.config.get("torch_dtype")))
        if stored == "float16":
            return torch.float16
        if stored == "bfloat16" or has_bf16(device):
            return torch.bfloat16
        return torch.float16
    if name not in DTYPES:
        raise StreamqError(f"--dtype {name!r}: choose auto, float32, float16 or bfloat16")
    return DTYPES[name]


def has_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported()


def reset_peak_vram(device: torch.device) -> None:
    """Start a new peak-VRAM window on device (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram(device: torch.device) -> int:
    """Bytes: the most the caching allocator held for tensors on device since reset_peak_vram (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def to_device_ahead(samples: Iterable[tuple[int, torch.Tensor]], device: torch.device, dtype: torch.dtype | None = None,
                    store=None) -> Iterator[tuple[int, torch.Tensor]]:
    """(j, x) pairs -> (j, x on device, cast to dtype when given).

    On CUDA sample j+1 is copied into pinned memory and sent with a non-blocking copy on a side stream while the
    caller computes on sample j; the host time spent staging a copy is added to store.io_seconds (IO wait).
    Elsewhere each sample is just moved.
    """
    if device.type != "cuda":
        for j, x in samples:
            yield j, x.to(device) if dtype is None else x.to(device, dtype)
        return
    side = torch.cuda.Stream(device)

    def stage(x: torch.Tensor):
        start = time.perf_counter()
        host = x if x.is_pinned() else x.pin_memory()
        with torch.cuda.stream(side):
            y = host.to(device, non_blocking=True)
            y = y if dtype is None else y.to(dtype)
            ready = torch.cuda.Event()
            ready.record(side)
        if store is not None:
            store.io_seconds += time.perf_counter() - start
        return y, ready

    it = iter(samples)
    nxt = next(it, None)
    staged = stage(nxt[1]) if nxt is not None else None
    while nxt is not None:
        j, (y, ready) = nxt[0], staged
        nxt = next(it, None)
        staged = stage(nxt[1]) if nxt is not None else None  # queued on the side stream before j's forward
        current = torch.cuda.current_stream(device)
        current.wait_event(ready)
        y.record_stream(current)  # y was allocated on the side stream: keep it until the compute stream is done
        yield j, y


def cast_floats(kwargs: dict, dtype: torch.dtype) -> dict:
    """A block's forward kwargs with every floating tensor (position embeddings, additive masks; also inside
    tuples) cast to dtype; the rest unchanged."""
    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v
    return {k: cast(v) for k, v in kwargs.items()}


def all_finite(x: torch.Tensor) -> bool:
    """Whether x holds no inf/nan: its min and max are finite (both propagate NaN). One pass without temporaries,
    10-20x faster than isfinite(x).all() on a block's outputs and weights (no [x.shape] bool mask)."""
    if not x.is_floating_point() or not x.numel():
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(x: torch.Tensor, what: str) -> None:
    """A one-line StreamqError when x holds inf/nan (16-bit overflow, never passed on silently as NaN)."""
    if not all_finite(x):
        hint = ("; float16 overflows past 65504: use --dtype bfloat16 or float32" if x.dtype == torch.float16
                else "")
        raise StreamqError(f"{what}: non-finite values in {str(x.dtype).removeprefix('torch.')}{hint}")
