"""SpQR (Dettmers et al. 2023): GPTQ with small groups, second-level quantized statistics and fp16 outliers
(quant/spqr.py, formats/spqr.py)."""
from __future__ import annotations

import math

from streamq.config import PACKABLE_BITS, QuantConfig
from streamq.errors import StreamqError
from streamq.methods import Method
from streamq.quant.spqr import spqr_quantize


def solve(W, H, cfg):
    result = spqr_quantize(W, H, cfg)
    return result, result.loss, result.damp


def check(cfg: QuantConfig) -> None:
    """SpQR's own rules on a config."""
    if cfg.sym:
        raise StreamqError("--method spqr: SpQR's grids are asymmetric min-max grids with zero points; "
                           "drop --sym (SpQR uses --asym by default)")
    if (cfg.qq_scale_bits is None) != (cfg.qq_zero_bits is None):
        raise StreamqError("--qq-scale-bits and --qq-zero-bits: set both (second-level quantization) or neither")
    for name in ("qq_scale_bits", "qq_zero_bits"):
        value = getattr(cfg, name)
        if value is not None and value not in PACKABLE_BITS:
            choices = ", ".join(map(str, PACKABLE_BITS))
            raise StreamqError(f"--{name.replace('_', '-')} {value}: use one of {choices}")
    if cfg.qq_groupsize < 1:
        raise StreamqError(f"--qq-groupsize {cfg.qq_groupsize}: must be a positive number of output rows")
    if not cfg.outlier_threshold > 0:  # also rejects nan
        raise StreamqError(f"--outlier-threshold {cfg.outlier_threshold}: must be positive (inf = no outliers)")
    if cfg.group_size == 1 and math.isfinite(cfg.outlier_threshold) and not cfg.simplified_outliers:
        raise StreamqError("--group-size 1 leaves no other weight to fit a leave-one-out grid on; "
                           "use --simplified-outliers")


METHOD = Method(
    name="spqr",
    fields=("act_order", "damp", "block_columns", "true_sequential", "qq_scale_bits", "qq_zero_bits", "qq_groupsize",
            "outlier_threshold", "simplified_outliers"),
    defaults={"sym": False},  # SpQR's grids are asymmetric min-max grids with zero points
    solve=solve,
    estimate="spqr",
    check=check,
    reference="tests.spqr_reference:reference_spqr",
)
