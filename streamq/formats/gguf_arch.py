"""What each architecture needs in a GGUF file for llama.cpp: the llama.cpp architecture, its hyperparameter
keys, and the per-architecture transforms llama.cpp's converter (convert_hf_to_gguf.py, conversion/<arch>.py)
applies to the Hugging Face tensors. Every transform keeps streamq's quantized weights exact: row orders move
whole rows of a quantized Linear (codes with their per-row scales), shifts apply to F32 norm weights only.

  llama, mistral, granite  q_proj / k_proj rows: each head's rotary halves interleaved (llama.cpp's NORM rope)
  gpt_neox                 query_key_value rows [head][q,k,v][dim] -> [q; k; v]
  falcon (7B: multi-query)  query_key_value rows are already [q; k; v] (the converter's regrouping is the
                           identity for one key/value head; the other layouts are refused)
  gemma2, gemma3_text      every *norm.weight + 1 (Gemma's RMSNorm scales by 1 + w)
Sliding windows: llama.cpp's LLAMA, STARCODER2 and PHI3 graphs have none (its converter drops the key), so
mistral / starcoder2 / phi3 files agree with streamq.load only up to sliding_window tokens; gemma2, gemma3
and olmo2 carry their windows and per-layer patterns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from streamq.errors import StreamqError


@dataclass(frozen=True)
class Arch:
    gguf: str                                   # gguf.MODEL_ARCH member
    rows: Callable | None = None                # (linear name, rows, config) -> row order or None
    norm: str = "rms"                           # "rms" or "layer": which epsilon key llama.cpp reads
    norm_shift: float = 0.0                     # added to every *norm.weight
    extra: Callable | None = None               # (writer, config) -> None: the architecture's own keys
    check: Callable | None = None               # (config) -> None or StreamqError


def n_heads(config: dict) -> tuple[int, int]:
    """(query heads, key/value heads) as the model computes them (Falcon 7B, multi-query: one)."""
    n_head = config["num_attention_heads"]
    if config.get("model_type") == "falcon":
        return n_head, 1
    return n_head, config.get("num_key_value_heads") or n_head


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives a q_proj / k_proj weight of `rows` rows in n_head heads: each
    head's two rotary halves interleaved (its `permute`), as an index: new row i = old row perm[i]."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def rotary_rows(name: str, rows: int, config: dict):
    n_head, n_kv = n_heads(config)
    if name.endswith(("q_proj", "k_proj")):
        return qk_permutation(rows, n_head if name.endswith("q_proj") else n_kv)
    return None


def neox_qkv_rows(name: str, rows: int, config: dict):
    if not name.endswith("query_key_value"):
        return None
    n_head = config["num_attention_heads"]
    return torch.arange(rows).reshape(n_head, 3, -1).transpose(0, 1).reshape(rows)


def granite_keys(writer, config: dict) -> None:
    for key, add in (("attention_multiplier", writer.add_attention_scale),
                     ("embedding_multiplier", writer.add_embedding_scale),
                     ("residual_multiplier", writer.add_residual_scale), ("logits_scaling", writer.add_logit_scale)):
        if config.get(key):
            add(float(config[key]))


def swa_keys(writer, config: dict) -> None:
    """Sliding window, the per-layer pattern (True = sliding) and the sliding layers' rope base."""
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
        if config.get("layer_types"):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    local = ((config.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
    if local is not None:
        writer.add_rope_freq_base_swa(float(local))


def gemma_keys(writer, config: dict) -> None:
    swa_keys(writer, config)
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if config.get(key):
            add(float(config[key]))


def gemma_check(config: dict) -> None:
    """llama.cpp fixes Gemma's query scale by model size: 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for the
    27B layer counts (46 Gemma 2, 62 Gemma 3); query_pre_attn_scalar must be that one."""
    big = config["num_hidden_layers"] == (46 if config["model_type"] == "gemma2" else 62)
    expected = config["hidden_size"] // config["num_attention_heads"] if big else head_dim(config)
    if config.get("query_pre_attn_scalar", expected) != expected:
        raise StreamqError(f"--format gguf: query_pre_attn_scalar {config['query_pre_attn_scalar']} is not the "
                           f"{expected} llama.cpp assumes for this {config['model_type']} size")


def neox_keys(writer, config: dict) -> None:
    writer.add_parallel_residual(bool(config.get("use_parallel_residual", True)))


def cohere_keys(writer, config: dict) -> None:
    writer.add_logit_scale(float(config["logit_scale"]))


def cohere_check(config: dict) -> None:
    if config.get("use_qk_norm"):
        raise StreamqError("--format gguf: cohere with use_qk_norm is not mapped (its per-head LayerNorm weights)")


def falcon_check(config: dict) -> None:
    if (config.get("alibi") or config.get("new_decoder_architecture") or not config.get("parallel_attn", True)
            or not config.get("multi_query", True)):
        raise StreamqError("--format gguf: only Falcon's 7B layout (multi-query, rotary, parallel attention, one "
                           "norm) is mapped")


def phi3_check(config: dict) -> None:
    if config.get("max_position_embeddings", 0) > config.get("original_max_position_embeddings", 1 << 62):
        raise StreamqError("--format gguf: phi3 long-context rope factors are not mapped")


ARCHES = {  # model_type -> what llama.cpp needs
    "llama": Arch("LLAMA", rows=rotary_rows),
    "mistral": Arch("LLAMA", rows=rotary_rows),
    "granite": Arch("GRANITE", rows=rotary_rows, extra=granite_keys),
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "olmo2": Arch("OLMO2", extra=swa_keys),
    "gemma2": Arch("GEMMA2", norm_shift=1.0, extra=gemma_keys, check=gemma_check),
    "gemma3_text": Arch("GEMMA3", norm_shift=1.0, extra=gemma_keys, check=gemma_check),
    "phi3": Arch("PHI3", check=phi3_check),
    "starcoder2": Arch("STARCODER2", norm="layer"),
    "cohere": Arch("COMMAND_R", norm="layer", extra=cohere_keys, check=cohere_check),
    "gpt_neox": Arch("GPTNEOX", norm="layer", rows=neox_qkv_rows, extra=neox_keys),
    "falcon": Arch("FALCON", norm="layer", check=falcon_check),
}


def arch_of(config: dict) -> Arch:
    """The Arch of a config.json, after its checks, or StreamqError."""
    model_type = config["model_type"]
    if model_type not in ARCHES:
        raise StreamqError(f"--format gguf: model_type {model_type!r} is not one streamq maps to llama.cpp "
                           f"({', '.join(ARCHES)})")
    rope = config.get("rope_parameters") or {}
    kinds = [rope.get("rope_type")] + [v.get("rope_type") for v in rope.values() if isinstance(v, dict)]
    if config.get("rope_scaling") or any(k not in (None, "default") for k in kinds):
        raise StreamqError("--format gguf: rope scaling is not mapped yet (llama.cpp needs its own keys for it)")
    arch = ARCHES[model_type]
    if arch.check:
        arch.check(config)
    return arch
