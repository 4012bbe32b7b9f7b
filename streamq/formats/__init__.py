"""Output formats: one module per format, one line in FORMATS; chosen by name (`--format`), never by method.

A *layout* format is what the output folder's shards hold. Its module provides:
  NAME                                   the --format name
  SIZED_BY_DATA                          True when tensor sizes depend on the data (SpQR's outliers)
  check(cfg)                             StreamqError (one line, naming the loader) when cfg cannot be stored
  linear_shapes(out, in, cfg, n=0)       suffix -> (shape, dtype) of one quantized Linear (n: outliers)
  pack(result, cfg)                      a method's result -> {suffix: tensor}
  unpack(tensors, cfg)                   {suffix: tensor} -> GPTQTensors (codes, scales, zeros, g_idx); formats
                                         that cannot be converted (SpQR) raise StreamqError
  dequantize(tensors, cfg)               {suffix: tensor} -> W [out, in] fp32
  quantization_config(cfg, quantizer)    config.json's quantization_config
  config_from(q)                         the layout QuantConfig back from a quantization_config
  matches(q)                             whether a quantization_config is this format's
  linear_module(in, out, cfg, bias, **kw) the nn.Module streamq.load puts in place of the Linear
An *export* format (GGUF) is a file made from a finished folder: check(cfg) and export(src, dst, **options).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from streamq.errors import StreamqError

FORMATS = {
    "gptq": "streamq.formats.gptq",
    "spqr": "streamq.formats.spqr",
    "compressed-tensors": "streamq.formats.compressed_tensors",
    "gguf": "streamq.formats.gguf_file",
    "dense": "streamq.formats.dense",
}
# formats the pipeline writes shards in (the rest are exports); dense before compressed-tensors, whose
# quant_method its config.json shares
LAYOUTS = ("gptq", "spqr", "dense", "compressed-tensors")


def get_format(name: str) -> ModuleType:
    """The module of format `name`."""
    if name not in FORMATS:
        raise StreamqError(f"--format {name!r}: choose from {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[name])


def parse_formats(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'gptq,gguf' (AutoRound-style) or a list -> ('gptq', 'gguf'); None -> ()."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    for name in names:
        get_format(name)  # unknown names are an error here, before any work
    return names


def resolve_formats(cfg, names: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """(layout written by the run, formats exported from it afterwards) for method config cfg and the asked
    formats (empty: the method's default, spqr for SpQR, dense for 16 bits, else gptq). Every format checks it
    can hold cfg."""
    default = "spqr" if cfg.method == "spqr" else "dense" if cfg.bits == 16 else "gptq"
    names = names or (default,)
    layouts = [n for n in names if n in LAYOUTS]
    layout = layouts[0] if layouts else default
    for name in dict.fromkeys((layout, *names)):
        get_format(name).check(cfg)
    return layout, tuple(n for n in names if n != layout)


def default_layout(cfg) -> ModuleType:
    """The layout format of a run that names none: spqr for SpQR, dense for 16 bits, else gptq."""
    return get_format(resolve_formats(cfg, ())[0])


def format_of_config(config: dict, where: str) -> ModuleType:
    """The layout format of a folder's config.json (its quantization_config), or StreamqError."""
    q = config.get("quantization_config") or {}
    for name in LAYOUTS:
        module = get_format(name)
        if module.matches(q):
            return module
    raise StreamqError(f"{where}: not a streamq output folder (config.json has no gptq, spqr, dense or "
                       "compressed-tensors quantization_config)")


def output_config(source: dict, quantization_config: dict, model_class: str) -> dict:
    """config.json of an output folder: the source's, its quantization_config set, and `architectures` filled
    from the model class when the source has none (llama.cpp's converter and vLLM pick the model by it)."""
    config = dict(source)
    config["quantization_config"] = quantization_config
    if not config.get("architectures"):
        config["architectures"] = [model_class]
    return config
