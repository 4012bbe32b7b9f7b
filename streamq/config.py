"""Method configuration: one frozen dataclass, validated once at the edge, serialized into outputs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from streamq.errors import StreamqError

METHODS = ("gptq", "rtn", "autoround", "spqr")
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
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    full_range: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_columns: int = 128
    true_sequential: bool = True
    iters: int = 200
    lr: float | None = None
    minmax_tuning: bool = True
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    fp_targets: bool = True
    qq_scale_bits: int | None = None
    qq_zero_bits: int | None = None
    qq_groupsize: int = 16
    outlier_threshold: float = math.inf
    simplified_outliers: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StreamqError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.bits not in PACKABLE_BITS:
            raise StreamqError(f"--bits {self.bits}: the GPTQ format packs {', '.join(map(str, PACKABLE_BITS))} bits")
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
        if self.method != "autoround" and not self.fp_targets:
            raise StreamqError("--no-fp-targets is an AutoRound option (the other methods have no targets)")
        if self.method == "autoround" and self.act_order:
            raise StreamqError("--act-order is a GPTQ option; AutoRound keeps the columns in order")
        if self.method == "spqr":
            self._check_spqr()

    def _check_spqr(self) -> None:
        if self.sym:
            raise StreamqError("--method spqr: SpQR's grids are asymmetric min-max grids with zero points; "
                               "drop --sym (SpQR uses --asym by default)")
        if self.static_groups:
            raise StreamqError("--static-groups is a GPTQ option; SpQR fits each group when it is reached")
        if (self.qq_scale_bits is None) != (self.qq_zero_bits is None):
            raise StreamqError("--qq-scale-bits and --qq-zero-bits: set both (second-level quantization) or neither")
        for name in ("qq_scale_bits", "qq_zero_bits"):
            value = getattr(self, name)
            if value is not None and value not in PACKABLE_BITS:
                choices = ", ".join(map(str, PACKABLE_BITS))
                raise StreamqError(f"--{name.replace('_', '-')} {value}: use one of {choices}")
        if self.qq_groupsize < 1:
            raise StreamqError(f"--qq-groupsize {self.qq_groupsize}: must be a positive number of output rows")
        if not self.outlier_threshold > 0:  # also rejects nan
            raise StreamqError(f"--outlier-threshold {self.outlier_threshold}: must be positive (inf = no outliers)")
        if self.group_size == 1 and math.isfinite(self.outlier_threshold) and not self.simplified_outliers:
            raise StreamqError("--group-size 1 leaves no other weight to fit a leave-one-out grid on; "
                               "use --simplified-outliers")

    @property
    def fp_stream(self) -> bool:
        """Whether the run carries the fp model's hidden states beside the quantized ones (AutoRound's targets)."""
        return self.method == "autoround" and self.fp_targets

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        """The fields as JSON-safe values: an infinite outlier_threshold is written as the string "inf" (JSON has
        no infinity; Python's `Infinity` is not JSON). `from_dict` reads it back."""
        d = dataclasses.asdict(self)
        if math.isinf(d["outlier_threshold"]):
            d["outlier_threshold"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """Inverse of to_dict (validated like any config)."""
        return cls(**{**d, "outlier_threshold": float(d.get("outlier_threshold", math.inf))})
