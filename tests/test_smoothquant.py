"""SmoothQuant (streamq/quant/smooth.py) and activation quantization (streamq/quant/actquant.py): the fold leaves the
fp block unchanged, the scales follow the reference formula, smoothing lowers W8A8 error on a model with
activation outliers, static / KV-cache scales equal the calibrated absmax over 127 (448 for fp8) computed here
from a plain transformers model, streamq.load and eval fake-quantize activations as an independent reference
does, and bad flags are one-line errors."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.cli import main
from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.forward import run_block
from streamq.quant.actquant import fake_quantized
from streamq.quant.block import quantize_block
from streamq.quant.smooth import find_mappings, smooth_block
from tests.conftest import make_tiny_model
from tests.reference import load_with_block0_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
NS, SEQ = 4, 32
OUTLIERS = [3, 17, 40]  # hidden channels whose norm weights are scaled 50x: activation outliers


def make_outlier_model(folder, arch: str = "llama"):
    """A tiny model whose norms put 50x outliers on a few hidden channels of every Linear group's input."""
    src = make_tiny_model(folder, arch, n_layers=2, shards=1, vary_1d=True)
    state = load_file(src / "model.safetensors")
    for name, t in state.items():
        if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
            t[OUTLIERS] *= 50
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def windows(src, n=NS, seqlen=SEQ):
    return calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), n, seqlen)


def channel_absmax(block, name: str, inputs, kw) -> torch.Tensor:
    """max |input_j| of Linear `name` over every token of every input (the test's own hook)."""
    seen = []
    h = block.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax((0, 1))))
    with torch.no_grad():
        for x in inputs:
            run_block(block, x, kw)
    h.remove()
    return torch.stack(seen).amax(0)


EXPECTED_MAPPINGS = {
    "llama": {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]},
    "opt": {"self_attn_layer_norm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "final_layer_norm": ["fc1"]},
}


