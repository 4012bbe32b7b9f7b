"""Unnamed temporary files in one folder, handed out for scratch data and taken back for reuse.

Writing into a file's existing pages is cheaper than into a fresh file (the page cache need not allocate
them): a SmolLM2-135M run writes 6.4 GB of kept block intermediates (quant/kept.py), in 5.2 s into a fresh
file per list and 3.9 s into reused ones (tools/measure_spill.py [--fresh-files], one run each; 8.1 vs 1.9 s in
an earlier pair). A file taken back is cut to the bytes its last user wrote, so the pool holds no more disk
than its users last did; nothing is ever named, so every file vanishes with the process at the latest.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO


class ScratchFiles:
    """A pool of unnamed temporary files in `folder` (created there on demand, closed by close())."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._free: list[IO[bytes]] = []
        self._closed = False

    def take(self) -> IO[bytes]:
        """A file to write from offset 0 (a returned one, holding stale bytes past what its new user writes)."""
        return self._free.pop() if self._free else tempfile.TemporaryFile(dir=self.folder)

    def give(self, f: IO[bytes], used: int) -> None:
        """Take f back; `used`: the bytes its user wrote from offset 0 (the file is cut to them). After close()
        the file is closed instead."""
        if self._closed:
            f.close()
            return
        f.truncate(used)
        self._free.append(f)

    def close(self) -> None:
        """Close (and so free) every file taken back; files still out are closed by their users."""
        self._closed = True
        for f in self._free:
            f.close()
        self._free.clear()
