"""The one exception type users see: a one-line message saying what and where."""
from __future__ import annotations

import shutil
from pathlib import Path


class StreamqError(Exception):
    """A user-facing failure (bad input, impossible flags, full disk). The CLI prints it and exits 2."""


class OtherRunError(StreamqError):
    """The output folder holds a run with another fingerprint (source, method, calibration, version)."""


def disk_full(path: str | Path, needed: int) -> StreamqError:
    """The error for ENOSPC while writing `path`; needed: bytes the run still has to write there."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return StreamqError(f"{path}: disk full ({needed:,} bytes still to write, {free:,} free); "
                        "free space and re-run the same command to resume")
