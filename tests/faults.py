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


def full_disk_store(store, fail_at: int, prefix: str):
    """A zarr store (public WrapperStore API) that behaves like `store` until the fail_at-th write of a key
    starting with prefix, which raises ENOSPC as a full disk does (zarr writes each chunk to a temporary file
    renamed into place, so nothing of it lands)."""
    import errno

    from zarr.storage import WrapperStore

    count = [0]

    class FullDisk(WrapperStore):
        async def set(self, key, value):
            count[0] += key.startswith(prefix)
            if count[0] >= fail_at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await super().set(key, value)

    return FullDisk(store)
