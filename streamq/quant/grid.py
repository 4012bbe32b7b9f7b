"""Round-to-nearest primitives: per-row min/max grids, integer codes, dequantization.

Semantics follow GPTQ's reference quantizer (IST-DASLab/gptq `quant.py`, weight=True, perchannel=True)
with two deliberate differences, both so the packed checkpoint reproduces our weights bit for bit:
  1. the scale is rounded to fp16 before zero points and codes are computed (checkpoints store fp16 scales);
  2. asymmetric zero points are clamped to [1, maxq] (the GPTQ v1 format stores zero-1, so zero=0 is lost).
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from streamq.errors import StreamqError

# Smallest positive normal fp16; stands in for a scale that rounds to 0 in fp16 (division by it stays finite).
_FP16_TINY = 2.0**-14
# Largest finite fp16; larger scales would become inf in the checkpoint.
_FP16_MAX = 65504.0


def grid_range(xmin: Tensor, xmax: Tensor, sym: bool) -> tuple[Tensor, Tensor]:
    """The range a grid spans, from xmin <= 0 <= xmax: symmetric about 0 when sym (unless nothing is negative,
    as in the reference), and [-1, 1] where both are 0. Differentiable (AutoRound tunes xmin/xmax through it)."""
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def fp16_scale(scale: Tensor) -> Tensor:
    """scale rounded to fp16 (clamped to its finite range; what the checkpoint stores), 0 replaced by the
    smallest fp16 normal, in scale's dtype. The cast passes gradients straight through (AutoRound)."""
    scale = scale.clamp(-_FP16_MAX, _FP16_MAX).half().to(scale.dtype)
    return torch.where(scale == 0, _FP16_TINY, scale)


def full_range_scale(wmin: Tensor, wmax: Tensor, bits: int) -> Tensor:
    """Scale of the full-range symmetric grid (auto-round's int_sym) from wmin <= 0 <= wmax: the larger side is
    2^(bits-1) steps from 0 and lands on code 0 (scale negative when that side is wmax); fp16-rounded like
    fit_grid's, 0 replaced by the smallest fp16 normal. Differentiable (AutoRound tunes wmin/wmax through it)."""
    larger = torch.where(wmax >= -wmin, -wmax, -wmin)
    return fp16_scale(larger / (1 << (bits - 1)))


# fit_grid's range searches: "minmax" = the row's own min/max; "mse" = the shrunk min/max range with the smallest
# sum |w - q|^norm per row, as IST-DASLab/gptq's Quantizer(mse=True) searches it (and llm-compressor's mse observer),
# each row stopping once MSE_PATIENCE shrinks in a row did not improve it (llm-compressor stops all rows at once)
GRID_SEARCHES = ("minmax", "mse")
MSE_STEPS, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4  # range factors 1, 0.99, ..., 0.21; error exponent
# On all 210 SmolLM2-135M Linears (g64 w4 asym, tools/bench_grid_search.py) 10 tries 17.0 of the 80 shrinks a row and
# gives 6207 of 1.66M rows (0.37%) another grid than the full search, in 0.68x the time of 20 (27.3 shrinks, every row
# the full search's grid); perplexity 27.74 vs 27.79 with 20 (README "Results"). llm-compressor's mse observer: 5.
MSE_PATIENCE = 10
# elements of one [shrinks, rows, cols] error tensor (8 MiB fp32): all SmolLM2 Linears 5.4-6.1 s idle, 2 MiB 8.9-9.5 s
_MSE_CHUNK = 1 << 21


