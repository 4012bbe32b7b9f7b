"""Output formats (streamq/formats): the compressed-tensors folder loads in transformers with streamq's
logits, the GGUF file dequantizes (gguf.quants, llama.cpp's reference numpy code) to streamq's weights, the
written quantization_configs obey vLLM's parsing rules, export converts without recomputing, and every
combination a format cannot hold exactly is refused with one line."""
from __future__ import annotations

import json

import pytest
import torch

import streamq
from streamq.errors import OtherRunError, StreamqError
from streamq.formats.export import export
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
GRIDS = {  # name -> compress keyword arguments (RTN: data-free, fast; the grid is what the formats see)
    "w4g32-sym": dict(bits=4, group_size=32),
    "w4g32-asym": dict(bits=4, group_size=32, sym=False),
    "w4g64-full-range": dict(bits=4, group_size=64, full_range=True),
    "w8-per-channel": dict(bits=8, group_size=-1),
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("fmt") / "llama", "llama", n_layers=2, shards=2)


@pytest.fixture(scope="module")
def outputs(src, tmp_path_factory):
    """grid name -> a finished folder (gptq layout) with compressed-tensors and gguf exported inside."""
    root = tmp_path_factory.mktemp("fmt-out")
    return {name: streamq.compress(src, root / name, method="rtn", formats="gptq,compressed-tensors",
                                   progress=False, **kw) for name, kw in GRIDS.items()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("grid", GRIDS)
def test_compressed_tensors_loads_in_transformers_with_streamq_logits(outputs, grid):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = outputs[grid]
    ct = out / "compressed-tensors"
    ours, theirs = streamq.load(out), streamq.load(ct)
    for name, module in ours.named_modules():  # the same quantized weights, read back from either layout
        if hasattr(module, "dequantized_weight"):
            assert torch.equal(module.dequantized_weight(), theirs.get_submodule(name).dequantized_weight()), name
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    ref = logits(ours, ids)
    if GRIDS[grid].get("sym", True):
        # compressed-tensors' own loading path in transformers (compressed modules, fp32 model): exact
        model = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32)
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5)
    # Every grid, asym included, through the library's decompression (weights rebuilt in the fp16 scale
    # dtype, hence the tolerance): asym's direct path leaves zero points unpacked in compressed-tensors 0.20
    model = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=2e-2)