@pytest.mark.parametrize("arch", EXPECTED_MAPPINGS)
def test_fold_leaves_fp_block_output_unchanged(arch, tmp_path):
    src = make_tiny_model(tmp_path / arch, arch, n_layers=1, shards=1, vary_1d=True)
    _, layers, _, inputs, kws = load_with_block0_inputs(src, windows(src))
    block, kw = layers[0], kws[0]
    mappings = find_mappings(block, inputs[0], kw)
    assert {m.norm: sorted(m.linears) for m in mappings} == {k: sorted(v) for k, v in EXPECTED_MAPPINGS[arch].items()}
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    with torch.no_grad():
        reference = [run_block(block, x, kw) for x in inputs]
        folded = smooth_block(block, lambda: iter(inputs), kw, 0.5, CPU)
        after = [run_block(block, x, kw) for x in inputs]
    norm_params = {f"{n}.{k}" for n in EXPECTED_MAPPINGS[arch] for k, _ in block.get_submodule(n).named_parameters()}
    assert set(folded) == norm_params  # weight (and OPT's LayerNorm bias)
    for name in norm_params | {f"{lin}.weight" for group in EXPECTED_MAPPINGS[arch].values() for lin in group}:
        assert not torch.allclose(block.get_parameter(name), before[name]), name  # the fold changed it
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight") if arch == "llama" else ("fc2.weight",):
        assert torch.equal(block.get_parameter(name), before[name])  # no norm in front: untouched
    for y, ref in zip(after, reference):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_norms_that_do_not_fold_are_left_alone(tmp_path):
    """Gemma's norms compute (1 + w) * x: dividing w by s is not a fold, so the check undoes it and warns."""
    src = make_tiny_model(tmp_path / "g", "gemma2", n_layers=1, shards=1, vary_1d=True)
    _, layers, _, inputs, kws = load_with_block0_inputs(src, windows(src))
    block, kw = layers[0], kws[0]
    assert {m.norm for m in find_mappings(block, inputs[0], kw)} == {"input_layernorm", "pre_feedforward_layernorm"}
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    with pytest.warns(UserWarning, match="left unsmoothed"):
        assert smooth_block(block, lambda: iter(inputs), kw, 0.5, CPU) == {}
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_scales_follow_the_reference_formula(alpha, tmp_path):
    src = make_outlier_model(tmp_path / "m")
    _, layers, _, inputs, kws = load_with_block0_inputs(src, windows(src))
    block = layers[0]
    act = channel_absmax(block, "self_attn.q_proj", inputs, kws[0])
    w = torch.cat([block.get_submodule(f"self_attn.{p}_proj").weight.detach() for p in "qkv"]).abs().amax(0)
    s = (act.pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)  # smoothquant smooth.py
    norm = block.input_layernorm.weight.detach().clone()
    q = block.self_attn.q_proj.weight.detach().clone()
    folded = smooth_block(block, lambda: iter(inputs), kws[0], alpha, CPU)
    torch.testing.assert_close(folded["input_layernorm.weight"], norm / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(block.self_attn.q_proj.weight, q * s, rtol=1e-6, atol=0)
    assert s[OUTLIERS].min() > 5 * s.median()  # the outlier channels are the ones scaled down


def test_w8a8_block_error_is_lower_with_smoothing(tmp_path):
    """On the outlier model, int8 per-token activations + int8 per-channel weights (RTN): the block's output error
    against the fp block drops with SmoothQuant (alpha 0.5)."""
    src = make_outlier_model(tmp_path / "m")
    _, layers, _, inputs, kws = load_with_block0_inputs(src, windows(src))
    cfg = QuantConfig(method="rtn", bits=8, group_size=-1, act_bits=8)
    errors = {}
    for i, (layer, kw) in enumerate(zip(layers, kws)):
        with torch.no_grad():
            reference = [run_block(layer, x, kw) for x in inputs]
        for alpha in (None, 0.5):
            block = copy.deepcopy(layer)
            if alpha is not None:
                smooth_block(block, lambda: iter(inputs), kw, alpha, CPU)
            quantize_block(block, None, kw, cfg, CPU)
            with torch.no_grad(), fake_quantized(block, cfg, {}):
                out = [run_block(block, x, kw) for x in inputs]
            errors[i, alpha] = (sum((o - r).pow(2).sum() for o, r in zip(out, reference))
                                / sum(r.pow(2).sum() for r in reference)).item()
        inputs = reference
        assert errors[i, 0.5] < 0.5 * errors[i, None], errors


# --- the pipeline: static activation / KV-cache scales against a plain transformers model ---------------------

def reference_model(src, out):
    """transformers' model of the source with every block tensor taken from the output folder: int8 W8A8
    weights dequantized here as weight * weight_scale, the folded norms as written."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stored = load_file(out / "model.safetensors") if (out / "model.safetensors").exists() else {
        k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"{name}_scale" in stored and stored[name].dtype == torch.int8:
                p.copy_(stored[name].float() * stored[f"{name}_scale"].float())
            elif name in stored:
                p.copy_(stored[name].float())
    return model, stored


def kv_linears(model):
    return {n: m for n, m in model.named_modules() if n.endswith(("k_proj", "v_proj"))}


def block_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


RUNS = {  # name -> compress keyword arguments beyond W8A8's
    "gptq-static-int8kv": dict(method="gptq", act_dynamic=False, kv_cache="int8", smooth_alpha=0.5),
    "rtn-static-fp8kv": dict(method="rtn", act_dynamic=False, kv_cache="fp8", smooth_alpha=0.5),
    "gptq-dynamic": dict(method="gptq"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    src = make_outlier_model(root / "src")
    outs = {name: streamq.compress(src, root / name, bits=8, group_size=-1, act_bits=8, formats="compressed-tensors",
                                   calib=str(src / "calib.txt"), nsamples=NS, seqlen=SEQ, progress=False, **kw)
            for name, kw in RUNS.items()}
    return src, outs


@pytest.mark.parametrize("name", ["gptq-static-int8kv", "rtn-static-fp8kv"])
def test_static_and_kv_scales_equal_calibrated_absmax(runs, name):
    src, outs = runs
    out = outs[name]
    model, stored = reference_model(src, out)
    kv_max = {"int8": 127.0, "fp8": 448.0}[RUNS[name]["kv_cache"]]
    absmax = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: absmax.__setitem__(
        f"{n}.input_scale", max(absmax.get(f"{n}.input_scale", 0.0), a[0].abs().max().item())))
        for n, m in block_linears(model).items()]
    hooks += [m.register_forward_hook(lambda m, a, o, n=n: absmax.__setitem__(
        n.replace("_proj", "_scale"), max(absmax.get(n.replace("_proj", "_scale"), 0.0), o.abs().max().item())))
        for n, m in kv_linears(model).items()]
    tokens = windows(src)
    with torch.no_grad():
        for j in range(len(tokens)):  # one window at a time, as the pipeline streams them
            model(tokens[j:j + 1], use_cache=False)
    for h in hooks:
        h.remove()
    assert len(absmax) == 2 * (7 + 2)
    for key, m in absmax.items():
        top = kv_max if key.endswith(("k_scale", "v_scale")) else 127.0
        assert stored[key].dtype == torch.float32 and stored[key].shape == (1,), key
        torch.testing.assert_close(stored[key], torch.tensor([m / top]), rtol=1e-5, atol=0, msg=key)


def test_smoothing_writes_the_folded_norms(runs):
    """Block 0's folded input norm equals the source's over s computed here from the fp embeddings; every mapped
    norm of the output differs from the source's, the others (none here) and the embeddings do not."""
    src, outs = runs
    model, stored = reference_model(src, outs["gptq-static-int8kv"])
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens, seen = windows(src), []
    h = fp.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax((0, 1))))
    with torch.no_grad():
        for j in range(len(tokens)):
            fp(tokens[j:j + 1], use_cache=False)
    h.remove()
    attn = fp.model.layers[0].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0).clamp(min=1e-5)
    s = (torch.stack(seen).amax(0).pow(0.5) / w.pow(0.5)).clamp(min=1e-5)
    torch.testing.assert_close(stored["model.layers.0.input_layernorm.weight"],
                               fp.model.layers[0].input_layernorm.weight.detach() / s, rtol=1e-5, atol=0)
    source = load_file(src / "model.safetensors")
    for name in source:
        if "layernorm" in name and name.startswith("model.layers."):
            assert not torch.equal(stored[name], source[name]), name
    assert torch.equal(stored["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert torch.equal(stored["model.norm.weight"], source["model.norm.weight"])


def fake_quant_reference(model, stored, cfg: dict):
    """Hooks on the reference model doing vLLM's int8 / fp8 arithmetic, written out here."""
    def int8(x, s):
        return (x / s).round().clamp(-128, 127) * s

    hooks = []
    for n, m in block_linears(model).items():
        if cfg.get("act_dynamic", True):
            hooks.append(m.register_forward_pre_hook(
                lambda m, a: (int8(a[0], a[0].abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127),)))
        else:
            hooks.append(m.register_forward_pre_hook(lambda m, a, s=stored[f"{n}.input_scale"]: (int8(a[0], s),)))
    for n, m in kv_linears(model).items() if cfg.get("kv_cache") else ():
        s = stored[n.replace("_proj", "_scale")]
        if cfg["kv_cache"] == "fp8":
            hooks.append(m.register_forward_hook(
                lambda m, a, o, s=s: (o / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s))
        else:
            hooks.append(m.register_forward_hook(lambda m, a, o, s=s: int8(o, s)))
    return hooks


@pytest.mark.parametrize("name", RUNS)
def test_load_and_eval_fake_quantize_like_the_reference(runs, name):
    src, outs = runs
    out = outs[name]
    model, stored = reference_model(src, out)
    ids = windows(src, 2, 48)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        hooks = fake_quant_reference(model, stored, RUNS[name])
        reference = model(ids, use_cache=False).logits
        ours = streamq.load(out)(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (reference - plain).abs().max() > 1e-3  # activation quantization changed something
    text = src / "calib.txt"
    ppl = streamq.evaluate(out, text, seqlen=48, max_windows=2, progress=False)
    tokens = AutoTokenizer.from_pretrained(src)(text.read_text()[:20000], add_special_tokens=False).input_ids
    ids = torch.tensor(tokens[:96]).view(2, 48)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert ppl == pytest.approx(torch.exp(nll).item(), rel=1e-4)


def test_written_config_describes_w8a8_and_the_kv_cache(runs):
    src, outs = runs
    for name, kw in RUNS.items():
        q = json.loads((outs[name] / "config.json").read_text())["quantization_config"]
        group = q["config_groups"]["group_0"]
        assert q["format"] == "int-quantized"  # what vLLM's W8A8 int8 scheme and compressed-tensors read
        assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
        assert group["weights"]["symmetric"] is True
        a = group["input_activations"]
        static = kw.get("act_dynamic") is False
        assert (a["num_bits"], a["type"], a["symmetric"], a["dynamic"], a["strategy"]) == \
            (8, "int", True, not static, "tensor" if static else "token")
        kv = q.get("kv_cache_scheme")
        if "kv_cache" in kw:
            assert (kv["num_bits"], kv["type"], kv["strategy"], kv["symmetric"], kv["dynamic"]) == \
                (8, "float" if kw["kv_cache"] == "fp8" else "int", "tensor", True, False)
        else:
            assert kv is None
        assert main(["verify", str(outs[name])]) == 0


def test_a16w8_rtn_is_weight_only_int8_per_channel(tmp_path):
    from streamq.quant.rtn import rtn_quantize

    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    out = streamq.compress(src, tmp_path / "o", method="rtn", bits=8, group_size=-1, formats="compressed-tensors",
                           progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    w = q["config_groups"]["group_0"]["weights"]
    assert q["format"] == "pack-quantized" and q["config_groups"]["group_0"]["input_activations"] is None
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (8, "int", "channel", None, True)
    assert q.get("kv_cache_scheme") is None
    model, source = streamq.load(out), load_file(src / "model.safetensors")
    cfg = QuantConfig(method="rtn", bits=8, group_size=-1)
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        expected = rtn_quantize(source[f"model.layers.0.{name}.weight"].float(), cfg).weight
        assert torch.equal(model.get_submodule(f"model.layers.0.{name}").dequantized_weight(), expected)


W8A8 = ["--bits", "8", "--group-size", "-1", "--act-bits", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--smooth-alpha", "1.5"], "--smooth-alpha 1.5: SmoothQuant's migration strength lies in [0, 1]"),
    (["--smooth-alpha", "-0.1"], "--smooth-alpha -0.1"),
    (["--bits", "8", "--group-size", "-1", "--act-bits", "4", "--format", "compressed-tensors"], "--act-bits 4: only 8"),
    (["--act-bits", "8", "--format", "compressed-tensors"], "needs int8 symmetric per-channel weights"),
    (["--kv-cache", "int4", "--format", "compressed-tensors"], "--kv-cache 'int4': choose int8 or fp8"),
    (W8A8, "--format gptq cannot describe activation or KV-cache quantization"),
    (["--kv-cache", "fp8", "--format", "compressed-tensors,gguf"], "--format gguf cannot describe"),
    (["--no-act-dynamic", "--format", "compressed-tensors"], "needs --act-bits 8"),
    (["--method", "autoround", "--kv-cache", "fp8", "--format", "compressed-tensors"], "does not calibrate"),
])
def test_bad_flags_are_one_line_errors(argv, message, tmp_path, capsys):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    out = tmp_path / "o"
    assert main(["compress", str(src), str(out), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_api_and_structure_refusals(tmp_path):
    with pytest.raises(StreamqError, match="--kv-cache 'int4': choose int8 or fp8"):
        QuantConfig(kv_cache="int4")
    src = make_tiny_model(tmp_path / "f", "falcon", n_layers=1, shards=1)  # fused query_key_value
    with pytest.raises(StreamqError, match="--kv-cache needs separate k_proj / v_proj"):
        streamq.compress(src, tmp_path / "o", kv_cache="fp8", group_size=32, formats="compressed-tensors",
                         progress=False)
    assert not (tmp_path / "o").exists()