def grid_from_range(wmin: Tensor, wmax: Tensor, bits: int, sym: bool, full_range: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the grid spanning wmin <= 0 <= wmax (any equal shapes, elementwise); see fit_grid."""
    maxq = (1 << bits) - 1
    if full_range:
        scale = full_range_scale(wmin, wmax, bits)
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    xmin, xmax = grid_range(wmin, wmax, sym)
    scale = fp16_scale((xmax - xmin) / maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def fit_grid(w: Tensor, bits: int, sym: bool, full_range: bool = False, search: str = "minmax"
             ) -> tuple[Tensor, Tensor]:
    """Min/max grid per row of w: [rows, cols] float -> (scale [rows], zero [rows]) in w's dtype.

    The range always contains 0. sym: range is [-max|w|, max|w|] (unless the row has no negative value,
    as in the reference) and zero = (maxq+1)/2. Asym: zero = round(-xmin/scale). Differences from the
    reference: scale is rounded to fp16 (clamped to fp16's finite range, 0 replaced by the smallest normal)
    before zero is derived, and asym zero is clamped to [1, maxq] for the GPTQ v1 checkpoint's zero-1.
    full_range (sym): full_range_scale's grid, zero = 2^(bits-1).
    search "mse": the range [p * min, p * max] (p = 1, 0.99, ..., 0.21) whose grid gives the row the smallest
    sum |w - q|^2.4; the first such p on ties, so p = 1 (the min/max grid) unless a shrink is strictly better.
    A row's search stops after MSE_PATIENCE shrinks in a row that did not lower its error.
    """
    wmin, wmax = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    if search == "minmax":
        return grid_from_range(wmin, wmax, bits, sym, full_range)
    if search != "mse":
        raise StreamqError(f"grid search {search!r}: choose one of {', '.join(GRID_SEARCHES)}")
    return _mse_grid(w, wmin, wmax, bits, sym, full_range)


def fit_groups(w: Tensor, group_size: int, bits: int, sym: bool, full_range: bool = False, search: str = "minmax"
               ) -> tuple[Tensor, Tensor]:
    """fit_grid of every group of columns of w [rows, cols] at once (group_size divides cols; -1: one group):
    (scales [groups, rows], zeros [groups, rows]), each group's grid exactly what fit_grid gives its columns."""
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    grouped = w.reshape(rows, cols // gs, gs).transpose(0, 1).reshape(-1, gs)  # [groups * rows, gs]
    scale, zero = fit_grid(grouped, bits, sym, full_range, search)
    return scale.view(cols // gs, rows), zero.view(cols // gs, rows)


def _mse_grid(w: Tensor, wmin: Tensor, wmax: Tensor, bits: int, sym: bool, full_range: bool
              ) -> tuple[Tensor, Tensor]:
    """fit_grid's "mse" search, vectorized over rows and shrink factors in chunks of about _MSE_CHUNK elements
    (at most MSE_PATIENCE shrinks a chunk); rows that have stopped leave the chunk, which ends when none is left."""
    maxq = (1 << bits) - 1
    rows, cols = w.shape
    shrink = torch.tensor([1 - i / MSE_STEPS for i in range(int(MSE_MAXSHRINK * MSE_STEPS))], dtype=w.dtype,
                          device=w.device)[:, None]  # [S, 1]
    steps = max(1, min(MSE_PATIENCE, len(shrink), _MSE_CHUNK // max(1, rows * cols)))
    row_chunk = max(1, _MSE_CHUNK // (steps * cols))
    scale, zero = grid_from_range(wmin, wmax, bits, sym, full_range)  # p = 1, replaced where a shrink wins
    buf = _scratch(steps * min(rows, row_chunk) * cols, w.dtype, w.device)
    for r0 in range(0, rows, row_chunk):
        live = torch.arange(r0, min(rows, r0 + row_chunk), device=w.device)  # rows still searching
        best = torch.full_like(live, torch.inf, dtype=w.dtype)
        last = torch.zeros_like(live)  # per live row: the shrink of its last improvement
        for s0 in range(0, len(shrink), steps):
            # (index_select / index_copy_, not tensor[live]: its indexing kernel was a fifth of the search's CPU time;
            # all rows live at first: a view)
            x = w[r0 : r0 + len(live)] if s0 == 0 else w.index_select(0, live)
            p, x, lo, hi = shrink[s0 : s0 + steps], x[None], wmin.index_select(0, live), wmax.index_select(0, live)
            s, z = grid_from_range(p * lo, p * hi, bits, sym, full_range)  # [steps, live rows]
            err = _error(x, s[..., None], z[..., None], maxq, buf[: s.numel() * cols].view(*s.shape, cols))
            err, last, stopped = _within_patience(err, best, last, s0)
            e, i = err.min(dim=0)  # the first shrink of the smallest error in this chunk
            win = e < best  # strictly: an earlier (larger) p keeps ties
            best = torch.where(win, e, best)
            pick = i[None]
            scale.index_copy_(0, live, torch.where(win, s.gather(0, pick)[0], scale.index_select(0, live)))
            zero.index_copy_(0, live, torch.where(win, z.gather(0, pick)[0], zero.index_select(0, live)))
            live, best, last = live[~stopped], best[~stopped], last[~stopped]
            if not len(live):
                break
    return scale, zero


_scratch_buffers = threading.local()  # per thread (freed with it): (dtype, device) -> the largest error buffer so far


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused buffer of at least n elements (its first n returned): a fresh 8 MiB one per Linear would be
    mapped and page-faulted anew each time (big allocations go back to the OS when freed, footprint.bound_heap)."""
    buffers = _scratch_buffers.__dict__.setdefault("by_kind", {})
    key = (dtype, torch.device(device))
    if key not in buffers or buffers[key].numel() < n:
        buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buffers[key][:n]


def _within_patience(err: Tensor, best: Tensor, last: Tensor, s0: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the errors err [steps, rows] of shrinks s0, s0+1, ... set to inf after MSE_PATIENCE shrinks in a
    row without a strict improvement. best: each row's smallest error before s0, last: the
    shrink where it was reached (0 if none). Returns (err, the new last [rows], which rows stopped [rows] bool)."""
    index = torch.arange(s0, s0 + len(err), device=err.device)[:, None]  # [steps, 1]
    before = torch.cat([best[None], torch.cummin(err, dim=0).values[:-1].minimum(best)])  # best before each shrink
    last_at = torch.where(err < before, index, last).cummax(dim=0).values  # last improvement up to each shrink
    last_before = torch.cat([last[None], last_at[:-1]])  # ... and before each shrink
    off = (index - last_before > MSE_PATIENCE).cummax(dim=0).values
    return err.masked_fill(off, torch.inf), last_at[-1], off[-1]


def _error(x: Tensor, scale: Tensor, zero: Tensor, maxq: int, out: Tensor) -> Tensor:
    """sum over cols of |x - dequantize(quantize_codes(x))|^MSE_NORM: x [1, rows, cols], scale/zero [S, rows, 1]
    -> [S, rows]; quantize_codes' and dequantize's arithmetic, in place in out [S, rows, cols]. The power is taken
    as exp(MSE_NORM * ln|d|) (0 at d = 0): within 1e-5 of fp64 pow's value relative to each sum
    (tests/test_grid_search.py); on an Intel Xeon VM the whole search took 0.73x pow's time, on an AMD EPYC VM
    about the same (tools/bench_grid_search.py --pow-error: 7-8 of 1.66M rows get another grid)."""
    q = torch.div(x, scale, out=out).round_().add_(zero).clamp_(0, maxq)
    q.sub_(zero).mul_(scale).sub_(x).abs_().log_().mul_(MSE_NORM).exp_()
    return q.sum(dim=-1)


def _column(t: Tensor) -> Tensor:
    """[rows] -> [rows, 1], so per-row parameters broadcast over a [rows, cols] weight."""
    return t.reshape(-1, 1)


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer codes clamp(round(w/scale) + zero, 0, maxq) as a float tensor; w: [rows, cols], scale/zero: [rows]."""
    return torch.clamp(torch.round(w / _column(scale)) + _column(zero), 0, maxq)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """scale * (codes - zero); codes: [rows, cols] float, scale/zero: [rows]. Exact for fp16-representable scales."""
    return _column(scale) * (codes - _column(zero))


def check_group_size(in_features: int, group_size: int, name: str) -> None:
    """Raise StreamqError unless group_size divides in_features (-1, one group per row, always fits)."""
    if group_size != -1 and in_features % group_size != 0:
        raise StreamqError(
            f"{name}: --group-size {group_size} does not divide in_features {in_features}; "
            "use a divisor or -1"
        )
