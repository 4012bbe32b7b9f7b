"""IO off the compute path: read-ahead of the next block's weights, write-behind of the finished block's
tensors and manifest, and the IO wait each block records."""
from __future__ import annotations

import json
import threading
import time

import pytest

import streamq
from streamq import blockwork
from streamq.calib.store import ActivationStore
from streamq.errors import StreamqError
from streamq.io import prefetch
from streamq.io.writer import ShardWriter
from streamq.io.blocks import block_names, build_layout
from streamq.io.checkpoint import Checkpoint
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ra") / "llama", "llama", n_layers=3, shards=2)


def test_read_ranges_reads_exactly_the_blocks_bytes(src):
    ckpt = Checkpoint(src)
    names = block_names(build_layout(ckpt), ckpt, 1)
    ranges = [ckpt.byte_range(n) for n in names]
    assert prefetch.read_ranges(ranges) == sum(ckpt.nbytes(n) for n in names) > 0
    path, begin, end = ranges[0]  # the range is the tensor's bytes: they decode to the tensor
    raw = path.read_bytes()[begin:end]
    assert raw == ckpt.get(names[0]).contiguous().numpy().tobytes()


def test_each_next_block_is_read_ahead_and_io_wait_recorded(src, tmp_path, monkeypatch):
    started, waited = [], []
    real_start, real_wait = prefetch.Prefetcher.start, prefetch.Prefetcher.wait
    monkeypatch.setattr(prefetch.Prefetcher, "start", lambda self, key, names: started.append(key) or real_start(
        self, key, names))
    monkeypatch.setattr(prefetch.Prefetcher, "wait", lambda self, key: waited.append(key) or real_wait(self, key))
    out = streamq.compress(src, tmp_path / "out", calib=str(src / "calib.txt"), nsamples=4, seqlen=32,
                           group_size=16, progress=False)
    assert started == [0, 1, 2] and waited == [0, 1, 2]
    blocks = json.loads((out / "streamq_manifest.json").read_text())["blocks"]
    for b in blocks.values():
        assert 0 < b["io_wait_seconds"] < b["seconds"]  # store reads/writes and the shard write take some time
    report = json.loads((out / "streamq_report.json").read_text())
    assert report["io_wait_seconds_total"] == pytest.approx(sum(b["io_wait_seconds"] for b in blocks.values()))


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_block_is_written_behind_while_the_next_computes(src, tmp_path, monkeypatch, method):
    """Block i's shard write runs on the write-behind thread while block i + 1 computes, yet nothing
    overwrites the store before block i is in the manifest, and the output is the same bytes."""
    whole = streamq.compress(src, tmp_path / "whole", method=method, calib=str(src / "calib.txt"), nsamples=4,
                             seqlen=32, group_size=16, progress=False)
    out = tmp_path / "out"
    events, current = [], [None]
    real_work, real_write_unit, real_store_write = blockwork.block_work, ShardWriter.write_unit, ActivationStore._write

    def work(layout, ckpt, i, *args, **kw):
        current[0] = i
        events.append(("start", i, time.perf_counter()))
        return real_work(layout, ckpt, i, *args, **kw)

    def write_unit(self, key, tensors):
        if key.startswith("block."):
            time.sleep(0.3)  # a slow disk
        digest = real_write_unit(self, key, tensors)
        events.append(("written", key, time.perf_counter(), threading.current_thread().name))
        return digest

    def store_write(self, slot, j, x):
        if current[0]:  # a block after the first: its predecessor must be recorded before its inputs go
            assert json.loads((out / "streamq_manifest.json").read_text())["next_block"] == current[0]
        return real_store_write(self, slot, j, x)

    monkeypatch.setattr("streamq.pipeline.block_work", work)
    monkeypatch.setattr(ShardWriter, "write_unit", write_unit)
    monkeypatch.setattr(ActivationStore, "_write", store_write)
    streamq.compress(src, out, method=method, calib=str(src / "calib.txt"), nsamples=4, seqlen=32, group_size=16,
                     progress=False)
    starts = {e[1]: e[2] for e in events if e[0] == "start"}
    written = {e[1]: e for e in events if e[0] == "written"}
    for i in (0, 1, 2):
        assert written[f"block.{i}"][3].startswith("streamq-write")
    for i in (1, 2):  # block i started before block i - 1's tensors were on disk
        assert starts[i] < written[f"block.{i - 1}"][2]
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".safetensors"}  # noqa: E731
    assert files(out) == files(whole)


def test_a_failed_write_behind_stops_the_run_and_leaves_the_block_unrecorded(src, tmp_path, monkeypatch):
    real_write_unit = ShardWriter.write_unit

    def write_unit(self, key, tensors):
        if key == "block.1":
            raise StreamqError("model.safetensors: disk full (test)")
        return real_write_unit(self, key, tensors)

    monkeypatch.setattr(ShardWriter, "write_unit", write_unit)
    out = tmp_path / "out"
    with pytest.raises(StreamqError, match="disk full"):
        streamq.compress(src, out, calib=str(src / "calib.txt"), nsamples=4, seqlen=32, group_size=16, progress=False)
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert manifest["next_block"] == 1 and not manifest["complete"] and "block.1" not in manifest["units"]
    monkeypatch.setattr(ShardWriter, "write_unit", real_write_unit)  # space freed: the same command resumes
    streamq.compress(src, out, calib=str(src / "calib.txt"), nsamples=4, seqlen=32, group_size=16, progress=False)
    assert json.loads((out / "streamq_manifest.json").read_text())["complete"]
