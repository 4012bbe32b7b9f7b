"""MindSpore-Golden-Stick-style quantization_config -> QuantConfig keyword arguments (streamq/recipe.py reads
the file and documents the keys; this module maps them)."""
from __future__ import annotations

import re

from streamq.errors import StreamqError
from streamq.recipe import Fields, _check_keys

MINDSPORE_KEYS = {"quant_method", "weight_dtype", "activation_dtype", "kvcache_dtype", "outliers_suppression",
                  "modules_to_not_convert", "precision_recovery", "weight_quant_granularity", "group_size",
                  "act_quant_granularity", "algorithm_args"}


def read_mindspore(q: dict, out: Fields, where: str) -> None:
    """A Golden-Stick-style quantization_config -> out."""
    at = (where + ".") if where else ""
    q = _check_keys(q, MINDSPORE_KEYS, out.file, where or "the quantization_config")
    method = q.get("quant_method")
    if method not in ("rtn", "smooth_quant", "ptq", "gptq"):
        raise StreamqError(f"{out.file}: {at}quant_method {method!r}: choose rtn, smooth_quant, ptq or gptq")
    bits = {"int8": 8, "int4": 4}
    weight = str(q.get("weight_dtype", "int8")).lower()
    if weight not in bits:
        raise StreamqError(f"{out.file}: {at}weight_dtype {q.get('weight_dtype')!r}: choose int8 or int4")
    out.put("bits", bits[weight], f"{at}weight_dtype")
    recovery = str(q.get("precision_recovery", "none")).lower()
    if recovery not in ("none", "gptq"):
        raise StreamqError(f"{out.file}: {at}precision_recovery {recovery!r}: choose gptq or none")
    out.put("method", "gptq" if method == "gptq" or recovery == "gptq" else "rtn", f"{at}quant_method")
    granularity = str(q.get("weight_quant_granularity", "per_channel")).lower()
    if granularity == "per_channel":
        out.put("group_size", -1, f"{at}weight_quant_granularity")
    elif granularity == "per_group" and q.get("group_size"):
        out.put("group_size", int(q["group_size"]), f"{at}group_size")
    else:
        raise StreamqError(f"{out.file}: {at}weight_quant_granularity {granularity!r}: per_channel, or per_group "
                           "with group_size")
    act = str(q.get("activation_dtype", "int8" if method == "smooth_quant" else "none")).lower()
    if act == "int8":
        out.put("act_bits", 8, f"{at}activation_dtype")
        per = str(q.get("act_quant_granularity", "per_tensor")).lower()
        if per not in ("per_tensor", "per_token"):
            raise StreamqError(f"{out.file}: {at}act_quant_granularity {per!r}: per_tensor or per_token")
        out.put("act_dynamic", per == "per_token", f"{at}act_quant_granularity")
    elif act not in ("none", "null", "float16", "bfloat16"):
        raise StreamqError(f"{out.file}: {at}activation_dtype {act!r}: choose int8 or none")
    kv = str(q.get("kvcache_dtype", "none")).lower()
    if kv in ("int8", "fp8"):
        out.put("kv_cache", kv, f"{at}kvcache_dtype")
    elif kv not in ("none", "null", "float16", "bfloat16"):
        raise StreamqError(f"{out.file}: {at}kvcache_dtype {kv!r}: choose int8, fp8 or none")
    suppression = str(q.get("outliers_suppression", "smooth" if method == "smooth_quant" else "none")).lower()
    if suppression not in ("smooth", "none"):
        raise StreamqError(f"{out.file}: {at}outliers_suppression {suppression!r}: choose smooth or none")
    if suppression == "smooth":
        args = q.get("algorithm_args") or {}
        args = args.get("smooth_quant", args) if isinstance(args, dict) else {}
        out.put("smooth_alpha", float(args.get("alpha", 0.5)), f"{at}algorithm_args")
    names = q.get("modules_to_not_convert") or []
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise StreamqError(f"{out.file}: {at}modules_to_not_convert must be a list of names")
    patterns = tuple(f"re:.*{re.escape(n)}" for n in names)  # transformers' rule: the name is a substring
    if patterns:
        out.put("ignore", patterns, f"{at}modules_to_not_convert")
