"""The output folder's manifest: durable small files, opening OUT (create / resume / restart / refuse), checking
a manifest read back, and the lock that keeps one writer (or several readers) on a folder at a time.

The manifest lists every file name the run may create ("files"), so `--restart` deletes those and nothing
else. A restart first replaces the manifest, durably, by a fresh one that also names the earlier run's files
still to delete ("discard"); only then are they deleted. A restart killed midway therefore leaves an
incomplete run (never an old "complete" manifest over missing shards), and whichever run opens the folder
next finishes the deletion before it continues.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamq.errors import OtherRunError, StreamqError, disk_full
from streamq.options import EXPORT_MARKER, MANIFEST

LOCK = ".streamq.lock"
ALWAYS_OURS = (MANIFEST, MANIFEST + ".tmp", LOCK)  # named in no manifest's "files": they are the bookkeeping


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


# Manifest field -> the type it must have (checked once, where a manifest is read).
FIELDS = {"fingerprint": dict, "plan": dict, "next_block": int, "slot": str, "units": dict, "blocks": dict,
          "complete": bool, "files": list}


def read_manifest(out: Path) -> dict:
    """The manifest of OUT, checked: every field of the right type, the written units and blocks consistent
    with next_block and the complete flag. Raises StreamqError naming the first problem."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise StreamqError(f"{path}: unreadable or not valid JSON ({type(e).__name__})") from None
    if not isinstance(manifest, dict):
        raise StreamqError(f"{path}: not a streamq manifest (a JSON {type(manifest).__name__}, not an object)")
    for field, kind in FIELDS.items():
        value = manifest.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StreamqError(f"{path}: field {field!r} is missing or not a JSON {kind.__name__}")
    units, blocks, n = manifest["units"], manifest["blocks"], manifest["next_block"]
    _check_plan(manifest["plan"], path)
    planned = manifest["plan"]["units"]
    n_blocks = sum(k.startswith("block.") for k in planned)
    if not 0 <= n <= n_blocks or manifest["slot"] not in ("a", "b"):
        raise StreamqError(f"{path}: next_block {n} / slot {manifest['slot']!r} out of range")
    done = {f"block.{i}" for i in range(n)} | ({"rest"} if "rest" in units else set())
    if set(units) != done or set(blocks) != {str(i) for i in range(n)} or \
            not all(isinstance(d, str) for d in units.values()):
        raise StreamqError(f"{path}: the written units {sorted(units)[:3]} disagree with next_block {n}")
    if manifest["complete"] and (n != n_blocks or "rest" not in units):
        raise StreamqError(f"{path}: says complete with {n} of {n_blocks} blocks written")
    if any(k not in planned or planned[k]["begin"] is None for k in units):  # written units are laid out
        raise StreamqError(f"{path}: a written unit has no place in the output plan")
    for k, block in blocks.items():  # what the report and a SpQR resume read back
        layers = block.get("layers") if isinstance(block, dict) else None
        if not isinstance(layers, dict) or not _real(block.get("seconds")) or not all(
                isinstance(r, dict) and _real(r.get("error")) and _count(r.get("n_outliers", 0)) for r in layers.values()):
            raise StreamqError(f"{path}: the record of block {k} is malformed")
    shards = manifest["plan"]["shards"].values()
    if manifest["complete"] and any(None in (s["bytes"], s["header_sha256"]) for s in shards):
        raise StreamqError(f"{path}: says complete with shards not laid out")
    digests = manifest.get("source_sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise StreamqError(f"{path}: field 'source_sha256' is not an object of sha256 strings")
    if not isinstance(manifest.get("discard", []), list) or \
            not all(isinstance(f, str) and _plain_name(f) for f in manifest["files"] + manifest.get("discard", [])):
        raise StreamqError(f"{path}: field 'files' names something outside the folder")
    return manifest


def _check_plan(plan: dict, path: Path) -> None:
    """The output plan's shape: shards {name: {bytes, header_sha256}}, units {key: {shard, begin, end, tensors}}
    (a data-sized unit not yet settled has None for its sizes), source {tensor: [output tensors]}."""
    def fail(what):
        raise StreamqError(f"{path}: the output plan's {what} is malformed")

    def number(v):
        return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)

    shards, units, source = plan.get("shards"), plan.get("units"), plan.get("source")
    if not isinstance(shards, dict) or not isinstance(units, dict) or not isinstance(source, dict):
        fail("shards, units or source")
    for name, shard in shards.items():
        if not _plain_name(name) or not isinstance(shard, dict) or not {"bytes", "header_sha256"} <= set(shard) or \
                not number(shard["bytes"]) or not isinstance(shard["header_sha256"], (str, type(None))):
            fail(f"shard {name[:80]!r}")
    for key, unit in units.items():
        if not isinstance(unit, dict) or not {"begin", "end"} <= set(unit) or not isinstance(unit.get("shard"), str) \
                or unit["shard"] not in shards or not number(unit["begin"]) or \
                not number(unit.get("end")) or not isinstance(unit.get("tensors"), list) or \
                not all(isinstance(t, str) for t in unit["tensors"]):
            fail(f"unit {key[:80]!r}")
        if unit["begin"] is not None and (unit["end"] is None or unit["end"] < unit["begin"]):
            fail(f"unit {key[:80]!r}")
    if not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in source.values()):
        fail("source map")


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _plain_name(name: str) -> bool:
    """A file name directly inside the folder: no separators, not '.' or '..'."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def open_output(out: Path, fp: dict, plan: dict, files: list[str], resume: str) -> dict:
    """Create, resume, restart or refuse the output folder (locked by the caller). Returns the manifest to
    continue from.

    fp: the run fingerprint; plan: the output layout; files: every name the run may create in OUT (shards and
    their .partial, index, config, tokenizer, report, work folder). resume: auto | restart | never.
    A folder holding anything but streamq's bookkeeping and no manifest is refused, naming a file in it."""
    fresh = {"fingerprint": fp, "plan": plan, "next_block": 0, "slot": "a", "units": {}, "blocks": {},
             "complete": False, "files": sorted(set(files)), "source_sha256": {}}
    present = sorted(p.name for p in out.iterdir() if p.name not in ALWAYS_OURS)
    # a run killed mid-rename leaves the manifest's temporary: stale, since the caller holds the folder's lock
    (out / (MANIFEST + ".tmp")).unlink(missing_ok=True)
    if not (out / MANIFEST).exists():
        if present:  # a run killed before its first manifest leaves only that file's temporary and the lock
            raise StreamqError(f"{out}: not a streamq output folder (it holds {present[0]}); choose an empty "
                               "or new folder")
        write_json_atomic(out / MANIFEST, fresh)
        return fresh
    if resume == "never":
        raise StreamqError(f"{out}: holds an earlier run; remove it, or drop --no-resume to continue it")
    try:
        manifest = read_manifest(out)
    except StreamqError as e:
        if resume != "restart":
            raise StreamqError(f"{e}; use --restart to discard the run in that folder") from None
        manifest = {"files": [], "plan": {"shards": {}}}
    if resume == "restart":
        owned = set(manifest["files"]) | set(manifest.get("discard", [])) | _shard_files(manifest["plan"])
        return _restart(out, {**fresh, "discard": sorted(owned | set(files))})
    if manifest.get("discard"):  # an earlier --restart was killed while deleting: finish it first
        return _restart(out, manifest)
    changed = [k for k in fp if manifest["fingerprint"].get(k) != fp[k]]
    if changed:
        raise OtherRunError(f"{out}: belongs to another run ({', '.join(changed)} changed); "
                            "use --restart to discard it or choose another folder")
    return manifest


