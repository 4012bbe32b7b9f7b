"""streamq.device: the compute dtype chosen per device and checkpoint, peak VRAM per block in the manifest,
sample transfers (CPU here; the overlapped CUDA copies in the gpu-marked test)."""
from __future__ import annotations

import json

import pytest
import torch

import streamq
from streamq import device as dev
from streamq.errors import StreamqError
from tests.conftest import make_tiny_model

CUDA = torch.device("cuda")


class Ckpt:
    def __init__(self, dtype: str):
        self.config = {"dtype": dtype}


@pytest.mark.parametrize("stored, bf16, want", [
    ("float32", True, torch.bfloat16), ("float32", False, torch.float16), ("float16", True, torch.float16),
    ("bfloat16", False, torch.bfloat16)])
def test_auto_dtype_on_a_gpu(monkeypatch, stored, bf16, want):
    """fp32 checkpoints get bf16 where the GPU has it (fp16's range is the one that overflows), else fp16."""
    monkeypatch.setattr(dev, "has_bf16", lambda device: bf16)
    assert dev.resolve_dtype("auto", CUDA, Ckpt(stored)) == want


def test_auto_dtype_on_the_cpu_and_explicit_names():
    assert dev.resolve_dtype("auto", dev.CPU, Ckpt("bfloat16")) == torch.float32
    assert dev.resolve_dtype("float16", dev.CPU, Ckpt("float32")) == torch.float16
    with pytest.raises(StreamqError, match="--dtype 'half'"):
        dev.resolve_dtype("half", dev.CPU, Ckpt("float32"))


def test_tests_compute_on_the_cpu(monkeypatch):
    """conftest pins --device auto to the CPU outside gpu-marked tests (a GPU machine would otherwise compare
    CUDA 16-bit runs with fp32 CPU references): even where torch sees a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == dev.CPU


def test_to_device_ahead_on_the_cpu_moves_and_casts():
    xs = [(j, torch.randn(1, 4, 8)) for j in range(3)]
    got = list(dev.to_device_ahead(iter(xs), dev.CPU, torch.bfloat16))
    assert [j for j, _ in got] == [0, 1, 2]
    assert all(torch.equal(y, x.to(torch.bfloat16)) for (_, y), (_, x) in zip(got, xs))


def test_cast_floats_leaves_integer_tensors():
    kw = dev.cast_floats({"pos": (torch.ones(2), torch.zeros(2)), "ids": torch.arange(3), "flag": True},
                         torch.float16)
    assert kw["pos"][0].dtype == torch.float16 and kw["ids"].dtype == torch.int64 and kw["flag"] is True


def test_peak_vram_recorded_per_block_and_reported_as_their_max(tmp_path, monkeypatch):
    """Each block's record holds the peak of its own window (reset before it); the report's peak is the max."""
    from streamq import pipeline

    src = make_tiny_model(tmp_path / "m", "llama", n_layers=3, shards=1)
    calls = []
    monkeypatch.setattr(pipeline, "reset_peak_vram", lambda device: calls.append("reset"))
    peaks = iter([7, 30, 12])
    monkeypatch.setattr(pipeline, "peak_vram", lambda device: calls.append("peak") or next(peaks))
    out = streamq.compress(src, tmp_path / "o", method="rtn", group_size=32, progress=False, device="cpu")
    blocks = json.loads((out / "streamq_manifest.json").read_text())["blocks"]
    assert [blocks[str(i)]["peak_vram_bytes"] for i in range(3)] == [7, 30, 12]
    assert calls == ["reset", "peak"] * 3
    assert json.loads((out / "streamq_report.json").read_text())["peak_vram_bytes"] == 30


@pytest.mark.gpu
def test_to_device_ahead_on_cuda_matches_and_counts_io():
    class Store:
        io_seconds = 0.0

    store = Store()
    xs = [(j, torch.randn(1, 256, 512)) for j in range(4)]
    got = [(j, y.float().cpu()) for j, y in dev.to_device_ahead(iter(xs), CUDA, torch.float16, store)]
    assert all(torch.equal(y, x.half().float()) for (_, y), (_, x) in zip(got, xs))
    assert store.io_seconds > 0


@pytest.mark.gpu
def test_peak_vram_measured_on_the_gpu(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=2, shards=1)
    out = streamq.compress(src, tmp_path / "o", group_size=32, nsamples=4, seqlen=32, calib=str(src / "calib.txt"),
                           progress=False, device="cuda")
    report = json.loads((out / "streamq_report.json").read_text())
    blocks = report["blocks"]
    assert all(b["peak_vram_bytes"] > 0 for b in blocks.values())
    assert report["peak_vram_bytes"] == max(b["peak_vram_bytes"] for b in blocks.values())
