"""Durable small files: JSON written to a temporary name, fsynced and renamed into place."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from streamq.errors import disk_full


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder by path; for a folder this makes the renames inside it durable.
    Opened read-only: on POSIX that is how a directory entry is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """path gets data, or keeps its old content if we die midway: never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)  # frees the space; the old file at path is untouched
        if e.errno == errno.ENOSPC:
            raise disk_full(path, len(data)) from None
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    return json.loads(path.read_text())