def _shard_files(plan: dict) -> set[str]:
    """Shard names a plan lays out, and their unfinished .partial names (older manifests list no files)."""
    shards = plan.get("shards") if isinstance(plan.get("shards"), dict) else {}
    return {n for s in shards if isinstance(s, str) and _plain_name(s) for n in (s, s + ".partial")}


def _restart(out: Path, manifest: dict) -> dict:
    """Record the fresh manifest first (durably), then delete the files it lists under "discard"."""
    write_json_atomic(out / MANIFEST, manifest)
    for name in manifest["discard"]:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        tmp = out / (name + ".tmp")
        if tmp.exists():
            tmp.unlink()
    manifest = {k: v for k, v in manifest.items() if k != "discard"}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


@contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold OUT for one compress run: create the folder if needed, take an exclusive flock on OUT/.streamq.lock
    (the kernel drops it when the process dies, so a kill -9 leaves no stale lock). A folder this call
    created and left empty is removed again."""
    if out.exists() and not out.is_dir():
        raise StreamqError(f"{out}: exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _locked(out / LOCK, fcntl.LOCK_EX, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise StreamqError(f"{out}: cannot write there ({e.strerror})") from None
    if fd is None:
        raise StreamqError(f"{out}: another streamq run is writing this folder; wait for it to finish")
    try:
        yield
    finally:
        if not (out / MANIFEST).exists():  # refused, or failed before its first manifest: leave no trace
            (out / LOCK).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        os.close(fd)


@contextmanager
def reader_lock(folder: Path) -> Iterator[None]:
    """Hold a folder for reading: a shared flock when a streamq lock file is there, refused while a compress
    run holds it. A folder without one (a source model) is read as it is."""
    try:
        fd = _locked(folder / LOCK, fcntl.LOCK_SH, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # the model reader reports a missing folder
        fd = -1
    except OSError as e:
        raise StreamqError(f"{folder / LOCK}: cannot open ({e.strerror})") from None
    if fd is None:
        raise StreamqError(f"{folder}: a streamq compress run is writing this folder; wait for it to finish")
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _locked(path: Path, how: int, flags: int) -> int | None:
    """An fd of path holding flock `how` (non-blocking), or None when another process holds a conflicting lock.
    A lock won on a file that its holder unlinked meanwhile (see writer_lock) is retried on the new file."""
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                os.close(fd)
                raise
        os.close(fd)


def check_readable(folder: Path, allow_incomplete: bool = False) -> None:
    """Readers (eval / load / generate) take only finished outputs: a folder with a streamq manifest must be
    complete, and a quantized folder must have one (or be a finished `streamq export`, which carries
    EXPORT_MARKER). allow_incomplete skips both checks."""
    if allow_incomplete or (folder / EXPORT_MARKER).is_file():
        return
    if (folder / MANIFEST).exists():
        manifest = read_manifest(folder)
        if not manifest["complete"]:
            raise StreamqError(f"{folder}: an unfinished streamq run ({manifest['next_block']} blocks written); "
                               "re-run its compress command to finish it, or pass --allow-incomplete")
        return
    try:
        quantized = "quantization_config" in json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError, TypeError):
        return  # the model reader reports a missing or broken config.json
    if quantized:
        raise StreamqError(f"{folder}: a quantized folder without {MANIFEST} (not written by streamq, or its "
                           "manifest was lost); pass --allow-incomplete to read it anyway")


@contextmanager
def reading(folder: str | Path, allow_incomplete: bool = False) -> Iterator[None]:
    """What every reader of a model folder holds: the shared lock, after the completion check."""
    folder = Path(folder)
    with reader_lock(folder):
        check_readable(folder, allow_incomplete)
        yield
