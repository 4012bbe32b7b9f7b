"""AutoRound on a real (tiny) Llama block: beats RTN, reduces to RTN at iters=0, reproducible, streamed equals
in-memory, packs losslessly, keeps the best iterate."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from streamq.calib.capture import ModelEnds, batched_kwargs, run_block
from streamq.calib.store import ActivationStore
from streamq.config import AUTOROUND_PRESETS, QuantConfig
from streamq.errors import StreamqError
from streamq.formats.gptq import dequantize_gptq, pack_gptq
from streamq.io.blocks import build_layout, load_block
from streamq.io.checkpoint import Checkpoint
from streamq.quant.autoround import autoround_block
from streamq.quant.rtn import rtn_quantize
from tests.conftest import make_tiny_model

NS, SEQ = 16, 32
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Block 0 of a tiny Llama (hidden 64) with its real inputs X, fp outputs Y [NS, SEQ, 64] and kwargs."""
    folder = make_tiny_model(tmp_path_factory.mktemp("ar") / "llama", "llama", n_layers=1, shards=1)
    ckpt = Checkpoint(folder)
    layout = build_layout(ckpt)
    ends = ModelEnds(layout, ckpt, CPU, torch.float32, with_head=False)
    ids = torch.randint(0, 300, (NS, SEQ), generator=torch.Generator().manual_seed(0))
    X = torch.cat([ends.block_inputs(ids[i:i + 1])[0] for i in range(NS)])
    kwargs = ends.block_inputs(ids[:1])[1]
    block = load_block(layout, ckpt, 0, CPU, torch.float32)
    with torch.no_grad():
        Y = torch.cat([run_block(block, X[i:i + 1], kwargs) for i in range(NS)])
    return copy.deepcopy(block), X, Y, kwargs


def config(**kw) -> QuantConfig:
    return QuantConfig(**{"method": "autoround", "group_size": 32, "iters": 40, **kw})


def tune(data, cfg, inputs=None, targets=None, on_iter=None):
    """Tune a fresh copy of the fp block; returns (block with quantized weights, results)."""
    block, X, Y, kwargs = data
    block = copy.deepcopy(block)
    results = autoround_block(block, inputs or (lambda idx: X[idx]), targets or (lambda idx: Y[idx]), NS, kwargs,
                              cfg, CPU, on_iter=on_iter)
    return block, results


def output_mse(data, block) -> float:
    _, X, Y, kwargs = data
    with torch.no_grad():
        return sum((run_block(block, X[i:i + 1], kwargs) - Y[i:i + 1]).pow(2).sum().item() for i in range(NS)) / Y.numel()


def rtn_block(data, cfg):
    block = copy.deepcopy(data[0])
    for m in block.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = rtn_quantize(m.weight, cfg).weight
    return block


def linears(block) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def tuned(data):
    """bits -> (block, results) of one default tuning run, shared by the tests that only read them."""
    return {bits: tune(data, config(bits=bits)) for bits in (2, 3, 4)}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_block_error_below_rtn(data, tuned, bits):
    block, results = tuned[bits]
    rtn, ours = output_mse(data, rtn_block(data, config(bits=bits))), output_mse(data, block)
    assert ours < 0.6 * rtn, (bits, ours, rtn)
    assert set(results) == set(linears(data[0]))


def test_asym_below_rtn(data):
    cfg = config(bits=3, sym=False)
    block, _ = tune(data, cfg)
    assert output_mse(data, block) < 0.6 * output_mse(data, rtn_block(data, cfg))


@pytest.mark.parametrize("cfg", [dict(bits=4), dict(bits=3, sym=False), dict(bits=2, sym=False, group_size=-1),
                                 dict(bits=8, group_size=-1), dict(bits=4, minmax_tuning=False),
                                 dict(bits=4, full_range=True), dict(bits=2, full_range=True)])
def test_iters_0_is_rtn(data, cfg):
    cfg = config(iters=0, **cfg)
    block, results = tune(data, cfg)
    for name, m in linears(data[0]).items():
        ref, (res, loss) = rtn_quantize(m.weight, cfg), results[name]
        for field in ref._fields:
            assert torch.equal(getattr(res, field), getattr(ref, field)), (name, field)
        assert torch.equal(linears(block)[name].weight, ref.weight)
        assert loss > 0


def test_same_seed_same_result_other_seed_differs(data):
    (_, a), (_, b), (_, c) = (tune(data, config(bits=3, iters=15, seed=s)) for s in (7, 7, 8))
    for name in a:
        assert a[name][1] == b[name][1]
        assert all(torch.equal(x, y) for x, y in zip(a[name][0], b[name][0]))
    assert any(not torch.equal(a[n][0].codes, c[n][0].codes) for n in a)


