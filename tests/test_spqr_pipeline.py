"""`--method spqr` end to end: the streamed run equals an in-memory SpQR on the full model; the folder loads,
evaluates and generates; an interrupted run resumes byte-identically; the report counts bits as the paper does."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

import streamq
from streamq import pipeline
from streamq.calib.data import calibration_windows
from streamq.cli import main
from streamq.formats.spqr import tensor_names, unpack_spqr
from streamq.verify import verify
from tests.conftest import assert_loads_to_engine_weights, loaded_model_perplexity, make_tiny_model, run_interrupted
from tests.reference import reference_spqr
from tests.test_autoround_pipeline import file_bytes, report
from tests.test_pipeline import read_all

pytestmark = pytest.mark.usefixtures("one_thread")
NS, SEQ = 6, 48
SPQR = dict(method="spqr", bits=3, group_size=16, qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=16,
            outlier_threshold=0.2, act_order=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("spqr") / "llama", "llama", n_layers=2, shards=2)


def run(src, out, **kw):
    return streamq.compress(src, out, **{**SPQR, "calib": str(src / "calib.txt"), "nsamples": NS, "seqlen": SEQ,
                                         "progress": False, **kw})


@pytest.fixture(scope="module")
def streamed(src, tmp_path_factory):
    """(output folder, the engine's fake-quantized weight per full Linear name, recorded as blocks are packed)."""
    engine = {}
    original = pipeline.block_tensors

    def record(layout, ckpt, i, results, cfg, *fmt):
        engine.update({f"{layout.block_prefix(i)}{n}": r.weight.clone() for n, (r, _) in results.items()})
        return original(layout, ckpt, i, results, cfg, *fmt)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "block_tensors", record)
        out = run(src, tmp_path_factory.mktemp("spqr-out") / "out")
    return out, engine


@pytest.fixture(scope="module")
def reference(src):
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    cfg = streamq.QuantConfig(**{**SPQR, "sym": False})
    return reference_spqr(src, tokens, cfg)


def layer_tensors(tensors: dict, name: str, cfg) -> dict:
    return {k: tensors[f"{name}.{k}"] for k in tensor_names(cfg)}


def test_streamed_equals_in_memory_reference(streamed, reference):
    out, _ = streamed
    _, ref = reference
    tensors = read_all(out)
    cfg = streamq.QuantConfig(**{**SPQR, "sym": False})
    assert len(ref) == 2 * 7
    for name, r in ref.items():
        got = unpack_spqr(layer_tensors(tensors, name, cfg), cfg)
        assert torch.equal(got.perm, r.perm), name
        same = (got.codes == r.codes.to(torch.int32)).float().mean().item()
        assert same >= 0.999, f"{name}: only {same:.4%} of codes equal the reference"
        assert r.n_outliers > 0, name
        assert torch.equal(got.row_ptr, r.outlier_row_ptr) and torch.equal(got.col, r.outlier_col), name


