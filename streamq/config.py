"""Method configuration: one frozen dataclass, validated once at the edge, serialized into outputs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from streamq.errors import StreamqError

METHODS = ("gptq", "rtn", "autoround")
PACKABLE_BITS = (2, 3, 4, 8)

# Named AutoRound settings (intel/auto-round's "light" and "best" recipes). Each maps field names to values;
# "nsamples" is a run option (RunOptions.nsamples, how many calibration windows are captured), not a
# QuantConfig field, so whoever applies a preset splits it between QuantConfig and RunOptions.
AUTOROUND_PRESETS = {
    "light": {"iters": 50, "lr": 5e-3},
    "best": {"iters": 1000, "nsamples": 512},
}


@dataclass(frozen=True)
class QuantConfig:
    """How each Linear of a decoder block is quantized.

    bits: 2/3/4/8 (what the GPTQ int32 bitstream layout holds); group_size: input columns sharing one
    scale/zero, -1 = one group per output row; damp: fraction of mean diag(H) added to H's diagonal;
    block_columns: GPTQ's lazy-batch width (columns); true_sequential: re-collect Hessians after each
    group of Linears sharing an input (q/k/v, o, gate/up, down) is quantized.

    AutoRound only: iters: signed-gradient steps per block (0 = plain RTN); lr: step size of the rounding
    offsets and min/max factors, None = 1/iters (decays linearly to 0); minmax_tuning: also tune the per-group
    min/max range factors; batch_size: calibration samples per forward pass; grad_accum: forward passes whose
    gradients are summed before one step; seed: seeds the minibatch sampler.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StreamqError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.bits not in PACKABLE_BITS:
            raise StreamqError(f"--bits {self.bits}: the GPTQ format packs {', '.join(map(str, PACKABLE_BITS))} bits")
        if self.group_size != -1 and self.group_size < 1:
            raise StreamqError(f"--group-size {self.group_size}: use -1 (per channel) or a positive column count")
        if not 0 < self.damp < 1:
            raise StreamqError(f"--damp {self.damp}: must lie in (0, 1), a fraction of mean diag(H)")
        if self.block_columns < 1:
            raise StreamqError(f"block_columns {self.block_columns}: must be positive")
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
        if self.method == "autoround" and self.act_order:
            raise StreamqError("--act-order is a GPTQ option; AutoRound keeps the columns in order")

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
