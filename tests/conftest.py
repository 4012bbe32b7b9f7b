"""Shared fixtures: tiny random-weight decoder models saved as (multi-shard) safetensors folders."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested through Triton's CPU interpreter, which must be chosen before
# anything imports Triton (transformers does, through torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # imported now, in interpreter mode, whatever the environment of the test that would import it first
        import triton.language  # noqa: F401
    except ImportError:
        pass
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

CALIB = Path(__file__).resolve().parents[1] / "streamq" / "data" / "calib.txt"
SHARED_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen-calib.txt"


def sample_text() -> str:
    """~60 KB of real English for tokenizer training and calibration."""
    src = CALIB if CALIB.exists() else SHARED_CALIB
    return src.read_text(encoding="utf-8")[:60_000]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([sample_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# Per architecture: the config class and what a tiny instance of it sets beyond the common fields. Values
# that differ from a plain Llama on purpose (sliding windows shorter than the test sequences, soft-capping,
# scaled embeddings and residuals, parallel attention + MLP, biases, fused q/k/v) so each family's own code
# paths run; `tie` is the family's usual tie_word_embeddings.
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, head_dim=16), False),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=24), False),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, head_dim=16), False),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16), False),
    "opt": ("OPTConfig", dict(word_embed_proj_dim=None, do_layer_norm_before=True), False),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
                                    final_logit_softcapping=5.0, attn_logit_softcapping=20.0, pad_token_id=0), True),
    "gemma3_text": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=24, pad_token_id=0,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                    True),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=None, eos_token_id=0, bos_token_id=0), False),
    "falcon": ("FalconConfig", dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                    bias=False, alibi=False, bos_token_id=0, eos_token_id=0), True),
    "gpt_neox": ("GPTNeoXConfig", dict(use_parallel_residual=True, rope_parameters=dict(
        rope_theta=10000.0, partial_rotary_factor=0.5, rope_type="default")), False),
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2, use_bias=True, sliding_window=24, bos_token_id=0,
                                            eos_token_id=0), True),
    "cohere": ("CohereConfig", dict(num_key_value_heads=2, logit_scale=0.5, pad_token_id=0, bos_token_id=0,
                                    eos_token_id=0), True),
    "olmo2": ("Olmo2Config", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=0), False),
    "granite": ("GraniteConfig", dict(num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2, logits_scaling=2.0), True),
}

# Mixture-of-experts families (tests/test_moe.py), kept apart from ARCHITECTURES (test_architectures.py's
# hand-listed references cover dense blocks): 4 routed experts of width `inter`, 2 per token; DeepSeek-V3 with
# MLA attention, one shared expert and a dense first block. `experts` in make_tiny_model overrides the count.
MOE_ARCHITECTURES = {
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
                False),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True), False),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                                             num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1,
                                             q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16), False),
}
EXPERT_COUNT = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def tiny_config(arch: str, n_layers: int, vocab: int, hidden: int = 64, inter: int = 128):
    """A small instance of the family's real config class (see ARCHITECTURES, MOE_ARCHITECTURES)."""
    import transformers

    name, extra, tie = ARCHITECTURES[arch] if arch in ARCHITECTURES else MOE_ARCHITECTURES[arch]
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=4,
                  max_position_embeddings=512, tie_word_embeddings=tie)
    if arch == "opt":
        common.update(ffn_dim=inter, word_embed_proj_dim=hidden)
        extra = {k: v for k, v in extra.items() if k != "word_embed_proj_dim"}
    elif arch == "falcon":
        common.update(ffn_hidden_size=inter)
    elif arch in MOE_ARCHITECTURES:  # experts of width inter; DeepSeek's dense first block twice as wide
        common.update(intermediate_size=2 * inter if arch == "deepseek_v3" else inter, moe_intermediate_size=inter)
    else:
        common.update(intermediate_size=inter)
    if "layer_types" in extra:
        extra = dict(extra, layer_types=(extra["layer_types"] * n_layers)[:n_layers])
    return getattr(transformers, name)(**common, **extra)


def save_model(model, folder: Path, shards: int, dtype: torch.dtype) -> None:
    """Write the state dict as `shards` safetensors files + index (shared tensors written once)."""
    from transformers.core_model_loading import revert_weight_conversion

    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if any(v.dim() == 3 for v in state.values()):  # fused MoE experts -> one tensor per expert, as HF saves them
        state = revert_weight_conversion(model, state)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.dtype = dtype
    model.config.save_pretrained(folder)


