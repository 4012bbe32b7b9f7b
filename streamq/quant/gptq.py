"""GPTQ (Frantar et al. 2022): quantize columns one by one, pushing each rounding error onto the columns
not yet quantized through the upper Cholesky factor of H^-1.

Follows IST-DASLab/gptq `fasterquant` (dead inputs, act-order, static groups, damping, lazy batches).
One deliberate difference: a lazy batch never straddles a group start (non-static groups), so every
group's grid is fitted on fully updated weights. The reference fits a group that starts mid-batch on
weights still missing that batch's updates, which makes its result depend on the batch width; with the
usual group_size == block_columns == 128 both agree.

Speed: the Linears reading one H share its factor (hessian_factor, bit-identical to computing it again); a lazy
batch is itself solved in sub-batches (_column_batch_torch: the reference's arithmetic up to the order of the sums,
the codes of its fp64 result exactly, tests/test_gptq.py); on the CPU the column loop runs through numpy
(_column_batch_numpy, bit-identical to the torch loop), whose per-call overhead is a fraction of torch's on these
[rows]-sized vectors.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from streamq.config import QuantConfig
from streamq.device import all_finite
from streamq.errors import StreamqError
from streamq.methods import QuantResult
from streamq.quant.grid import dequantize, fit_grid, fit_groups, quantize_codes


class GPTQResult(NamedTuple):
    """What gptq_quantize found for one Linear."""

    result: QuantResult
    loss: float  # the reference's sum of (w - q)^2 / d^2 / 2 over all weights
    damp: float  # damp fraction of mean diag(H) finally used (cfg.damp unless raised)
    error_num: float  # tr((W-Q) H (W-Q)^T) with the undamped H, from the loss (output_error_numerator)


def inverse_cholesky(H: Tensor, damp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of Hd^-1, Hd = H + damp * mean(diag H) * I (U^T U = Hd^-1), raising damp x10 (to
    1.0 at most) on failure.

    The reference gets U from a Cholesky factorization, cholesky_inverse and a second factorization. Here one
    factorization of Hd in reversed order does: with J the exchange matrix and J Hd J = C C^T (C lower),
    Hd^-1 = (J C^-1 J)^T (J C^-1 J) and J C^-1 J is upper triangular, so U = J C^-1 J (one triangular solve;
    0.6-0.7x the time at 576 and 1536 columns, the same accuracy). Holds at most two [in, in] matrices besides
    H at a time."""
    mean_diag = H.diagonal().mean()
    while True:
        Hd = H.flip(0, 1)  # J H J (a copy)
        Hd.diagonal().add_(damp * mean_diag)
        C, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            Cinv = torch.eye(len(C), dtype=C.dtype, device=C.device)
            torch.linalg.solve_triangular(C, Cinv, upper=False, out=Cinv)  # in place: no third matrix
            del C
            U = Cinv.flip(0, 1)
            del Cinv
            if all_finite(U):
                return U, damp
        if damp >= 1.0:
            raise StreamqError("GPTQ: Hessian is not positive definite even with damp 1.0 (degenerate inputs?)")
        damp = min(damp * 10, 1.0)
        warnings.warn(f"GPTQ: Hessian not positive definite; retrying with damp {damp:g}", RuntimeWarning)


