"""--ignore and --quant-lm-head (streamq/ignore.py): ignored Linears are not quantized, their source tensors are
copied byte-identical, the report and every layout's quantization_config list them, the loaders leave them
dense, and the true-sequential passes still run them in fp (streamed GPTQ == the in-memory reference with the
same Linears skipped); a pattern that matches nothing is refused; the head is quantized only when asked.
transformers + gptqmodel leaving them dense: tests/test_formats_gptqmodel.py (the test-gptq extra)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.cli import main
from streamq.formats.gptq import unpack_gptq
from streamq.ignore import match_name
from streamq.quant.rtn import rtn_quantize
from streamq.verify import verify
from tests.conftest import make_tiny_model
from tests.reference import reference_quantize
from tests.test_pipeline import read_all

pytestmark = pytest.mark.usefixtures("one_thread")
NS, SEQ = 4, 32
PATTERNS = ["model.layers.1.mlp.down_proj", "re:.*self_attn\\.k_proj"]
IGNORED = ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
RUNS = {  # method, --format, extra fields
    "gptq": ("gptq", "gptq", {}),
    "rtn": ("rtn", "gptq", {}),
    "autoround": ("autoround", "gptq", {"iters": 2, "batch_size": 2}),
    "gptq-compressed-tensors": ("gptq", "compressed-tensors", {"act_order": False}),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ignore") / "m", "llama", n_layers=2, shards=2, tie=False)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def compress(src, out, method, fmt="gptq", **kw):
    kw.setdefault("group_size", 32)
    return streamq.compress(src, out, method=method, formats=fmt, calib=str(src / "calib.txt"), nsamples=NS,
                            seqlen=SEQ, progress=False, **kw)


def test_match_name_is_llm_compressors():
    assert match_name("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj")
    assert not match_name("model.layers.3.mlp.down_proj", "mlp.down_proj")  # plain names are exact
    assert match_name("model.layers.3.mlp.down_proj", "re:.*down_proj")
    assert not match_name("model.layers.3.mlp.down_proj", "re:down_proj")  # re.match: anchored at the start
    assert match_name("model.layers.13.mlp.down_proj", "re:model.layers.1")  # ... but not at the end


@pytest.mark.parametrize("run", RUNS)
def test_ignored_linears_are_copied_byte_identical_and_stay_dense(src, tmp_path, run):
    method, fmt, extra = RUNS[run]
    out = compress(src, tmp_path / run, method, fmt, ignore=PATTERNS, **extra)
    source, output = read_all(src), read_all(out)
    packed_suffix = "qweight" if fmt == "gptq" else "weight_packed"
    for i in range(2):
        for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{lin}"
            if name in IGNORED:
                assert name + "." + packed_suffix not in output
                assert output[name + ".weight"].dtype == source[name + ".weight"].dtype
                assert raw(output[name + ".weight"]) == raw(source[name + ".weight"]), name
            else:
                assert name + ".weight" not in output and name + "." + packed_suffix in output, name
    report = json.loads((out / "streamq_report.json").read_text())
    assert report["ignored_linears"] == IGNORED
    recorded = {f"model.layers.{i}.{n}" for i, b in report["blocks"].items() for n in b["layers"]}
    assert len(recorded) == 14 - len(IGNORED) and not recorded & set(IGNORED)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert q["streamq_ignore"] == IGNORED and q["lm_head"] is False
        assert sorted(q["modules_in_block_to_quantize"][0]) == sorted(recorded)  # transformers / optimum's allow-list
        assert sorted(q["dynamic"]) == sorted(f"-:^{n.replace('.', chr(92) + '.')}$" for n in IGNORED)
    else:
        assert q["ignore"] == [*IGNORED, "lm_head"]
    model = streamq.load(out)
    modules = dict(model.named_modules())
    for name in IGNORED:
        assert type(modules[name]) is nn.Linear, name
        assert torch.equal(modules[name].weight, source[name + ".weight"].float())
    assert type(modules["model.layers.0.self_attn.q_proj"]) is not nn.Linear
    assert verify(out) == []


def test_ignored_linears_still_run_in_fp_in_the_true_sequential_passes(tmp_path):
    """Block 0's down_proj and k_proj are left in fp: the streamed GPTQ codes of every other Linear (block 1's
    inputs included) equal the in-memory reference that skips the same Linears but runs them."""
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1, tie=False)
    ignore = ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj")
    out = compress(src, tmp_path / "o", "gptq", ignore=list(ignore))
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    _, ref, _ = reference_quantize(src, tokens, streamq.QuantConfig(method="gptq", group_size=32, ignore=ignore))
    _, ref_all, _ = reference_quantize(src, tokens, streamq.QuantConfig(method="gptq", group_size=32))
    tensors = read_all(out)
    assert set(ref) == set(ref_all) - set(ignore)
    for name, r in ref.items():
        got = unpack_gptq({k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4)
        same = (got.codes == r.codes.to(torch.int32)).float().mean().item()
        assert same >= 0.999, f"{name}: only {same:.4%} of codes equal the reference"
    # the skip matters: block 1 sees other inputs than with everything quantized
    name = "model.layers.1.self_attn.q_proj"
    assert not torch.equal(ref[name].codes, ref_all[name].codes)


def test_ignored_linears_are_left_out_of_smoothing_and_activation_quantization(src, tmp_path):
    """With SmoothQuant and static int8 activations, an ignored q_proj keeps its source weight: its norm group
    (input_layernorm -> q/k/v) is not smoothed in that block, and it gets no input scale; streamq.load runs it."""
    out = compress(src, tmp_path / "o", "rtn", "compressed-tensors", bits=8, group_size=-1, smooth_alpha=0.5,
                   act_bits=8, act_dynamic=False, ignore=["model.layers.0.self_attn.q_proj"])
    source, output = read_all(src), read_all(out)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"):
        assert raw(output[name]) == raw(source[name]), name
    assert not torch.equal(output["model.layers.1.input_layernorm.weight"],
                           source["model.layers.1.input_layernorm.weight"])  # smoothed where nothing is ignored
    assert "model.layers.0.self_attn.q_proj.input_scale" not in output
    assert "model.layers.0.self_attn.k_proj.input_scale" in output
    assert verify(out) == []
    with torch.no_grad():
        assert torch.isfinite(streamq.load(out)(torch.randint(0, 100, (1, 8))).logits).all()


def test_a_pattern_that_matches_nothing_is_a_one_line_error(src, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["compress", str(src), str(out), "--method", "rtn", "--group-size", "32", "--no-progress",
                 "--ignore", "re:.*down_proj", "--ignore", "re:.*dwn_proj"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'re:.*dwn_proj' matches no Linear" in err, err
    assert not (out / "config.json").exists()
    code = main(["compress", str(src), str(out), "--method", "rtn", "--ignore", "re:(", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a regular expression" in err and len(err.splitlines()) == 1, err


def test_lm_head_stays_fp_by_default_and_quant_lm_head_quantizes_it(src, tmp_path):
    plain = compress(src, tmp_path / "plain", "rtn")
    assert raw(read_all(plain)["lm_head.weight"]) == raw(read_all(src)["lm_head.weight"])
    assert type(streamq.load(plain).lm_head) is nn.Linear
    for fmt, suffix in (("gptq", "qweight"), ("compressed-tensors", "weight_packed")):
        out = compress(src, tmp_path / fmt, "gptq", fmt, quant_lm_head=True, act_order=False)
        tensors = read_all(out)
        assert "lm_head.weight" not in tensors and f"lm_head.{suffix}" in tensors
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert q["lm_head"] is True if fmt == "gptq" else "lm_head" not in q["ignore"]
        model = streamq.load(out)
        assert type(model.lm_head) is not nn.Linear
        want = rtn_quantize(read_all(src)["lm_head.weight"].float(),
                            streamq.QuantConfig(method="rtn", group_size=32, grid_search="mse", sym=False)).weight  # GPTQ's grid
        torch.testing.assert_close(model.lm_head.dequantized_weight(), want, rtol=0, atol=1e-6)
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        with torch.no_grad():
            hidden = model.model(ids).last_hidden_state
            torch.testing.assert_close(model(ids).logits, hidden @ want.t(), rtol=1e-4, atol=1e-4)


def test_quant_lm_head_with_tied_embeddings_is_refused(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "tied", "llama", n_layers=1, shards=1, tie=True)
    code = main(["compress", str(src), str(tmp_path / "o"), "--method", "rtn", "--group-size", "32",
                 "--quant-lm-head", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tied to the input embeddings" in err, err
