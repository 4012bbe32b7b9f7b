"""When the Triton kernels run: on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (Triton's CPU interpreter,
for tests); otherwise, or without Triton installed, each launcher's plain-torch reference.

Triton is imported (and the kernels jitted) when a launcher first runs, through the kernel modules
(`gptq_triton`, `spqr_triton`), never at `import streamq.kernels`: Triton jits its own standard library
(tl.sum, tl.max) when it is imported, so TRITON_INTERPRET=1 must be set before anything in the process imports
Triton, and a process uses one mode.
"""
from __future__ import annotations

import functools
import importlib.util
import os

from torch import Tensor


@functools.cache
def triton_available() -> bool:
    """Whether Triton is installed (CPU-only torch builds ship without it: the torch reference serves)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: Tensor) -> bool:
    """Whether the launchers run the Triton kernels for tensors on t's device."""
    return triton_available() and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
