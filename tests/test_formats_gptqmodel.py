"""transformers + gptqmodel (the GPTQ backend transformers uses) loads streamq's GPTQ folders with streamq's
logits. Needs the `test-gptq` extra (gptqmodel 7.6 + optimum, wheels in ~80 s with torch 2.13); without
them this module is skipped as a whole, and says so."""
from __future__ import annotations

import pytest
import torch

import streamq
from tests.conftest import make_tiny_model

pytest.importorskip("gptqmodel", reason="pip install '.[test-gptq]' (gptqmodel 7.6 + optimum)")
pytest.importorskip("optimum", reason="pip install '.[test-gptq]' (gptqmodel 7.6 + optimum)")
CASES = {
    "w4g32-sym": dict(method="rtn", bits=4, group_size=32),
    "w4g32-asym": dict(method="rtn", bits=4, group_size=32, sym=False),
    "w4g32-full-range": dict(method="rtn", bits=4, group_size=32, full_range=True),
    "w8g32": dict(method="rtn", bits=8, group_size=32),
    "act-order-static": dict(method="gptq", bits=4, group_size=32, act_order=True, static_groups=True),
    "act-order": dict(method="gptq", bits=4, group_size=32, act_order=True),
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_gptqmodel_loads_with_streamq_logits(case, tmp_path):
    from transformers import AutoModelForCausalLM, GPTQConfig

    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1)
    kw = CASES[case]
    out = streamq.compress(src, tmp_path / "o", calib=str(src / "calib.txt"), nsamples=2, seqlen=16, progress=False,
                           **kw)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=kw["bits"], backend="torch"))
    assert "gptqmodel" in type(model.model.layers[0].self_attn.q_proj).__module__
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamq.load(out)(ids).logits, rtol=0, atol=1e-2)


def test_transformers_gptqmodel_leaves_ignored_linears_dense(tmp_path):
    """--ignore (streamq/ignore.py): gptqmodel reads the `dynamic` "-:" rules of quantization_config and keeps
    those Linears as plain nn.Linear with the source weights; the logits match streamq.load's."""
    from torch import nn
    from transformers import AutoModelForCausalLM, GPTQConfig

    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1, tie=False)
    ignored = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    out = streamq.compress(src, tmp_path / "o", method="rtn", bits=4, group_size=32, progress=False,
                           ignore=["model.layers.1.mlp.down_proj", "re:.*self_attn\\.k_proj"])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=4, backend="torch"))
    modules = dict(model.named_modules())
    for name in ignored:
        assert type(modules[name]) is nn.Linear, (name, type(modules[name]))
    assert "gptqmodel" in type(modules["model.layers.0.self_attn.q_proj"]).__module__
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamq.load(out)(ids).logits, rtol=0, atol=1e-2)
