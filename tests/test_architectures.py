"""Every covered architecture family, each a tiny random-weight model built from its real transformers config
class (conftest.ARCHITECTURES: 2 blocks, 3 safetensors shards, biases and norm weights drawn at random,
sliding windows shorter than the sequences): GPTQ and RTN equal the in-memory reference (which lists each
family's blocks and groups by hand, as `streamq inspect` must find them), streamed perplexity equals
transformers' own, `streamq.load` gives the fake-quantized reference's logits and greedy continuation, and a
run interrupted in block 1 resumes byte-identically. Plus the one-line refusals of what cannot be streamed."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamq
from streamq.calib.capture import traced_forward
from streamq.calib.data import calibration_windows
from streamq.errors import StreamqError
from streamq.inspect import TESTED, inspect_model
from streamq.io.blocks import ModelLayout, build_layout, check_own_state, find_blocks
from streamq.io.checkpoint import Checkpoint
from streamq.loading import generate
from tests.conftest import ARCHITECTURES, make_tiny_model, output_snapshot, run_interrupted
from tests.reference import BLOCKS, SEQUENTIAL, reference_quantize
from tests.test_pipeline import assert_matches_reference

NS, SEQ = 4, 32  # calibration windows longer than the tiny models' sliding windows (24)
EVAL_SEQ, EVAL_WINDOWS = 48, 2
ARCHS = sorted(ARCHITECTURES)
GPTQ = dict(method="gptq", bits=4, group_size=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> source folder, and arch -> its GPTQ output, made once per module on first use."""
    return lazy_models(tmp_path_factory.mktemp("archs"))


def lazy_models(root, **model_kw):
    """(source, gptq): arch -> its tiny model (make_tiny_model(..., **model_kw)) / its GPTQ output under root,
    each made on first use."""
    sources, outputs = {}, {}

    def source(arch):
        if arch not in sources:
            sources[arch] = make_tiny_model(root / arch, arch, n_layers=2, shards=3, vary_1d=True, **model_kw)
        return sources[arch]

    def gptq(arch):
        if arch not in outputs:
            outputs[arch] = compress(source(arch), root / f"{arch}-gptq", **GPTQ)
        return outputs[arch]

    return source, gptq


def compress(src, out, **cfg):
    return streamq.compress(src, out, calib=str(src / "calib.txt"), nsamples=NS, seqlen=SEQ, shard_size=40_000,
                            progress=False, **cfg)


def reference(src, **cfg):
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    model, results, _ = reference_quantize(src, tokens, streamq.QuantConfig(**cfg))
    return model, results


def full_model_perplexity(model, src) -> float:
    """transformers' own: the whole model on EVAL_WINDOWS non-overlapping windows of calib.txt."""
    ids = AutoTokenizer.from_pretrained(src)((src / "calib.txt").read_text(), add_special_tokens=False).input_ids
    ids = torch.tensor(ids[: EVAL_WINDOWS * EVAL_SEQ]).view(EVAL_WINDOWS, EVAL_SEQ)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return torch.exp(nll).item()


def streamed_perplexity(folder, src) -> float:
    return streamq.evaluate(folder, src / "calib.txt", seqlen=EVAL_SEQ, max_windows=EVAL_WINDOWS, progress=False)


