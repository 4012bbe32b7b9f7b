"""fit_grid's mse range search (grid_search="mse"): equal to a plain loop over shrink factors, never worse than the
min/max grid in its own norm, the packers' invariant kept, lower layer errors for GPTQ and RTN, flags refused
where no grid is fitted."""
import pytest
import torch

import streamq
from streamq.cli import main
from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.quant.grid import fit_grid, fit_groups

from streamq.quant.gptq import gptq_quantize
from streamq.quant.rtn import rtn_quantize
from tests.conftest import make_tiny_model
from tests.test_gptq import correlated_problem, expanded

pytestmark = pytest.mark.usefixtures("one_thread")

GRIDS = [dict(sym=False), dict(sym=True), dict(sym=True, full_range=True)]
GRID_IDS = ["asym", "sym", "full_range"]


def reference_mse_grid(x, bits, sym, full_range=False, grid=100, maxshrink=0.8, norm=2.4, patience=20):
    """IST-DASLab/gptq Quantizer.find_params(weight=True) with mse=True, one row per channel, as a plain loop over
    shrink factors p = 1 - i/grid, with streamq's fp16 scale and asym zero clamp (and its full-range grid); a row
    stops after `patience` shrinks in a row without a strict improvement (None: never)."""
    maxq = 2**bits - 1
    xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
    best = torch.full([x.shape[0]], float("inf"))
    scale, zero = torch.zeros(x.shape[0]), torch.zeros(x.shape[0])
    misses, searching = torch.zeros(x.shape[0]), torch.ones(x.shape[0], dtype=torch.bool)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        lo, hi = p * xmin, p * xmax
        if full_range:  # the larger side lands on code 0, 2^(bits-1) steps from 0
            s1 = torch.where(hi >= -lo, -hi, -lo) / 2 ** (bits - 1)  # signed: code 0 is the larger side
            z1 = torch.full_like(s1, 2 ** (bits - 1))
        else:
            if sym:
                hi = torch.maximum(lo.abs(), hi)
                lo = torch.where(lo < 0, -hi, lo)
            empty = (lo == 0) & (hi == 0)
            lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
            s1 = (hi - lo) / maxq
        s1 = s1.half().float()
        s1 = torch.where(s1 == 0, 2.0**-14, s1)
        if not full_range:
            z1 = torch.full_like(s1, (maxq + 1) / 2) if sym else torch.round(-lo / s1).clamp(1, maxq)
        q = torch.clamp(torch.round(x / s1[:, None]) + z1[:, None], 0, maxq)
        # |d|^norm as exp(norm * ln|d|), the way grid._error takes it, so that near-ties resolve alike on any CPU;
        # test_mse_error_is_the_power_sum checks that against fp64 pow
        err = torch.exp(norm * torch.log((s1[:, None] * (q - z1[:, None]) - x).abs())).sum(1)
        better = (err < best) & searching
        best[better], scale[better], zero[better] = err[better], s1[better], z1[better]
        misses = torch.where(better, 0, misses + 1)
        searching &= patience is None or misses < patience
    return scale, zero


def row_error(w, scale, zero, bits, norm=2.4):
    """sum over each row of |w - q|^norm, fp64."""
    maxq = 2**bits - 1
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return (scale[:, None] * (q - zero[:, None]) - w).double().abs().pow(norm).sum(1)


