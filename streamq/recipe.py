"""`--recipe FILE`: an llm-compressor / SparseML recipe or a MindSpore-Golden-Stick-style quantization_config,
read into the keyword arguments that fill QuantConfig and RunOptions (a recipe is data: it only fills the same
frozen configs the flags do).

llm-compressor / SparseML (the OBCQ tutorial's layout): `<name>_stage: {<name>_modifiers: {Modifier: {args}}}`.
    SparseGPTModifier   method sparsegpt: sparsity, mask_structure, block_size -> block_columns, percdamp /
                        dampening_frac -> damp, sequential_update -> true_sequential, quantize (false and no
                        quantizing modifier: --bits 16, prune only), targets (must select every block), ignore
    GPTQModifier        method gptq (with SparseGPTModifier: its weight scheme, pruned and quantized jointly in
                        SparseGPT's one pass): block_size, dampening_frac, actorder, scheme / config_groups, ignore,
                        kv_cache_scheme, targets, sequential_update, offload_hessians (streamq streams anyway)
    QuantizationModifier  method rtn (alone): scheme / config_groups, ignore, kv_cache_scheme, targets; SparseML's
                        legacy form (no scheme: its default int8 weights + static int8 activations),
                        post_oneshot_calibration, scheme_overrides (Linear: the scheme; Embedding: nothing, streamq
                        keeps embeddings in fp)
    SmoothQuantModifier smoothing_strength -> smooth_alpha; mappings must be the norm -> Linear groups streamq
                        finds from the block's structure (q/k/v <- input_layernorm, gate/up <- post_attention_layernorm)
Weight schemes: presets W4A16, W4A16_ASYM, W8A16, W8A8 / INT8, or one config group with `weights` (num_bits, type
int, symmetric, strategy channel / group, group_size, actorder, observer minmax) and `input_activations` (int8,
symmetric, token + dynamic or tensor + static). `ignore` entries are Linear names / "re:" patterns (streamq.ignore);
class names such as LlamaRMSNorm name modules streamq never quantizes and are dropped ("Linear" is refused). A
Linear that any modifier ignores is left neither pruned nor quantized. lm_head is quantized (--quant-lm-head)
when a quantizing modifier targets every Linear and no ignore entry matches it, as llm-compressor does.

MindSpore Golden Stick (`quantization_config:` or the dict itself): quant_method rtn | smooth_quant | ptq | gptq,
weight_dtype int8 | int4, activation_dtype int8 | none, kvcache_dtype int8 | none, outliers_suppression smooth |
none, modules_to_not_convert (names matched as substrings, as transformers does), precision_recovery gptq | none,
weight_quant_granularity per_channel | per_group with group_size, act_quant_granularity per_tensor (static) |
per_token (dynamic), algorithm_args {smooth_quant: {alpha}} (or {alpha}).

With int8 activations or a KV-cache scheme and no --format, the output is compressed-tensors (the layout that
describes them; llm-compressor's own).

Every unknown key or modifier is a one-line StreamqError naming the key and where it is.
"""
from __future__ import annotations

import re
from pathlib import Path

from streamq.errors import StreamqError