def make_tiny_model(folder: Path, arch: str = "llama", n_layers: int = 2, shards: int = 2,
                    dtype: torch.dtype = torch.float32, seed: int = 0, hidden: int = 64, inter: int = 128,
                    tie: bool | None = None, vary_1d: bool = False, experts: int | None = None) -> Path:
    """A random-weight model of family `arch` (ARCHITECTURES, MOE_ARCHITECTURES) saved as `shards` safetensors
    files with a small BPE tokenizer and calib.txt. tie: tie_word_embeddings (None: the family's usual choice);
    vary_1d: draw biases and norm weights at random too (they start as zeros / ones), so code that drops them
    shows; experts: routed experts per MoE block. MoE experts are saved as HF checkpoints hold them, one tensor
    per expert (transformers' own save-time conversion of its fused parameters)."""
    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, n_layers, len(tok), hidden, inter)
    if tie is not None:
        config.tie_word_embeddings = tie
    if experts is not None:
        setattr(config, EXPERT_COUNT[arch], experts)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-init weights so blocks change the residual stream visibly
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and vary_1d:
                p.add_(torch.randn_like(p), alpha=0.1)
    save_model(model, folder, shards, dtype)
    tok.save_pretrained(folder)
    (folder / "calib.txt").write_text(sample_text(), encoding="utf-8")
    return folder


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests are skipped where torch sees no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a gpu-marked test; tools/gpu_check.py runs them on a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_gpu_test(request, monkeypatch):
    """Tests compute on the CPU, in the dtype they ask for, even on a GPU machine: --device auto means the CPU
    except in `gpu`-marked tests (whose references are built for the GPU's dtypes)."""
    if request.node.get_closest_marker("gpu") is None:
        import streamq.device

        monkeypatch.setattr(streamq.device, "auto_device", lambda: torch.device("cpu"))
    # CPU code paths as a CPU user runs them: Triton's interpreter only where a kernel test asks for it (its
    # `device` fixture sets TRITON_INTERPRET=1 again); Triton itself was imported in interpreter mode above.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "llama", "llama", n_layers=2, shards=2)


# Fields of streamq_report.json / streamq_manifest.json that differ between any two runs of the same command:
# wall-clock seconds (per layer, per block, total) and peak RSS / VRAM.
TIMING_FIELDS = ("seconds", "seconds_total", "io_wait_seconds", "io_wait_seconds_total", "peak_rss_bytes",
                 "peak_vram_bytes")


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING_FIELDS}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def output_snapshot(folder: Path) -> dict[str, str]:
    """Every file under an output folder (hidden work folders included) -> sha256 of its bytes, every folder
    -> "folder"; the manifest and report -> their JSON without TIMING_FIELDS. Two runs of one command must
    give equal snapshots."""
    import hashlib

    snap = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            snap[rel] = "folder"
        elif rel in ("streamq_manifest.json", "streamq_report.json"):
            snap[rel] = json.dumps(_without_timing(json.loads(path.read_text())), sort_keys=True)
        else:
            snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snap


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add hand-off latency (10x on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def loaded_model_perplexity(out: Path, text: Path, seqlen: int, windows: int) -> float:
    """Perplexity of `streamq.load(out)` run as one full model on the first `windows` seqlen-token windows."""
    import streamq

    model = streamq.load(out)
    ids = AutoTokenizer.from_pretrained(out)(text.read_text(), add_special_tokens=False).input_ids
    ids = torch.tensor(ids[: windows * seqlen]).view(windows, seqlen)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return torch.exp(nll).item()


def assert_loads_to_engine_weights(out: Path, engine: dict, ref_model) -> None:
    """streamq.load(out): every quantized layer dequantizes to exactly the engine's weight (name -> [out, in]),
    and the logits match the fake-quantized reference model."""
    import streamq

    model = streamq.load(out)
    for name, weight in engine.items():
        assert torch.equal(model.get_submodule(name).dequantized_weight(), weight), name
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-3, atol=1e-3)


def run_interrupted(monkeypatch, name: str, run) -> None:
    """Call run() with streamq.blockwork.<name> raising KeyboardInterrupt on its second call (in block 1),
    then put the real function back."""
    from streamq import blockwork

    real, calls = getattr(blockwork, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwork, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(blockwork, name, real)
