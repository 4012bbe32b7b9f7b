"""A resume never mixes two models: the tensors the interrupted run read are hashed as they are read, and
re-hashed on resume (issue 13 item 1)."""
from __future__ import annotations

import json
import struct

import pytest

import streamq
from streamq.interrupt import Interrupted
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(nsamples=2, seqlen=16, group_size=32, progress=False)


def stop_after(n: int):
    calls = []
    return lambda: calls.append(1) or len(calls) >= n


def data_range(shard, name) -> tuple[int, int]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def find_shard(model, name):
    return next(f for f in sorted(model.glob("*.safetensors")) if f'"{name}"'.encode() in f.read_bytes()[:100_000])


def swap_data(model, a: str, b: str) -> None:
    """Swap the data bytes of two same-shaped tensors of one shard; the header stays byte-identical."""
    shard = find_shard(model, a)
    assert shard == find_shard(model, b)
    raw = bytearray(shard.read_bytes())
    (a0, a1), (b0, b1) = data_range(shard, a), data_range(shard, b)
    assert a1 - a0 == b1 - b0
    raw[a0:a1], raw[b0:b1] = raw[b0:b1], raw[a0:a1]
    shard.write_bytes(raw)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_resume_refuses_a_source_whose_read_tensors_changed(tmp_path, method):
    model = make_tiny_model(tmp_path / "m", "llama", n_layers=4, shards=1)
    out = tmp_path / "o"
    with pytest.raises(Interrupted):
        streamq.compress(model, out, method=method, calib=str(model / "calib.txt"), should_stop=stop_after(2), **RUN)
    swap_data(model, "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(streamq.StreamqError, match=r"model\.layers\.1\.self_attn\.(q|o)_proj\.weight changed"):
        streamq.compress(model, out, method=method, calib=str(model / "calib.txt"), **RUN)


def test_resume_refuses_changed_embeddings(tmp_path):
    """The store holds block inputs computed from the embeddings: those are source tensors the run read too."""
    model = make_tiny_model(tmp_path / "m", "llama", n_layers=3, shards=1)
    out = tmp_path / "o"
    with pytest.raises(Interrupted):
        streamq.compress(model, out, calib=str(model / "calib.txt"), should_stop=stop_after(1), **RUN)
    shard = model / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    begin, _ = data_range(shard, "model.embed_tokens.weight")
    raw[begin] ^= 0x01  # the lowest mantissa bit of one fp32 weight
    shard.write_bytes(raw)
    with pytest.raises(streamq.StreamqError, match=r"model\.embed_tokens\.weight changed"):
        streamq.compress(model, out, calib=str(model / "calib.txt"), **RUN)


def test_unchanged_source_resumes(tmp_path):
    model = make_tiny_model(tmp_path / "m", "llama", n_layers=3, shards=2)
    out = tmp_path / "o"
    with pytest.raises(Interrupted):
        streamq.compress(model, out, calib=str(model / "calib.txt"), should_stop=stop_after(1), **RUN)
    recorded = json.loads((out / "streamq_manifest.json").read_text())["source_sha256"]
    assert "model.layers.0.mlp.down_proj.weight" in recorded and "model.embed_tokens.weight" in recorded
    assert not any(k.startswith("model.layers.2.") for k in recorded)  # only what was read so far
    streamq.compress(model, out, calib=str(model / "calib.txt"), **RUN)
    assert json.loads((out / "streamq_manifest.json").read_text())["complete"]
