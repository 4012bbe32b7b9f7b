"""Method configuration: one frozen dataclass, validated once at the edge, serialized into outputs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from streamq.errors import StreamqError
from streamq.methods import COMMON, get_method, names
from streamq.quant.grid import GRID_SEARCHES

PACKABLE_BITS = (2, 3, 4, 8)

# Named recipes per method: field name -> value. AutoRound's are intel/auto-round's "light" and "best".
# "nsamples" is a run option (RunOptions.nsamples), not a QuantConfig field: apply_preset returns plain keyword
# arguments and the caller splits them.
PRESETS = {
    "autoround": {
        "light": {"iters": 50, "lr": 5e-3},
        "best": {"iters": 1000, "nsamples": 512},
    },
    # The SpQR README's near-lossless recipe (main.py --wbits 4 --groupsize 16 --perchannel --qq_scale_bits 3
    # --qq_zero_bits 3 --qq_groupsize 16 --outlier_threshold=0.2 --permutation_order act_order --percdamp 1e0
    # --nsamples 128); the reference's grids are asymmetric.
    "spqr": {
        "near-lossless": {"bits": 4, "group_size": 16, "qq_scale_bits": 3, "qq_zero_bits": 3, "qq_groupsize": 16,
                          "outlier_threshold": 0.2, "act_order": True, "damp": 1.0, "sym": False, "nsamples": 128},
    },
}
AUTOROUND_PRESETS = PRESETS["autoround"]


def apply_preset(method: str, preset: str | None, kwargs: dict) -> dict:
    """kwargs with the preset's values filled in where kwargs does not set them (explicit flags win)."""
    if preset is None:
        return dict(kwargs)
    recipes = PRESETS.get(method, {})
    if preset not in recipes:
        known = ", ".join(f"{m}: {', '.join(r)}" for m, r in PRESETS.items())
        raise StreamqError(f"--preset {preset!r} does not exist for --method {method} (presets: {known})")
    return {**recipes[preset], **kwargs}


