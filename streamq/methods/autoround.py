"""AutoRound (Cheng et al. 2023): signed gradient descent on the rounding of a whole block (quant/autoround.py,
driven by blockwork.autoround_step)."""
from __future__ import annotations

from streamq.methods import Method

METHOD = Method(
    name="autoround",
    fields=("full_range", "iters", "lr", "minmax_tuning", "batch_size", "grad_accum", "seed", "fp_targets"),
    defaults={"full_range": lambda c: c["sym"]},  # auto-round's symmetric grid uses all 2^bits levels
    solve=None,  # tunes every Linear of the block jointly
    footprint="autoround",
    estimate="autoround",
    reference="tests.reference:reference_autoround",
)
