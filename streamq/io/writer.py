"""Output shards written block by block, with every tensor's place planned before the first block runs.

Packed shapes are known from the config alone, so the run plans which shard each unit (a block's tensors, or
the non-block tensors) goes to and at which byte offset. Each shard's safetensors header is written when its
first unit arrives; each unit's bytes are written at their planned offset, fsynced, and hashed for the
manifest. A shard lives under `NAME.partial` until its last unit is durable, then is renamed into place, so
a shard with its final name is always complete. Re-writing a unit at its offset (after a crash) is idempotent.
Memory: one tensor at a time.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.errors import disk_full
from streamq.io.checkpoint import DTYPES
from streamq.io.manifest import fsync_dir

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ALIGN = 8  # safetensors pads the header so data starts 8-byte aligned


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Unit:
    """Tensors written together: "block.{i}" or "rest" (embeddings, norms, head)."""

    key: str
    specs: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_shards(units: list[Unit], shard_size: int) -> list[list[Unit]]:
    """Greedy: a new shard starts when the next unit would push the current one past shard_size bytes."""
    shards: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(units: list[Unit]) -> bytes:
    entries: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for unit in units:
        for s in unit.specs:
            entries[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                               "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def file_digest(path: Path, begin: int, end: int) -> str:
    """sha256 of bytes [begin, end) of a file (fewer when it is shorter), read 16 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(begin)
        remaining = end - begin
        while remaining:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:  # a short file: its digest will not match
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


class ShardWriter:
    def __init__(self, folder: Path, shards: list[list[Unit]]):
        self.folder = folder
        self.names = shard_names(len(shards))
        self.headers = [_header(units) for units in shards]
        self.place: dict[str, tuple[int, int, int]] = {}  # unit key -> (shard, begin, end) file offsets
        self.units = {u.key: u for units in shards for u in units}
        self.last_unit = [units[-1].key for units in shards]
        for s, units in enumerate(shards):
            pos = len(self.headers[s])
            for u in units:
                self.place[u.key] = (s, pos, pos + u.nbytes)
                pos += u.nbytes

    def weight_map(self) -> dict[str, str]:
        return {spec.name: self.names[self.place[key][0]] for key, u in self.units.items() for spec in u.specs}

    def total_size(self) -> int:
        return sum(u.nbytes for u in self.units.values())

    def plan(self) -> dict:
        """The layout as JSON for the manifest (what `streamq verify` checks): per shard its size and header
        sha256, per unit its shard, byte range and tensor names."""
        shards = {name: {"bytes": self.place[last][2], "header_sha256": hashlib.sha256(header).hexdigest()}
                  for name, header, last in zip(self.names, self.headers, self.last_unit)}
        units = {key: {"shard": self.names[s], "begin": begin, "end": end,
                       "tensors": [spec.name for spec in self.units[key].specs]}
                 for key, (s, begin, end) in self.place.items()}
        return {"shards": shards, "units": units}

    def bytes_from(self, key: str) -> int:
        """Bytes still to write when unit `key` is next: its data, the later units' and later shards' headers."""
        keys = list(self.units)
        shard = self.place[key][0]
        return sum(self.units[k].nbytes for k in keys[keys.index(key):]) + sum(map(len, self.headers[shard + 1:]))

    def write_unit(self, key: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write a unit's tensors at their planned place, durably. Returns the sha256 of the bytes written."""
        unit = self.units[key]
        shard, begin, end = self.place[key]
        got = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        want = {s.name: (s.dtype, s.shape) for s in unit.specs}
        if got != want:
            raise RuntimeError(f"unit {key}: tensors differ from the plan: {sorted(set(got.items()) ^ set(want.items()))[:4]}")
        path = self.folder / (self.names[shard] + ".partial")
        final = self.folder / self.names[shard]
        if final.exists() and not path.exists():  # re-writing into a shard finished before a crash
            os.replace(final, path)
        digest = hashlib.sha256()
        try:
            with open(path, "r+b" if path.exists() else "w+b") as f:
                f.seek(0)
                f.write(self.headers[shard])
                f.seek(begin)
                for spec in unit.specs:
                    data = tensor_bytes(tensors[spec.name])
                    f.write(data)
                    digest.update(data)
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # the manifest does not list this unit yet, so a re-run writes it again
            if e.errno == errno.ENOSPC:
                raise disk_full(path, self.bytes_from(key)) from None
            raise
        if key == self.last_unit[shard]:
            os.replace(path, final)
            fsync_dir(self.folder)
        return digest.hexdigest()

    def unit_digest(self, key: str) -> str | None:
        """sha256 of a unit's bytes as found on disk (None when its shard file is absent or too short)."""
        shard, begin, end = self.place[key]
        for name in (self.names[shard], self.names[shard] + ".partial"):
            path = self.folder / name
            if path.exists() and path.stat().st_size >= end:
                return file_digest(path, begin, end)
        return None
