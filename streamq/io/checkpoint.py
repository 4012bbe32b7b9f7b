"""A Hugging Face model folder read through memory maps: config.json + safetensors shards.

Headers are parsed and checked up front (offsets inside the file, contiguous, known dtypes) so a truncated
or lying file is reported by name before hours of work; tensors are then read one at a time via
`safetensors.safe_open`, which maps the file instead of loading it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from streamq.errors import StreamqError

# safetensors dtype names -> torch dtypes (the ones a decoder checkpoint can hold)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: file, safetensors dtype name, shape, byte range inside the data section."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header. Returns (header without __metadata__, data start in bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StreamqError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise StreamqError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StreamqError(f"{path}: corrupt safetensors header ({e.msg if hasattr(e, 'msg') else e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    expected = 0
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise StreamqError(f"{path}: tensor {name} has dtype {entry['dtype']}, which streamq cannot use")
        numel = 1
        for d in entry["shape"]:
            numel *= d
        itemsize = torch.empty((), dtype=DTYPES[entry["dtype"]]).element_size()
        if begin != expected or end - begin != numel * itemsize:
            raise StreamqError(f"{path}: header offsets of tensor {name} are inconsistent ({begin}..{end})")
        expected = end
    if data_start + expected > size:
        raise StreamqError(
            f"{path}: truncated safetensors file (header needs {data_start + expected} bytes, file has {size})")
    return header, data_start


class Checkpoint:
    """Tensor name -> TensorInfo over all shards of a model folder; tensors are read lazily by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise StreamqError(f"{self.folder}: model folder not found")
        self.config = read_config(self.folder)
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._headers: list[bytes] = []
        self.data_start: dict[Path, int] = {}  # file -> byte offset of its data section
        for file in self.files:
            header, self.data_start[file] = read_header(file)
            self._headers.append(json.dumps(header, sort_keys=True).encode())
            for name, e in header.items():
                self.tensors[name] = TensorInfo(file, e["dtype"], tuple(e["shape"]), *e["data_offsets"])
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise StreamqError(f"{index}: not a safetensors index ({e})") from None
            files = [self.folder / f for f in sorted(set(weight_map.values()))]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise StreamqError(
                    f"{self.folder}: only pickle checkpoints ({', '.join(pickles)}); streamq reads safetensors only, "
                    "because loading a pickle can run arbitrary code")
            raise StreamqError(f"{self.folder}: no *.safetensors files")
        for f in files:
            if not f.exists():
                raise StreamqError(f"{f}: shard named in the index is missing")
        return files

    def fingerprint(self) -> str:
        """sha256 of config.json and every shard header: changes when the source model changes."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for header in self._headers:
            h.update(header)
        return h.hexdigest()

    def names(self) -> list[str]:
        return list(self.tensors)

    @functools.cached_property
    def quant_format(self):
        """(format module, layout QuantConfig) of a streamq output folder (streamq/formats), None for a plain
        fp checkpoint."""
        if not self.config.get("quantization_config"):
            return None
        from streamq.formats import format_of_config

        fmt = format_of_config(self.config, str(self.folder))
        return fmt, fmt.config_from(self.config["quantization_config"])

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (a copy out of the memory map) and check it is finite.

        In a streamq output folder (any layout format), "<linear>.weight" is served dequantized ([out, in] fp32) from its packed
        tensors, so everything that streams a source model streams a compressed one too.
        """
        info = self.tensors.get(name)
        stem = name.removesuffix("weight")
        if info is None and self.quant_format is not None:
            fmt, cfg = self.quant_format
            names = fmt.tensor_names(cfg)
            if stem + names[0] in self.tensors:
                return fmt.dequantize({k: self.get(stem + k) for k in names}, cfg).to(device)
        if info is None:
            raise StreamqError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        t = handle.get_tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise StreamqError(f"{info.file.name}: tensor {name} contains NaN or Inf")
        return t.to(device)

    def close(self) -> None:
        """Drop the memory maps: pages read through them would otherwise stay counted in RSS."""
        self._handles.clear()

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, first byte, end byte) of a stored tensor within its shard file."""
        info = self.tensors[name]
        return info.file, self.data_start[info.file] + info.begin, self.data_start[info.file] + info.end

    def nbytes(self, name: str) -> int:
        info = self.tensors[name]
        return info.end - info.begin


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise StreamqError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StreamqError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise StreamqError(f"{path}: lacks the field model_type")
    return config
