"""compress(): streamed results equal the in-memory reference; outputs load, evaluate and run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.formats.gptq import unpack_gptq
from tests.conftest import assert_loads_to_engine_weights, loaded_model_perplexity, make_tiny_model
from tests.reference import reference_quantize

NS, SEQ = 6, 48


def read_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def run_both(tmp_path, arch: str, method: str, **cfg):
    src = make_tiny_model(tmp_path / arch, arch, n_layers=2, shards=3)
    out = tmp_path / f"{arch}-{method}"
    streamq.compress(src, out, method=method, calib=str(src / "calib.txt"), nsamples=NS, seqlen=SEQ,
                     shard_size=60_000, progress=False, **cfg)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    ref_model, ref, errors = reference_quantize(src, tokens, streamq.QuantConfig(method=method, **cfg))
    return src, out, ref_model, ref, errors


def assert_matches_reference(out, ref, bits):
    tensors = read_all(out)
    assert len(ref) > 0
    for name, r in ref.items():
        got = unpack_gptq({k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, bits)
        same = (got.codes == r.codes.to(torch.int32)).float().mean().item()
        assert same >= 0.999, f"{name}: only {same:.4%} of codes equal the reference"
        torch.testing.assert_close(got.scales, r.scales, rtol=1e-3, atol=1e-6)
        assert torch.equal(got.g_idx, r.g_idx.to(torch.int32))


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
def test_streamed_gptq_equals_in_memory_reference(tmp_path, arch):
    _, out, _, ref, errors = run_both(tmp_path, arch, "gptq", bits=4, group_size=32)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # really sharded
    assert_matches_reference(out, ref, 4)
    # GPTQ reduces the output error of every layer against RTN on the same calibration inputs
    worse = {n: e for n, e in errors.items() if e[0] >= e[1]}
    assert not worse, f"GPTQ not better than RTN on {worse}"


def test_streamed_rtn_equals_reference(tmp_path):
    _, out, _, ref, _ = run_both(tmp_path, "llama", "rtn", bits=3, group_size=32, sym=False)
    assert_matches_reference(out, ref, 3)


def test_act_order_output_loads_and_matches_fake_quant_logits(tmp_path, monkeypatch):
    import streamq.pipeline as pipeline

    engine = {}  # the engine's own fake-quantized weights, recorded as blocks are packed
    original = pipeline.block_tensors

    def record(layout, ckpt, i, results, cfg, *fmt):
        engine.update({f"{layout.block_prefix(i)}{n}": r.weight.clone() for n, (r, _) in results.items()})
        return original(layout, ckpt, i, results, cfg, *fmt)

    monkeypatch.setattr(pipeline, "block_tensors", record)
    src, out, ref_model, ref, _ = run_both(tmp_path, "llama", "gptq", bits=4, group_size=16, act_order=True)
    assert_matches_reference(out, ref, 4)
    assert set(engine) == set(ref)
    assert_loads_to_engine_weights(out, engine, ref_model)


def test_output_folder_layout(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=2, tie=True)
    out = streamq.compress(src, tmp_path / "o", bits=8, group_size=-1, calib=str(src / "calib.txt"), nsamples=4,
                           seqlen=32, shard_size=50_000, progress=False)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["static_groups"], q["sym"],
            q["checkpoint_format"]) == ("gptq", 8, -1, False, True, True, "gptq")  # act-order + static (defaults): desc_act false
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_all(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (out / "tokenizer.json").exists() and (out / "streamq_report.json").exists()
    assert "lm_head.weight" not in tensors  # tied: like the source, written once
    source = read_all(src)
    emb = "model.embed_tokens.weight"
    assert torch.equal(tensors[emb], source[emb])  # copied unchanged, whichever shard holds it
    q_proj = "model.layers.1.self_attn.q_proj"
    assert tensors[f"{q_proj}.qweight"].dtype == torch.int32 and tensors[f"{q_proj}.scales"].dtype == torch.float16
    assert tensors[f"{q_proj}.qweight"].shape == (64 * 8 // 32, 64) and tensors[f"{q_proj}.g_idx"].shape == (64,)
    report = json.loads((out / "streamq_report.json").read_text())
    assert len(report["blocks"]) == 2 and report["peak_rss_bytes"] > 0
    assert 8.0 < report["bits_per_quantized_weight"] < 9.0
    # the OUTPUT loads: its embedding is the source's, every Linear dequantizes to within 8-bit error of the
    # source weight, and its logits follow the source model's
    model, ref = streamq.load(out), AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert torch.equal(model.get_input_embeddings().weight, source[emb])
    for name in [n for n in tensors if n.endswith(".qweight")]:
        w, dq = source[name.replace("qweight", "weight")], model.get_submodule(name[:-8]).dequantized_weight()
        assert (dq - w).norm() / w.norm() < 0.02, name
    ids = torch.randint(0, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).norm() / want.norm() < 0.05


def test_streaming_perplexity_equals_transformers(tmp_path):
    src = make_tiny_model(tmp_path / "m", "qwen3", n_layers=3, shards=2)
    ppl = streamq.evaluate(src, src / "calib.txt", seqlen=64, max_windows=5, progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(src)((src / "calib.txt").read_text(), add_special_tokens=False).input_ids
    ids = torch.tensor(ids[: 5 * 64]).view(5, 64)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, model.config.vocab_size),
                                                ids[:, 1:].reshape(-1))
    assert abs(ppl - torch.exp(nll).item()) / ppl < 1e-4


def test_eval_of_compressed_folder_equals_loaded_model(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1)
    out = streamq.compress(src, tmp_path / "o", bits=3, group_size=32, calib=str(src / "calib.txt"), nsamples=4,
                           seqlen=32, progress=False)
    ppl = streamq.evaluate(out, src / "calib.txt", seqlen=64, max_windows=3, offload="disk", progress=False)
    assert abs(ppl - loaded_model_perplexity(out, src / "calib.txt", seqlen=64, windows=3)) / ppl < 1e-4


def test_rerun_of_finished_folder_removes_a_stale_manifest_temporary(tmp_path):
    """A run killed while renaming the manifest's temporary into place leaves it; the next run in that folder
    (here: over a finished one, which returns early) removes it and leaves the output as it was."""
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1)
    out = streamq.compress(src, tmp_path / "o", method="rtn", bits=4, group_size=32, progress=False)
    before = read_all(out)
    (out / "streamq_manifest.json.tmp").write_text("{torn")
    streamq.compress(src, out, method="rtn", bits=4, group_size=32, progress=False)
    assert not (out / "streamq_manifest.json.tmp").exists()
    after = read_all(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
