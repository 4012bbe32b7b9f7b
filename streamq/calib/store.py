"""Activation store: the hidden states entering a block, one [1, seqlen, hidden] sample at a time.

Two slots, "a" and "b", ping-pong: block i reads one and writes the other, so the slot a manifest
points at is never being written. A store with an fp stream (AutoRound's targets: the unquantized model's
hidden states) has a second pair, "fa" and "fb", that ping-pongs alongside. On disk it is a zarr v3 group (one
array per slot, one chunk per sample) that zarr creates and opens; each chunk is written to a temporary file and
renamed into place (as zarr >= 3.1.3 writes one), so a killed write never leaves a torn sample. In RAM, one torch
tensor per slot with the same API.

Which samples hold data is tracked in memory (a sample is written before it is read, a slot complete before a
manifest points at it); a store reopened for a resume takes a slot whose every chunk is stored as complete.
sync() makes the slots complete() checked durable (an fsync of each of their files and folders); flush(slot) does
both at once.
Reads and writes of an uncompressed slot (the one layout streamq creates) skip zarr's async machinery: the chunk
file, named by zarr's own chunk key, holds the sample's raw little-endian bytes (zarr v3's `bytes` codec), read
with one preadv into the tensor returned (~0.15 ms for a SmolLM2 sample against ~1 ms through zarr; a block reads
its inputs once per pass) and written with one pwrite (0.42-1.22 ms against 1.02-1.85 ms through zarr's setitem
on this project's 2-core VM; tools/bench_store_io.py).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec
from zarr.codecs.bytes import Endian

from streamq.errors import StreamqError, disk_full
from streamq.io.fileread import pread_tensor, pwrite_all
from streamq.io.manifest import fsync_path
from streamq.io.scratch import ScratchFiles

SLOTS = ("a", "b")
FP_SLOTS = ("fa", "fb")  # the fp stream's pair; fp(slot) is slot's partner
FORMAT = "streamq-activations"
VERSION = 1
# zarr has no bfloat16 (without the ml_dtypes extension): its raw bits go in as uint16, a view both ways (no copy).
STORED_AS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "uint16"}
DTYPES = {str(d).removeprefix("torch."): d for d in STORED_AS}
# Every chunk is stored, even an all-zero one, so a slot whose chunks are all stored is complete.
ZARR_CONFIG = {"write_empty_chunks": True}


class ActivationStore:
    """Slots "a"/"b" (and "fa"/"fb" with an fp stream) of shape [nsamples, seqlen, hidden] in the model's dtype
    (float32/float16/bfloat16)."""

    def __init__(self, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype,
                 path: str | None, arrays: dict | None, tensors: dict | None, complete: tuple[str, ...] = ()):
        self.nsamples, self.seqlen, self.hidden, self.dtype = nsamples, seqlen, hidden, dtype
        self.slots = tuple(arrays if arrays is not None else tensors)
        self._path = path
        self._arrays = arrays  # slot -> zarr.Array, on disk
        self._tensors = tensors  # slot -> Tensor, in RAM
        # Samples written by this process, plus every sample of the slots a reopened store found complete.
        self._written = {s: torch.full((nsamples,), s in complete, dtype=torch.bool) for s in self.slots}
        self.io_seconds = 0.0  # time callers spent blocked on this store: reads not yet prefetched, writes, fsyncs
        self.before_write = None  # called (and its time counted in io_seconds) before every write, see writebehind.py
        # on disk: scratch files beside the store, reused block after block (quant/kept.py spills into them)
        self.spill = ScratchFiles(Path(path).parent) if path is not None else None
        self._unsynced: set[str] = set()  # slots complete() found whole, not yet made durable (sync())

    @classmethod
    def on_disk(cls, path: str, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype,
                create: bool, fp_stream: bool = False) -> ActivationStore:
        """Create a fresh store in folder ``path`` (replacing an old store there), or with create=False
        reopen one for a resumed run, refusing it unless shape, dtype and slots match."""
        _check_layout(nsamples, seqlen, hidden, dtype)
        name = _dtype_name(dtype)
        shape = (nsamples, seqlen, hidden)
        slots = _slots(fp_stream)
        if create:
            _clear_for_create(path)
            try:
                root = zarr.open_group(open_local(path), mode="w-", attributes={
                    "format": FORMAT, "version": VERSION, "shape": list(shape), "torch_dtype": name})
                arrays = {s: root.create_array(
                    s, shape=shape, chunks=(1, seqlen, hidden), dtype=STORED_AS[dtype],
                    # No compression: activations are high-entropy floats that barely compress, and the
                    # store sits on the per-block critical path where codec time would dominate.
                    compressors=None, filters=None, fill_value=0,
                    chunk_key_encoding={"name": "default", "separator": "/"},
                    attributes={"torch_dtype": name}, config=ZARR_CONFIG) for s in slots}
            except OSError as e:
                raise StreamqError(f"activation store {path}: cannot create ({e})") from None
            return cls(nsamples, seqlen, hidden, dtype, path, arrays, None)
        if not _is_store(path):
            raise StreamqError(f"activation store {path}: not found (cannot resume from it)")
        root = zarr.open_group(open_local(path), mode="r+")
        attrs = root.attrs.asdict()
        if attrs.get("version") != VERSION or attrs.get("shape") != list(shape) or attrs.get("torch_dtype") != name:
            raise StreamqError(f"activation store {path}: holds {attrs.get('shape')} {attrs.get('torch_dtype')} "
                               f"(version {attrs.get('version')}), this run needs {list(shape)} {name}")
        arrays = {}
        for s in slots:
            if s not in root:
                raise StreamqError(f"activation store {path}: slot {s} is missing")
            arr = root[s]
            if (arr.shape != shape or arr.chunks != (1, seqlen, hidden) or arr.dtype != np.dtype(STORED_AS[dtype])
                    or arr.attrs.get("torch_dtype") != name):
                raise StreamqError(f"activation store {path}: slot {s} is {arr.shape} {arr.dtype}, "
                                   f"this run needs {shape} {name}")
            arrays[s] = arr.with_config(ZARR_CONFIG)
        complete = tuple(s for s, arr in arrays.items() if arr.nchunks_initialized == nsamples)
        return cls(nsamples, seqlen, hidden, dtype, path, arrays, None, complete)

    @classmethod
    def in_ram(cls, nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype,
               fp_stream: bool = False) -> ActivationStore:
        """Every slot as a CPU tensor: 2 (4 with fp_stream) * nsamples * nbytes_per_sample bytes allocated now."""
        _check_layout(nsamples, seqlen, hidden, dtype)
        tensors = {s: torch.empty(nsamples, seqlen, hidden, dtype=dtype) for s in _slots(fp_stream)}
        return cls(nsamples, seqlen, hidden, dtype, None, None, tensors)

    @property
    def path(self) -> str | None:
        """The store's folder; None in RAM."""
        return self._path

    @property
    def nbytes_per_sample(self) -> int:
        """Bytes of one [1, seqlen, hidden] sample."""
        return self.seqlen * self.hidden * self.dtype.itemsize

    @staticmethod
    def other(slot: str) -> str:
        """The slot a block writes when it reads ``slot`` (the same stream's other slot)."""
        _check_slot(slot)
        return {"a": "b", "b": "a", "fa": "fb", "fb": "fa"}[slot]

    @staticmethod
    def fp(slot: str) -> str:
        """The fp stream's slot paired with quantized-stream ``slot``: it holds the same samples' hidden
        states in the unquantized model."""
        _check_slot(slot, SLOTS)
        return "f" + slot

    def read(self, slot: str, i: int) -> torch.Tensor:
        """Sample i of ``slot``: [1, seqlen, hidden] CPU tensor of the store's dtype (a copy)."""
        with self._blocked():
            return self._read(slot, i)

    def _read(self, slot: str, i: int) -> torch.Tensor:
        self._check_index(slot, i)
        if not self._written[slot][i]:
            raise StreamqError(f"activation store {self._path or '(RAM)'}: sample {i} of slot {slot} was never written")
        if self._tensors is not None:
            return self._tensors[slot][i:i + 1].clone()
        if _raw_little_endian(self._arrays[slot]):
            return self._read_chunk_file(slot, i)
        x = torch.from_numpy(self._arrays[slot][i:i + 1])
        return x.view(self.dtype) if self.dtype == torch.bfloat16 else x

    def _read_chunk_file(self, slot: str, i: int) -> torch.Tensor:
        """Sample i of an uncompressed slot, read from its chunk file: [1, seqlen, hidden] of the store's dtype."""
        path, nbytes = self._sample_key(slot, i), self.seqlen * self.hidden * self.dtype.itemsize
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                x, done = pread_tensor(fd, 0, (1, self.seqlen, self.hidden), self.dtype)
                extra = os.pread(fd, 1, done)
            finally:
                os.close(fd)
        except OSError as e:
            raise StreamqError(f"activation store {self._path}: cannot read sample {i} of slot {slot} ({e})") from None
        if done < nbytes or extra:
            raise StreamqError(f"activation store {path}: holds {'more' if extra else done} bytes, a sample is "
                               f"{nbytes} (not written by this store?)")
        return x

    def write(self, slot: str, i: int, x: torch.Tensor) -> None:
        """Store x: [1, seqlen, hidden] of exactly the store's dtype, on any device, as sample i."""
        with self._blocked():
            if self.before_write is not None:
                self.before_write()
            self._write(slot, i, x)

    def _write(self, slot: str, i: int, x: torch.Tensor) -> None:
        self._check_index(slot, i)
        if x.dtype != self.dtype or tuple(x.shape) != (1, self.seqlen, self.hidden):
            raise StreamqError(f"activation store: sample {i} is {tuple(x.shape)} {x.dtype}, "
                               f"the store holds (1, {self.seqlen}, {self.hidden}) {self.dtype}")
        x = x.detach().to("cpu")
        self._written[slot][i] = False  # until the new bytes are in
        if self._tensors is not None:
            self._tensors[slot][i:i + 1].copy_(x)
            self._written[slot][i] = True
            return
        if self.dtype == torch.bfloat16:
            x = x.view(torch.uint16)
        try:
            if _raw_little_endian(self._arrays[slot]):
                self._write_chunk_file(slot, i, x)
            else:
                self._arrays[slot][i:i + 1] = x.contiguous().numpy()
        except OSError as e:  # full disk, removed folder
            if e.errno == errno.ENOSPC:  # this slot's remaining samples are what it still needs
                raise disk_full(self._sample_key(slot, i), (self.nsamples - i) * self.nbytes_per_sample) from None
            raise StreamqError(f"activation store {self._path}: cannot write sample {i} of slot {slot} ({e})") from None
        self._written[slot][i] = True

    def _write_chunk_file(self, slot: str, i: int, x: torch.Tensor) -> None:
        """Sample i of an uncompressed slot as zarr stores it: its raw bytes in a temporary file of the chunk's
        folder, renamed onto the chunk key (so a killed write never leaves a torn sample)."""
        path = self._sample_key(slot, i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                pwrite_all(fd, memoryview(x.contiguous().reshape(-1).view(torch.uint8).numpy()), 0)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def flush(self, slot: str) -> None:
        """Make ``slot`` durable now: complete(slot), then sync()."""
        with self._blocked():
            self.complete(slot)
            self.sync()

    def complete(self, slot: str) -> None:
        """Raise if a sample of ``slot`` was never written, so a manifest cannot point at a partial slot; else
        mark it for the next sync(). (The pipeline syncs on its write-behind thread, before the manifest that
        points at the slot: the next block computes meanwhile.)"""
        self._check_slot(slot)
        missing = [i for i in range(self.nsamples) if not self._written[slot][i]]
        if missing:
            where = self._path or "(RAM)"
            raise StreamqError(f"activation store {where}: slot {slot} lacks samples {missing[:8]}"
                               f"{' ...' if len(missing) > 8 else ''} ({len(missing)} of {self.nsamples})")
        self._unsynced.add(slot)

    def sync(self) -> None:
        """Make the slots complete() marked durable: an fsync of each of their chunk files and folders (the renames
        that put the chunks in place), then of the metadata. In RAM: nothing. Not one syncfs of the filesystem: that
        also writes back every other dirty page there, the kept block intermediates' scratch files above all (they
        are rewritten each block and never need to reach the disk): a SmolLM2-135M run wrote 6.3 GB to the disk with
        syncfs and 1.5 GB with fsyncs, and its 31 syncs took 2.2 s against 0.75 s (on the write-behind thread)."""
        slots, self._unsynced = self._unsynced, set()
        if self._path is None or not slots:
            return
        for slot in sorted(slots):
            for folder, _, files in os.walk(os.path.join(self._path, slot), topdown=False):
                for name in files:
                    fsync_path(os.path.join(folder, name))
                fsync_path(folder)
        fsync_path(os.path.join(self._path, "zarr.json"))
        fsync_path(self._path)

    def iter_samples(self, slot: str, prefetch: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (i, sample [1, seqlen, hidden]) for i = 0..nsamples-1; with prefetch, sample i+1 is read
        on a background thread while the caller works on sample i."""
        self._check_slot(slot)
        if not prefetch:
            for i in range(self.nsamples):
                yield i, self.read(slot, i)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamq-prefetch")
        try:
            ahead = pool.submit(self._read, slot, 0)
            for i in range(self.nsamples):
                with self._blocked():
                    x = ahead.result()
                if i + 1 < self.nsamples:
                    ahead = pool.submit(self._read, slot, i + 1)
                yield i, x
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def delete(self) -> None:
        """Remove the folder on disk (or drop the tensors in RAM); the store is unusable afterwards."""
        if self.spill is not None:
            self.spill.close()
        if self._path is not None and os.path.isdir(self._path):
            shutil.rmtree(self._path)
        self._arrays = self._tensors = None

    @contextlib.contextmanager
    def _blocked(self):
        """Count the time inside the with-block in io_seconds."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.io_seconds += time.perf_counter() - start

    def _sample_key(self, slot: str, i: int) -> str:
        """Where sample i of slot is stored, for messages: the store folder / slot / its chunk key."""
        return os.path.join(self._path, slot, self._arrays[slot].metadata.encode_chunk_key((i, 0, 0)))

    def _check_slot(self, slot: str) -> None:
        _check_slot(slot)
        if slot not in self.slots:
            raise StreamqError(f"activation store: slot {slot} exists only in a store with an fp stream")

    def _check_index(self, slot: str, i: int) -> None:
        self._check_slot(slot)
        if self._arrays is None and self._tensors is None:
            raise StreamqError("activation store: used after delete()")
        if not 0 <= i < self.nsamples:
            raise StreamqError(f"activation store: sample {i} out of range [0, {self.nsamples})")


def open_local(path: str) -> zarr.abc.store.Store:
    """The zarr store of the folder path (the one place the store is opened; tests wrap it to inject faults)."""
    return zarr.storage.LocalStore(path)


def _raw_little_endian(arr: zarr.Array) -> bool:
    """Whether arr's chunks are stored as their raw bytes, little-endian, whole (no compressor, filter or sharding):
    then a chunk file is the sample's bytes as torch holds them (x86 / ARM are little-endian)."""
    codecs = arr.metadata.codecs
    return (sys.byteorder == "little" and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian in (Endian.little, None))


def _check_slot(slot: str, allowed: tuple[str, ...] = SLOTS + FP_SLOTS) -> None:
    if slot not in allowed:
        raise StreamqError(f"activation store: slot {slot!r} is not one of {allowed}")


def _slots(fp_stream: bool) -> tuple[str, ...]:
    return SLOTS + FP_SLOTS if fp_stream else SLOTS


def _check_layout(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype) -> None:
    if min(nsamples, seqlen, hidden) < 1:
        raise StreamqError(f"activation store: shape ({nsamples}, {seqlen}, {hidden}) must be positive")
    _dtype_name(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in STORED_AS:
        raise StreamqError(f"activation store: dtype {dtype} unsupported (use {', '.join(DTYPES)})")
    return str(dtype).removeprefix("torch.")


def _is_store(path: str) -> bool:
    meta = os.path.join(path, "zarr.json")
    if not os.path.isfile(meta):
        return False
    try:
        attrs = zarr.open_group(open_local(path), mode="r").attrs.asdict()
    except Exception:  # any unreadable metadata means "not one of ours"
        return False
    return attrs.get("format") == FORMAT


def _clear_for_create(path: str) -> None:
    """Remove an old store at path; refuse to touch a file or a non-empty folder that is not a store."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise StreamqError(f"activation store {path}: exists and is not a folder")
    if _is_store(path):
        shutil.rmtree(path)
    elif os.listdir(path):
        raise StreamqError(f"activation store {path}: folder is not empty and holds no activation store")
