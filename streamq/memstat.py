"""Peak resident memory of this process (bytes), as the budgets and reports count it."""
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
