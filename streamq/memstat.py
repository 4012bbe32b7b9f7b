"""Peak resident memory of this process (bytes), as the budgets and reports count it, and handing freed heap back
to the OS."""
from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """High-water RSS of this process's own address space: /proc/self/status VmHWM on Linux. ru_maxrss (the
    fallback elsewhere) is no good in a child process: Linux carries the parent's RSS at fork into the child's
    ru_maxrss across exec, so a small child of a large parent reports the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim(0): every arena, also free pages in the
    middle of one). Freed memory otherwise stays in the arenas: on SmolLM2-135M the tokenizer's ~260 MB of
    Rust/Python temporaries stayed resident for the whole run, and each block left ~80-190 MB behind, so a run's
    peak RSS was the sum of its phases rather than their maximum. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
