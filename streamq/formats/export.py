"""`streamq export`: convert a finished streamq output folder into another format without recomputing.

Nothing is re-quantized: each quantized Linear's stored tensors are unpacked (format.unpack: codes, scales,
zeros, g_idx) and packed again by the target format, which refuses what it cannot hold exactly. Streaming:
a layout target is written shard by shard (the source's shard names; peak RAM one output shard), a GGUF file
tensor by tensor. The result is built under DST.partial and renamed to DST once complete.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.formats import LAYOUTS, format_of_config, get_format, output_config
from streamq.io.checkpoint import Checkpoint
from streamq.io.manifest import fsync_path, read_json, write_bytes_atomic, write_json_atomic
from streamq.methods import QuantResult
from streamq.options import EXPORT_MARKER, MANIFEST, TOKENIZER_FILES



def export_missing(out: Path, names: tuple[str, ...]) -> None:
    """compress --format a,b,...: each further format converted from the finished folder into OUT/<format>/,
    skipped where a finished one is already there (a resumed run redoes only what is missing)."""
    for name in names:
        if not (out / name).exists():
            export(out, name, out / name)


def finished_run(folder: Path) -> QuantConfig:
    """The method config of a complete streamq output folder (from its manifest; an exported folder: from its
    quantization_config), or StreamqError."""
    path = folder / MANIFEST
    if not path.exists():  # a folder export wrote: its quantization_config says what it holds
        config = Checkpoint(folder).config
        return format_of_config(config, str(folder)).config_from(config["quantization_config"])
    manifest = read_json(path)
    if not manifest.get("complete"):
        raise StreamqError(f"{folder}: the run is not finished; resume it with streamq compress first")
    return QuantConfig.from_dict(manifest["fingerprint"]["method"])


def export(src: str | Path, name: str, dst: str | Path, **options) -> Path:
    """Write finished folder src in format `name` to dst (a folder; GGUF: dst/model-<types>.gguf). options go to
    an export format's export() (GGUF: head_type)."""
    src, dst = Path(src), Path(dst)
    cfg = finished_run(src)
    ckpt = Checkpoint(src)
    source = format_of_config(ckpt.config, str(src))
    target = get_format(name)
    target.check(cfg)
    if dst.exists() and any(dst.iterdir()):
        raise StreamqError(f"{dst}: exists and is not empty; choose a new folder")
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if name in LAYOUTS:
        convert_layout(ckpt, source, target, cfg, partial)
    else:
        target.export(ckpt, source, cfg, partial, **options)
    for file in TOKENIZER_FILES:
        if (src / file).exists():
            shutil.copyfile(src / file, partial / file)
    write_json_atomic(partial / EXPORT_MARKER, {"format": name, "exported_from": str(src), "complete": True})
    fsync_path(partial)
    if dst.exists():
        dst.rmdir()
    partial.rename(dst)
    fsync_path(dst.parent)
    return dst


def planned_bytes(layout, ckpt: Checkpoint, cfg: QuantConfig, name: str, shard_size: int) -> int:
    """Bytes format `name` will write for this model and cfg, before any block runs: a layout format's shards
    (headers included, as the shard writer plans them) plus the copied tokenizer files; GGUF: its tensor data
    (llama.cpp's block sizes; the header and vocabulary come on top) plus the tokenizer files."""
    from streamq.io.writer import ShardWriter, plan_shards
    from streamq.outputs import plan_units

    tokenizer = sum((ckpt.folder / n).stat().st_size for n in TOKENIZER_FILES if (ckpt.folder / n).exists())
    if name in LAYOUTS:
        writer = ShardWriter(Path("."), plan_shards(plan_units(layout, ckpt, cfg, fmt=get_format(name)), shard_size))
        return writer.total_size() + sum(len(h) for h in writer.headers if h is not None) + tokenizer
    return get_format(name).planned_bytes(layout, ckpt, cfg) + tokenizer


def quantized_stems(ckpt: Checkpoint, source) -> list[str]:
    """Names "<linear>." of the quantized Linears of a folder in layout format `source`."""
    first = source.tensor_names(ckpt.quant_format[1])[0]
    return [n[: -len(first)] for n in ckpt.names() if n.endswith("." + first)]


def convert_layout(ckpt: Checkpoint, source, target, cfg: QuantConfig, out: Path) -> None:
    """Every shard of ckpt rewritten with its quantized Linears in layout format `target`, then config + index."""
    src_cfg = ckpt.quant_format[1]
    stems = quantized_stems(ckpt, source)
    by_stem = {stem + k: stem for stem in stems for k in source.tensor_names(src_cfg)}
    weight_map, total = {}, 0
    for file in ckpt.files:
        tensors, done = {}, set()
        for name in sorted(n for n, info in ckpt.tensors.items() if info.file == file):
            stem = by_stem.get(name)
            if stem is None:
                tensors[name] = ckpt.get(name)
            elif stem not in done:
                done.add(stem)
                parts = {k: ckpt.read(stem + k) for k in source.tensor_names(src_cfg)}
                for k, t in repack(parts, source, target, cfg).items():
                    tensors[stem + k] = t
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
        weight_map.update({n: file.name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if len(ckpt.files) > 1:
        write_json_atomic(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    import json

    from streamq import __version__

    from streamq.ignore import loader_hints

    q = {**target.quantization_config(cfg, f"streamq:{__version__}"),
         **loader_hints([s[:-1] for s in stems], cfg, target.NAME)}  # --ignore: the quantized Linears by name
    config = output_config({k: v for k, v in ckpt.config.items() if k != "quantization_config"}, q,
                           ckpt.config.get("architectures", [None])[0])
    write_bytes_atomic(out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def repack(parts: dict[str, torch.Tensor], source, target, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """One Linear's tensors in format `source` -> the same quantized weight in format `target`."""
    t = source.unpack(parts, cfg)
    result = QuantResult(None, t.codes.to(torch.uint8), t.scales, t.zeros.to(torch.uint8), t.g_idx)
    return target.pack(result, cfg)
