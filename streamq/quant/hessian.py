"""Second-order input statistics of one Linear, kept apart from any solver that consumes them."""
from __future__ import annotations

import math

import torch
from torch import Tensor


# add() rescales H and adds x^T x on its upper block-triangle in this many column strips (10/16 of the work): on
# SmolLM2's widths 4 strips took 0.96x the time of 8 (9/16 of the work, smaller products), the same bits
# (tools/bench_hessian.py, an Intel Xeon VM)
_STRIPS = 4


class HessianAccumulator:
    """Running H = 2/nsamples * sum_tokens x^T x over a Linear's calibration inputs, [in, in] fp32.

    Counts samples as the GPTQ reference does: an input [batch, seq, in] adds `batch` samples (any
    extra leading dims multiply into the batch); a [seq, in] or [in] input adds one. Like the reference,
    H is rescaled before each add and x is scaled by sqrt(2/nsamples), so H stays a mean and never
    overflows in fp32 however many tokens pass through.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._nsamples = 0
        self._mirrored = True  # the lower triangle equals the upper one (H is read from both)

    def add(self, x: Tensor) -> None:
        """Accumulate x: [..., in] (any dtype/device; flattened to tokens, computed in fp32 on H's device)."""
        batch = math.prod(x.shape[:-2]) if x.dim() > 2 else 1
        if batch == 0:
            return
        x = x.reshape(-1, x.shape[-1]).to(device=self._H.device, dtype=torch.float32)
        keep = self._nsamples / (self._nsamples + batch)
        self._nsamples += batch
        x = math.sqrt(2 / self._nsamples) * x
        d = x.shape[1]
        width = -(-d // _STRIPS)
        for i in range(0, d, width):  # upper block-triangle only: x^T x is symmetric (so is the rescale)
            strip = self._H[i : i + width, i:]
            strip.mul_(keep).addmm_(x[:, i : i + width].t(), x[:, i:])
        self._mirrored = False

    @property
    def H(self) -> Tensor:
        """The accumulated [in, in] fp32 Hessian, exactly symmetric (the live buffer: do not modify it in place)."""
        if not self._mirrored:  # the upper triangle, diagonal included, mirrored onto the lower one
            self._H.triu_().add_(torch.triu(self._H, diagonal=1).t())
            self._mirrored = True
        return self._H

    @property
    def nsamples(self) -> int:
        """Samples added so far, counted as the reference counts them."""
        return self._nsamples


def relative_output_error(W: Tensor, Q: Tensor, H: Tensor, chunk_bytes: int = 16 << 20, num: float | None = None
                          ) -> float:
    """tr((W-Q) H (W-Q)^T) / tr(W H W^T): relative squared error of the layer's outputs on the calibration set.

    W, Q: [out, in]; H: [in, in] (undamped). Rows are taken a chunk at a time (about chunk_bytes each) in H's
    dtype, the sums accumulated in fp64, so nothing of W's or H's size is copied; 0.0 when both traces vanish.
    num: the numerator where the solver already knows it (GPTQ: gptq.output_error_numerator); only the
    denominator is multiplied out then.
    """
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.to(dtype)
    rows = max(1, chunk_bytes // (W.shape[1] * H.element_size()))
    numerator, den = (0.0 if num is None else num), 0.0
    for r in range(0, W.shape[0], rows):
        w = W[r:r + rows].to(H.device, dtype)
        if num is None:
            d = w - Q[r:r + rows].to(H.device, dtype)
            numerator += ((d @ H) * d).sum(dtype=torch.float64).item()
        den += ((w @ H) * w).sum(dtype=torch.float64).item()
    if den == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / den