def weights(rows=96, cols=64, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    if heavy:  # Student-t-like: a few large weights per row stretch the min/max range
        w = w / torch.rand(rows, cols, generator=g).clamp(min=0.02) ** 0.7
    w[3] = 0  # empty row
    w[5] = w[5].abs() + 0.01  # no negative value
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("patience", [20, 3])
def test_mse_grid_equals_a_plain_loop_over_shrink_factors(bits, grid, patience, monkeypatch):
    import streamq.quant.grid as grid_module

    monkeypatch.setattr(grid_module, "MSE_PATIENCE", patience)
    wide = torch.rand(4, 4096, generator=torch.Generator().manual_seed(bits)) * 0.3 - 0.15
    wide[:, 0] = 1.0  # one outlier over a long row: clipping it pays, down to the largest shrink allowed
    stopped_early = False
    for w in (weights(seed=bits), weights(seed=bits, heavy=True), wide):
        ref = reference_mse_grid(w, bits, patience=patience, **grid)
        full = reference_mse_grid(w, bits, patience=None, **grid)
        stopped_early |= not torch.equal(ref[0], full[0])
        for chunk in (1 << 19, 7 * 96 * 64, 2048):  # one chunk; 7 shrink factors a chunk (96 x 64); rows a chunk
            monkeypatch.setattr(grid_module, "_MSE_CHUNK", chunk)
            scale, zero = fit_grid(w, bits, search="mse", **grid)
            assert torch.equal(scale, ref[0]) and torch.equal(zero, ref[1]), chunk
    if patience == 3 and bits < 8:  # the stop is exercised: some row's best lies beyond 3 misses in a row
        assert stopped_early


def test_mse_error_is_the_power_sum():
    """grid._error's sums (exp(norm * ln|d|) in fp32) within 1e-5 relative of sum |d|^norm in fp64; exact zeros
    (weights on the grid, an all-zero row) give 0."""
    from streamq.quant.grid import MSE_NORM, _error

    w = weights(rows=64, cols=128, seed=7, heavy=True)
    w[7, :] = 0.0
    scale = torch.stack([w.abs().amax(1).clamp(min=1e-3) / 7 * f for f in (1.0, 0.8, 0.5)]).half().float()[..., None]
    zero = torch.full_like(scale, 8.0)
    w[9] = scale[0, 9, 0] * torch.arange(-8, 8).repeat(8)  # every weight on the first grid: error 0
    got = _error(w[None], scale, zero, 15, torch.empty(3, *w.shape))
    q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
    want = (scale.double() * (q.double() - zero) - w.double()).abs().pow(MSE_NORM).sum(-1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=0)
    assert got[:, 7].eq(0).all() and got[0, 9] == 0


@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_fit_groups_equals_fit_grid_per_group(search):
    w = weights(rows=40, cols=192, seed=3, heavy=True)
    scales, zeros = fit_groups(w, 64, 4, False, search=search)
    for g in range(3):
        s, z = fit_grid(w[:, 64 * g : 64 * (g + 1)], 4, False, search=search)
        assert torch.equal(scales[g], s) and torch.equal(zeros[g], z)
    s, z = fit_grid(w, 4, False, search=search)
    assert torch.equal(fit_groups(w, -1, 4, False, search=search)[0][0], s)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_mse_grid_never_worse_than_minmax_and_better_on_heavy_tails(bits, grid):
    for heavy in (False, True):
        w = weights(rows=256, seed=10 + bits, heavy=heavy)
        minmax = row_error(w, *fit_grid(w, bits, **grid), bits)
        scale, zero = fit_grid(w, bits, search="mse", **grid)
        mse = row_error(w, scale, zero, bits)
        assert torch.all(mse <= minmax)
        assert torch.equal(scale.half().float(), scale) and torch.all(scale != 0)
        if not grid["sym"]:
            assert zero.min() >= 1 and zero.max() <= 2**bits - 1
        if heavy:  # most rows gain, and the total clearly drops
            assert (mse < minmax).float().mean() > 0.5 and mse.sum() < 0.97 * minmax.sum()
    assert torch.equal(fit_grid(torch.zeros(4, 8), bits, search="mse", **grid)[0],
                       fit_grid(torch.zeros(4, 8), bits, **grid)[0])  # nothing to gain: the min/max grid


@pytest.mark.parametrize("cfg", [dict(method="rtn", group_size=32, sym=False),
                                 dict(method="rtn", group_size=-1, bits=3),
                                 dict(group_size=32, sym=False, bits=3),
                                 dict(group_size=32, act_order=False, sym=True),
                                 dict(group_size=48, act_order=True, static_groups=False, block_columns=32, sym=True)],
                         ids=["rtn-asym", "rtn-w3-channel", "gptq-asym-w3", "gptq-in-order", "gptq-dynamic"])
def test_results_keep_the_packers_invariant_and_the_error_drops(cfg):
    W, H = correlated_problem(out=64, inp=96, dtype=torch.float32)
    W = W / torch.rand(W.shape, generator=torch.Generator().manual_seed(1)).clamp(min=0.05) ** 0.5  # heavier tails
    results = {}
    for search in ("minmax", "mse"):
        c = QuantConfig(**cfg, grid_search=search)
        r = rtn_quantize(W, c) if c.method == "rtn" else gptq_quantize(W, H, c).result
        assert torch.equal(r.weight, expanded(r))  # weight == scales * (codes - zeros), exactly
        assert int(r.codes.max()) <= c.maxq and r.codes.dtype == torch.uint8
        assert torch.equal(r.scales.half().float(), r.scales)
        results[search] = r
    err = {s: ((W - r.weight) @ H * (W - r.weight)).sum().item() for s, r in results.items()}  # tr(E H E^T)
    assert err["mse"] < 0.97 * err["minmax"], err
    assert not torch.equal(results["mse"].scales, results["minmax"].scales)


@pytest.mark.parametrize("method,bits,sym", [("gptq", 4, True), ("rtn", 3, False)])
def test_streamed_mse_equals_reference_and_lowers_layer_errors(tmp_path, method, bits, sym):
    """Through compress: the flag reaches the solver (output == the in-memory reference with the same config), and
    on a tiny random model the mse grid lowers the mean relative output error of the layers. (GPTQ asym with static
    groups gains little at the layer level on Gaussian weights: +-3% either way on correlated_problem's seeds.)"""
    from tests.test_pipeline import assert_matches_reference, run_both

    errors = {}
    for search in ("minmax", "mse"):
        _, out, _, ref, errs = run_both(tmp_path / search, "llama", method, bits=bits, group_size=32, sym=sym,
                                        grid_search=search)
        assert_matches_reference(out, ref, bits)
        if method == "gptq":  # (gptq's error, rtn's error on the same grid search) per layer
            errors[search] = errs
        else:
            import json

            errors[search] = json.loads((out / "streamq_report.json").read_text())["mean_layer_error"]
    if method == "gptq":
        for k in (0, 1):
            mean = {s: sum(e[k] for e in errs.values()) / len(errs) for s, errs in errors.items()}
            assert mean["mse"] < mean["minmax"], (k, mean)
    else:
        assert errors["mse"] < errors["minmax"], errors


def test_grid_search_refused_where_no_grid_is_searched(tmp_path, capsys):
    for method in ("spqr", "autoround"):
        with pytest.raises(StreamqError, match=rf"--grid-search.*--method {method}"):
            QuantConfig(method=method, grid_search="mse")
    with pytest.raises(StreamqError, match="--bits 16 prunes only.*--grid-search"):
        QuantConfig(method="sparsegpt", bits=16, grid_search="mse")
    with pytest.raises(StreamqError, match="--grid-search 'l1'"):
        QuantConfig(grid_search="l1")
    with pytest.raises(StreamqError, match="grid search 'l1'"):
        fit_grid(torch.ones(2, 4), 4, True, search="l1")
    QuantConfig(method="sparsegpt", bits=4, grid_search="mse")  # quantized kept weights: a grid to search
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    assert main(["compress", str(src), str(tmp_path / "o"), "--method", "spqr", "--grid-search", "mse",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--grid-search" in err and "--method spqr" in err, err
    assert not (tmp_path / "o").exists()
    assert streamq._configs("rtn", None, {"grid_search": "mse"})[0].grid_search == "mse"
    # defaults: GPTQ searches (README "Results": 27.74 vs 28.21 on SmolLM2-135M w4 g64 asym); the others do not
    assert [QuantConfig(method=m).grid_search for m in ("gptq", "rtn", "sparsegpt", "spqr", "autoround")] == \
        ["mse", "minmax", "minmax", "minmax", "minmax"]
    assert QuantConfig(grid_search="minmax").grid_search == "minmax"
