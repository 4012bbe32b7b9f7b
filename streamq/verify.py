"""`streamq verify OUT`: check an output folder against its manifest, without the source model.

Every byte of every shard is accounted for: each shard's size and header sha256 against the plan recorded
when the run started, each unit's bytes against the sha256 recorded when it was written. Then coverage:
every planned tensor is in its shard's header and in the index, and every source tensor is represented
(a quantized Linear's weight by its packed GPTQ tensors, anything else by itself).
"""
from __future__ import annotations

from pathlib import Path

from streamq.errors import StreamqError
from streamq.io.checkpoint import read_config, read_header
from streamq.io.manifest import read_json, read_manifest, reader_lock
from streamq.options import INDEX, MANIFEST
from streamq.io.writer import file_digest



def verify(out: str | Path) -> list[str]:
    """Problems found in the output folder `out`, one line each; an empty list when all is well. A folder
    that a compress run is writing is refused (StreamqError)."""
    out = Path(out)
    with reader_lock(out):
        return _verify(out)


def _verify(out: Path) -> list[str]:
    if not (out / MANIFEST).exists():
        return [f"{out}: no {MANIFEST}; not a streamq output folder"]
    try:
        manifest = read_manifest(out)
    except StreamqError as e:
        return [str(e)]
    plan = manifest["plan"]
    complete = manifest.get("complete") is True
    problems = []
    if not complete:
        blocks = [k for k in plan["units"] if k.startswith("block.")]
        done = sum(k in manifest["units"] for k in blocks)
        problems.append(f"{out}: incomplete run ({done} of {len(blocks)} blocks written, not finished); "
                        "re-run its compress command to finish it")
    problems += check_bytes(out, plan, manifest["units"], complete)
    problems += check_coverage(out, plan, complete)
    if complete and not problems:
        formats = manifest["fingerprint"].get("format") or ["gptq"]
        problems += check_config(out, manifest["fingerprint"].get("method"), str(formats[0]))
    return problems


def check_config(out: Path, method, layout_format: str) -> list[str]:
    """config.json's quantization_config: the one the run's recorded method implies (format, bits, group size,
    act-order, symmetry), and one that fits the tensors (every quantized Linear's packed tensors present with the
    shapes and dtypes it implies; checked by building the model skeleton from config.json)."""
    from streamq.io.blocks import build_layout
    from streamq.io.checkpoint import Checkpoint

    path = out / "config.json"
    try:
        q = read_config(out).get("quantization_config")
    except StreamqError as e:
        return [str(e)]
    if not isinstance(q, dict):
        return [f"{path}: has no quantization_config (the folder would read as an unquantized model)"]
    try:  # what the run's method and layout format write (streamq/formats), the quantizer tag aside
        from streamq.config import QuantConfig
        from streamq.formats import get_format

        want = get_format(layout_format).quantization_config(QuantConfig.from_dict(method), "")
    except (StreamqError, TypeError, ValueError, AttributeError):
        return [f"{out / MANIFEST}: the recorded method or format is not one streamq writes"]
    for key, value in want.items():
        if key != "quantizer" and q.get(key) != value:
            return [f"{path}: quantization_config {key} is {q.get(key)!r}, the run used {value!r}"]
    try:
        build_layout(Checkpoint(out))
    except StreamqError as e:
        return [str(e)]
    return []


def check_bytes(out: Path, plan: dict, digests: dict[str, str], complete: bool) -> list[str]:
    """Shard files against the plan (size, header) and each written unit against its recorded sha256.
    In an unfinished run only the units the manifest lists are checked, in `NAME.partial` where unrenamed."""
    problems, found = [], {}
    for name, shard in plan["shards"].items():
        path = out / name
        if not path.exists() and not complete:
            path = out / (name + ".partial")
        if not path.exists():
            if complete or any(u["shard"] == name for k, u in plan["units"].items() if k in digests):
                problems.append(f"{out / name}: shard missing")
            continue
        found[name] = path
        if complete:
            planned = {t for u in plan["units"].values() if u["shard"] == name for t in u["tensors"]}
            problems += check_shard_file(path, shard, planned)
    for key, unit in plan["units"].items():
        if key not in digests:
            if complete:
                problems.append(f"{out}: unit {key} is not recorded as written in {MANIFEST}")
            continue
        path = found.get(unit["shard"])
        if path is not None and file_digest(path, unit["begin"], unit["end"]) != digests[key]:
            problems.append(f"{path}: bytes {unit['begin']}..{unit['end']} ({key}) differ from their sha256 "
                            f"in {MANIFEST}")
    return problems


def check_shard_file(path: Path, shard: dict, planned: set[str]) -> list[str]:
    """A finished shard: a valid safetensors header, byte-equal to the planned one, holding every planned
    tensor, and exactly the planned size."""
    try:
        header, data_start = read_header(path)
    except StreamqError as e:
        return [str(e)]
    problems = [f"{path}: tensor {t} is missing from the header" for t in sorted(planned - set(header))]
    if file_digest(path, 0, data_start) != shard["header_sha256"]:
        problems.append(f"{path}: header differs from the one planned for it")
    if path.stat().st_size != shard["bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, the plan says {shard['bytes']}")
    return problems


def check_coverage(out: Path, plan: dict, complete: bool) -> list[str]:
    """Every source tensor has its output tensors in the plan; the index (multi-shard) maps each to its shard."""
    problems = []
    shard_of = {t: u["shard"] for u in plan["units"].values() for t in u["tensors"]}
    represented = set()
    for source, outputs in plan["source"].items():
        lacking = [t for t in outputs if t not in shard_of]
        if lacking:
            problems.append(f"{out}: source tensor {source} is not represented (no {lacking[0]} in the output)")
        represented.update(outputs)
    for t in sorted(set(shard_of) - represented):
        problems.append(f"{out}: output tensor {t} stands for no source tensor")
    if complete and (len(plan["shards"]) > 1 or (out / INDEX).exists()):
        try:
            weight_map = read_json(out / INDEX)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return problems + [f"{out / INDEX}: missing or unreadable ({type(e).__name__})"]
        if not isinstance(weight_map, dict):
            return problems + [f"{out / INDEX}: weight_map is not an object"]
        for t, shard in sorted(shard_of.items()):
            if weight_map.get(t) != shard:
                problems.append(f"{out / INDEX}: {t} maps to {weight_map.get(t)}, it lives in {shard}")
        for t in sorted(set(weight_map) - set(shard_of)):
            problems.append(f"{out / INDEX}: {t} is not in the output")
    if complete and not (out / "config.json").exists():
        problems.append(f"{out / 'config.json'}: missing")
    return problems
