"""Mixture-of-experts models (streamq/moe.py): tiny random Mixtral, Qwen3-MoE and DeepSeek-V3 (MLA attention, a
shared expert, a dense first block), saved with one tensor per expert as HF checkpoints are. Streamed GPTQ and
RTN equal the in-memory reference on transformers' fused experts per expert (tests/reference.py
reference_quantize_moe: Hessians from the tokens the router picks), tokens per expert are reported, an expert
below --moe-min-tokens is rounded to nearest, `streamq.load` gives the reference's logits, streamed
perplexity equals transformers', an interrupted run resumes byte-identically; unsupported layouts are one line."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.errors import StreamqError
from streamq.io.blocks import build_layout, load_block
from streamq.io.checkpoint import Checkpoint
from streamq.footprint import hessian_groups
from streamq.moe import RoutedExperts
from streamq.quant.stages import sequential_passes
from tests.conftest import MOE_ARCHITECTURES, make_tiny_model, output_snapshot, run_interrupted
from tests.reference import MOE, reference_quantize_moe
from tests.test_architectures import GPTQ, NS, SEQ, compress, lazy_models
from tests.test_pipeline import assert_matches_reference

INTER = 32
ARCHS = sorted(MOE_ARCHITECTURES)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """arch -> source folder and arch -> its GPTQ output, made once per module on first use."""
    return lazy_models(tmp_path_factory.mktemp("moe"), inter=INTER)


def reference(src, **cfg):
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    return reference_quantize_moe(src, tokens, streamq.QuantConfig(**cfg))


def expert_tokens(out) -> dict[str, int]:
    """Checkpoint-named expert Linear -> tokens routed to it, from the report."""
    report = json.loads((out / "streamq_report.json").read_text())
    layout = build_layout(Checkpoint(out))
    return {layout.source_name(f"{layout.block_prefix(int(i))}{n}.weight")[:-len(".weight")]: r["tokens"]
            for i, b in report["blocks"].items() for n, r in b["layers"].items() if r["tokens"] is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_unfused_equal_transformers_fused_forward(built, arch):
    """The per-expert stand-in computes what transformers' fused experts module computes."""
    src = built[0](arch)
    ckpt = Checkpoint(src)
    layout = build_layout(ckpt)
    block = load_block(layout, ckpt, 1, torch.device("cpu"), torch.float32)
    moe_name = MOE[arch][1]
    assert isinstance(block.get_submodule(moe_name).experts, RoutedExperts)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).model.layers[1].get_submodule(moe_name)
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        torch.testing.assert_close(block.get_submodule(moe_name)(x), ref(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_streamed_equals_reference_per_expert(built, one_thread, arch):
    src, out = built[0](arch), built[1](arch)
    _, ref, counts = reference(src, **GPTQ)
    n_experts = 4
    assert sum(".experts." in n for n in ref) == 3 * n_experts * (1 if arch == "deepseek_v3" else 2)
    assert_matches_reference(out, ref, 4)
    assert expert_tokens(out) == counts
    # the router is copied unquantized; expert tensors keep the checkpoint's per-expert names (vLLM's loader)
    names = Checkpoint(out).tensors
    moe_ckpt, (gate, _, _) = MOE[arch][2], MOE[arch][3]
    assert f"model.layers.1.{moe_ckpt}.experts.3.{gate}.qweight" in names
    assert f"model.layers.1.{moe_ckpt}.gate.weight" in names


def test_min_tokens_experts_rounded_to_nearest_and_listed(built, one_thread, tmp_path, caplog):
    """With --moe-min-tokens between the experts' token counts, the experts below it equal RTN (identity
    Hessian) in the reference and in the run, and the run's report warns for exactly those."""
    src = built[0]("qwen3_moe")
    counts = expert_tokens(built[1]("qwen3_moe"))
    threshold = sorted(set(counts.values()))[len(set(counts.values())) // 2]
    cfg = dict(GPTQ, moe_min_tokens=threshold)
    out = compress(src, tmp_path / "min", **cfg)
    _, ref, ref_counts = reference(src, **cfg)
    assert_matches_reference(out, ref, 4)
    report = json.loads((out / "streamq_report.json").read_text())
    warned = {n for b in report["blocks"].values() for n, r in b["layers"].items() if "moe-min-tokens" in r["warning"]}
    below = {n for b in report["blocks"].values() for n, r in b["layers"].items()
             if r["tokens"] is not None and r["tokens"] < threshold}
    assert warned == below and 0 < len(below) < len(counts)


def test_all_tokens_calibration_equals_reference(built, one_thread, tmp_path):
    """--moe-all-tokens: every expert's Hessian over every calibration token (the reference's too), reported
    as such; block 0's outputs stay the model's (block 1, solved on them, still equals the reference)."""
    src = built[0]("mixtral")
    cfg = dict(GPTQ, moe_all_tokens=True)
    out = compress(src, tmp_path / "all", **cfg)
    _, ref, counts = reference(src, **cfg)
    assert_matches_reference(out, ref, 4)
    assert set(expert_tokens(out).values()) == {NS * SEQ} == set(counts.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_streamed_equals_reference_and_loads_to_its_logits(built, one_thread, tmp_path, arch):
    src = built[0](arch)
    cfg = dict(method="rtn", bits=4, group_size=32, sym=False)
    out = compress(src, tmp_path / "rtn", **cfg)
    ref_model, ref, _ = reference(src, **cfg)
    assert_matches_reference(out, ref, 4)
    model = streamq.load(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert isinstance(streamq.loading.generate(out, "It is a truth", max_new_tokens=3), str)


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_output_loads_to_reference_logits_and_perplexity_equals_transformers(built, one_thread, arch):
    src, out = built[0](arch), built[1](arch)
    ref_model, _, _ = reference(src, **GPTQ)
    ids = torch.tensor(AutoTokenizer.from_pretrained(src)((src / "calib.txt").read_text()[:4000],
                                                          add_special_tokens=False).input_ids[:2 * 48]).view(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(streamq.load(out)(ids).logits, ref_model(ids).logits, rtol=2e-3, atol=2e-3)
        source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        logits = source(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    expected = torch.exp(nll).item()
    got = streamq.evaluate(src, src / "calib.txt", seqlen=48, max_windows=2, progress=False)
    assert abs(got - expected) / expected < 1e-5


def test_expert_groups_share_two_hessian_passes(built, tmp_path, monkeypatch):
    """Whole-block path (experts not streamed): every expert's gate/up is one Hessian pass, every expert's down
    the next (not two passes per expert). Streamed (the default): the routed experts are one leaf, one pass."""
    import streamq.blockwork as blockwork
    import streamq.quant.block as qblock

    passes, traces, real = [], [], qblock.plan
    monkeypatch.setattr(qblock, "plan", lambda t, *a: traces.append(t) or passes.append(real(t, *a).passes)
                        or real(t, *a))
    src = built[0]("mixtral")
    run = lambda out: streamq.compress(src, tmp_path / out, calib=str(src / "calib.txt"), nsamples=1,  # noqa: E731
                                       seqlen=SEQ, progress=False, **GPTQ)
    run("streamed")
    attention = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert [[n for g in p for n in g] for p in passes[1]] == [*attention, ["mlp.experts"]]
    passes.clear(), traces.clear()
    monkeypatch.setattr(blockwork, "streams_experts", lambda cfg: False)
    run("whole")
    flat = [[n for g in p for n in g] for p in passes[1]]
    assert flat == [*attention, [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("w1", "w3")],
                    [f"mlp.experts.{e}.w2" for e in range(4)]]
    # within a Hessian budget of two experts' gate/up (fp32 [64, 64] each) and three downs ([32, 32])
    capped = [[n for g in p for n in g] for p in sequential_passes(traces[1], budget=2 * 4 * 64 ** 2)]
    assert capped[2:] == [[f"mlp.experts.{e}.{p}" for e in es for p in ("w1", "w3")] for es in ((0, 1), (2, 3))] \
        + [[f"mlp.experts.{e}.w2" for e in range(4)]]
    # the planner counts the same passes (at most the budget of Hessians in one)
    groups = hessian_groups({n: (32, 64) if n.endswith(("w1", "w3")) else (64, 32) for g in flat[2:] for n in g}, True)
    assert groups == flat[2:]


def test_interrupted_resumes_byte_identical(built, one_thread, tmp_path, monkeypatch):
    src, out = built[0]("deepseek_v3"), built[1]("deepseek_v3")
    run_interrupted(monkeypatch, "quantize_block", lambda: compress(src, tmp_path / "cut", **GPTQ))
    compress(src, tmp_path / "cut", **GPTQ)
    resumed, whole = output_snapshot(tmp_path / "cut"), output_snapshot(out)
    reports = [json.loads(snap.pop("streamq_report.json")) for snap in (resumed, whole)]
    means = [r.pop("mean_layer_error") for r in reports]
    assert resumed == whole and reports[0] == reports[1] and means[0] == pytest.approx(means[1], rel=1e-12)


def test_fused_expert_checkpoint_is_one_line_error(tmp_path):
    """A checkpoint holding transformers' fused expert tensors (not one per expert) is refused in one line."""
    from safetensors.torch import save_file

    src = make_tiny_model(tmp_path / "m", "qwen3_moe", n_layers=1, shards=1, inter=INTER)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    model.config.save_pretrained(fused)
    with pytest.raises(StreamqError, match=r"stores model\.layers\.0\.mlp\.experts\.gate_up_proj fused") as e:
        build_layout(Checkpoint(fused))
    assert "\n" not in str(e.value)


def test_unsupported_experts_layout_is_one_line_error(tmp_path, monkeypatch):
    """An experts module outside the one layout streamq computes (here: marked transposed) is refused in one line."""
    src = make_tiny_model(tmp_path / "m", "mixtral", n_layers=1, shards=1, inter=INTER)
    import streamq.moe as moe

    real = moe._check_layout

    def transposed(module, where):
        module.is_transposed = True
        return real(module, where)

    monkeypatch.setattr(moe, "_check_layout", transposed)
    with pytest.raises(StreamqError, match="unsupported MoE experts layout MixtralExperts .*is_transposed=True"):
        build_layout(Checkpoint(src))


def test_inspect_lists_experts_and_compressed_tensors_export_loads(built, one_thread, tmp_path):
    """`streamq inspect` traces an MoE block on the meta device (no routing there) and lists every expert's
    Linears in their passes; the GPTQ folder exported to compressed-tensors loads to the same logits."""
    from streamq.formats.export import export
    from streamq.inspect import inspect_model

    src, out = built[0]("mixtral"), built[1]("mixtral")
    report = inspect_model(src)
    names = [lin["name"] for group in report["blocks"][0] for lin in group]
    assert {f"mlp.experts.{e}.{p}" for e in range(4) for p in ("w1", "w2", "w3")} <= set(names)
    ct = export(out, "compressed-tensors", tmp_path / "ct")
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(streamq.load(ct)(ids).logits, streamq.load(out)(ids).logits)
    assert any(".block_sparse_moe.experts.3.w2." in n for n in Checkpoint(ct).tensors)
