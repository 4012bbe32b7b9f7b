"""A Hugging Face model folder: config.json + safetensors shards, read one tensor at a time.

Headers are parsed and checked up front (offsets inside the file, contiguous, known dtypes) so a truncated
or lying file is reported by name before hours of work; each tensor is then read by its byte range straight
into its own buffer (no memory map, whose touched pages would count in RSS), never the whole file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from streamq.device import all_finite
from streamq.errors import StreamqError
from streamq.io.fileread import pread_tensor

# safetensors dtype names -> torch dtypes (the ones a decoder checkpoint can hold)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
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
    if not isinstance(header, dict):
        raise StreamqError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StreamqError(f"{path}: safetensors __metadata__ is not an object of strings")
    data_start = 8 + header_len
    expected = 0
    for name, entry in header.items():
        _check_entry(path, name, entry)
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
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


def _check_entry(path: Path, name: str, entry) -> None:
    """One header entry: {"dtype": known name, "shape": [non-negative ints], "data_offsets": [begin, end] ints}."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62

    if not isinstance(entry, dict):
        raise StreamqError(f"{path}: header entry of tensor {name} is not an object")
    if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
        raise StreamqError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which streamq cannot use")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(count(d) for d in shape):
        raise StreamqError(f"{path}: tensor {name} has shape {str(shape)[:60]}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(count(d) for d in offsets):
        raise StreamqError(f"{path}: tensor {name} has data_offsets {str(offsets)[:60]}, not [begin, end]")


class Checkpoint:
    """Tensor name -> TensorInfo over all shards of a model folder; tensors are read lazily by name."""

    def __init__(self, folder: str | Path, hash_reads: bool = False):
        """hash_reads: record the sha256 of every tensor `get` reads (name -> hex) in self.digests."""
        self.folder = Path(folder)
        self.digests: dict[str, str] | None = {} if hash_reads else None
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

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_bytes())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise StreamqError(f"{index}: not a safetensors index ({type(e).__name__}: {str(e)[:80]})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise StreamqError(f"{index}: weight_map is not an object of tensor name -> shard file")
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
        inside = self.folder.resolve()
        for f in files:
            if f.resolve() != inside / f.name or f.parent.resolve() != inside:
                raise StreamqError(f"{f}: shard file outside the model folder {self.folder} (a model folder must be "
                                   "self-contained: no '..', absolute paths or symlinks leaving it)")
            if not f.is_file():
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
        # compressed-tensors' int-quantized layout (W8A8) keeps the int8 codes under the weight's own name
        if (info is None or info.dtype == "I8") and self.quant_format is not None:
            fmt, cfg = self.quant_format
            names = fmt.tensor_names(cfg)
            if stem + names[0] in self.tensors:
                return fmt.dequantize({k: self.read(stem + k) for k in names}, cfg).to(device)
        return self.read(name, device)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor as stored (never dequantized), checked finite. Its bytes are read from the file into the
        tensor (pread), not copied out of a memory map: pages touched through a map stay counted in this
        process's RSS until it is unmapped (SmolLM2-135M's 57 MB embedding, read while the output is finished)."""
        info = self.tensors.get(name)
        if info is None:
            raise StreamqError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        file, begin, end = self.byte_range(name)
        with open(file, "rb", buffering=0) as f:
            t, done = pread_tensor(f.fileno(), begin, info.shape, DTYPES[info.dtype])
        if done < end - begin:  # the header was checked: the file changed under us
            raise StreamqError(f"{file}: cannot read tensor {name} (the file ends at byte {begin + done})")
        if self.digests is not None:  # the bytes as stored in the file: what a resume hashes again
            self.digests[name] = hashlib.sha256(_raw_bytes(t)).hexdigest()
        check_stored_finite(t, info.file, name)
        return t.to(device)

    def check_digests(self, digests: dict[str, str]) -> None:
        """Hash again every tensor in digests (name -> sha256 recorded when an earlier run read it), straight from
        the files; raise StreamqError naming the first one, in file order, that is gone or whose bytes changed."""
        order = sorted(digests, key=lambda n: self.byte_range(n)[:2] if n in self.tensors else (Path(), -1))
        for name in order:
            if name not in self.tensors or file_sha256(*self.byte_range(name)) != digests[name]:
                raise StreamqError(f"{self.folder}: tensor {name} changed since the interrupted run read it "
                                   "(another model under the same names?); use --restart to compress it anew")

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        """(file, first byte, end byte) of a stored tensor within its shard file."""
        info = self.tensors[name]
        return info.file, self.data_start[info.file] + info.begin, self.data_start[info.file] + info.end

    def nbytes(self, name: str) -> int:
        info = self.tensors[name]
        return info.end - info.begin


def check_stored_finite(t: torch.Tensor, file: Path, name: str) -> None:
    """Raise StreamqError when t (stored tensor `name` of `file`, or rows of it) is floating and not all finite."""
    if not all_finite(t):
        raise StreamqError(f"{file.name}: tensor {name} contains NaN or Inf")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as safetensors stores them (C order, native little-endian)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_chunks(path: Path, begin: int, end: int, buf: bytearray) -> Iterator[memoryview]:
    """Bytes [begin, end) of a file, read into buf (len(buf) bytes at a time; fewer when the file is shorter)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(begin)
        while begin < end:
            n = f.readinto(memoryview(buf)[:min(len(buf), end - begin)])
            if not n:
                break
            yield memoryview(buf)[:n]
            begin += n


