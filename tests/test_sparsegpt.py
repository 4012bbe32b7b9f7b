"""SparseGPT (methods/sparsegpt.py, quant/sparsegpt.py, formats/dense.py): the solver equals a plain textbook
loop; streamed runs equal the in-memory reference, prune exactly what the mask defines, beat magnitude pruning
and prune-then-RTN on every layer; prune-only folders load and run; bad flags are one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.cli import main
from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.interrupt import Interrupted
from streamq.formats.gptq import dense_gptq, unpack_gptq
from streamq.quant.hessian import relative_output_error
from streamq.quant.rtn import rtn_quantize
from streamq.quant.sparsegpt import sparsegpt_prune
from tests.conftest import loaded_model_perplexity, make_tiny_model
from tests.reference import plain_sparsegpt, reference_sparsegpt
from tests.test_gptq import correlated_problem
from tests.test_pipeline import read_all

NS, SEQ = 6, 48

SOLVER_VARIANTS = [
    dict(bits=16),
    dict(bits=16, sparsity=0.3, block_columns=32),
    dict(bits=4, group_size=32),
    dict(bits=3, group_size=48, block_columns=32, sym=False),  # group starts mid mask block
    dict(bits=4, group_size=-1, sparsity=0.7, full_range=True),
    dict(bits=16, mask_structure="2:4"),
    dict(bits=4, group_size=32, mask_structure="2:4", block_columns=8),
    dict(bits=8, group_size=32, mask_structure="16:32", block_columns=64),
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", SOLVER_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_solver_equals_plain_loop_exactly_in_fp64(variant):
    W, H = correlated_problem()
    H[5, :] = H[:, 5] = 0  # one dead input
    cfg = QuantConfig(method="sparsegpt", **variant)
    ref = plain_sparsegpt(W, H, cfg)
    r = sparsegpt_prune(W, H, cfg).result
    assert torch.equal(r.weight, ref.weight)
    assert r.pruned == int(ref.mask.sum()) and bool((r.weight[ref.mask] == 0).all())
    if cfg.bits != 16:
        assert torch.equal(r.codes.long(), ref.codes)
        assert torch.equal(r.weight, dense_gptq(unpack_gptq_like(r)))  # codes / grids reproduce the weight


def unpack_gptq_like(r):
    from streamq.formats.gptq import GPTQTensors

    return GPTQTensors(r.codes, r.scales, r.zeros, r.g_idx)


def expected_pruned(rows: int, cols: int, cfg: QuantConfig) -> int:
    """The mask's size as the method defines it: N/M of every row, or int(sparsity * rows * width) per block."""
    n, m = (int(v) for v in cfg.mask_structure.split(":"))
    if m:
        return rows * cols * n // m
    w = cfg.block_columns
    return sum(int(rows * (min(c + w, cols) - c) * cfg.sparsity) for c in range(0, cols, w))


