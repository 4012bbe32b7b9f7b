"""Which Linears stay unquantized (`--ignore`) and whether the output head is quantized (`--quant-lm-head`).

Patterns follow llm-compressor / compressed-tensors' `ignore:` lists (compressed_tensors.utils.match.match_name):
a plain pattern is one module's exact name as the checkpoint spells it ("model.layers.3.mlp.down_proj"); a
pattern starting with "re:" is a Python regex matched from the start of the name (re.match, not fullmatch:
"re:.*down_proj" also matches "...down_proj_x"). Class names ("Linear") are not patterns here: they would
ignore everything.

A run resolves the patterns once against its model (resolve_ignore): QuantConfig.ignore then holds the exact
names of the block Linears left in fp, in checkpoint order, which is what the manifest, the report and every
layout's quantization_config record. An ignored Linear still runs (in fp) in the block's true-sequential
passes; its source tensors are copied into the output unchanged.

The head (lm_head) is never quantized unless quant_lm_head: then it is rounded to nearest on the method's grid
(bits, group size, sym, full range; RTN, because the head's input, the final norm's output, is not in the
activation store) and stored in the layout like a block Linear. Refused with tied embeddings: the checkpoint
holds one tensor for the embeddings and the head, and the embeddings must stay dense.
"""
from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from streamq.errors import StreamqError


def match_name(name: str, pattern: str) -> bool:
    """llm-compressor's match: "re:REGEX" -> re.match(REGEX, name); otherwise exact equality."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name


def check_patterns(patterns, quant_lm_head: bool) -> tuple[str, ...]:
    """The patterns as a tuple, each a non-empty string whose regex compiles (QuantConfig's validation)."""
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str) or not p.strip() or p == "re:":
            raise StreamqError(f"--ignore {p!r}: give a Linear name or a 're:' regex")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise StreamqError(f"--ignore {p!r}: not a regular expression ({e})") from None
    if quant_lm_head and any(match_name("lm_head", p) for p in patterns):
        raise StreamqError("--quant-lm-head contradicts an --ignore pattern that matches lm_head; drop one")
    return patterns


def head_name(layout) -> str | None:
    """The name of the model's output head Linear (lm_head for most families), or None."""
    head = layout.model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in layout.model.named_modules() if m is head), None)


def resolve_ignore(layout, ckpt, cfg):
    """cfg with ignore resolved to the exact names of the block Linears it matches (checkpoint order), after
    checking quant_lm_head fits this model. A pattern that matches no Linear (a block's or the head) is an
    error: a typo must not quantize everything."""
    names = [layout.block_prefix(i) + n for i in range(layout.n_blocks) for n in layout.block_linears(i)]
    head = head_name(layout)
    matched = set()
    for p in cfg.ignore:
        hits = {n for n in names if match_name(n, p)}
        if not hits and not (head and match_name(head, p)):
            raise StreamqError(f"--ignore {p!r} matches no Linear of {ckpt.folder} (names look like {names[0]}; "
                               "a regex needs the 're:' prefix)")
        matched |= hits
    if cfg.quant_lm_head:
        check_head(layout, ckpt, cfg, head)
    return dataclasses.replace(cfg, ignore=tuple(n for n in names if n in matched))


def check_head(layout, ckpt, cfg, head: str | None) -> None:
    """StreamqError unless the head can be quantized: a Linear of its own, not tied, in a GPTQ-grid layout."""
    if head is None:
        raise StreamqError(f"--quant-lm-head: {ckpt.folder} has no Linear output head")
    if cfg.method == "spqr":
        raise StreamqError("--quant-lm-head: the spqr layout holds SpQR-solved Linears only; the head is "
                           "rounded to nearest, use --method gptq/rtn/autoround")
    if getattr(layout.config, "tie_word_embeddings", False) or head + ".weight" not in ckpt.tensors:
        raise StreamqError(f"--quant-lm-head: {head} is tied to the input embeddings (tie_word_embeddings) in "
                           f"{ckpt.folder}: quantizing the one stored tensor would quantize the embeddings too")


def quantized_linears(layout, i: int, cfg) -> dict[str, nn.Linear]:
    """Block i's Linears that are quantized (those no ignore pattern matches), by name relative to the block."""
    prefix = layout.block_prefix(i)
    return {n: m for n, m in layout.block_linears(i).items()
            if not any(match_name(prefix + n, p) for p in cfg.ignore)}


def ignored_in_block(layout, i: int, cfg) -> frozenset[str]:
    """Names (relative to block i) of its Linears left in fp."""
    return frozenset(layout.block_linears(i)) - frozenset(quantized_linears(layout, i, cfg))


def loader_hints(quantized: list[str], cfg, fmt_name: str) -> dict:
    """Extra quantization_config keys naming the quantized Linears (full names) when some are ignored, for
    loaders that skip by an allow-list: transformers/optimum's GPTQ `modules_in_block_to_quantize` (matched with
    str.endswith, so full names select exactly those modules); the `dynamic` rules of the gptq format are
    gptqmodel's / vLLM's own reading."""
    if not cfg.ignore or fmt_name != "gptq":
        return {}
    return {"modules_in_block_to_quantize": [list(quantized)]}


def quantized_head(layout, cfg) -> tuple[str, nn.Linear] | None:
    """(name, meta Linear) of the head when cfg quantizes it, else None."""
    if not cfg.quant_lm_head:
        return None
    name = head_name(layout)
    return name, layout.model.get_submodule(name)


def head_tensors(layout, ckpt, cfg, fmt) -> dict[str, torch.Tensor]:
    """The head's weight rounded to nearest on cfg's grid, packed by layout format fmt: {name.suffix: tensor}
    ({} when the head is not quantized)."""
    from streamq.quant.grid import check_group_size
    from streamq.quant.rtn import rtn_quantize

    head = quantized_head(layout, cfg)
    if head is None:
        return {}
    name, lin = head
    check_group_size(lin.in_features, cfg.group_size, name)
    result = rtn_quantize(ckpt.get(name + ".weight").float(), cfg)
    return {f"{name}.{k}": t.cpu() for k, t in fmt.pack(result, cfg).items()}