class _Unset:
    """A field not given: it takes its method's default (streamq.methods), else NEUTRAL's."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# The value of each method-specific field for a method that does not read it (and the default of the methods
# that do, unless their Method.defaults says otherwise). Setting a field a method does not read to anything else
# is refused.
NEUTRAL = {
    "sym": True, "full_range": False, "act_order": False, "static_groups": False, "damp": 0.01,
    "block_columns": 128, "true_sequential": True, "iters": 200, "lr": None, "minmax_tuning": True,
    "batch_size": 8, "grad_accum": 1, "seed": 0, "fp_targets": True, "qq_scale_bits": None,
    "qq_zero_bits": None, "qq_groupsize": 16, "outlier_threshold": math.inf, "simplified_outliers": False,
    # SparseGPT (issue 18): fraction of weights pruned; "0:0" = unstructured, "N:M" = N zeros per M input columns
    "sparsity": 0.0, "mask_structure": "0:0",
    # grid fitting (quant/grid.py fit_grid): "minmax" = each group's min/max range; "mse" = the shrunk range with the
    # smallest |w - q|^2.4 (IST-DASLab/gptq's mse search); read by GPTQ, RTN and SparseGPT
    "grid_search": "minmax",
}
# CLI spellings where the flag is not --field-name (booleans whose flag turns the default off)
FLAGS = {"true_sequential": "--no-true-sequential", "minmax_tuning": "--no-minmax-tuning",
         "fp_targets": "--no-fp-targets"}


def flag(name: str) -> str:
    """The CLI flag of a QuantConfig field."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class QuantConfig:
    """How each Linear of a decoder block is quantized.

    bits: 2/3/4/8 (what the GPTQ int32 bitstream layout holds); group_size: input columns sharing one
    scale/zero, -1 = one group per output row; damp: fraction of mean diag(H) added to H's diagonal;
    block_columns: GPTQ's lazy-batch width (columns); true_sequential: re-collect Hessians after each
    group of Linears sharing an input (q/k/v, o, gate/up, down) is quantized. full_range (sym only): the
    symmetric grid of auto-round and llama.cpp, scale = +-max|w| / 2^(bits-1) signed so the larger side lands
    on code 0, using all 2^bits levels (the GPTQ grid, scale = 2 max|w| / (2^bits - 1), leaves one unused);
    AutoRound's default, as in the reference.

    Each method reads COMMON plus the fields its streamq.methods entry declares; a field left unset takes the
    method's default (GPTQ: act_order and static_groups on; SpQR: sym off; AutoRound: full_range = sym), else
    NEUTRAL's. A field the method does not read, set to anything but its NEUTRAL value, is an error naming the
    flag and the method.

    AutoRound only: iters: signed-gradient steps per block (0 = plain RTN); lr: step size of the rounding
    offsets and min/max factors, None = 1/iters (decays linearly to 0); minmax_tuning: also tune the per-group
    min/max range factors; batch_size: calibration samples per forward pass; grad_accum: forward passes whose
    gradients are summed before one step; seed: seeds the minibatch sampler; fp_targets: tune each block
    toward the fp model's own block outputs, carried in a second activation stream beside the quantized one
    (as the reference does; the store on disk doubles), False: toward the fp block run on the quantized inputs.

    SpQR only (asymmetric grids, sym=False; act_order is SpQR's permutation_order "act_order", False = "identity"):
    qq_scale_bits / qq_zero_bits: bits of the second-level quantization of the per-group scales / zeros (set
    both, or neither for plain fp16 scales and integer zeros, i.e. GPTQ's grid); qq_groupsize: consecutive output
    rows sharing one second-level scale/zero; outlier_threshold: tau, a weight whose Hessian-weighted squared
    error exceeds tau * the layer's mean sensitivity is kept in fp16 (inf = no outliers); simplified_outliers:
    fit each group's grid on all its weights instead of leaving likely outliers out (faster, usually worse).

    SparseGPT only: sparsity: fraction of each Linear's weights pruned, in [0, 1) (default 0.5, N/M with an
    N:M mask); mask_structure: "0:0" unstructured, "N:M" N zeros in every M consecutive input columns; bits 16
    prunes without quantizing (dense fp16 weights).
    Every method (quant/smooth.py, quant/actquant.py): smooth_alpha: SmoothQuant's migration strength in [0, 1]
    (None = no smoothing), folded into each norm and the Linears reading it before the weight method runs;
    act_bits: 8 = int8 activations (W8A8; needs bits 8, group_size -1, sym), None = 16-bit; act_dynamic: per-token
    scales computed at run time, False = static per-tensor scales calibrated on the calibration data; kv_cache:
    None | "int8" | "fp8", per-layer k/v scales calibrated on the k/v projections' outputs. RTN stays data-free
    unless smoothing, static scales or a KV cache ask for calibration activations (`calibrated`).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = UNSET
    full_range: bool = UNSET
    act_order: bool = UNSET
    static_groups: bool = UNSET
    damp: float = UNSET
    block_columns: int = UNSET
    true_sequential: bool = UNSET
    iters: int = UNSET
    lr: float | None = UNSET
    minmax_tuning: bool = UNSET
    batch_size: int = UNSET
    grad_accum: int = UNSET
    seed: int = UNSET
    fp_targets: bool = UNSET
    qq_scale_bits: int | None = UNSET
    qq_zero_bits: int | None = UNSET
    qq_groupsize: int = UNSET
    outlier_threshold: float = UNSET
    simplified_outliers: bool = UNSET
    # ignore lists and the head (streamq/ignore.py), read by every method: ignore: Linear names or "re:" regexes
    # (llm-compressor's syntax) left unquantized, copied byte-identical; quant_lm_head: RTN-quantize the output head
    ignore: tuple[str, ...] = ()
    quant_lm_head: bool = False
    # SparseGPT (issue 18; methods/sparsegpt.py): see NEUTRAL
    sparsity: float = UNSET
    mask_structure: str = UNSET
    # grid fitting (quant/grid.py fit_grid; issue 14): "minmax" | "mse", see NEUTRAL
    grid_search: str = UNSET
    # SmoothQuant and activation quantization (streamq/quant/smooth.py, streamq/quant/actquant.py): read by every
    # method (RTN calibrates the activations it needs); see check_activation_fields for what each combination means.
    smooth_alpha: float | None = None
    act_bits: int | None = None
    act_dynamic: bool = True
    kv_cache: str | None = None
    # MoE (streamq/moe.py): a routed expert's Linear that calibration sends fewer tokens than this is solved
    # with an identity Hessian (= round-to-nearest on the method's grid), with a warning naming it
    moe_min_tokens: int = 16
    moe_all_tokens: bool = False  # calibration sends every token through every expert (outputs stay the model's)

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if method is None:
            raise StreamqError(f"--method {self.method!r}: choose one of {', '.join(names())}")
        from streamq.ignore import check_patterns

        object.__setattr__(self, "ignore", check_patterns(self.ignore, self.quant_lm_head))
        self._resolve_defaults(method)
        if self.bits not in PACKABLE_BITS and self.bits != method.dense_bits:
            dense = [m for m in names() if get_method(m).dense_bits == self.bits]  # SparseGPT's 16: prune only
            hint = f" (--method {', '.join(dense)} also takes {self.bits}: dense weights)" if dense else ""
            raise StreamqError(f"--bits {self.bits}: the GPTQ format packs {', '.join(map(str, PACKABLE_BITS))} "
                               f"bits{hint}")
        if self.group_size != -1 and self.group_size < 1:
            raise StreamqError(f"--group-size {self.group_size}: use -1 (per channel) or a positive column count")
        if not 0 < self.damp <= 1:
            raise StreamqError(f"--damp {self.damp}: must lie in (0, 1], a fraction of mean diag(H)")
        if self.block_columns < 1:
            raise StreamqError(f"block_columns {self.block_columns}: must be positive")
        if self.full_range and not self.sym:
            raise StreamqError("--full-range is a symmetric grid; drop --asym")
        if self.static_groups and not self.act_order:
            raise StreamqError("--static-groups only changes anything with --act-order")
        if self.iters < 0:
            raise StreamqError(f"--iters {self.iters}: use 0 (plain RTN) or a positive step count")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise StreamqError(f"--lr {self.lr}: must be a positive number (or unset for 1/iters)")
        if self.batch_size < 1:
            raise StreamqError(f"--batch-size {self.batch_size}: must be positive")
        if self.grad_accum < 1:
            raise StreamqError(f"--grad-accum {self.grad_accum}: must be positive")
        if self.seed < 0:
            raise StreamqError(f"--seed {self.seed}: must be non-negative")
        if self.moe_min_tokens < 0:
            raise StreamqError(f"--moe-min-tokens {self.moe_min_tokens}: must be non-negative")
        if self.grid_search not in GRID_SEARCHES:
            raise StreamqError(f"--grid-search {self.grid_search!r}: choose one of {', '.join(GRID_SEARCHES)}")
        if method.check is not None:
            method.check(self)
        from streamq.quant.actquant import check_activation_fields

        check_activation_fields(self)

    def _resolve_defaults(self, method) -> None:
        """Fill unset fields with the method's defaults (else NEUTRAL's); refuse fields the method does not read
        that are set away from NEUTRAL."""
        given = {f: getattr(self, f) for f in NEUTRAL if getattr(self, f) is not UNSET}
        for name, value in given.items():
            if name not in method.fields and name not in COMMON and value != NEUTRAL[name]:
                readers = [m for m in names() if name in get_method(m).fields]
                raise StreamqError(f"{flag(name)} ({name}={value!r}) is not read by --method {self.method} "
                                   f"(it is an option of {', '.join(readers) or 'no method'}); drop it")
        resolved = {**NEUTRAL, **given}
        others = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NEUTRAL}  # bits, act_bits, ...
        for name, default in method.defaults.items():  # in declaration order: a callable sees those before it
            if name not in given:
                resolved[name] = default({**others, **resolved}) if callable(default) else default
        for name in NEUTRAL:
            object.__setattr__(self, name, resolved[name])

    @property
    def fp_stream(self) -> bool:
        """Whether the run carries the fp model's hidden states beside the quantized ones (AutoRound's targets)."""
        return self.method == "autoround" and self.fp_targets

    @property
    def calibrated(self) -> bool:
        """Whether the run reads calibration activations: the method's Hessians or tuning, or statistics that
        smoothing, static activation scales or KV-cache scales are calibrated from (RTN included)."""
        return (get_method(self.method).calibrated or self.smooth_alpha is not None
                or (self.act_bits is not None and not self.act_dynamic) or self.kv_cache is not None)

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        """The fields as JSON-safe values: an infinite outlier_threshold is written as the string "inf" (JSON has
        no infinity; Python's `Infinity` is not JSON). `from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["ignore"] = list(self.ignore)
        if math.isinf(d["outlier_threshold"]):
            d["outlier_threshold"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Inverse of to_dict (validated like any config)."""
        return cls(**{**d, "outlier_threshold": float(d.get("outlier_threshold", math.inf))})

