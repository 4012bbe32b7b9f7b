"""Output shards written block by block, with every tensor's place planned before the first block runs.

Packed shapes are known from the config alone, so the run plans which shard each unit (a block's tensors, or
the non-block tensors) goes to and at which byte offset. Each shard's safetensors header is written when its
first unit arrives; each unit's bytes are written at their planned offset, fsynced, and hashed for the
manifest. A shard lives under `NAME.partial` until its last unit is durable, then is renamed into place, so
a shard with its final name is always complete. Re-writing a unit at its offset (after a crash) is idempotent.
Memory: one tensor at a time (a unit's tensors may be a lazy mapping, outputs.PackedLater, computing each when
taken).

Units sized by their data (SpQR blocks: the outlier tensors' lengths are known only once the block is
quantized) follow one rule: such a unit is planned into a shard of its own, so the number and names of the
shards, and which shard every tensor lands in, are still fixed up front; only that shard's header and the
unit's byte range wait until `settle(unit)` gives the unit's actual tensor shapes (names and dtypes as
planned), right before it is written. A resumed run settles the units it already wrote again from what its
manifest recorded (the pipeline keeps the outlier counts), before checking their sha256.
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
from streamq.io.manifest import fsync_path

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
    sized_by_data: bool = False  # some shapes are placeholders until the writer's settle() (see above)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_shards(units: list[Unit], shard_size: int) -> list[list[Unit]]:
    """Greedy: a new shard starts when the next unit would push the current one past shard_size bytes.
    A unit sized by its data gets a shard of its own."""
    shards: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        alone = unit.sized_by_data or (shards[-1] and shards[-1][-1].sized_by_data)
        if shards[-1] and (alone or size + unit.nbytes > shard_size):
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
        self.headers: list[bytes | None] = [None] * len(shards)  # None: a data-sized unit not settled yet
        self.place: dict[str, tuple[int, int, int]] = {}  # unit key -> (shard, begin, end) file offsets
        self.units = {u.key: u for units in shards for u in units}
        self.shard_of = {u.key: s for s, units in enumerate(shards) for u in units}
        self.last_unit = [units[-1].key for units in shards]
        for s, units in enumerate(shards):
            if not any(u.sized_by_data for u in units):
                self._lay_out(s, units)

    def _lay_out(self, s: int, units: list[Unit]) -> None:
        self.headers[s] = _header(units)
        pos = len(self.headers[s])
        for u in units:
            self.place[u.key] = (s, pos, pos + u.nbytes)
            pos += u.nbytes

    def settle(self, unit: Unit) -> None:
        """Fix the actual shapes of a unit planned as sized by its data (alone in its shard): its shard's header
        and its byte range follow from them. Tensor names and dtypes must be the planned ones."""
        planned = self.units[unit.key]
        if not planned.sized_by_data:
            raise RuntimeError(f"unit {unit.key}: planned with known sizes, nothing to settle")
        if [(t.name, t.dtype) for t in planned.specs] != [(t.name, t.dtype) for t in unit.specs]:
            raise RuntimeError(f"unit {unit.key}: settled tensors differ from the planned names or dtypes")
        self.units[unit.key] = Unit(unit.key, unit.specs, sized_by_data=True)
        self._lay_out(self.shard_of[unit.key], [self.units[unit.key]])

    def weight_map(self) -> dict[str, str]:
        return {spec.name: self.names[self.shard_of[key]] for key, u in self.units.items() for spec in u.specs}

    def total_size(self) -> int:
        """Bytes of all tensors (final once every data-sized unit is settled)."""
        return sum(u.nbytes for u in self.units.values())

    def plan(self) -> dict:
        """The layout as JSON for the manifest (what `streamq verify` checks): per shard its size and header
        sha256, per unit its shard, byte range and tensor names. Not yet known (None): the shard size, header
        and byte ranges of a data-sized unit that is not settled."""
        shards = {name: {"bytes": self.place[last][2], "header_sha256": hashlib.sha256(header).hexdigest()}
                  if header is not None else {"bytes": None, "header_sha256": None}
                  for name, header, last in zip(self.names, self.headers, self.last_unit)}
        units = {}
        for key, unit in self.units.items():
            _, begin, end = self.place.get(key, (None, None, None))
            units[key] = {"shard": self.names[self.shard_of[key]], "begin": begin, "end": end,
                          "tensors": [spec.name for spec in unit.specs]}
        return {"shards": shards, "units": units}

    def bytes_from(self, key: str) -> int:
        """Bytes still to write when unit `key` is next: its data, the later units' and later shards' headers
        (a lower bound while later data-sized units are unsettled: their outliers are counted as none)."""
        keys = list(self.units)
        shard = self.shard_of[key]
        return sum(self.units[k].nbytes for k in keys[keys.index(key):]) + \
            sum(len(h) for h in self.headers[shard + 1:] if h is not None)

    def write_unit(self, key: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write a unit's tensors at their planned place, durably. Returns the sha256 of the bytes written."""
        unit = self.units[key]
        if key not in self.place:
            raise RuntimeError(f"unit {key} is sized by its data: settle() it before writing it")
        shard, begin, end = self.place[key]
        got = tensors.describe() if hasattr(tensors, "describe") else \
            {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}  # describe(): a lazy mapping (outputs.py)
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
                    t = tensors[spec.name]
                    if (t.dtype, tuple(t.shape)) != (spec.dtype, spec.shape):
                        raise RuntimeError(f"unit {key}: {spec.name} is {t.dtype} {list(t.shape)}, planned "
                                           f"{spec.dtype} {list(spec.shape)}")
                    data = tensor_bytes(t)
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
            fsync_path(self.folder)
        return digest.hexdigest()

    def unit_digest(self, key: str) -> str | None:
        """sha256 of a unit's bytes as found on disk (None when its shard file is absent or too short, or the
        unit is data-sized and not settled)."""
        if key not in self.place:
            return None
        shard, begin, end = self.place[key]
        for name in (self.names[shard], self.names[shard] + ".partial"):
            path = self.folder / name
            if path.exists() and path.stat().st_size >= end:
                return file_digest(path, begin, end)
        return None
