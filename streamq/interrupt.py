"""Safe stop: SIGINT/SIGTERM ask a run to stop at its next safe point instead of dying mid-write.

The first signal only records itself; the pipeline checks between blocks (after a block is durably recorded)
and raises `Interrupted`. A second signal gets the handler that was there before, as if streamq had
installed none (Ctrl-C twice: KeyboardInterrupt now). Nothing happens at import; handlers are installed
by `stop_on_signals()` and restored when it exits.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(Exception):
    """A run stopped at a safe point on request; its output folder resumes with the same command."""

    def __init__(self, blocks_done: int, n_blocks: int):
        super().__init__(f"stopped after block {blocks_done}/{n_blocks}")
        self.blocks_done, self.n_blocks = blocks_done, n_blocks


class StopRequest:
    """Callable flag: true once a stop signal arrived; `signum` says which (None before)."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell convention for death by signal: 128 + signal number (SIGINT 130, SIGTERM 143)."""
        return 128 + (self.signum or 0)


@contextmanager
def stop_on_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopRequest]:
    """Within the block, the first of `signums` sets the yielded StopRequest; the old handlers come back after.
    Outside the main thread (where Python cannot install handlers) the request simply never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    old = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    def handle(signum, frame):
        if request.signum is None:
            request.signum = signum
            return
        restore()  # a second signal: behave as if we were not here
        signal.raise_signal(signum)

    for s in signums:
        signal.signal(s, handle)
    try:
        yield request
    finally:
        restore()
