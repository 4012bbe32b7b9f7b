"""streamq/report.py: the report's aggregates do not depend on the order the manifest lists blocks and layers in
(a resumed run reads its manifest back with sorted keys, an uninterrupted one holds them in insertion order)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import streamq
from streamq.io.blocks import build_layout
from streamq.io.checkpoint import Checkpoint
from streamq.io.writer import ShardWriter, plan_shards
from streamq.formats import get_format
from streamq.options import RunOptions
from streamq.outputs import plan_units
from streamq.report import layers_in_order, run_report
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def reordered(blocks: dict) -> dict:
    """The same records with blocks and layers in reverse insertion order."""
    return {i: {**b, "layers": dict(reversed(list(b["layers"].items())))} for i, b in reversed(list(blocks.items()))}


def test_aggregates_are_the_same_in_any_key_order(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=3, shards=1)  # 3 blocks x 7 Linears
    out = streamq.compress(src, tmp_path / "out", method="rtn", group_size=32, progress=False)
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    # Errors whose float sum depends on the order: 1.0 first swallows each 1e-16; the small ones first do not.
    blocks = {str(i): manifest["blocks"][str(i)] for i in range(3)}
    for n, (_, _, record) in enumerate(layers_in_order(blocks)):
        record["error"] = 1.0 if n == 0 else 1e-16
    for i, b in enumerate(blocks.values()):
        b["seconds"], b["io_wait_seconds"] = [1e16, 1.0, -1e16][i], [0.1, 0.2, 0.3][i]
    assert sum(r["error"] for b in blocks.values() for r in b["layers"].values()) != \
        sum(r["error"] for b in reordered(blocks).values() for r in b["layers"].values())  # the test can tell

    ckpt = Checkpoint(src)
    layout = build_layout(ckpt)
    cfg = streamq.QuantConfig(method="rtn", group_size=32)
    writer = ShardWriter(tmp_path / "unused", plan_shards(plan_units(layout, ckpt, cfg), RunOptions().shard_size))
    reports = [run_report(ckpt, layout, cfg, RunOptions(), writer, {**manifest, "blocks": b}, torch.device("cpu"),
                          get_format("gptq")) for b in (blocks, reordered(blocks))]
    for r in reports:
        r.pop("peak_rss_bytes")  # this process's high-water mark, read at each call
    assert json.dumps(reports[0], sort_keys=True) == json.dumps(reports[1], sort_keys=True)
    assert reports[0]["mean_layer_error"] == math.fsum([1.0] + [1e-16] * 20) / 21
    assert reports[0]["seconds_total"] == 1.0 and reports[0]["io_wait_seconds_total"] == math.fsum([0.1, 0.2, 0.3])
    assert reports[0]["bits_per_quantized_weight"] == json.loads((out / "streamq_report.json").read_text())[
        "bits_per_quantized_weight"]
