"""`--method autoround` through the streaming pipeline: equals the in-memory reference, iters 0 is RTN,
beats RTN on every block, and resumes byte-identically."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

import streamq
from streamq.calib.data import calibration_windows
from streamq.cli import main
from streamq.formats.gptq import unpack_gptq
from tests.conftest import make_tiny_model, run_interrupted
from tests.reference import reference_autoround
from tests.test_pipeline import read_all

pytestmark = pytest.mark.usefixtures("one_thread")

NS, SEQ = 8, 32
RUN = dict(nsamples=NS, seqlen=SEQ, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ar") / "llama", "llama", n_layers=3, shards=2)


def run(src, out, **kw):
    return streamq.compress(src, out, **{"method": "autoround", "calib": str(src / "calib.txt"), **RUN, **kw})


def report(out) -> dict:
    return json.loads((out / "streamq_report.json").read_text())


def file_bytes(out) -> dict[str, bytes]:
    """Shards, index, config and tokenizer files; the manifest and report also hold timings."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name not in ("streamq_report.json", "streamq_manifest.json")}


@pytest.mark.parametrize("offload,fp_targets", [("disk", True), ("ram", True), ("disk", False)])
def test_streamed_equals_in_memory_reference(src, tmp_path, offload, fp_targets):
    cfg = dict(bits=3, group_size=32, sym=False, iters=12, seed=3, fp_targets=fp_targets)
    out = run(src, tmp_path / "out", offload=offload, **cfg)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ, seed=3)
    _, ref = reference_autoround(src, tokens, streamq.QuantConfig(method="autoround", batch_size=4, **cfg))
    tensors = read_all(out)
    assert len(ref) == 3 * 7
    for name, r in ref.items():
        got = unpack_gptq({k: tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 3)
        assert torch.equal(got.codes, r.codes.to(torch.int32)), name
        assert torch.equal(got.zeros, r.zeros.to(torch.int32)), name
        assert torch.equal(got.scales, r.scales.float()), name


def test_fp_targets_differ_from_quantized_input_targets_after_block_0(src):
    """Block 0 sees the same inputs and targets in both modes; later blocks are tuned toward other targets."""
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ, seed=0)
    cfg = dict(method="autoround", bits=3, group_size=32, iters=6, batch_size=4)
    _, fp = reference_autoround(src, tokens, streamq.QuantConfig(**cfg))
    _, hybrid = reference_autoround(src, tokens, streamq.QuantConfig(**cfg, fp_targets=False))
    for name in fp:
        same = torch.equal(fp[name].codes, hybrid[name].codes)
        assert same == (".layers.0." in name), name


@pytest.mark.parametrize("full_range", [None, False])  # None: AutoRound's default, the full-range grid
def test_iters_0_writes_the_rtn_model(src, tmp_path, full_range):
    rtn = streamq.compress(src, tmp_path / "rtn", method="rtn", bits=4, group_size=32, progress=False,
                           full_range=full_range is None)
    ar = run(src, tmp_path / "ar", bits=4, group_size=32, iters=0, full_range=full_range)
    assert file_bytes(ar)["model.safetensors"] == file_bytes(rtn)["model.safetensors"]


def test_block_output_error_below_rtn_on_every_block(src, tmp_path):
    tuned = report(run(src, tmp_path / "tuned", bits=3, group_size=32, iters=40))
    rtn = report(run(src, tmp_path / "rtn", bits=3, group_size=32, iters=0))
    for i, block in rtn["blocks"].items():
        e_rtn = next(iter(block["layers"].values()))["error"]
        e_ar = next(iter(tuned["blocks"][i]["layers"].values()))["error"]
        assert 0 < e_ar < e_rtn, (i, e_ar, e_rtn)


def test_resume_after_interruption_is_byte_identical(src, tmp_path, monkeypatch):
    cfg = dict(bits=4, group_size=32, iters=8, shard_size=40_000)
    whole = file_bytes(run(src, tmp_path / "whole", **cfg))
    assert len([n for n in whole if n.endswith(".safetensors")]) > 1
    run_interrupted(monkeypatch, "autoround_step", lambda: run(src, tmp_path / "cut", **cfg))  # in block 1
    assert json.loads((tmp_path / "cut" / "streamq_manifest.json").read_text())["next_block"] == 1
    assert file_bytes(run(src, tmp_path / "cut", **cfg)) == whole


def test_cli_flags_and_preset(src, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compress", str(src), str(out), "--method", "autoround", "--preset", "light", "--iters", "3",
                 "--bits", "4", "--group-size", "32", "--calib", str(src / "calib.txt"), "--nsamples", "4",
                 "--seqlen", "32", "--batch-size", "2", "--grad-accum", "2", "--no-progress"]) == 0
    method = report(out)["method"]
    assert (method["iters"], method["lr"], method["batch_size"], method["grad_accum"]) == (3, 5e-3, 2, 2)
    assert main(["compress", str(src), str(tmp_path / "x"), "--method", "gptq", "--preset", "light"]) == 2
    assert "--preset 'light' does not exist for --method gptq" in capsys.readouterr().err
