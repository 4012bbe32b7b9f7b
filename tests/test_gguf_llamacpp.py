"""streamq's GGUF files in llama.cpp itself (libllama through ctypes: tests/llamacpp_runtime.py; .ci/run fetches
the library with tools/fetch_llamacpp.sh and sets STREAMQ_LLAMACPP_LIB). A tiny random model of every
architecture streamq maps to llama.cpp, exported twice: with the quantized Linears dequantized to F32 (the
same weights without llama.cpp's quantized dot products: logits equal streamq.load's to float rounding, or to
ggml's GELU approximation) and as streamq exports it (Q4_0 / Q4_1 / Q8_0: llama.cpp rounds the activations to
8 bits in those matmuls, a few percent of the logits' range)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import streamq
from streamq.errors import StreamqError
from streamq.formats.export import export
from streamq.formats.gguf_arch import ARCHES, arch_of
from tests.conftest import make_tiny_model
from tests.llamacpp_runtime import Llama, library_dir

LIB = library_dir()
needs_llamacpp = pytest.mark.skipif(LIB is None, reason="llama.cpp not fetched: tools/fetch_llamacpp.sh .llamacpp "
                                                        "(the README's test command does)")
# F32-file tolerance: 1e-4 where the MLP is SiLU (float rounding); GELU families: ggml's CPU GELU is an fp16
# table / tanh form, 2e-4 .. 1.3e-3 measured (gpt_neox's exact erf GELU the most)
GELU = {"gemma2", "gemma3_text", "starcoder2", "gpt_neox", "falcon"}
# llama.cpp's LLAMA and STARCODER2 graphs have no sliding window: compare within the tiny models' window (24)
NO_WINDOW = {"mistral", "starcoder2"}


def logits(folder, ids) -> np.ndarray:
    with torch.no_grad():
        return streamq.load(folder)(torch.tensor([ids])).logits[0].float().numpy()


def llamacpp_logits(path, ids) -> np.ndarray:
    with Llama(path, 64, folder=LIB) as llm:
        return llm.logits(ids)


@needs_llamacpp
@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_llamacpp_runs_every_mapped_architecture(arch, tmp_path):
    src = make_tiny_model(tmp_path / "src", arch, n_layers=2, shards=1, vary_1d=True)
    out = streamq.compress(src, tmp_path / "out", method="rtn", bits=4, group_size=32, progress=False)
    ids = torch.randint(0, 200, (24 if arch in NO_WINDOW else 40,), generator=torch.Generator().manual_seed(0))
    ref = logits(out, ids.tolist())
    f32 = next(export(out, "gguf", tmp_path / "f32", weight_type="f32", head_type="f32").glob("*.gguf"))
    np.testing.assert_allclose(llamacpp_logits(f32, ids.tolist()), ref, rtol=0,
                               atol=4e-3 if arch in GELU else 1e-4)
    q4 = next(export(out, "gguf", tmp_path / "q4").glob("*.gguf"))
    assert q4.name == "model-Q4_0.gguf"
    diff = np.abs(llamacpp_logits(q4, ids.tolist()) - ref).max()
    assert diff <= 0.05 * np.abs(ref).max(), (diff, np.abs(ref).max())


@needs_llamacpp
@pytest.mark.parametrize("grid, kind", [(dict(bits=4, group_size=32, sym=False), "Q4_1"),
                                        (dict(bits=8, group_size=64), "Q8_0"),
                                        (dict(bits=4, group_size=64, full_range=True), "Q4_0")])
def test_llamacpp_runs_every_gguf_type(grid, kind, tmp_path):
    src = make_tiny_model(tmp_path / "src", "llama", n_layers=2, shards=2)
    out = streamq.compress(src, tmp_path / "out", method="rtn", progress=False, **grid)
    ids = list(range(3, 43))
    ref = logits(out, ids)
    path = next(export(out, "gguf", tmp_path / "g", head_type="f16").glob("*.gguf"))
    assert path.name == f"model-{kind}.gguf"
    diff = np.abs(llamacpp_logits(path, ids) - ref).max()
    assert diff <= 0.05 * np.abs(ref).max(), (diff, np.abs(ref).max())


def tiny(arch: str, **changes) -> dict:
    from tests.conftest import tiny_config

    return dict(tiny_config(arch, 2, 300).to_dict(), **changes)


@pytest.mark.parametrize("config, message", [
    (tiny("opt"), "not one streamq maps to llama.cpp"),
    (tiny("falcon", new_decoder_architecture=True), "only Falcon's 7B layout"),
    (tiny("falcon", alibi=True), "only Falcon's 7B layout"),
    (tiny("falcon", multi_query=False), "only Falcon's 7B layout"),
    (tiny("gemma2", query_pre_attn_scalar=32), "query_pre_attn_scalar 32 is not the 16"),
    (tiny("cohere", use_qk_norm=True), "use_qk_norm"),
    (tiny("phi3", max_position_embeddings=8192, original_max_position_embeddings=4096), "long-context"),
    (tiny("llama", rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope scaling"),
    (tiny("gemma3_text", rope_parameters=dict(full_attention=dict(rope_type="linear", factor=8.0),
                                              sliding_attention=dict(rope_type="default"))), "rope scaling"),
])
def test_unmapped_variants_are_refused_in_one_line(config, message):
    with pytest.raises(StreamqError, match=message):
        arch_of(config)
