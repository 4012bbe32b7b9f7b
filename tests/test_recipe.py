"""--recipe (streamq/recipe.py): the SparseML OBCQ tutorial's TinyLlama recipe (module names adapted to a
2-block tiny Llama) runs end to end and writes exactly what the equivalent flags write; llm-compressor GPTQ
recipes and MindSpore-style quantization_configs map to the expected QuantConfig; unknown keys, unknown
modifiers and flags that contradict the recipe are one-line errors naming the key and where it is."""
from __future__ import annotations

import json

import pytest
import torch

import streamq
from streamq.cli import main
from streamq.errors import StreamqError
from streamq.quant.rtn import rtn_quantize
from streamq.recipe import merge_flags, read_recipe
from streamq.verify import verify
from tests.conftest import make_tiny_model
from tests.test_pipeline import read_all

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--nsamples", "4", "--seqlen", "32", "--no-progress"]

# The tutorial's recipe (sparseml docs "One Shot With SparseML", TinyLlama-1.1B-Chat-v0.4), with its ignored
# down_proj layers (21, 7, 2, 20, 19 of 22) renamed to the tiny model's blocks.
OBCQ_TUTORIAL = r"""
test_stage:
  obcq_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.5
      mappings: [
        [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
        [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
      ]
    QuantizationModifier:
      ignore:
      # These operations don't make sense to quantize
      - LlamaRotaryEmbedding
      - LlamaRMSNorm
      - SiLUActivation
      # Skip quantizing the BMMs
      - QuantizableMatMul
      # Skip quantizing the layers with the most sensitive activations
      - model.layers.1.mlp.down_proj
      post_oneshot_calibration: true
      scheme_overrides:
        Embedding:
          input_activations: null
          weights:
            num_bits: 8
            symmetric: false
    SparseGPTModifier:
      sparsity: 0.5
      block_size: 128
      sequential_update: true
      quantize: true
      percdamp: 0.01
      mask_structure: "0:0"
      targets: ["re:model.layers.\\d*$"]
"""
# what the recipe means, as flags
OBCQ_FLAGS = ["--method", "sparsegpt", "--sparsity", "0.5", "--mask-structure", "0:0", "--bits", "8",
              "--group-size", "-1", "--damp", "0.01", "--smooth-alpha", "0.5", "--act-bits", "8", "--no-act-dynamic",
              "--ignore", "model.layers.1.mlp.down_proj", "--quant-lm-head", "--format", "compressed-tensors"]
GPTQ_W4A16 = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      block_size: 64
      dampening_frac: 0.05
      actorder: static
      ignore: ["lm_head", "re:.*layers\\\\.0\\\\.mlp\\\\.down_proj"]
      config_groups:
        group_0:
          targets: ["Linear"]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32}
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_of(fields) -> streamq.QuantConfig:
    known = set(streamq.QuantConfig.__dataclass_fields__)
    return streamq.QuantConfig(**{k: v for k, v in fields.items() if k in known})


def test_obcq_tutorial_recipe_maps_to_sparsegpt_w8a8_with_smoothing(tmp_path):
    fields = read_recipe(write(tmp_path, OBCQ_TUTORIAL))
    assert dict(fields) == {
        "method": "sparsegpt", "sparsity": 0.5, "mask_structure": "0:0", "block_columns": 128, "damp": 0.01,
        "true_sequential": True, "bits": 8, "sym": True, "group_size": -1, "act_bits": 8, "act_dynamic": False,
        "smooth_alpha": 0.5, "ignore": ("model.layers.1.mlp.down_proj",), "quant_lm_head": True}
    assert fields.soft == {"formats": "compressed-tensors"}
    assert config_of(fields) == streamq.QuantConfig(
        method="sparsegpt", sparsity=0.5, bits=8, group_size=-1, damp=0.01, smooth_alpha=0.5, act_bits=8,
        act_dynamic=False, ignore=("model.layers.1.mlp.down_proj",), quant_lm_head=True)


def test_obcq_tutorial_recipe_runs_end_to_end_and_writes_what_its_flags_write(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1, tie=False)
    recipe = write(tmp_path, OBCQ_TUTORIAL)
    assert main(["compress", str(src), str(tmp_path / "r"), "--recipe", str(recipe), *FAST]) == 0
    assert main(["compress", str(src), str(tmp_path / "f"), *OBCQ_FLAGS, *FAST]) == 0
    by_recipe, by_flags = read_all(tmp_path / "r"), read_all(tmp_path / "f")
    assert by_recipe.keys() == by_flags.keys()
    assert all(torch.equal(by_recipe[k], by_flags[k]) for k in by_recipe)
    config = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((tmp_path / "f" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["model.layers.1.mlp.down_proj"]  # lm_head quantized, as the recipe says
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    assert verify(tmp_path / "r") == []
    source = read_all(src)
    ignored = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(by_recipe[ignored], source[ignored])
    assert "model.layers.1.mlp.down_proj.input_scale" not in by_recipe  # ignored: fp inputs, no static scale
    assert "model.layers.0.mlp.down_proj.input_scale" in by_recipe
    model = streamq.load(tmp_path / "r")
    weight = lambda m: m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight  # noqa: E731
    linears = {f"model.layers.{i}.{n}": m for i in range(2) for n, m in model.model.layers[i].named_modules()
               if n.endswith("_proj")}
    assert len(linears) == 14
    for name, m in linears.items():  # pruned 50% (and int8-quantized), but the ignored one
        zeros = (weight(m) == 0).float().mean().item()
        assert zeros < 0.01 if name + ".weight" == ignored else zeros >= 0.5, (name, zeros)
    head = rtn_quantize(source["lm_head.weight"].float(), streamq.QuantConfig(method="rtn", bits=8, group_size=-1))
    torch.testing.assert_close(weight(model.lm_head).float(), head.weight, rtol=0, atol=1e-6)  # RTN on w8's grid
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, model.config.vocab_size, (1, 12))).logits).all()