def test_streamed_equals_in_memory(data, tmp_path):
    """Minibatches read sample by sample from the zarr store give bit-identical results to indexing RAM tensors."""
    _, X, Y, _ = data
    store = ActivationStore.on_disk(str(tmp_path / "acts"), NS, SEQ, X.shape[-1], torch.float32, create=True)
    for i in range(NS):
        store.write("a", i, X[i:i + 1])
        store.write("b", i, Y[i:i + 1])
    cfg = config(bits=3, iters=15, batch_size=4, grad_accum=2)
    streamed = tune(data, cfg, inputs=lambda idx: torch.cat([store.read("a", i) for i in idx]),
                    targets=lambda idx: torch.cat([store.read("b", i) for i in idx]))
    in_memory = tune(data, cfg)
    for name, (res, loss) in in_memory[1].items():
        assert streamed[1][name][1] == loss
        assert all(torch.equal(x, y) for x, y in zip(streamed[1][name][0], res))
        assert torch.equal(linears(streamed[0])[name].weight, linears(in_memory[0])[name].weight)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packs_and_dequantizes_to_the_block_weights(tuned, bits):
    block, results = tuned[bits]
    for name, (res, _) in results.items():
        g = res.g_idx.long()
        assert torch.equal(res.scales[g].t() * (res.codes.float() - res.zeros[g].t().float()), res.weight)
        packed = pack_gptq(res, bits)
        assert torch.equal(dequantize_gptq(packed, bits), linears(block)[name].weight), name


def test_keeps_best_iterate(data):
    """The returned loss is the minimum over iterations, and the written weights reproduce it on that minibatch."""
    _, X, Y, kwargs = data
    losses, batches = [], []
    cfg = config(bits=2, iters=30, batch_size=1)  # one-sample minibatches: noisy losses, the last is not the best

    def targets(idx):
        batches.append(idx)
        return Y[idx]

    block, results = tune(data, cfg, targets=targets, on_iter=lambda i, loss: losses.append(loss))
    best = min(losses)
    assert len(losses) == cfg.iters and all(loss == best for _, loss in results.values())
    assert 0 < losses.index(best) < cfg.iters - 1 and best < losses[-1]  # neither the RTN start nor the last
    idx = batches[losses.index(best)]
    with torch.no_grad():
        out = run_block(block, X[idx], batched_kwargs(kwargs, len(idx), CPU))
    assert (out - Y[idx]).pow(2).mean().item() == pytest.approx(best, rel=1e-5)


def test_rounding_offsets_stay_within_half(data):
    """|V| <= 0.5 with steps that would carry it past 0.5: without min/max tuning the grid is RTN's and every
    code is within 1 of RTN's (an unclamped V reaches 2 away here)."""
    losses = []
    cfg = config(bits=4, iters=20, lr=0.2, minmax_tuning=False)
    _, results = tune(data, cfg, on_iter=lambda i, loss: losses.append(loss))
    assert losses.index(min(losses)) >= 3  # kept an iterate after steps summing to 0.2 + 0.19 + 0.18 > 0.5
    for name, m in linears(data[0]).items():
        ref, res = rtn_quantize(m.weight, cfg), results[name][0]
        assert torch.equal(res.scales, ref.scales) and torch.equal(res.zeros, ref.zeros)
        assert (res.codes.int() - ref.codes.int()).abs().max() <= 1


def test_batched_forward_equals_per_sample(data):
    block, X, _, kwargs = data
    with torch.no_grad():
        batched = run_block(block, X[:5], batched_kwargs(kwargs, 5, CPU))
        single = torch.cat([run_block(block, X[i:i + 1], kwargs) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_leaves_requires_grad_and_dtype(data):
    block, X, Y, kwargs = data
    block = copy.deepcopy(block).to(torch.bfloat16)
    kwargs = {**kwargs, "position_embeddings": tuple(t.to(torch.bfloat16) for t in kwargs["position_embeddings"])}
    flags = {n: i % 2 == 0 for i, (n, _) in enumerate(block.named_parameters())}
    for n, p in block.named_parameters():
        p.requires_grad_(flags[n])
    results = autoround_block(block, lambda idx: X[idx], lambda idx: Y[idx], NS, kwargs, config(bits=4, iters=3), CPU)
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags
    for name, m in linears(block).items():
        assert m.weight.dtype == torch.bfloat16 and m.weight.grad is None
        assert torch.equal(m.weight, results[name][0].weight.to(torch.bfloat16))


def test_config_validation_and_presets():
    assert QuantConfig(method="autoround").iters == 200 and QuantConfig().lr is None
    for bad in (dict(iters=-1), dict(lr=0.0), dict(batch_size=0), dict(grad_accum=0), dict(seed=-1),
                dict(method="autoround", act_order=True), dict(method="gptq", fp_targets=False)):
        with pytest.raises(StreamqError):
            QuantConfig(**bad)
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    for preset in AUTOROUND_PRESETS.values():
        QuantConfig(method="autoround", **{k: v for k, v in preset.items() if k in fields})
        assert set(preset) - fields <= {"nsamples"}
