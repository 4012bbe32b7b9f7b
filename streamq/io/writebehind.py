"""Write-behind of finished blocks: the store slots a block wrote are made durable (ActivationStore.sync), its
packed tensors go into their shard, and then the manifest records the block, on a background thread while the
next block computes.

At most one record is pending. Resuming needs the store slot a killed run restarts from, so the pipeline makes
every activation-store write wait for the pending record first (ActivationStore.before_write): until a block is
in the manifest, nothing overwrites its inputs. The order on disk stays data first, manifest last.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class WriteBehind:
    """submit(record) runs record() on one background thread after the previous one finished; wait() blocks
    until the pending record is done, re-raises its failure, and returns the seconds spent waiting."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-write")
        self._pending: Future | None = None

    def submit(self, record: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(record)

    def wait(self) -> float:
        pending, self._pending = self._pending, None
        if pending is None:
            return 0.0
        start = time.perf_counter()
        pending.result()
        return time.perf_counter() - start

    def close(self) -> None:
        """Finish the pending record (re-raising its failure) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
