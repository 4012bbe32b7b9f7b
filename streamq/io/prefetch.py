"""Read-ahead of the next block's weights: its tensors' bytes are read on a background thread while the current
block computes, so materializing it later copies from the page cache instead of waiting on the disk.

The bytes go through one small reusable buffer into the kernel's page cache (reclaimable, not this process's
RSS); nothing is kept. A failed read-ahead is ignored: the real read reports the problem where it happens.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from streamq.io.checkpoint import Checkpoint, read_chunks

CHUNK = 8 << 20  # bytes per read


def read_ranges(ranges: list[tuple[Path, int, int]]) -> int:
    """Read every (file, begin, end) byte range once; returns the bytes read."""
    buf = bytearray(CHUNK)
    return sum(len(part) for path, begin, end in sorted(ranges) for part in read_chunks(path, begin, end, buf))


class Prefetcher:
    """One background reader: start(key, names) reads those checkpoint tensors ahead; wait(key) blocks until
    that read is done and returns the seconds spent waiting (0 when it finished in time or never started)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-readahead")
        self.pending: dict[object, Future] = {}

    def start(self, key, names: list[str]) -> None:
        ranges = [self.ckpt.byte_range(n) for n in names if n in self.ckpt.tensors]
        self.pending[key] = self.pool.submit(read_ranges, ranges)

    def wait(self, key) -> float:
        future = self.pending.pop(key, None)
        if future is None:
            return 0.0
        start = time.perf_counter()
        try:
            future.result()
        except OSError:
            pass
        return time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
