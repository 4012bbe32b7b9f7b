"""The method registry (streamq/methods): each method's fields and defaults live in one place, a flag another
method owns is refused by name (Python API and CLI alike), and a new method is one registration: a toy "zero"
method, declared only in this file, runs through compress, and its output loads."""
from __future__ import annotations

import json
import math

import pytest
import torch

import streamq
from streamq.cli import main
from streamq.config import NEUTRAL, QuantConfig
from streamq.errors import StreamqError
from streamq.methods import REGISTRY, Method, get_method, names, register
from streamq.methods import QuantResult
from tests.conftest import make_tiny_model


def zero_solve(W, H, cfg):
    """Every weight quantized to 0: codes at the zero point, scale 1. -> (QuantResult, loss, damp)."""
    out_f, in_f = W.shape
    gs = in_f if cfg.group_size == -1 else cfg.group_size
    zero = (cfg.maxq + 1) // 2
    codes = torch.full((out_f, in_f), zero, dtype=torch.uint8)
    result = QuantResult(torch.zeros_like(W), codes, W.new_ones(in_f // gs, out_f),
                         torch.full((in_f // gs, out_f), zero, dtype=torch.uint8),
                         torch.arange(in_f, dtype=torch.int32) // gs)
    return result, 0.0, 0.0


@pytest.fixture
def zero_method():
    register(Method(name="zero", fields=(), solve=zero_solve, calibrated=False, footprint="rtn", estimate="rtn"))
    yield
    del REGISTRY["zero"]


def test_a_method_registered_in_a_test_runs_through_compress(tmp_path, zero_method):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1)
    out = streamq.compress(src, tmp_path / "o", method="zero", group_size=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["streamq_method"], q["quant_method"], q["desc_act"]) == ("zero", "gptq", False)
    model = streamq.load(out)
    quantized = [m for n, m in model.named_modules() if hasattr(m, "dequantized_weight")]
    assert len(quantized) == 2 * 7
    assert all(torch.equal(m.dequantized_weight(), torch.zeros(m.out_features, m.in_features)) for m in quantized)
    report = json.loads((out / "streamq_report.json").read_text())
    assert report["mean_layer_error"] == pytest.approx(1.0)  # ||W - 0||^2 / ||W||^2
    with pytest.raises(StreamqError, match=r"--iters .*--method zero"):  # it declared no fields
        QuantConfig(method="zero", iters=3)
    assert streamq.plan(src, method="zero", benchmark=False, group_size=32).offload == "none"  # data-free


def test_defaults_live_with_the_method():
    assert (QuantConfig().act_order, QuantConfig().static_groups, QuantConfig().sym) == (True, True, False)
    assert QuantConfig(bits=8).sym and QuantConfig(full_range=True).sym and QuantConfig(bits=3).sym is False
    assert QuantConfig(method="rtn").sym and not QuantConfig(sym=False, bits=8).sym  # RTN's own; given wins
    assert QuantConfig(act_order=False).static_groups is False  # static groups follow act-order
    assert QuantConfig(method="spqr").sym is False
    assert (QuantConfig(method="spqr").act_order, QuantConfig(method="autoround").act_order) == (False, False)
    assert QuantConfig(method="autoround").full_range is True
    assert QuantConfig(method="autoround", sym=False).full_range is False
    assert QuantConfig(method="rtn").act_order is False and QuantConfig(method="rtn").full_range is False
    for name in ("gptq", "rtn", "autoround", "spqr"):  # serialized configs read back to themselves
        cfg = QuantConfig(method=name)
        assert QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # streamq.compress / plan add nothing of their own: the config they build is the method's
    for name in ("gptq", "rtn", "autoround", "spqr"):
        assert streamq._configs(name, None, {"seed": 0})[0] == QuantConfig(method=name)


@pytest.mark.parametrize("method,field,value", [
    ("gptq", "iters", 5), ("gptq", "qq_scale_bits", 3), ("gptq", "outlier_threshold", 0.2), ("gptq", "lr", 0.1),
    ("gptq", "fp_targets", False), ("rtn", "act_order", True), ("rtn", "damp", 0.1), ("rtn", "true_sequential", False),
    ("autoround", "act_order", True), ("autoround", "damp", 0.1), ("spqr", "static_groups", True),
    ("spqr", "iters", 10), ("spqr", "full_range", True), ("rtn", "simplified_outliers", True),
])
def test_a_flag_the_method_does_not_read_is_refused(method, field, value):
    with pytest.raises(StreamqError) as e:
        QuantConfig(method=method, **{field: value})
    message = str(e.value)
    assert "\n" not in message and f"--method {method}" in message
    assert (field.replace("_", "-") in message), message


def test_every_field_is_declared_by_some_method_and_neutral_values_pass():
    declared = {f for m in names() for f in get_method(m).fields}
    assert declared | {"sym"} == set(NEUTRAL)
    for name in names():  # setting a field to its neutral value is not an error
        QuantConfig(method=name, **{f: v for f, v in NEUTRAL.items() if f not in get_method(name).fields
                                    and f != "sym"})
    assert math.isinf(NEUTRAL["outlier_threshold"])


def test_cli_refuses_and_no_act_order_turns_it_off(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    out = tmp_path / "o"
    fast = ["--calib", str(src / "calib.txt"), "--nsamples", "2", "--seqlen", "16", "--group-size", "32",
            "--no-progress"]
    assert main(["compress", str(src), str(out), "--method", "rtn", "--act-order", *fast]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--act-order" in err and "--method rtn" in err, err
    assert not out.exists()
    assert main(["compress", str(src), str(out), "--no-act-order", *fast]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["desc_act"], q["static_groups"]) == (False, False)
    default = tmp_path / "d"
    assert main(["compress", str(src), str(default), *fast]) == 0
    q = json.loads((default / "config.json").read_text())["quantization_config"]
    assert (q["streamq_act_order"], q["static_groups"], q["desc_act"]) == (True, True, False)  # static: g_idx in order