def test_tested_list_is_this_files():
    assert TESTED == tuple(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_and_plan_find_blocks_and_groups_by_structure(built, arch):
    """The block list and true-sequential groups streamq traces equal the ones read off transformers' code
    (tests/reference.py); plan sizes the same Linears."""
    src = built[0](arch)
    report = inspect_model(src)
    model_type = report["model_type"]
    assert report["tested"] and report["n_blocks"] == 2
    assert report["blocks_path"] == BLOCKS.get(model_type, BLOCKS["default"])
    expected = SEQUENTIAL.get(model_type, SEQUENTIAL["default"])
    for block in report["blocks"]:
        assert [[lin["name"] for lin in group] for group in block] == expected
    linears = {lin["name"]: tuple(lin["shape"]) for group in report["blocks"][0] for lin in group}
    plan = streamq.plan(src, nsamples=NS, seqlen=SEQ, benchmark=False, **GPTQ)
    assert plan.n_blocks == 2
    assert linears[plan.blocks[0].largest_linear] == plan.blocks[0].largest_linear_shape


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_streamed_equals_in_memory_reference(built, one_thread, arch):
    src, out = built[0](arch), built[1](arch)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    _, ref = reference(src, **GPTQ)
    assert len(ref) == 2 * len(build_layout(Checkpoint(src)).block_linears(0))
    assert_matches_reference(out, ref, 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_streamed_equals_reference_and_loads_to_its_logits(built, one_thread, tmp_path, arch):
    src = built[0](arch)
    cfg = dict(method="rtn", bits=3, group_size=32, sym=False)
    out = compress(src, tmp_path / "rtn", **cfg)
    ref_model, ref = reference(src, **cfg)
    assert_matches_reference(out, ref, 3)
    model = streamq.load(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))  # longer than the sliding windows
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-4, atol=1e-4)
    # generate (with the KV cache) continues as the fake-quantized reference does, greedily
    tok = AutoTokenizer.from_pretrained(src)
    prompt = tok("It is a truth universally", return_tensors="pt", add_special_tokens=False).input_ids
    ref_ids = ref_model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generate(out, "It is a truth universally", max_new_tokens=6) == \
        tok.decode(ref_ids[0, prompt.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_perplexity_equals_transformers(built, one_thread, arch):
    src, out = built[0](arch), built[1](arch)
    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected = full_model_perplexity(source, src)
    assert abs(streamed_perplexity(src, src) - expected) / expected < 1e-5
    expected = full_model_perplexity(streamq.load(out), src)  # the compressed folder, streamed and whole
    assert abs(streamed_perplexity(out, src) - expected) / expected < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_interrupted_in_block_1_resumes_byte_identical(built, one_thread, tmp_path, monkeypatch, arch):
    src, out = built[0](arch), built[1](arch)
    run_interrupted(monkeypatch, "quantize_block", lambda: compress(src, tmp_path / "cut", **GPTQ))
    manifest = json.loads((tmp_path / "cut" / "streamq_manifest.json").read_text())
    assert manifest["next_block"] == 1 and not manifest["complete"]
    compress(src, tmp_path / "cut", **GPTQ)
    resumed, whole = output_snapshot(tmp_path / "cut"), output_snapshot(out)
    # the report's mean over layers is summed in manifest order, which a resume changes (last-ulp differences;
    # the deterministic aggregate is the `fresh` branch's streamq/report.py): compared to 1e-12 here
    reports = [json.loads(snap.pop("streamq_report.json")) for snap in (resumed, whole)]
    means = [r.pop("mean_layer_error") for r in reports]
    assert resumed == whole and reports[0] == reports[1] and means[0] == pytest.approx(means[1], rel=1e-12)


# --- what cannot be streamed: one line naming what is missing ---

def edited_model(built, tmp_path, **changes):
    """The llama model's files with config.json fields changed."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(built[0]("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_model_type_unknown_to_transformers(built, tmp_path):
    with pytest.raises(StreamqError, match="model type 'nosuchnet' is unknown to transformers"):
        build_layout(Checkpoint(edited_model(built, tmp_path, model_type="nosuchnet")))


def test_model_type_without_causal_lm(built, tmp_path):
    with pytest.raises(StreamqError, match="'t5' has no causal language model class"):
        build_layout(Checkpoint(edited_model(built, tmp_path, model_type="t5")))


class _Block(nn.Module):
    def __init__(self, linear=None):
        super().__init__()
        self.proj = linear or nn.Linear(8, 8)

    def forward(self, hidden_states, scale=1.0):
        return self.proj(hidden_states) * scale


class _Toy(nn.Module):
    """A decoder whose forward is chosen by the test: how it calls its blocks."""

    def __init__(self, blocks, run):
        super().__init__()
        self.embed, self.layers, self.run = nn.Embedding(10, 8), nn.ModuleList(blocks), run

    def forward(self, input_ids):
        return self.run(self, self.embed(input_ids))


def toy_layout(run, blocks=None) -> ModelLayout:
    toy = _Toy(blocks or [_Block(), _Block()], run)
    return ModelLayout(None, toy, toy, toy.layers, "layers.", "", toy, "layers")


def straight(toy, h):
    for i, block in enumerate(toy.layers):
        h = block(h, scale=float(i + 1))
    return h


def test_toy_decoder_traced_per_block():
    layout = toy_layout(straight)
    trace, _ = traced_forward(layout, lambda: layout.model(torch.zeros(1, 3, dtype=torch.long)))
    assert trace.kwargs == [{"scale": 1.0}, {"scale": 2.0}] and trace.hidden.shape == (1, 3, 8)


@pytest.mark.parametrize("run, message", [
    (lambda toy, h: toy.layers[1](toy.layers[0](h) * 2), "changes the hidden states between blocks 0 and 1"),
    (lambda toy, h: toy.layers[0](toy.layers[0](h)), r"calls \[0, 0\]"),
    (lambda toy, h: h, "never calls them"),
])
def test_blocks_that_cannot_be_streamed(run, message):
    layout = toy_layout(run)
    with pytest.raises(StreamqError, match=message):
        traced_forward(layout, lambda: layout.model(torch.zeros(1, 3, dtype=torch.long)))


def test_blocks_sharing_state():
    shared = nn.Linear(8, 8)
    toy = _Toy([_Block(shared), _Block(shared)], straight)
    with pytest.raises(StreamqError, match=r"blocks share state \(layers.1.proj.weight is also layers.0.proj.weight\)"):
        check_own_state(toy, "layers", toy.layers, "toy")


def test_block_count_checked_against_config():
    toy = _Toy([_Block(), _Block()], straight)
    assert find_blocks(toy, 2, "toy")[0] == "layers"
    with pytest.raises(StreamqError, match="holds 2 _Block but num_hidden_layers is 3"):
        find_blocks(toy, 3, "toy")
