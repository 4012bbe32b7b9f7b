"""Peak resident memory of this process (bytes), as the budgets and reports count it, and handing back to the OS
what this process holds resident but no longer uses (freed heap, library pages touched once)."""
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


MADV_DONTNEED = 4


def release_clean_file_pages() -> int:
    """Unmap the resident pages of this process's read-only file mappings that hold no private copies (smaps
    Anonymous: 0): shared libraries' code and constants, which stay in the kernel's page cache, so a page used
    again is mapped back from it on its next access (a minor fault) with the same bytes. They count in RSS while
    mapped: on SmolLM2-135M ~145 MB after transformers' imports (67 MB of it libtriton, which torch._dynamo
    loads via transformers.masking_utils and a CPU run never calls), of which ~20 MB come back when the block
    work runs. Writable mappings and pages written through a private mapping are never touched (their bytes are
    not the file's). Returns the bytes of the mappings released (0 without /proc or madvise)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    candidates, current = [], None  # [begin, end, resident kB, anonymous kB] of read-only file mappings
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode path
            current = None
            if len(fields) > 5 and fields[5].startswith("/") and "w" not in fields[1] and fields[-1] != "(deleted)":
                begin, end = (int(x, 16) for x in fields[0].split("-"))
                current = [begin, end, 0, None]
                candidates.append(current)
        elif current is not None and fields[0] == "Rss:":
            current[2] = int(fields[1])
        elif current is not None and fields[0] == "Anonymous:":
            current[3] = int(fields[1])
    released = 0
    for begin, end, resident, anonymous in candidates:
        if resident and anonymous == 0 and madvise(begin, end - begin, MADV_DONTNEED) == 0:
            released += resident << 10
    return released


def release_unused_memory() -> None:
    """release_free_heap, then release_clean_file_pages: what this process holds resident and no longer uses."""
    release_free_heap()
    release_clean_file_pages()
