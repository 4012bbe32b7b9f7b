"""Injected faults shared by the durability tests (also imported by test_killresume's child processes, so it
imports nothing heavy)."""
from __future__ import annotations


class InterceptedFile:
    """An open file whose write(data) first calls on_write(file, data), which may tear the write (see
    write_half) and raise, or kill the process; everything else goes to the file."""

    def __init__(self, f, on_write):
        self.f, self.on_write = f, on_write

    def write(self, data):
        self.on_write(self.f, data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def write_half(f, data) -> None:
    """Write the first half of data's bytes: what a write cut short by a full disk or a kill leaves."""
    view = memoryview(data).cast("B")
    f.write(view[: len(view) // 2])


def full_disk_pwrite(pwrite_all, fail_at: int):
    """A pwrite_all (io/fileread.py) that behaves like the given one until its fail_at-th call, which writes half
    the bytes and raises ENOSPC as a full disk does."""
    import errno

    count = [0]

    def pwrite(fd, data, offset):
        count[0] += 1
        if count[0] >= fail_at:
            pwrite_all(fd, data[: len(data) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite_all(fd, data, offset)

    return pwrite