def test_export_round_trip_is_byte_identical(outputs, tmp_path):
    """gptq -> compressed-tensors -> gptq gives back the very tensors the run wrote (nothing recomputed)."""
    from safetensors.torch import load_file

    out = outputs["w4g32-asym"]
    back = export(out / "compressed-tensors", "gptq", tmp_path / "back")
    for shard in out.glob("*.safetensors"):
        a, b = load_file(str(shard)), load_file(str(back / shard.name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), shard.name
    assert json.loads((back / "config.json").read_text())["quantization_config"]["sym"] is False


def test_gguf_tensors_dequantize_to_streamq_weights(outputs, tmp_path):
    import gguf

    for grid in ("w4g32-sym", "w4g64-full-range", "w8-per-channel", "w4g32-asym"):
        out = outputs[grid]
        path = next(export(out, "gguf", tmp_path / grid).glob("*.gguf"))
        reader = gguf.GGUFReader(path)
        fields = {f.name: f for f in reader.fields.values()}
        assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
        tensors = {t.name: t for t in reader.tensors}
        model = streamq.load(out)
        cfg = model.config
        expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
            f"blk.{i}.{n}.weight" for i in range(cfg.num_hidden_layers) for n in (
                "attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        assert set(tensors) == expected
        qtype = {"w8-per-channel": "Q8_0", "w4g32-asym": "Q4_1"}.get(grid, "Q4_0")
        for i, block in enumerate(model.model.layers):
            for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                             ("mlp.down_proj", "ffn_down")):
                t = tensors[f"blk.{i}.{name}.weight"]
                assert t.tensor_type.name == qtype
                w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                module = block.get_submodule(hf)
                ours = module.dequantized_weight()
                if name in ("attn_q", "attn_k"):  # llama.cpp's row order: rotary halves interleaved per head
                    heads = cfg.num_attention_heads if name == "attn_q" else cfg.num_key_value_heads
                    ours = ours.reshape(heads, 2, -1, ours.shape[1]).transpose(1, 2).reshape(ours.shape)
                if qtype != "Q4_1":
                    assert torch.equal(w, ours), (grid, t.name)
                else:  # m = fp16(-d z): off by at most half an fp16 ulp of d*z per weight
                    from streamq.formats.gptq import unpack_gptq

                    packed = {k: getattr(module, k) for k in ("qweight", "qzeros", "scales", "g_idx")}
                    u = unpack_gptq(packed, 4)
                    dz = (u.scales * u.zeros).abs().t().repeat_interleave(32, 1)
                    if name in ("attn_q", "attn_k"):
                        dz = dz.reshape(heads, 2, -1, dz.shape[1]).transpose(1, 2).reshape(dz.shape)
                    assert ((w - ours).abs() <= dz * 2.0**-11 + 1e-12).all(), (grid, t.name)
        norm = torch.from_numpy(gguf.quants.dequantize(tensors["blk.0.attn_norm.weight"].data,
                                                       tensors["blk.0.attn_norm.weight"].tensor_type).copy())
        assert torch.equal(norm, model.model.layers[0].input_layernorm.weight.float())


@pytest.mark.parametrize("kwargs, fmt, message", [
    (dict(bits=3, group_size=32), "gguf", "maps only 4-bit"),
    (dict(bits=8, group_size=32, sym=False), "gguf", "maps only 4-bit"),
    (dict(bits=4, group_size=16), "gguf", "multiple of llama.cpp's 32"),
    (dict(bits=4, group_size=32, act_order=True, static_groups=False), "gguf", "no g_idx"),
    (dict(bits=4, group_size=32, act_order=True, static_groups=False), "compressed-tensors", "no g_idx"),
])
def test_formats_refuse_what_they_cannot_hold(src, tmp_path, kwargs, fmt, message):
    method = "gptq" if kwargs.get("act_order") else "rtn"
    with pytest.raises(StreamqError, match=message) as e:
        streamq.compress(src, tmp_path / "o", method=method, formats=f"gptq,{fmt}", progress=False, **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_run_fingerprint_includes_the_format(src, outputs):
    with pytest.raises(OtherRunError, match="format"):
        streamq.compress(src, outputs["w4g32-sym"], method="rtn", formats="compressed-tensors", progress=False,
                         **GRIDS["w4g32-sym"])


def test_gptq_config_desc_act_and_architectures(tmp_path):
    """desc_act is true only where g_idx is a real permutation (vLLM refuses desc_act; with static groups g_idx
    is the column order); architectures comes from the model class when the source leaves it null."""
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = None
    (src / "config.json").write_text(json.dumps(config))
    common = dict(method="gptq", bits=4, group_size=32, calib=str(src / "calib.txt"), nsamples=2, seqlen=16,
                  progress=False)
    static = streamq.compress(src, tmp_path / "static", act_order=True, static_groups=True, **common)
    dynamic = streamq.compress(src, tmp_path / "dynamic", act_order=True, static_groups=False, **common)
    for out, desc_act in ((static, False), (dynamic, True)):
        written = json.loads((out / "config.json").read_text())
        assert written["quantization_config"]["desc_act"] is desc_act
        assert written["architectures"] == ["LlamaForCausalLM"]
        g_idx = streamq.load(out).model.layers[0].self_attn.q_proj.g_idx
        assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 32) is not desc_act


# vLLM cannot run on these CPUs; its config parsing rules, read from its source (vLLM 0.33), written out here:
# - gptq_marlin.py GPTQMarlinConfig: TYPE_MAP keys (bits, sym) in {(4, True), (8, True)}, else "Unsupported
#   quantization config"; from_config needs the keys bits, group_size, desc_act, sym; desc_act with
#   group_size -1 is read as false; is_gptq_marlin_compatible also needs quant_method "gptq".
# - utils/marlin_utils.py MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128].
# - gptq.py / utils/gptq_utils.py (issue 12's reading of vLLM 0.33): desc_act true ("group activation
#   ordering") is refused, and qzeros are ignored for sym (zero 2^(bits-1) assumed).
# - compressed_tensors/schemes/compressed_tensors_wNa16.py: WNA16 types sym {4: uint4b8, 8: uint8b128},
#   asym (zero points) {4: uint4, 8: uint8}; compressed_tensors.py _is_wNa16_group_channel: weights only,
#   strategy "group" or "channel", not dynamic, format "pack-quantized"; actorder "group" needs g_idx.
def vllm_gptq_problems(q: dict) -> list[str]:
    problems = [f"missing {k}" for k in ("bits", "group_size", "desc_act", "sym") if k not in q]
    if q.get("quant_method") != "gptq":
        problems.append("quant_method is not gptq")
    if (q.get("bits"), q.get("sym")) not in ((4, True), (8, True)):
        problems.append("Unsupported quantization config")
    if q.get("group_size") not in (-1, 32, 64, 128):
        problems.append("group size not supported by Marlin")
    if q.get("desc_act") and q.get("group_size") != -1:
        problems.append("group activation ordering no longer supported")
    return problems


def vllm_wna16_problems(q: dict) -> list[str]:
    problems = []
    if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
        problems.append("not a pack-quantized compressed-tensors config")
    for group in q["config_groups"].values():
        w = group["weights"]
        if group.get("input_activations") is not None or w.get("dynamic"):
            problems.append("not weight-only")
        if w["num_bits"] not in (4, 8) or w["type"] != "int":
            problems.append("WNA16 takes int4 / int8")
        if w["strategy"] not in ("group", "channel") or (w["strategy"] == "group") != (w["group_size"] is not None):
            problems.append("strategy/group_size mismatch")
        if w.get("actorder") == "group":
            problems.append("actorder group needs g_idx, which streamq does not write")
    return problems


@pytest.mark.parametrize("grid", GRIDS)
def test_written_configs_obey_vllm_rules(outputs, grid):
    gptq = json.loads((outputs[grid] / "config.json").read_text())["quantization_config"]
    ct = json.loads((outputs[grid] / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    expected_gptq = [] if GRIDS[grid].get("sym", True) else ["Unsupported quantization config"]  # asym: use CT
    assert vllm_gptq_problems(gptq) == expected_gptq
    assert vllm_wna16_problems(ct) == []
    assert ct["config_groups"]["group_0"]["weights"]["symmetric"] is GRIDS[grid].get("sym", True)


LLAMA_CPP_EXTRA = {  # per-block tensors beyond llama's, as llama.cpp's qwen2 / qwen3 graphs read them
    "llama": (), "qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias"), "qwen3": ("attn_q_norm.weight", "attn_k_norm.weight"),
}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "opt"])
def test_other_architectures(arch, tmp_path):
    """compressed-tensors loads in transformers with streamq's logits; GGUF has llama.cpp's names and exact
    weights where llama.cpp has the architecture (qwen2, qwen3), and OPT is refused with one line."""
    import gguf
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / arch, arch, n_layers=1, shards=1)
    out = streamq.compress(src, tmp_path / "o", method="rtn", bits=4, group_size=32, formats="gptq,compressed-tensors",
                           progress=False)
    ours = streamq.load(out)
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    theirs = AutoModelForCausalLM.from_pretrained(out / "compressed-tensors", dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    if arch == "opt":
        with pytest.raises(StreamqError, match="not one streamq maps to llama.cpp"):
            export(out, "gguf", tmp_path / "g")
        return
    tensors = {t.name: t for t in gguf.GGUFReader(next(export(out, "gguf", tmp_path / "g").glob("*.gguf"))).tensors}
    block = [f"blk.0.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                            "ffn_gate", "ffn_up", "ffn_down")]
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight", *block,
                            *(f"blk.0.{n}" for n in LLAMA_CPP_EXTRA[arch])}
    for hf, name in (("self_attn.q_proj", "attn_q"), ("mlp.up_proj", "ffn_up")):  # NEOX rope: no permutation
        t = tensors[f"blk.0.{name}.weight"]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(w, ours.model.layers[0].get_submodule(hf).dequantized_weight())
