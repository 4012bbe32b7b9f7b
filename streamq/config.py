"""Method configuration: one frozen dataclass, validated once at the edge, serialized into outputs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from streamq.errors import StreamqError

METHODS = ("gptq", "rtn")
PACKABLE_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    """How each Linear of a decoder block is quantized.

    bits: 2/3/4/8 (what the GPTQ int32 bitstream layout holds); group_size: input columns sharing one
    scale/zero, -1 = one group per output row; damp: fraction of mean diag(H) added to H's diagonal;
    block_columns: GPTQ's lazy-batch width (columns); true_sequential: re-collect Hessians after each
    group of Linears sharing an input (q/k/v, o, gate/up, down) is quantized.
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

    @property
    def maxq(self) -> int:
        """Largest integer code, 2**bits - 1."""
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