def magnitude_prune(W: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """W with its smallest-|w| weights zeroed: N of every M in each row, or the layer's k smallest."""
    n, m = (int(v) for v in cfg.mask_structure.split(":"))
    if m:
        groups = W.reshape(W.shape[0], -1, m)
        idx = groups.abs().topk(n, dim=2, largest=False).indices
        return groups.scatter(2, idx, 0.0).reshape(W.shape)
    k = expected_pruned(*W.shape, cfg)
    flat = W.flatten().clone()
    flat[flat.abs().argsort()[:k]] = 0
    return flat.reshape(W.shape)


def stored_weights(out, layers, bits):
    tensors = read_all(out)
    if bits == 16:
        return {n: tensors[f"{n}.weight"] for n in layers}
    return {n: dense_gptq(unpack_gptq({k: tensors[f"{n}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
                                      bits)) for n in layers}


LINEARS = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
RUNS = [dict(bits=16), dict(bits=16, mask_structure="2:4"), dict(bits=4, group_size=32),
        dict(bits=4, group_size=32, mask_structure="2:4")]


@pytest.mark.parametrize("run", RUNS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_streamed_equals_reference_with_exact_sparsity_and_lower_error(tmp_path, run):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=2)
    out = tmp_path / "o"
    streamq.compress(src, out, method="sparsegpt", calib=str(src / "calib.txt"), nsamples=NS, seqlen=SEQ,
                     progress=False, **run)
    cfg = QuantConfig(method="sparsegpt", **run)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    got = stored_weights(out, names, cfg.bits)
    _, ref, sources = reference_sparsegpt(src, tokens, cfg, follow=got)  # each layer on the streamed run's inputs
    assert set(ref) == set(names)
    report = json.loads((out / "streamq_report.json").read_text())
    n, m = (int(v) for v in cfg.mask_structure.split(":"))
    for name, r in ref.items():
        w, (W, H) = got[name].float(), sources[name]
        rows, cols = w.shape
        block, layer = name.split(".")[2], name.split(".", 3)[3]
        record = report["blocks"][block]["layers"][layer]
        # the streamed run equals the in-memory reference: same mask, same codes / fp16 weights
        same_mask = ((w == 0) == (r.weight == 0)).float().mean().item()
        assert same_mask >= 0.999, f"{name}: {same_mask:.4%} of zero positions agree"
        if cfg.bits == 16:
            close = ((w - r.weight).abs() <= 1e-3 * r.weight.abs().max()).float().mean().item()
            assert close >= 0.995, f"{name}: only {close:.4%} of weights equal the reference's"
        else:
            codes = unpack_gptq({k: read_all(out)[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")},
                                4).codes
            assert (codes == r.codes).float().mean().item() >= 0.999, name
        # exact sparsity: the report's mask size is what the method defines; every pruned weight is stored as 0
        assert record["sparsity"] == expected_pruned(rows, cols, cfg) / (rows * cols), name
        assert int((w == 0).sum()) >= expected_pruned(rows, cols, cfg)
        assert record["zero_fraction"] == (w == 0).float().mean().item()
        if cfg.bits == 16 and m == 0:
            assert int((w == 0).sum()) == expected_pruned(rows, cols, cfg), name
        if m:
            assert bool(((w.reshape(rows, -1, m) == 0).sum(dim=2) >= n).all()), f"{name}: a group of {m} has < {n} zeros"
        # Hessian-weighted layer error: below magnitude pruning (prune only) / prune-then-RTN (joint quantization)
        err = relative_output_error(W, w, H)
        if cfg.bits == 16:
            baseline = relative_output_error(W, magnitude_prune(W, cfg), H)
        else:
            pruned = sparsegpt_prune(W, H, QuantConfig(method="sparsegpt", bits=16, mask_structure=cfg.mask_structure,
                                                       sparsity=cfg.sparsity)).result.weight
            rtn = rtn_quantize(pruned, QuantConfig(method="rtn", bits=cfg.bits, group_size=cfg.group_size))
            baseline = relative_output_error(W, rtn.weight, H)
        assert err < baseline, f"{name}: error {err:.5f} not below the baseline's {baseline:.5f}"
    assert report["sparsity"] == pytest.approx(cfg.sparsity, abs=1e-3)


def test_prune_only_folder_loads_evaluates_and_generates(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1, dtype=torch.bfloat16)
    out = tmp_path / "o"
    streamq.compress(src, out, method="sparsegpt", bits=16, mask_structure="2:4", calib=str(src / "calib.txt"),
                     nsamples=4, seqlen=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"], q["sparsity_config"]["sparsity_structure"]) == \
        ("compressed-tensors", "dense", "2:4")
    tensors = read_all(out)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[q_proj].dtype == torch.float16 and (tensors[q_proj] == 0).float().mean() == 0.5
    model = streamq.load(out)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, tensors[q_proj].float())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # an ordinary fp checkpoint to transformers
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    ppl = streamq.evaluate(out, src / "calib.txt", seqlen=32, max_windows=2, progress=False)
    assert abs(ppl - loaded_model_perplexity(out, src / "calib.txt", seqlen=32, windows=2)) / ppl < 1e-3
    assert main(["generate", str(out), "Hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()  # the continuation
    assert main(["verify", str(out)]) == 0


def test_interrupted_prune_only_run_resumes_byte_identically(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1)
    kw = dict(method="sparsegpt", bits=16, calib=str(src / "calib.txt"), nsamples=4, seqlen=32, progress=False)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    streamq.compress(src, whole, **kw)
    with pytest.raises(Interrupted):
        streamq.compress(src, cut, should_stop=lambda: True, **kw)  # stops once block 1 is on disk
    assert json.loads((cut / "streamq_manifest.json").read_text())["next_block"] == 1
    streamq.compress(src, cut, **kw)
    a, b = read_all(whole), read_all(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compressed_tensors_layout_describes_the_sparsity(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    out = tmp_path / "o"
    streamq.compress(src, out, method="sparsegpt", bits=4, group_size=32, formats="compressed-tensors",
                     calib=str(src / "calib.txt"), nsamples=4, seqlen=32, progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["format"] == "pack-quantized" and q["sparsity_config"]["global_sparsity"] == 0.5
    model = streamq.load(out)
    assert (model.model.layers[0].mlp.down_proj.dequantized_weight() == 0).float().mean() >= 0.5
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers reads sparsity_config too
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags,words", [
    (["--sparsity", "1.0"], ["--sparsity 1.0", "[0, 1)"]),
    (["--sparsity", "-0.1"], ["--sparsity -0.1", "[0, 1)"]),
    (["--mask-structure", "3:2"], ["--mask-structure '3:2'", "0 < N < M"]),
    (["--mask-structure", "two:four"], ["--mask-structure 'two:four'"]),
    (["--mask-structure", "2:4", "--sparsity", "0.3"], ["--sparsity 0.3", "2:4", "N/M = 0.5"]),
    (["--mask-structure", "2:4", "--group-size", "6"], ["--group-size 6", "multiple of M = 4"]),
    (["--bits", "16", "--asym"], ["--bits 16", "--asym"]),
    (["--bits", "16", "--format", "gptq"], ["--format gptq", "--bits 16", "--format dense"]),
    (["--bits", "4", "--format", "dense"], ["--format dense", "4-bit"]),
    (["--method", "gptq", "--sparsity", "0.5"], ["--sparsity", "--method gptq", "sparsegpt"]),
    (["--method", "rtn", "--mask-structure", "2:4"], ["--mask-structure", "--method rtn"]),
    (["--method", "gptq", "--bits", "16"], ["--bits 16", "--method sparsegpt also takes 16"]),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, words):
    src = tmp_path / "missing-model"  # the flags are refused before the model is read
    out = tmp_path / "o"
    method = [] if "--method" in flags else ["--method", "sparsegpt"]
    assert main(["compress", str(src), str(out), *method, *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_defaults_follow_the_mask():
    assert QuantConfig(method="sparsegpt").sparsity == 0.5
    assert QuantConfig(method="sparsegpt", mask_structure="16:32").sparsity == 0.5
    assert QuantConfig(method="sparsegpt", mask_structure="1:4").sparsity == 0.25
    with pytest.raises(StreamqError, match="block_columns 6: must be a multiple of M = 4"):
        QuantConfig(method="sparsegpt", bits=3, group_size=32, mask_structure="2:4", block_columns=6)