def test_folder_layout_index_and_verify(streamed):
    out, _ = streamed
    # one shard per block (its outlier tensors are sized by the data) + one for the rest
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors"
                                                                  for i in (1, 2, 3)]
    tensors = read_all(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"]["model.layers.1.mlp.down_proj.outlier_val"] == "model-00002-of-00003.safetensors"
    assert verify(out) == []
    strict = dict(parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    for name in ("config.json", "streamq_report.json", "streamq_manifest.json"):
        json.loads((out / name).read_text(), **strict)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["checkpoint_format"], q["bits"], q["group_size"], q["qq_scale_bits"],
            q["qq_zero_bits"], q["qq_groupsize"], q["outlier_threshold"], q["permutation_order"], q["sym"]) == \
        ("spqr", "streamq-spqr", 3, 16, 3, 3, 16, 0.2, "act_order", False)


def test_loads_to_engine_weights_and_fake_quant_logits(streamed, reference, capsys):
    out, engine = streamed
    ref_model, ref = reference
    assert set(engine) == set(ref)
    assert_loads_to_engine_weights(out, engine, ref_model)
    assert main(["generate", str(out), "It was", "--max-new-tokens", "3"]) == 0  # batch-1 decoding: matvec path
    assert capsys.readouterr().out.startswith("It was")


def test_eval_equals_loaded_model(streamed, src):
    out, _ = streamed
    ppl = streamq.evaluate(out, src / "calib.txt", seqlen=64, max_windows=3, offload="disk", progress=False)
    assert abs(ppl - loaded_model_perplexity(out, src / "calib.txt", seqlen=64, windows=3)) / ppl < 1e-4


def test_report_bits_per_parameter_by_hand(streamed):
    out, _ = streamed
    r = report(out)
    tensors = read_all(out)
    params = outliers = 0
    bits = stored_bytes = 0.0
    for i, block in r["blocks"].items():
        for name, layer in block["layers"].items():
            full = f"model.layers.{i}.{name}"
            n = tensors[f"{full}.outlier_val"].numel()
            out_f, in_f = tensors[f"{full}.outlier_row_ptr"].numel() - 1, tensors[f"{full}.perm"].numel()
            assert layer["n_outliers"] == n and tensors[f"{full}.outlier_col"].numel() == n
            # w3 codes + 3-bit scale and zero codes per 16 weights + fp16 second-level scale/zero of both per
            # 16 x 16 weights + the int32 permutation per output row + 32 bits per outlier
            by_hand = 3 + (3 + 3) / 16 + 2 * (16 + 16) / (16 * 16) + 32 / out_f + 32 * n / (out_f * in_f)
            assert layer["bits_per_parameter"] == pytest.approx(by_hand, rel=1e-12)
            params += out_f * in_f
            outliers += n
            bits += by_hand * out_f * in_f
            stored_bytes += sum(t.numel() * t.element_size() for k, t in tensors.items()
                                if k.startswith(full + "."))
    assert r["n_outliers"] == outliers > 0
    assert r["outlier_share"] == pytest.approx(outliers / params, rel=1e-12)
    assert r["bits_per_parameter"] == pytest.approx(bits / params, rel=1e-12)
    assert r["bits_per_quantized_weight"] == pytest.approx(8 * stored_bytes / params, rel=1e-12)
    assert r["method"]["outlier_threshold"] == 0.2
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert manifest["blocks"]["1"]["layers"]["mlp.up_proj"]["n_outliers"] > 0  # resume sizes shards from these


def test_resume_after_interruption_is_byte_identical(src, tmp_path, monkeypatch):
    cfg = dict(bits=4, act_order=False, offload="disk")
    whole = file_bytes(run(src, tmp_path / "whole", **cfg))
    run_interrupted(monkeypatch, "quantize_block", lambda: run(src, tmp_path / "cut", **cfg))  # after block 0
    manifest = json.loads((tmp_path / "cut" / "streamq_manifest.json").read_text())
    assert manifest["next_block"] == 1
    plan = manifest["plan"]["units"]
    assert plan["block.0"]["end"] is not None and plan["block.1"]["end"] is None  # settled once written
    assert (tmp_path / "cut" / "model-00001-of-00003.safetensors").exists()
    problems = verify(tmp_path / "cut")  # the written block checks out; only the unfinished run is reported
    assert len(problems) == 1 and "incomplete run (1 of 2 blocks" in problems[0], problems
    assert file_bytes(run(src, tmp_path / "cut", **cfg)) == whole
    assert verify(tmp_path / "cut") == []


def test_cli_preset_default_asym_and_inf_threshold(src, tmp_path, capsys):
    out = tmp_path / "preset"
    fast = ["--calib", str(src / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    assert main(["compress", str(src), str(out), "--method", "spqr", "--preset", "near-lossless",
                 "--outlier-threshold", "0.5", *fast]) == 0
    r = report(out)
    m = r["method"]
    assert (m["bits"], m["group_size"], m["qq_scale_bits"], m["qq_zero_bits"], m["qq_groupsize"], m["act_order"],
            m["damp"], m["sym"]) == (4, 16, 3, 3, 16, True, 1.0, False)
    assert m["outlier_threshold"] == 0.5 and r["options"]["nsamples"] == 4  # explicit flags win over the preset
    # no preset: asym by default, no outliers (tau = inf, stored as "inf"), and the fingerprint round-trips
    plain = tmp_path / "plain"
    args = ["compress", str(src), str(plain), "--method", "spqr", "--bits", "4", "--group-size", "32", *fast]
    assert main(args) == 0
    q = json.loads((plain / "config.json").read_text())["quantization_config"]
    assert q["outlier_threshold"] == "inf" and q["sym"] is False
    assert report(plain)["n_outliers"] == 0 and report(plain)["method"]["outlier_threshold"] == "inf"
    before = file_bytes(plain)
    assert main(args) == 0 and file_bytes(plain) == before  # the same command finds its finished run
    model = streamq.load(plain)
    assert math.isinf(model.get_submodule("model.layers.0.mlp.up_proj").cfg.outlier_threshold)
    capsys.readouterr()
    assert main(["compress", str(src), str(tmp_path / "sym"), "--method", "spqr", "--sym", *fast]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("streamq: error:") and "--sym" in err and "asym" in err
    assert not (tmp_path / "sym" / "config.json").exists()
