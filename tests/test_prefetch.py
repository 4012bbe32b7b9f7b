"""Read-ahead of the next block's weights, and the IO wait each block records."""
from __future__ import annotations

import json

import pytest

import streamq
from streamq.io import prefetch
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
