"""quant/twins.py: a block reuses its twin's trace (one hooked forward fewer) and quantizes exactly as when traced;
a block that differs in a setting, a shape or the call's tensors is traced again; routed experts never reuse."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from streamq.calib.data import calibration_windows
from streamq.config import QuantConfig
from streamq.quant import twins
from streamq.quant.block import quantize_block
from streamq.quant.twins import block_signature, twin_trace
from tests.conftest import make_tiny_model
from tests.reference import load_with_block0_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
NS, SEQ = 4, 32
CPU = torch.device("cpu")


def block_and_inputs(tmp_path, arch):
    src = make_tiny_model(tmp_path / arch, arch, n_layers=1)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    _, layers, _, inputs, kw = load_with_block0_inputs(src, tokens)
    return layers[0], inputs, kw[0]


@pytest.fixture
def traces(monkeypatch):
    """The blocks trace() ran on, with the remembered trace dropped first."""
    seen, real = [], twins.trace
    monkeypatch.setattr(twins, "trace", lambda block, *a: seen.append(block) or real(block, *a))
    twins.forget()
    yield seen
    twins.forget()


def quantize(block, xs, kw):
    outs = []
    got = quantize_block(block, lambda: iter(xs), kw, QuantConfig(bits=4, group_size=32), CPU, emit=outs.append)
    return {n: r for n, (r, _) in got.items()}, outs


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_twin_reuses_the_trace_and_quantizes_as_when_traced(tmp_path, traces, arch):
    block, xs, kw = block_and_inputs(tmp_path, arch)
    twin, alone = copy.deepcopy(block), copy.deepcopy(block)
    quantize(block, xs, kw)
    got, got_out = quantize(twin, xs, kw)  # the signature holds after block's weights were quantized
    assert traces == [block]
    twins.forget()
    want, want_out = quantize(alone, xs, kw)
    assert traces == [block, alone]
    for name, r in want.items():
        for field in r._fields:
            assert torch.equal(getattr(got[name], field), getattr(r, field)), f"{name}.{field}"
    assert all(torch.equal(a, b) for a, b in zip(got_out, want_out))


def test_other_settings_shapes_or_call_tensors_are_traced_again(tmp_path, traces):
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    sliding = copy.deepcopy(block)
    sliding.self_attn.sliding_window = 8  # a plain per-layer setting (None in a Llama block)
    renamed = copy.deepcopy(block)
    renamed.self_attn.layer_idx = 7  # the layer's index alone does not make it another block
    wider = copy.deepcopy(block)
    wider.mlp.up_proj.weight.data = torch.zeros(wider.mlp.up_proj.out_features, 3)  # another parameter shape
    shorter = {k: tuple(t[:, : SEQ // 2] for t in v) if k == "position_embeddings" else v for k, v in kw.items()}
    base = block_signature(block, kw, CPU)
    assert block_signature(renamed, kw, CPU) == base
    for other, call in ((sliding, kw), (wider, kw), (block, shorter)):
        assert block_signature(other, call, CPU) != base
    assert block_signature(block, kw, torch.device("meta")) != base
    twin_trace(block, lambda: xs[0], kw, CPU)
    twin_trace(renamed, lambda: xs[0], kw, CPU)
    twin_trace(sliding, lambda: xs[0], kw, CPU)
    assert traces == [block, sliding]


def test_routed_experts_trace_is_not_remembered(tmp_path, monkeypatch):
    """A trace naming routed experts' Linears (Trace.parallel: a pipeline-loaded MoE block) is not reused."""
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    real, seen = twins.trace, []

    def routed(b, *a):
        t = real(b, *a)
        seen.append(b)
        t.parallel = {"mlp.up_proj": "mlp"}  # as stages.trace marks an expert Linear (streamq/moe.py parallel_key)
        return t

    monkeypatch.setattr(twins, "trace", routed)
    twins.forget()
    twin_trace(block, lambda: xs[0], kw, CPU)
    twin_trace(copy.deepcopy(block), lambda: xs[0], kw, CPU)
    assert len(seen) == 2
    twins.forget()