MODIFIER_KEYS = {
    "SparseGPTModifier": {"sparsity", "mask_structure", "block_size", "percdamp", "dampening_frac",
                          "sequential_update", "quantize", "targets", "ignore"},
    "GPTQModifier": {"block_size", "dampening_frac", "actorder", "scheme", "config_groups", "ignore",
                     "kv_cache_scheme", "targets", "sequential_update", "offload_hessians"},
    "QuantizationModifier": {"scheme", "config_groups", "ignore", "kv_cache_scheme", "targets",
                             "post_oneshot_calibration", "scheme_overrides"},
    "SmoothQuantModifier": {"smoothing_strength", "mappings", "ignore"},
}
PRESETS = {  # compressed-tensors' preset schemes streamq can write: weights, input activations
    "W4A16": ({"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128}, None),
    "W4A16_ASYM": ({"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128}, None),
    "W8A16": ({"num_bits": 8, "symmetric": True, "strategy": "channel"}, None),
    "W8A8": ({"num_bits": 8, "symmetric": True, "strategy": "channel"},
             {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}),
}
PRESETS["INT8"] = PRESETS["W8A8"]
# SparseML's legacy QuantizationModifier default (no scheme given): int8 weights, static int8 activations
LEGACY = ({"num_bits": 8, "symmetric": True, "strategy": "channel"},
          {"num_bits": 8, "symmetric": True, "strategy": "tensor", "dynamic": False})
WEIGHT_KEYS = {"num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "observer", "dynamic"}
ACT_KEYS = {"num_bits", "type", "symmetric", "strategy", "dynamic", "observer"}
SMOOTH_GROUPS = {(frozenset({"q_proj", "k_proj", "v_proj"}), "input_layernorm"),
                 (frozenset({"gate_proj", "up_proj"}), "post_attention_layernorm")}


class Fields(dict):
    """QuantConfig / RunOptions keyword arguments with where in the recipe each came from (for messages)."""

    def __init__(self, file: str):
        super().__init__()
        self.file, self.origin = file, {}
        self.soft = {}  # values that fill a flag left unset but never contradict one (the output format)

    def put(self, key: str, value, where: str) -> None:
        if key in self and self[key] != value:
            raise StreamqError(f"{self.file}: {where} sets {key}={value!r}, but {self.origin[key]} set {self[key]!r}")
        self[key], self.origin[key] = value, where


def read_recipe(path: str | Path) -> Fields:
    """The recipe file at path (YAML or JSON, read with yaml.safe_load) as QuantConfig/RunOptions kwargs."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise StreamqError(f"--recipe {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise StreamqError(f"--recipe {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise StreamqError(f"--recipe {path}: expected a mapping of stages (or a quantization_config)")
    out = Fields(str(path))
    if "quantization_config" in data or "quant_method" in data:
        q = data.get("quantization_config", data)
        extra = sorted(set(data) - {"quantization_config"}) if "quantization_config" in data else []
        if extra:
            raise StreamqError(f"{path}: unknown key {extra[0]!r} beside quantization_config")
        from streamq.recipe_mindspore import read_mindspore

        read_mindspore(q, out, "quantization_config" if q is not data else "")
    else:
        read_stages(data, out)
    if out.get("act_bits") is not None or out.get("kv_cache") is not None:
        out.soft["formats"] = "compressed-tensors"  # the layout that describes activation / KV-cache schemes
    return out


def _check_keys(args, known: set[str], file: str, where: str) -> dict:
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise StreamqError(f"{file}: {where} must be a mapping, not {type(args).__name__}")
    unknown = sorted(set(args) - known)
    if unknown:
        raise StreamqError(f"{file}: unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})")
    return args


def read_stages(data: dict, out: Fields) -> None:
    """llm-compressor / SparseML stages -> out."""
    modifiers = {}
    for stage, groups in data.items():
        if not str(stage).endswith("stage"):
            raise StreamqError(f"{out.file}: unknown key {stage!r} (a recipe's top level holds <name>_stage entries)")
        if not isinstance(groups, dict):
            raise StreamqError(f"{out.file}: {stage} must map <name>_modifiers to modifiers")
        for group, mods in groups.items():
            if not str(group).endswith("modifiers") or not isinstance(mods, dict):
                raise StreamqError(f"{out.file}: unknown key {group!r} in {stage} (expected <name>_modifiers: "
                                   "{Modifier: {...}})")
            for name, args in mods.items():
                where = f"{stage}.{group}.{name}"
                if name not in MODIFIER_KEYS:
                    raise StreamqError(f"{out.file}: unknown modifier {name!r} in {stage}.{group} (streamq reads "
                                       f"{', '.join(MODIFIER_KEYS)})")
                if name in modifiers:
                    raise StreamqError(f"{out.file}: {where}: {name} appears twice (streamq runs one pass)")
                modifiers[name] = (_check_keys(args, MODIFIER_KEYS[name], out.file, where), where)
    sparse, gptq, quant = (modifiers.get(n) for n in ("SparseGPTModifier", "GPTQModifier", "QuantizationModifier"))
    smooth = modifiers.get("SmoothQuantModifier")
    if not (sparse or gptq or quant):
        raise StreamqError(f"{out.file}: no SparseGPTModifier, GPTQModifier or QuantizationModifier: nothing to do")
    ignore: list[str] = []
    head_quantized = False
    scheme = None  # (weights, input activations, where)
    for mod in (quant, gptq):
        if mod is not None:
            args, where = mod
            found = _scheme(args, out.file, where, legacy=mod is quant)
            if found is not None:
                if scheme is not None and found[:2] != scheme[:2]:
                    raise StreamqError(f"{out.file}: {where}'s scheme differs from {scheme[2]}'s (streamq applies one "
                                       "weight scheme)")
                scheme = scheme or found
            if "kv_cache_scheme" in args and args["kv_cache_scheme"] is not None:
                out.put("kv_cache", _kv_cache(args["kv_cache_scheme"], out.file, f"{where}.kv_cache_scheme"),
                        f"{where}.kv_cache_scheme")
            _targets_all(args.get("targets"), out.file, where)
            entries = _ignore_list(args.get("ignore"), out.file, where)
            ignore += entries
            targets = args.get("targets", ["Linear"])  # llm-compressor's default
            every_linear = any(t in ("Linear", "__ALL__") for t in ([targets] if isinstance(targets, str) else targets))
            head_quantized |= every_linear and not any(_matches_head(e) for e in entries)
    if sparse is not None:
        args, where = sparse
        out.put("method", "sparsegpt", where)
        for key, field in (("sparsity", "sparsity"), ("mask_structure", "mask_structure"),
                           ("block_size", "block_columns"), ("percdamp", "damp"), ("dampening_frac", "damp"),
                           ("sequential_update", "true_sequential")):
            if key in args:
                out.put(field, args[key], f"{where}.{key}")
        _targets_all(args.get("targets"), out.file, where)
        ignore += _ignore_list(args.get("ignore"), out.file, where)
        quantize = args.get("quantize", False)
        if not isinstance(quantize, bool):
            raise StreamqError(f"{out.file}: {where}.quantize must be true or false")
        if scheme is None and quantize:  # SparseML applies its default quantization modifier
            scheme = (*LEGACY, f"{where}.quantize")
        if scheme is None:
            out.put("bits", 16, f"{where} (no quantizing modifier: prune only)")
    elif gptq is not None:
        out.put("method", "gptq", gptq[1])
    else:
        out.put("method", "rtn", quant[1])
    if gptq is not None:
        args, where = gptq
        for key, field in (("block_size", "block_columns"), ("dampening_frac", "damp"),
                           ("sequential_update", "true_sequential")):
            if key in args:
                out.put(field, args[key], f"{where}.{key}")
        if args.get("actorder") is not None:
            _actorder(args["actorder"], out, f"{where}.actorder")
    if scheme is not None:
        _apply_scheme(*scheme, out)
        if head_quantized:
            out.put("quant_lm_head", True, f"{scheme[2]} (targets every Linear and no ignore entry matches lm_head)")
    if smooth is not None:
        args, where = smooth
        out.put("smooth_alpha", float(args.get("smoothing_strength", 0.5)), f"{where}.smoothing_strength")
        _smooth_mappings(args.get("mappings"), out.file, f"{where}.mappings")
        if args.get("ignore"):
            raise StreamqError(f"{out.file}: {where}.ignore: streamq smooths every norm -> Linear group it finds; "
                               "drop the list")
    if ignore:
        out.put("ignore", tuple(dict.fromkeys(ignore)), "the modifiers' ignore lists")


def _scheme(args: dict, file: str, where: str, legacy: bool):
    """(weights args, input activation args or None, where) of a quantizing modifier, or None if it names none."""
    if "scheme" in args and "config_groups" in args:
        raise StreamqError(f"{file}: {where} sets both scheme and config_groups; keep one")
    if "scheme" in args:
        scheme = args["scheme"]
        if isinstance(scheme, dict):  # {PRESET: targets}
            if len(scheme) != 1:
                raise StreamqError(f"{file}: {where}.scheme: streamq applies one scheme to every Linear")
            (scheme, targets), = scheme.items()
            _targets_all(targets, file, f"{where}.scheme.{scheme}")
        if scheme not in PRESETS:
            raise StreamqError(f"{file}: {where}.scheme {scheme!r}: streamq writes {', '.join(PRESETS)} "
                               "(integer weights)")
        return (*PRESETS[scheme], f"{where}.scheme")
    if "config_groups" in args:
        groups = _check_keys(args["config_groups"], set(args["config_groups"] or {}), file, f"{where}.config_groups")
        if len(groups) != 1:
            raise StreamqError(f"{file}: {where}.config_groups: streamq applies one group to every Linear, "
                               f"found {len(groups)}")
        (name, group), = groups.items()
        g = f"{where}.config_groups.{name}"
        group = _check_keys(group, {"targets", "weights", "input_activations", "output_activations"}, file, g)
        _targets_all(group.get("targets"), file, g)
        if group.get("output_activations") is not None:
            raise StreamqError(f"{file}: {g}.output_activations: streamq does not quantize output activations")
        if not group.get("weights"):
            raise StreamqError(f"{file}: {g}: needs weights (streamq quantizes weights)")
        return group["weights"], group.get("input_activations"), g
    overrides = _check_keys(args.get("scheme_overrides"), {"Linear", "Embedding"}, file, f"{where}.scheme_overrides")
    if "Linear" in overrides:
        linear = _check_keys(overrides["Linear"], {"weights", "input_activations"}, file,
                             f"{where}.scheme_overrides.Linear")
        return linear.get("weights", LEGACY[0]), linear.get("input_activations", LEGACY[1]), \
            f"{where}.scheme_overrides.Linear"
    return (*LEGACY, f"{where} (SparseML's default scheme)") if legacy else None


def _apply_scheme(weights: dict, acts: dict | None, where: str, out: Fields) -> None:
    w = _check_keys(weights, WEIGHT_KEYS, out.file, f"{where}.weights")
    if w.get("type", "int") != "int" or w.get("dynamic", False):
        raise StreamqError(f"{out.file}: {where}.weights: streamq writes static integer weights (type int)")
    if w.get("observer", "minmax") != "minmax":
        raise StreamqError(f"{out.file}: {where}.weights.observer {w['observer']!r}: streamq fits min/max grids")
    out.put("bits", w.get("num_bits", 8), f"{where}.weights.num_bits")
    out.put("sym", bool(w.get("symmetric", True)), f"{where}.weights.symmetric")
    strategy = w.get("strategy", "channel")
    if strategy == "channel":
        out.put("group_size", -1, f"{where}.weights.strategy")
    elif strategy == "group":
        if not w.get("group_size"):
            raise StreamqError(f"{out.file}: {where}.weights: strategy group needs group_size")
        out.put("group_size", w["group_size"], f"{where}.weights.group_size")
    else:
        raise StreamqError(f"{out.file}: {where}.weights.strategy {strategy!r}: streamq's grids are per channel "
                           "or per group")
    if w.get("actorder") is not None:
        _actorder(w["actorder"], out, f"{where}.weights.actorder")
    if acts is not None:
        a = _check_keys(acts, ACT_KEYS, out.file, f"{where}.input_activations")
        strategy, dynamic = a.get("strategy", "tensor"), a.get("dynamic", False)
        if a.get("num_bits", 8) != 8 or a.get("type", "int") != "int" or not a.get("symmetric", True) \
                or (strategy, bool(dynamic)) not in (("token", True), ("tensor", False)):
            raise StreamqError(f"{out.file}: {where}.input_activations: streamq quantizes activations to symmetric "
                               "int8, per token dynamic or per tensor static")
        out.put("act_bits", 8, f"{where}.input_activations")
        out.put("act_dynamic", bool(dynamic), f"{where}.input_activations.dynamic")


def _actorder(value, out: Fields, where: str) -> None:
    """llm-compressor's actorder: weight / static (groups in column order) or group / dynamic (a g_idx)."""
    if value in (False, None):
        out.put("act_order", False, where)
    elif value in ("weight", "static", True):
        out.put("act_order", True, where)
        out.put("static_groups", True, where)
    elif value in ("group", "dynamic"):
        out.put("act_order", True, where)
        out.put("static_groups", False, where)
    else:
        raise StreamqError(f"{out.file}: {where} {value!r}: choose weight, static, group or null")


def _kv_cache(scheme, file: str, where: str) -> str:
    s = _check_keys(scheme, {"num_bits", "type", "symmetric", "strategy", "dynamic", "observer"}, file, where)
    if s.get("num_bits", 8) != 8 or s.get("strategy", "tensor") != "tensor" or s.get("dynamic", False):
        raise StreamqError(f"{file}: {where}: streamq calibrates static per-tensor 8-bit KV-cache scales")
    kinds = {"int": "int8", "float": "fp8"}
    if s.get("type", "int") not in kinds:
        raise StreamqError(f"{file}: {where}.type {s['type']!r}: choose int or float")
    return kinds[s.get("type", "int")]


def _targets_all(targets, file: str, where: str) -> None:
    """streamq compresses every block's Linears: targets must select all of them."""
    if targets is None:
        return
    for t in [targets] if isinstance(targets, str) else targets:
        if t in ("Linear", "__ALL__"):
            continue
        if isinstance(t, str) and t.startswith("re:") and all(
                re.match(t[3:], f"model.layers.{i}") for i in (0, 7, 31)) and not re.match(t[3:], "lm_head"):
            continue  # the tutorial's "re:model.layers.\d*$": every decoder block
        raise StreamqError(f"{file}: {where}.targets {t!r}: streamq compresses every block's Linears (targets Linear "
                           "or every model.layers.N); leave Linears out with ignore")


def _ignore_list(entries, file: str, where: str) -> list[str]:
    """Linear names / re: patterns of an ignore list; class names of modules streamq never quantizes dropped."""
    if entries is None:
        return []
    if isinstance(entries, str) or not all(isinstance(e, str) for e in entries):
        raise StreamqError(f"{file}: {where}.ignore must be a list of names")
    kept = []
    for e in entries:
        if re.fullmatch(r"[A-Z]\w*", e):  # a class name: LlamaRMSNorm, SiLUActivation, QuantizableMatMul, ...
            if e == "Linear" or e.endswith("Linear"):
                raise StreamqError(f"{file}: {where}.ignore {e!r} would leave every Linear unquantized")
            continue
        kept.append(e)
    return kept


def _matches_head(entry: str) -> bool:
    from streamq.ignore import match_name

    return match_name("lm_head", entry)


def _smooth_mappings(mappings, file: str, where: str) -> None:
    if mappings is None:
        return
    try:
        groups = {(frozenset(_suffix(b) for b in balance), _suffix(norm)) for balance, norm in mappings}
    except (TypeError, ValueError):
        raise StreamqError(f"{file}: {where}: expected [[balance Linears], smoothed norm] pairs") from None
    if not groups <= SMOOTH_GROUPS:
        raise StreamqError(f"{file}: {where}: streamq folds into the norm -> Linear groups it finds in each block "
                           "(q/k/v <- input_layernorm, gate/up <- post_attention_layernorm); other mappings are "
                           "not supported")


def _suffix(pattern: str) -> str:
    """'re:.*q_proj' / 're:.*input_layernorm$' / 'q_proj' -> the module's own name."""
    return re.sub(r"^re:(\.\*)?", "", pattern).rstrip("$").rpartition(".")[2]


def merge_flags(recipe: Fields, flags: dict) -> dict:
    """The CLI's keyword arguments (None = not given) filled from the recipe; a flag given with another value than
    the recipe's is an error naming both. --ignore patterns add to the recipe's."""
    from streamq.config import flag

    merged = dict(flags)
    for key, value in recipe.soft.items():
        if merged.get(key) is None:
            merged[key] = value
    for key, value in recipe.items():
        given = flags.get(key)
        if key == "ignore":
            merged[key] = tuple(dict.fromkeys([*value, *(given or ())]))
        elif given is None:
            merged[key] = value
        elif given != value:
            shown = given if isinstance(given, (str, int, float)) else repr(given)
            raise StreamqError(f"{flag(key)} {shown} contradicts {recipe.file} ({recipe.origin[key]}: {value!r})")
    return merged
