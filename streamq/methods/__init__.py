"""The method registry: what each quantization method reads, defaults, solves with and is planned as.

Adding a method is one module here that builds a `Method` plus one line in BUILTIN (or, outside the package,
one `register(...)` call). QuantConfig validates its fields against the method's declaration; quant/block.py
calls its solver; the planner and the time estimate use the footprint / estimate models it names.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

class QuantResult(NamedTuple):
    """One quantized Linear, in the layout every packer reads.

    Invariant: weight[r, c] == scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r]) exactly in fp32.
    """

    weight: Tensor  # [out, in] fp32 fake-quantized (dequantized) weight
    codes: Tensor  # [out, in] uint8 codes in [0, maxq], original column order
    scales: Tensor  # [n_groups, out] fp32 (fp16-representable)
    zeros: Tensor  # [n_groups, out] uint8 integer zero points
    g_idx: Tensor  # [in] int32 group of each input column


# Fields every method reads. Any other QuantConfig field is a method's own: set away from QuantConfig's neutral
# default for a method that does not declare it, it is refused (QuantConfig._check_fields).
COMMON = ("method", "bits", "group_size", "sym")

# solve(W [out, in] fp32, H [in, in] fp32 or None (data-free methods), cfg) -> (result, loss, damp[, error_num]);
# result: a QuantResult, or the typed result the method's packer reads (SpQR's SpQRResult); error_num, where the
# solver knows it without a product by H: tr((W-Q) H (W-Q)^T) (the report's layer error then needs one product).
Solve = Callable[..., tuple]


@dataclass(frozen=True)
class Method:
    """One quantization method as the rest of streamq sees it.

    fields: the QuantConfig fields it reads beyond COMMON. defaults: its defaults where they differ from
    QuantConfig's neutral ones; a callable value computes the default from the other fields (dict -> value).
    solve: per-Linear solver (see Solve); None = the method tunes a whole block (AutoRound, blockwork.py).
    calibrated: needs calibration inputs (False: data-free, no activation store). footprint / estimate: the
    memory model (footprint.py: "gptq" | "rtn" | "autoround") and time model (estimate.py: "gptq" | "spqr" |
    "rtn" | "autoround") it is planned as. check: extra validation of a config (raises StreamqError).
    reference: the tests' independent implementation ("module:function"), for the reader. dense_bits: a --bits
    value beyond the packable ones that the method accepts, meaning the weights stay dense 16-bit floats
    (SparseGPT's 16: prune only).
    """

    name: str
    fields: tuple[str, ...]
    solve: Solve | None
    defaults: dict = field(default_factory=dict)
    calibrated: bool = True
    footprint: str = "gptq"
    estimate: str = "gptq"
    check: Callable[[object], None] | None = None
    reference: str = ""
    dense_bits: int | None = None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method by name; returns it."""
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method | None:
    """The registered method called name, or None."""
    _load_builtin()
    return REGISTRY.get(name)


def names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(REGISTRY)


_builtin_loaded = False


def _load_builtin() -> None:
    """Register the built-in methods on first use (their solvers import QuantConfig, which imports this)."""
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        from streamq.methods import autoround, gptq, rtn, sparsegpt, spqr

        for module in (gptq, rtn, autoround, spqr, sparsegpt):  # the registry lines: one per built-in method
            REGISTRY.setdefault(module.METHOD.name, module.METHOD)