def file_sha256(path: Path, begin: int, end: int, chunk: int = 1 << 24) -> str:
    """sha256 of bytes [begin, end) of a file, read `chunk` bytes at a time."""
    digest = hashlib.sha256()
    for part in read_chunks(path, begin, end, bytearray(chunk)):
        digest.update(part)
    return digest.hexdigest()


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise StreamqError(f"{path}: missing (a Hugging Face model folder needs config.json)")
    try:
        config = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise StreamqError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except ValueError:  # bytes that are not UTF-8
        raise StreamqError(f"{path}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise StreamqError(f"{path}: lacks the field model_type")
    for field in SIZE_FIELDS:
        v = config.get(field)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 31):
            raise StreamqError(f"{path}: {field} is {str(v)[:40]}, not a positive integer")
    if "quantization_config" in config:
        check_quantization_config(path, config["quantization_config"])
    return config


# config.json sizes streamq (or transformers for it) reads; each must be a positive integer when present.
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim", "ffn_dim", "word_embed_proj_dim")


def check_quantization_config(path: Path, q) -> None:
    """config.json's quantization_config as streamq writes it: one of streamq's layout formats (streamq/formats),
    integer bits / group size, and a layout config that format accepts."""
    from streamq.formats import format_of_config

    if not isinstance(q, dict):
        raise StreamqError(f"{path}: quantization_config is not an object")
    fmt = format_of_config({"quantization_config": q}, str(path))
    for field in ("bits", "group_size", "qq_scale_bits", "qq_zero_bits", "qq_groupsize"):
        v = q.get(field, 0)
        if not (v is None and field.startswith("qq_")) and (not isinstance(v, int) or isinstance(v, bool)):
            raise StreamqError(f"{path}: quantization_config {field} is {str(v)[:40]}, not an integer")
    try:
        fmt.config_from(q)
    except (StreamqError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise StreamqError(f"{path}: quantization_config: {type(e).__name__ if not str(e) else str(e)[:120]}") from None


def check_against_config(ckpt: Checkpoint, layout) -> None:
    """config.json against the checkpoint: the block count, and every parameter of the model the config builds
    (a ModelLayout's meta skeleton) present with the shape the config implies; in a GPTQ/SpQR folder a block
    Linear's weight stands as its packed tensors, with the shapes the quantization_config implies."""
    where = f"{ckpt.folder / 'config.json'}"
    prefix, n = layout.layers_prefix, layout.n_blocks
    found = {name[len(prefix):].split(".", 1)[0] for name in ckpt.tensors if name.startswith(prefix)}
    extra = sorted(b for b in found if not (b.isdigit() and int(b) < n))
    if extra:
        raise StreamqError(f"{where}: num_hidden_layers {n}, but the checkpoint also holds {prefix}{extra[0]} "
                           f"({len(found)} blocks)")
    tied = getattr(layout.model, "all_tied_weights_keys", None) or getattr(layout.model, "_tied_weights_keys", {}) or {}
    linears = {layout.source_name(f"{layout.block_prefix(i)}{k}.weight"): m
               for i in range(n) for k, m in layout.block_linears(i).items()}
    if ckpt.quant_format is not None and ckpt.quant_format[1].quant_lm_head:  # --quant-lm-head: the head is packed
        from streamq.ignore import quantized_head

        head, lin = quantized_head(layout, ckpt.quant_format[1])
        linears[head + ".weight"] = lin
    for name, p in layout.model.named_parameters():
        name = layout.source_name(name)
        stored = ckpt.tensors.get(name)
        if name in linears and (stored is None or stored.dtype == "I8") and ckpt.quant_format is not None:
            _check_packed(ckpt, name.removesuffix("weight"), linears[name], where)
        elif name not in ckpt.tensors:
            if name in tied and getattr(layout.config, "tie_word_embeddings", False):
                continue
            raise StreamqError(f"{where}: num_hidden_layers {n} / the config implies tensor {name}, which is missing "
                               "from the checkpoint")
        elif ckpt.tensors[name].shape != tuple(p.shape):
            raise StreamqError(f"{where}: tensor {name} has shape {list(ckpt.tensors[name].shape)} in the checkpoint, "
                               f"the config implies {list(p.shape)}")


def _check_packed(ckpt: Checkpoint, stem: str, lin, where: str) -> None:
    """One quantized Linear's packed tensors: present, with the shapes and dtypes its quantization_config implies
    (in the folder's layout format; SpQR's outlier count is read from its outlier_col)."""
    fmt, cfg = ckpt.quant_format
    try:
        n_out = ckpt.tensors.get(stem + "outlier_col")
        shapes = fmt.linear_shapes(lin.out_features, lin.in_features, cfg,
                                   n_out.shape[0] if n_out and len(n_out.shape) == 1 else 0)
    except StreamqError as e:
        raise StreamqError(f"{where}: quantization_config does not fit {stem[:-1]} ({e})") from None
    for k, (shape, dtype) in shapes.items():
        info = ckpt.tensors.get(stem + k)
        if info is None:
            raise StreamqError(f"{where}: {stem}{k} is missing from the checkpoint (quantized as its "
                               "quantization_config says?)")
        if info.shape != tuple(shape) or DTYPES[info.dtype] != dtype:
            raise StreamqError(f"{where}: {stem}{k} is {info.dtype} {list(info.shape)}, the quantization_config "
                               f"implies {DTYPE_NAMES[dtype]} {list(shape)}")