def working_copies(W: Tensor, H: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """Copies of W [out, in] and H [in, in] on W's device in fp32 (fp64 when W is fp64); H must be finite."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.to(dtype, copy=True)
    H = H.to(device=W.device, dtype=dtype, copy=True)
    if not all_finite(H):
        raise StreamqError(f"{method}: Hessian has non-finite entries (inf/nan in the calibration activations?)")
    return W, H


def batch_bounds(cols: int, width: int, group: int | None) -> list[tuple[int, int]]:
    """[start, end) column ranges of the lazy batches: every `width` columns, also cut at every group start."""
    starts = set(range(0, cols, width)) | (set(range(0, cols, group)) if group else set())
    s = sorted(starts)
    return list(zip(s, s[1:] + [cols]))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to n inside the block (restored after). The column loop's ops are a
    few [rows, <=block_columns] slices each: a hand-off to another thread costs more than it saves (10x more on
    a loaded machine), and elementwise ops and rank-1 products give the same bits on any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class HessianFactor(NamedTuple):
    """What gptq_quantize derives from H alone, shared by the Linears that read one input (q/k/v, gate/up)."""

    dead: Tensor  # [in] bool: inputs that are always 0
    perm: Tensor  # [in]: column order (act-order: by descending diag H; else the identity)
    Hinv: Tensor  # [in, in]: upper Cholesky factor of the damped, permuted H^-1
    damp: float
    reg: float  # damp * mean(diag H): what was added to H's diagonal (dead inputs' diagonal counted as 1)
    notes: tuple  # (message, category) of the warnings computing it raised, raised again on every use


_last_factor: list = []  # at most one (weakref to H, key, HessianFactor), dropped with its H


def hessian_factor(H: Tensor, W: Tensor, cfg: QuantConfig) -> HessianFactor:
    """H's factor for solving W (on W's device, in W's working dtype), computed once per H: the next Linear reading
    the same (unmodified) H tensor reuses it. Bit-identical to computing it again: the same ops on the same H."""
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    key = (H._version, tuple(H.shape), W.device, dtype, cfg.damp, cfg.act_order)
    if _last_factor and _last_factor[0][0]() is H and _last_factor[0][1] == key:
        f = _last_factor[0][2]
    else:
        _last_factor.clear()
        _, Hw = working_copies(W[:0], H, "GPTQ")  # (W[:0]: only its device and dtype matter)
        dead = Hw.diagonal() == 0  # inputs that are always 0: any weight works, 0 is cheapest to store
        Hw[dead, dead] = 1
        cols = Hw.shape[0]
        perm = torch.argsort(Hw.diagonal(), descending=True) if cfg.act_order else torch.arange(cols, device=W.device)
        if cfg.act_order:
            Hw = Hw[perm[:, None], perm]  # (one gather: one [in, in] temporary, not two)
        (Hinv, damp), notes = _recorded(inverse_cholesky, Hw, cfg.damp)
        reg = damp * Hw.diagonal().mean().item()  # (inverse_cholesky's float32 mean times damp)
        del Hw  # the working copy: the column loop needs only Hinv
        f = HessianFactor(dead, perm, Hinv, damp, reg, notes)

        def drop(ref):
            if _last_factor and _last_factor[0][0] is ref:
                _last_factor.clear()
        _last_factor.append((weakref.ref(H, drop), key, f))
    for message, category in f.notes:
        warnings.warn(message, category)
    return f


def _recorded(fn, *args):
    """(fn(*args), the (message, category) of each warning it raised); when it raises, they are raised first."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(*args), tuple((w.message, w.category) for w in caught)
        except Exception as e:
            error, raised = e, caught[:]
    for w in raised:
        warnings.warn(w.message, w.category)
    raise error


def gptq_quantize(W: Tensor, H: Tensor, cfg: QuantConfig) -> GPTQResult:
    """Quantize W: [out, in] given H: [in, in] = 2/N sum x^T x (undamped), on W's device.

    Computes in fp32 (fp64 when W is fp64, which tests use to compare with a naive solver exactly);
    the caller's W and H are not modified. Returns original-column-order codes, per-group grids and
    g_idx (with act_order and non-static groups, groups follow the permuted order).
    """
    f = hessian_factor(H, W, cfg)
    source, W = W, W.to(f.Hinv.dtype, copy=True)
    rows, cols = W.shape
    gs = cols if cfg.group_size == -1 else cfg.group_size
    n_groups = math.ceil(cols / gs)
    W[:, f.dead] = 0
    if cfg.static_groups:  # grids from the original weights, in original column order
        static = fit_groups(W, gs, cfg.bits, cfg.sym, cfg.full_range, cfg.grid_search)  # one call: faster
    perm, Hinv, damp = f.perm, f.Hinv, f.damp
    if cfg.act_order:  # (the identity permutation would only copy W)
        W = W[:, perm]
    group_of = (perm // gs).tolist()  # static group of the column at each permuted position

    codesT = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)  # transposed: a column is a row
    QT = W.new_empty(cols, rows)
    scales, zeros = W.new_zeros(n_groups, rows), W.new_zeros(n_groups, rows)
    if cfg.static_groups:
        scales, zeros = static
    losses = W.new_zeros(rows)
    column_batch = _column_batch_numpy if W.device.type == "cpu" else _column_batch_torch
    for i1, i2 in batch_bounds(cols, cfg.block_columns, None if cfg.static_groups else gs):
        if cfg.static_groups:
            groups = group_of[i1:i2]
        else:
            if i1 % gs == 0:  # a group start (see batch_bounds): W[:, i1:] has every earlier update
                scales[i1 // gs], zeros[i1 // gs] = fit_grid(W[:, i1 : i1 + gs], cfg.bits, cfg.sym, cfg.full_range,
                                                              cfg.grid_search)
            groups = [i1 // gs] * (i2 - i1)
        Err1 = column_batch(W[:, i1:i2], Hinv[i1:i2, i1:i2], scales[groups], zeros[groups], cfg.maxq, losses,
                            codesT[i1:i2], QT[i1:i2])
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(cols, device=W.device, dtype=torch.int32) // gs
    if cfg.act_order and not cfg.static_groups:
        g_idx[perm] = g_idx.clone()  # group i // gs belongs to original column perm[i]
    if cfg.act_order:
        invperm = torch.argsort(perm)
        QT, codesT = QT[invperm], codesT[invperm]
    Q, codes = QT.t().contiguous(), codesT.t().contiguous()
    loss = losses.sum().item()
    error_num = output_error_numerator(loss, f.reg, source, Q, f.dead)
    result = QuantResult(
        weight=Q.float(),  # exact: fp16-representable scale times a small integer
        codes=codes,
        scales=scales.float(),
        zeros=zeros.to(torch.uint8),
        g_idx=g_idx,
    )
    return GPTQResult(result, loss, damp, error_num)


def output_error_numerator(loss: float, reg: float, W: Tensor, Q: Tensor, dead: Tensor) -> float:
    """tr((W-Q) H (W-Q)^T) for GPTQ's result Q [out, in] of W (the live inputs' columns; dead ones read 0s),
    without a product by H: with U the upper Cholesky factor of (H + reg I)^-1, GPTQ leaves W - Q = E U
    (E: the scaled errors, 2 * loss = ||E||^2) and U (H + reg I) U^T = I, so the damped trace is 2 * loss;
    the undamped one is that minus reg * ||W - Q||^2. Exact up to rounding (tests/test_gptq.py compares it with
    the product, which relative_output_error otherwise computes)."""
    d = W.to(Q.dtype) - Q
    if bool(dead.any()):
        d = d[:, ~dead]
    return max(0.0, 2 * loss - reg * d.pow(2).sum(dtype=torch.float64).item())


def _column_batch_torch(W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, maxq: int, losses: Tensor,
                        codesT: Tensor, QT: Tensor) -> Tensor:
    """One lazy batch column by column: W1 [rows, n] (not modified), Hinv1 [n, n], S1 / Z1 [n, rows] the grid of
    each column. Writes the codes and dequantized weights, transposed, into codesT / QT [n, rows], adds the
    batch's loss terms to losses [rows] column by column; returns the scaled errors [rows, n].

    Works on transposed copies (a column is a contiguous row) in sub-batches of _SUB_COLUMNS columns: inside one,
    each column's error is spread over the sub-batch's later columns (rank-1 updates, as the reference does over
    the whole batch); after it, over the batch's remaining columns in one product (as the reference does after a
    batch). The same arithmetic as the reference up to the order of the sums."""
    WT = W1.t().clone(memory_format=torch.contiguous_format)  # a copy even where W1.t() is contiguous
    CT, ET, d1 = torch.empty_like(WT), torch.empty_like(WT), Hinv1.diagonal().tolist()
    with intra_op_threads(1):
        for j1, j2 in sub_batches(WT.shape[0]):
            for i in range(j1, j2):
                w = WT[i]
                code = CT[i] = quantize_codes(w[:, None], S1[i], Z1[i], maxq)[:, 0]
                q = QT[i] = dequantize(code[:, None], S1[i], Z1[i])[:, 0]
                err = ET[i] = (w - q) / d1[i]
                losses += err**2 / 2  # per column, as the reference sums it (SpQR's loss matches)
                WT[i + 1 : j2] -= Hinv1[i, i + 1 : j2, None] * err  # column i itself is done
            spread(WT, Hinv1, ET, j1, j2)
    codesT.copy_(CT)
    return ET.t().contiguous()


# columns per sub-batch of a lazy batch: on SmolLM2's Linear shapes the column loop took 0.45-0.7x the time of one
# 128-column batch (8 and 32 were no faster)
_SUB_COLUMNS = 16


def sub_batches(n: int) -> list[tuple[int, int]]:
    return [(j, min(n, j + _SUB_COLUMNS)) for j in range(0, n, _SUB_COLUMNS)]


def spread(WT: Tensor, Hinv1: Tensor, ET: Tensor, j1: int, j2: int) -> None:
    """WT[j2:] -= (E[:, j1:j2] @ Hinv1[j1:j2, j2:])^T, in the transposed layout both column loops use (torch tensors,
    also viewing the numpy loop's arrays, on one thread: the same product gives the same bits in both)."""
    if j2 < WT.shape[0]:
        WT[j2:] -= Hinv1[j1:j2, j2:].t() @ ET[j1:j2]


def _column_batch_numpy(W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, maxq: int, losses: Tensor,
                        codesT: Tensor, QT: Tensor) -> Tensor:
    """_column_batch_torch on the CPU with the same IEEE operations in the same order, the per-column ones through
    numpy (a fraction of torch's per-call overhead, which dominates these [rows]-sized ops): bit-identical results."""
    tW = W1.t().clone(memory_format=torch.contiguous_format)  # [n, rows]: row i is column i (a copy)
    tE, tH = torch.empty_like(tW), Hinv1.contiguous()
    WT, ET, H1 = tW.numpy(), tE.numpy(), tH.numpy()
    S, Z, CT, QTn = S1.contiguous().numpy(), Z1.contiguous().numpy(), np.empty_like(WT), QT.numpy()
    d1, buf = H1.diagonal().copy(), np.empty_like(WT[:_SUB_COLUMNS])
    with intra_op_threads(1):
        for j1, j2 in sub_batches(WT.shape[0]):
            for i in range(j1, j2):
                w, c, q, e, s, z = WT[i], CT[i], QTn[i], ET[i], S[i], Z[i]
                np.divide(w, s, out=c)  # codes clamp(round(w / scale) + zero, 0, maxq), as grid.quantize_codes
                np.rint(c, out=c)
                np.add(c, z, out=c)
                np.maximum(c, 0, out=c)  # torch.clamp's max then min (np.clip's wrapper costs more than the op)
                np.minimum(c, maxq, out=c)
                np.subtract(c, z, out=q)  # scale * (codes - zero), as grid.dequantize
                np.multiply(s, q, out=q)
                np.subtract(w, q, out=e)
                np.divide(e, d1[i], out=e)
                rest = WT[i + 1 : j2]
                upd = buf[: len(rest)]
                np.multiply(H1[i, i + 1 : j2, None], e, out=upd)  # the rank-1 update inside the sub-batch
                np.subtract(rest, upd, out=rest)
            spread(tW, tH, tE, j1, j2)
    sq = np.square(ET)
    sq /= 2
    L = losses.numpy()
    for row in sq:  # per column, as the reference sums it (SpQR's loss matches)
        L += row
    codesT.numpy()[:] = CT  # exact: small non-negative integers
    return tE.t().contiguous()