def test_llm_compressor_gptq_recipe_maps_to_the_expected_config(tmp_path):
    fields = read_recipe(write(tmp_path, GPTQ_W4A16))
    assert config_of(fields) == streamq.QuantConfig(
        method="gptq", bits=4, group_size=32, sym=False, act_order=True, static_groups=True, block_columns=64,
        damp=0.05, ignore=("lm_head", "re:.*layers\\.0\\.mlp\\.down_proj"))
    assert "quant_lm_head" not in fields and fields.soft == {}


@pytest.mark.parametrize("case", ["smooth_quant", "ptq_gptq_w4"])
def test_mindspore_quantization_config_maps_to_the_expected_config(tmp_path, case):
    configs = {
        "smooth_quant": ({"quantization_config": {
            "quant_method": "smooth_quant", "weight_dtype": "int8", "activation_dtype": "int8",
            "kvcache_dtype": "int8", "outliers_suppression": "smooth", "algorithm_args": {"smooth_quant": {"alpha": 0.8}},
            "modules_to_not_convert": ["lm_head", "layers.1.mlp.down_proj"]}},
            streamq.QuantConfig(method="rtn", bits=8, group_size=-1, act_bits=8, act_dynamic=False, smooth_alpha=0.8,
                                kv_cache="int8", ignore=("re:.*lm_head", r"re:.*layers\.1\.mlp\.down_proj"))),
        "ptq_gptq_w4": ({"quant_method": "ptq", "weight_dtype": "int4", "activation_dtype": None,
                         "kvcache_dtype": None, "outliers_suppression": "none", "precision_recovery": "gptq",
                         "weight_quant_granularity": "per_group", "group_size": 64, "modules_to_not_convert": []},
                        streamq.QuantConfig(method="gptq", bits=4, group_size=64)),
    }
    data, want = configs[case]
    assert config_of(read_recipe(write(tmp_path, json.dumps(data), "config.json"))) == want


BAD = {  # recipe text -> words the one-line error must hold
    "typo in a modifier's key": (OBCQ_TUTORIAL.replace("smoothing_strength", "smoothing_strenght"),
                                 ["'smoothing_strenght'", "test_stage.obcq_modifiers.SmoothQuantModifier"]),
    "unknown modifier": (OBCQ_TUTORIAL.replace("SparseGPTModifier", "SparseGPTModifer"),
                         ["'SparseGPTModifer'", "test_stage.obcq_modifiers"]),
    "unknown top-level key": ("version: 1.1\n" + OBCQ_TUTORIAL, ["'version'"]),
    "unknown weights key": (GPTQ_W4A16.replace("group_size: 32", "group_size: 32, blocksize: 4"),
                            ["'blocksize'", "quant_stage.quant_modifiers.GPTQModifier.config_groups.group_0.weights"]),
    "unknown MindSpore key": ('{"quantization_config": {"quant_method": "rtn", "weight_dtype": "int8", '
                              '"kv_cache_dtype": "int8"}}', ["'kv_cache_dtype'", "quantization_config"]),
    "targets a subset": (OBCQ_TUTORIAL.replace('targets: ["re:model.layers.\\\\d*$"]', 'targets: ["re:model.layers.1$"]'),
                         ["targets", "re:model.layers.1$"]),
    "not YAML": ("test_stage: [unclosed", ["not YAML"]),
}


@pytest.mark.parametrize("case", BAD)
def test_unknown_keys_are_one_line_errors_naming_the_key_and_where(tmp_path, capsys, case):
    text, words = BAD[case]
    code = main(["compress", str(tmp_path / "no-model"), str(tmp_path / "o"), "--recipe", str(write(tmp_path, text)),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("streamq: error:"), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o").exists()


def test_flags_that_contradict_the_recipe_are_refused_and_agreeing_ones_accepted(tmp_path, capsys):
    recipe = write(tmp_path, OBCQ_TUTORIAL)
    code = main(["compress", str(tmp_path / "m"), str(tmp_path / "o"), "--recipe", str(recipe), "--bits", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--bits 4 contradicts" in err and "scheme" in err and len(err.splitlines()) == 1, err
    code = main(["compress", str(tmp_path / "m"), str(tmp_path / "o"), "--recipe", str(recipe), "--method", "gptq"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--method gptq contradicts" in err and "SparseGPTModifier" in err, err  # given, not default
    fields = read_recipe(recipe)
    merged = merge_flags(fields, {"bits": 8, "method": None, "ignore": ["re:.*q_proj"], "formats": "compressed-tensors,gguf"})
    assert merged["bits"] == 8 and merged["method"] == "sparsegpt" and merged["formats"] == "compressed-tensors,gguf"
    assert merged["ignore"] == ("model.layers.1.mlp.down_proj", "re:.*q_proj")
    with pytest.raises(StreamqError, match="--method gptq contradicts"):
        merge_flags(fields, {"method": "gptq"})
