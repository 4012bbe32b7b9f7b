"""GPTQ solver: equality with a naive column-by-column solver, error vs RTN, damping, dead inputs, Hessians."""
import math
import warnings

import pytest
import torch

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.quant.grid import dequantize, fit_grid, quantize_codes
from streamq.quant import gptq
from streamq.quant.gptq import gptq_quantize
from streamq.quant.hessian import HessianAccumulator, relative_output_error
from streamq.quant.rtn import rtn_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def naive_gptq(W, H, cfg):
    """Textbook GPTQ in fp64 with the explicit inverse: quantize column i, spread its error over the later
    columns with row i of H^-1, then eliminate i from H^-1 (Schur complement). No Cholesky, no lazy batches.
    Returns codes [out, in] in original order, g_idx [in], loss."""
    W, H = W.double().clone(), H.double().clone()
    rows, n = W.shape
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = n if cfg.group_size == -1 else cfg.group_size
    static = [fit_grid(W[:, c : c + gs], cfg.bits, cfg.sym, search=cfg.grid_search) for c in range(0, n, gs)]
    perm = torch.argsort(H.diag(), descending=True) if cfg.act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    g_idx = torch.zeros(n, dtype=torch.long)
    loss = 0.0
    for i in range(n):
        if cfg.static_groups:
            scale, zero = static[int(perm[i]) // gs]
            g_idx[perm[i]] = int(perm[i]) // gs
        else:
            if i % gs == 0:
                scale, zero = fit_grid(W[:, i : i + gs], cfg.bits, cfg.sym, search=cfg.grid_search)
            g_idx[perm[i]] = i // gs
        codes[:, i : i + 1] = quantize_codes(W[:, i : i + 1], scale, zero, cfg.maxq)
        q = dequantize(codes[:, i : i + 1], scale, zero)[:, 0]
        d = Hinv[i, i]
        loss += ((W[:, i] - q) ** 2 / d / 2).sum().item()
        W[:, i:] -= torch.outer((W[:, i] - q) / d, Hinv[i, i:])
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / d
    return codes[:, torch.argsort(perm)], g_idx, loss


def correlated_problem(out=48, inp=96, tokens=384, seed=0, dtype=torch.float64):
    """W and H = 2/N X^T X for inputs X = Z A with strongly correlated features and uneven scales."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(inp, inp, generator=g, dtype=dtype) * torch.rand(inp, generator=g, dtype=dtype) * 2
    X = torch.randn(tokens, inp, generator=g, dtype=dtype) @ A
    W = torch.randn(out, inp, generator=g, dtype=dtype) * 0.05
    return W, 2 / tokens * X.T @ X


def expanded(r):
    g = r.g_idx.long()
    return r.scales[g].t() * (r.codes.float() - r.zeros[g].t().float())


VARIANTS = [
    dict(group_size=-1),
    dict(group_size=32),
    dict(group_size=48, block_columns=32),  # group starts fall mid-batch
    dict(group_size=32, sym=False, bits=3),
    dict(group_size=-1, act_order=True),
    dict(group_size=32, act_order=True),
    dict(group_size=32, act_order=True, static_groups=True, bits=2),
    dict(group_size=48, act_order=True, sym=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_matches_naive_solver_exactly_in_fp64(variant):
    W, H = correlated_problem()
    H[5, :] = H[:, 5] = 0  # one dead input
    ref_codes, ref_g_idx, ref_loss = naive_gptq(W, H, QuantConfig(**variant))
    for width in (128, 8):
        cfg = QuantConfig(**{"block_columns": width, **variant})
        out = gptq_quantize(W, H, cfg)
        r = out.result
        assert torch.equal(r.codes.long(), ref_codes.long()), f"block_columns={width}"
        assert torch.equal(r.g_idx.long(), ref_g_idx)
        assert out.loss == pytest.approx(ref_loss, rel=1e-9)
        assert out.damp == cfg.damp
        assert torch.equal(r.weight, expanded(r))


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[5:7], ids=["plain", "act_order", "static"])
def test_fp32_agrees_with_fp64(variant):
    W, H = correlated_problem()
    ref_codes, _, _ = naive_gptq(W, H, QuantConfig(**variant))
    for width in (128, 8):
        r = gptq_quantize(W.float(), H.float(), QuantConfig(**{"block_columns": width, **variant})).result
        assert r.weight.dtype == torch.float32
        assert torch.equal(r.weight, expanded(r))
        differ = (r.codes.long() != ref_codes.long()).float().mean().item()
        assert differ <= 0.01, f"{differ:.2%} of codes differ from the fp64 solver (block_columns={width})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_numpy_column_loop_is_bit_identical_to_torch_loop(variant, dtype, monkeypatch):
    """The CPU column loop (numpy) and the one other devices run (torch) give the same bits, loss included."""
    W, H = correlated_problem(out=40, inp=96, dtype=dtype)
    H[5, :] = H[:, 5] = 0  # one dead input
    for width in (128, 8):
        cfg = QuantConfig(**{"block_columns": width, **variant})
        fast = gptq_quantize(W, H, cfg)
        monkeypatch.setattr(gptq, "_column_batch_numpy", gptq._column_batch_torch)
        slow = gptq_quantize(W, H, cfg)
        monkeypatch.undo()
        for a, b in zip(fast.result, slow.result):
            assert a.dtype == b.dtype and torch.equal(a, b), f"block_columns={width}"
        assert fast.loss == slow.loss


def test_act_order_groups_and_g_idx():
    W, H = correlated_problem()
    r = gptq_quantize(W, H, QuantConfig(group_size=16, act_order=True, static_groups=False)).result
    perm = torch.argsort(H.diag(), descending=True)
    assert torch.equal(r.g_idx[perm].long(), torch.arange(96) // 16)
    assert torch.equal(torch.bincount(r.g_idx.long()), torch.full((6,), 16))
    static = gptq_quantize(W, H, QuantConfig(group_size=16, act_order=True, static_groups=True)).result
    assert torch.equal(static.g_idx.long(), torch.arange(96) // 16)
    # static grids are the RTN grids of the original weights
    assert torch.equal(static.scales, rtn_quantize(W.float(), QuantConfig(group_size=16)).scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_lower_output_error_than_rtn(bits, group_size):
    W, H = correlated_problem(out=64, inp=128, tokens=320, seed=bits, dtype=torch.float32)
    cfg = QuantConfig(bits=bits, group_size=group_size)
    gptq = gptq_quantize(W, H, cfg).result
    rtn = rtn_quantize(W, cfg)
    err_gptq = relative_output_error(W, gptq.weight, H)
    err_rtn = relative_output_error(W, rtn.weight, H)
    # 2-bit min/max grids on small groups leave GPTQ little room (here ~0.9x RTN); elsewhere ~0.5x
    assert err_gptq < (0.95 if bits == 2 else 0.7) * err_rtn, (err_gptq, err_rtn)


def test_inputs_not_modified():
    W, H = correlated_problem(dtype=torch.float32)
    H[3, :] = H[:, 3] = 0
    W0, H0 = W.clone(), H.clone()
    gptq_quantize(W, H, QuantConfig(group_size=32, act_order=True))
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_dead_columns_zeroed():
    W, H = correlated_problem(dtype=torch.float32)
    dead = [0, 7, 50]
    H[dead, :] = 0
    H[:, dead] = 0
    for sym in (True, False):
        r = gptq_quantize(W, H, QuantConfig(group_size=32, sym=sym)).result
        assert torch.all(r.weight[:, dead] == 0)
        assert (r.weight[:, 1:7] != 0).float().mean() > 0.5


def indefinite_hessian(n=16, negative=-0.05):
    """Unit eigenvalues but one: mean diag ~ 1, so damp 0.01 leaves it indefinite and 0.1 fixes it."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    eig = torch.ones(n)
    eig[0] = negative
    return Q @ torch.diag(eig) @ Q.T


@pytest.mark.parametrize("n", [1, 7, 96])
def test_inverse_cholesky_is_the_references_factor(n):
    """One reversed factorization gives the reference's U (cholesky, cholesky_inverse, cholesky upper): the upper
    Cholesky factor of the damped inverse is unique, so both agree to rounding."""
    _, H = correlated_problem(inp=n, tokens=4 * n + 8)
    U, damp = gptq.inverse_cholesky(H, 0.01)
    Hd = H + damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    want = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    assert torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    torch.testing.assert_close(U, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
    torch.testing.assert_close(U.T @ U @ Hd, torch.eye(n, dtype=H.dtype), rtol=0, atol=1e-8)


def test_damp_raised_on_indefinite_hessian():
    H = indefinite_hessian()
    W = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gptq_quantize(W, H, QuantConfig(damp=0.01, group_size=-1))
    assert out.damp == pytest.approx(0.1)
    assert len(caught) == 1 and "damp 0.1" in str(caught[0].message)
    assert torch.isfinite(out.result.weight).all()


def test_damp_gives_up_after_one():
    H = indefinite_hessian(negative=-30.0)  # mean diag < 0: no damp fraction up to 1.0 helps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(StreamqError, match="damp 1.0"):
            gptq_quantize(torch.randn(8, 16), H, QuantConfig(damp=0.05, group_size=-1))
    assert [str(w.message).split()[-1] for w in caught] == ["0.5", "1"]


def test_factor_shared_by_linears_reading_one_hessian(monkeypatch):
    """q/k/v (gate/up) read one H tensor: its factor is computed once, reused bit for bit, recomputed for a changed
    or another tensor, its warnings raised on every use, and dropped with H."""
    W, H = correlated_problem(dtype=torch.float32)
    H = H.clone()
    cfg = QuantConfig(group_size=32, act_order=True, static_groups=True)
    calls = []
    real = gptq.inverse_cholesky
    monkeypatch.setattr(gptq, "inverse_cholesky", lambda *a: calls.append(1) or real(*a))
    gptq_quantize(W, H, cfg)
    shared = gptq_quantize(W[:20] * 3, H, cfg)
    assert len(calls) == 1
    fresh = gptq_quantize(W[:20] * 3, H.clone(), cfg)
    assert len(calls) == 2
    assert all(torch.equal(a, b) for a, b in zip(shared.result, fresh.result)) and shared.loss == fresh.loss
    gptq_quantize(W, H, cfg)
    assert len(calls) == 3
    H.mul_(1.0)  # modified in place: not the H the factor came from
    gptq_quantize(W, H, cfg)
    assert len(calls) == 4
    del H
    assert gptq._last_factor == []
    H = indefinite_hessian()
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert gptq_quantize(torch.randn(8, 16), H, QuantConfig(damp=0.01, group_size=-1)).damp == pytest.approx(0.1)
        assert [str(w.message) for w in caught] == ["GPTQ: Hessian not positive definite; retrying with damp 0.1"]
    assert len(calls) == 5


def test_non_finite_hessian_rejected():
    H = torch.eye(16)
    H[2, 3] = math.nan
    with pytest.raises(StreamqError, match="non-finite"):
        gptq_quantize(torch.randn(8, 16), H, QuantConfig(group_size=-1))


def test_hessian_accumulator_mean_and_split_invariance():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 10, 16, generator=g) * 3 + 1  # [batch, seq, in]
    tokens = X.reshape(-1, 16).double()
    expected = 2 / 6 * tokens.T @ tokens
    for split in (6, 3, 2, 1):
        acc = HessianAccumulator(16)
        for chunk in X.split(split):
            acc.add(chunk)
        assert acc.nsamples == 6
        assert acc.H.dtype == torch.float32 and acc.H.shape == (16, 16)
        torch.testing.assert_close(acc.H.double(), expected, rtol=1e-5, atol=1e-4)
    acc = HessianAccumulator(16)
    acc.add(X[0])  # [seq, in]: one sample, as in the reference
    assert acc.nsamples == 1
    torch.testing.assert_close(acc.H.double(), 2 * X[0].double().T @ X[0].double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("width", [1, 5, 16, 19])
def test_hessian_accumulator_symmetric_from_its_upper_strips(width):
    """add() multiplies only the upper block-triangle; H (read between adds too) is the full, exactly symmetric x^T x."""
    g = torch.Generator().manual_seed(width)
    X = torch.randn(4, 7, width, generator=g)
    acc = HessianAccumulator(width)
    for k, sample in enumerate(X):
        acc.add(sample[None])
        tokens = X[: k + 1].reshape(-1, width).double()
        torch.testing.assert_close(acc.H.double(), 2 / (k + 1) * tokens.T @ tokens, rtol=1e-5, atol=1e-5)
        assert torch.equal(acc.H, acc.H.T)


def test_hessian_accumulator_no_overflow():
    acc = HessianAccumulator(4)
    for _ in range(50):
        acc.add(torch.full((1000, 2, 4), 3e18))  # sum of x^T x alone would overflow fp32
    assert torch.isfinite(acc.H).all()
    torch.testing.assert_close(acc.H, torch.full((4, 4), 2 * 2 * 9e36), rtol=1e-4, atol=0)


def test_relative_output_error_known_values():
    W, H = correlated_problem(dtype=torch.float32)
    assert relative_output_error(W, torch.zeros_like(W), H) == pytest.approx(1.0)
    assert relative_output_error(W, W, H) == 0.0
    assert relative_output_error(W, 0.9 * W, H) == pytest.approx(0.01, rel=1e-6)
    Hd = torch.diag(torch.tensor([1.0, 0.0]))  # error on a dead input does not count
    assert relative_output_error(torch.tensor([[1.0, 5.0]]), torch.tensor([[1.0, 0.0]]), Hd) == 0.0


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_error_numerator_from_the_loss_equals_the_product(variant, dtype, rel):
    """gptq_quantize's error_num (2 * loss less the damping's share) is tr((W-Q) H (W-Q)^T) multiplied out, also
    with a dead input (whose weights GPTQ zeroes) and a damp raised by a singular H; the report uses it."""
    W, H = correlated_problem(dtype=dtype)
    H[5, :] = H[:, 5] = 0  # one dead input
    out = gptq_quantize(W, H, QuantConfig(**variant))
    d = W - out.result.weight.to(dtype)
    assert out.error_num == pytest.approx(((d @ H) * d).sum().item(), rel=rel)
    assert relative_output_error(W, out.result.weight, H, num=out.error_num) == pytest.approx(
        relative_output_error(W, out.result.weight, H), rel=rel)
    low_rank = H[:, :8] @ H[:8] / H.diagonal().sum()  # rank 8: damp 0.01 may not suffice in fp32
    out = gptq_quantize(W, low_rank, QuantConfig(**variant))
    d = W - out.result.weight.to(dtype)
    assert out.error_num == pytest.approx(((d @ low_rank) * d).sum().item(), rel=rel, abs=1e-9)
