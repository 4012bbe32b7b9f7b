"""streamq plan / --max-ram: sizes equal hand-computed bytes, decisions follow the budgets, impossible budgets are
refused up front with the smallest that fits, and a budgeted run stays under its budget (ru_maxrss)."""
from __future__ import annotations

import json
import re

import pytest
import torch

import streamq
from streamq import footprint
from streamq.cli import main, parse_size
from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.options import TOKENIZER_FILES, RunOptions
from streamq.planner import apply_plan, make_plan
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(nsamples=2, seqlen=16, group_size=32, progress=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """llama, 2 blocks, hidden 64, 4 heads of 16 (2 kv), inter 128, fp32."""
    return make_tiny_model(tmp_path_factory.mktemp("plan") / "m", "llama", n_layers=2, shards=2)


def test_sizes_equal_hand_computed_bytes(model, tmp_path):
    p = streamq.plan(model, benchmark=False, calib=str(model / "calib.txt"), **FAST)
    # q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128, two norms of 64; fp32 on the CPU
    linear_params = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
    assert [b.weight_bytes for b in p.blocks] == [4 * (linear_params + 2 * 64)] * 2
    b = p.blocks[0]
    assert (b.largest_linear, b.largest_linear_shape, b.hessian_bytes) == ("mlp.down_proj", (64, 128), 128 * 128 * 4)
    assert b.hessians_at_once_bytes == max(4 * 64 * 64 * 4, 2 * 64 * 64 * 4, 128 * 128 * 4)  # q/k/v/o, gate/up, down
    # the block's peak is the down_proj solve (streamq/footprint.py's formula, worked by hand for this config):
    # Wc 147,968 + H_group 65,536 (down's 128x128 fp32 Hessian) + solver 294,912 (max(4*65,536 + 32,768,
    # 65,536 + 3*32,768 + 4*32,768)) + 16 MiB LAPACK slack 16,777,216 + R 36,864 (uint8 codes) = 17,322,496,
    # times the 1.25 block slack. The kept intermediates (quant/stages.py: 2 samples * 16 tokens * (64 + 128) * 4
    # = 24,576) go to disk beside the disk store (quant/kept.py); with the store in RAM they are in the block's
    # peak: 17,347,072 * 1.25
    assert b.peak_bytes == 21_653_120
    kept = 2 * 16 * (64 + 128) * 4
    in_ram = streamq.plan(model, benchmark=False, calib=str(model / "calib.txt"), offload="ram", **FAST)
    assert in_ram.blocks[0].peak_bytes == 21_683_840
    assert p.store_slot_bytes == 2 * 16 * 64 * 4 and p.store_bytes == 2 * p.store_slot_bytes
    assert (p.offload, p.samples_per_forward, p.peak_vram_bytes) == ("disk", 1, 0)
    # a block's packed tensors wait for their write-behind while the next block runs: GPTQ w4 g32 per Linear
    # [out, in] qweight in*out/2, qzeros in/32*out/2, scales in/32*out*2, g_idx in*4 bytes; two fp32 norms:
    # q/o 2,624 each, k/v 1,440 each, gate/up 4,992 each, down 5,248, norms 512 = 23,872
    # peak RAM above the planning baseline: 64 MiB run overhead 67,108,864 + 3 disk-store samples in flight
    # 3*16*64*4 = 12,288 + the block peak 21,653,120 + pending 23,872
    assert p.peak_ram_bytes - p.baseline_rss_bytes == 88_798_144
    assert p.peak_disk_bytes == p.output_bytes + p.store_bytes + kept
    # the output is exactly what compress writes: shards plus the copied tokenizer files
    out = streamq.compress(model, tmp_path / "out", calib=str(model / "calib.txt"), **FAST)
    written = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors" or f.name in TOKENIZER_FILES)
    assert p.output_bytes == written


def test_offload_follows_max_ram(model):
    big = dict(nsamples=128, seqlen=512)  # slots of 16.8 MB: ram needs ~33 MB more than disk
    cfg = QuantConfig(group_size=32)
    disk = make_plan(model, cfg, RunOptions(offload="disk", **big))
    ram = make_plan(model, cfg, RunOptions(offload="ram", **big))
    assert ram.peak_ram_bytes - disk.peak_ram_bytes > 30 * 10**6
    tight = make_plan(model, cfg, RunOptions(**big), max_ram=disk.peak_ram_bytes + 10**7, fixed_offload=False)
    assert tight.offload == "disk" and "ram would need" in tight.offload_reason
    roomy = make_plan(model, cfg, RunOptions(**big), max_ram=ram.peak_ram_bytes + 10**7, fixed_offload=False)
    assert roomy.offload == "ram" and roomy.peak_disk_bytes == roomy.output_bytes
    with pytest.raises(StreamqError, match="--max-ram"):  # --offload ram given: no falling back to disk
        make_plan(model, cfg, RunOptions(offload="ram", **big), max_ram=disk.peak_ram_bytes + 10**7)
    # only ram fits a disk budget smaller than the store
    small_disk = make_plan(model, cfg, RunOptions(**big), max_disk=disk.output_bytes + 10**6, fixed_offload=False)
    assert small_disk.offload == "ram"


def test_resumed_run_keeps_disk(model, tmp_path, monkeypatch):
    monkeypatch.setattr(footprint, "bound_heap", lambda: True)  # process-wide: not for the test session
    out = tmp_path / "out"
    out.mkdir()
    (out / "streamq_manifest.json").write_text(json.dumps({"complete": False, "next_block": 1}))
    opts = apply_plan(model, out, QuantConfig(group_size=32), RunOptions(nsamples=2, seqlen=16), False,
                      max_ram=1 << 40)
    assert opts.offload == "disk"
    fresh = apply_plan(model, tmp_path / "new", QuantConfig(group_size=32), RunOptions(nsamples=2, seqlen=16),
                       False, max_ram=1 << 40)
    assert fresh.offload == "ram"


def test_impossible_budget_refused_with_smallest_that_fits(model, tmp_path, capsys):
    args = ["--calib", str(model / "calib.txt"), "--nsamples", "2", "--seqlen", "16", "--group-size", "32",
            "--no-progress"]
    streamq.plan(model, benchmark=False, nsamples=2, seqlen=16, group_size=32)  # imports paid: RSS steady
    out = tmp_path / "out"
    assert main(["compress", str(model), str(out), "--max-ram", "100MB", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("streamq: error: no plan fits --max-ram 100MB"), err
    assert not out.exists()  # refused before anything was written
    kw = dict(benchmark=False, nsamples=2, seqlen=16, group_size=32)
    with pytest.raises(StreamqError) as refused:  # the same refusal in-process, next to the plans below: the
        streamq.plan(model, max_ram=10**8, **kw)   # baseline (this process's RSS) is the one they see
    smallest = parse_size(re.search(r"smallest that fits is --max-ram (\S+)", str(refused.value)).group(1))
    assert streamq.plan(model, max_ram=smallest, **kw).peak_ram_bytes <= smallest
    with pytest.raises(StreamqError, match="smallest that fits"):  # less by more than the message's rounding
        streamq.plan(model, max_ram=smallest - 11 * 10**6, **kw)   # (fmt_size rounds up: to 10 MB above 1 GB)
    assert main(["plan", str(model), "--group-size", "32", "--max-ram", "1MB", "--no-benchmark"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-ram" in err, err
    assert main(["plan", str(model), "--group-size", "32", "--max-disk", "1kB", "--no-benchmark"]) == 2
    assert "smallest that fits is --max-disk" in capsys.readouterr().err


def test_plan_cli_table_and_json(model, capsys):
    assert main(["plan", str(model), "--nsamples", "4", "--seqlen", "32", "--group-size", "32"]) == 0
    table = capsys.readouterr().out
    for words in ("mlp.down_proj 64x128", "peak RAM", "peak disk", "time (estimate)", "micro-benchmark"):
        assert words in table, table
    assert main(["plan", str(model), "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--json",
                 "--no-benchmark", "--max-ram", "64GB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["offload"] == "ram" and plan["max_ram"] == 64 * 10**9 and plan["estimate_seconds"] is None
    assert plan["store_slot_bytes"] == 4 * 32 * 64 * 4 and len(plan["blocks"]) == 2
    assert plan["store_slots"] == 2 and plan["store_bytes"] == 2 * plan["store_slot_bytes"]
    for flags, slots in (([], 4), (["--no-fp-targets"], 2)):  # AutoRound's fp stream: two more slots
        assert main(["plan", str(model), "--method", "autoround", "--nsamples", "4", "--seqlen", "32",
                     "--group-size", "32", "--json", "--no-benchmark", "--offload", "disk", *flags]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["store_slots"] == slots and plan["peak_disk_bytes"] > slots * plan["store_slot_bytes"]


def test_cuda_blocks_over_max_vram_fall_back_to_cpu(model, tmp_path, monkeypatch):
    """No GPU here: the device is injected (planning reads no tensor and touches no CUDA API)."""
    monkeypatch.setattr("streamq.planner.resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr("streamq.device.has_bf16", lambda device: False)  # a GPU without bf16: fp16
    cfg, opts = QuantConfig(group_size=32), RunOptions(nsamples=2, seqlen=16)
    roomy = make_plan(model, cfg, opts, max_vram=80 * 10**9)
    assert roomy.dtype == "float16" and not roomy.cpu_fallback_blocks  # auto: 16-bit on a GPU
    assert roomy.peak_vram_bytes == max(b.peak_bytes for b in roomy.blocks) + footprint.VRAM_RESERVE
    tight = make_plan(model, cfg, opts, max_vram=footprint.VRAM_RESERVE + 10**6)
    assert tight.cpu_fallback_blocks == [0, 1] and [b.device for b in tight.blocks] == ["cpu", "cpu"]
    assert tight.peak_ram_bytes > roomy.peak_ram_bytes  # the blocks' working sets moved to the host
    assert apply_plan(model, tmp_path / "out", cfg, opts, True, max_vram=80 * 10**9).cpu_blocks == ()
    assert apply_plan(model, tmp_path / "out", cfg, opts, True,
                      max_vram=footprint.VRAM_RESERVE + 10**6).cpu_blocks == (0, 1)


def test_planned_cpu_blocks_run_on_the_cpu(model, tmp_path, monkeypatch):
    """compress with opts.cpu_blocks: those blocks' work gets the CPU, the others the run's device ("cpu:0"
    stands in for a GPU: a device that is not torch.device("cpu") but runs here)."""
    from streamq import pipeline

    devices = []
    monkeypatch.setattr(pipeline, "resolve_device", lambda name: torch.device("cpu", 0))
    monkeypatch.setattr(pipeline, "with_fallback", lambda work, device, what: devices.append(device) or work(
        device, False))
    pipeline.compress(model, tmp_path / "out", QuantConfig(group_size=32), RunOptions(
        nsamples=2, seqlen=16, progress=False, cpu_blocks=(1,), calib=str(model / "calib.txt")))
    assert devices == [torch.device("cpu", 0), torch.device("cpu")]


@pytest.mark.parametrize("formats", ["compressed-tensors", "gptq,compressed-tensors", "compressed-tensors,gguf"])
def test_output_sized_in_the_formats_written(model, tmp_path, formats):
    """The planned output is OUT's shards in their own layout format's shapes (compressed-tensors' weight_packed
    / weight_scale / weight_shape, not GPTQ's): exactly; plus every OUT/<format>/ export: to its file headers
    (an exported layout's safetensors header is save_file's; a GGUF's header and vocabulary come on top of its
    planned tensor data)."""
    p = streamq.plan(model, method="rtn", bits=4, group_size=32, formats=formats, benchmark=False)
    out = streamq.compress(model, tmp_path / "out", method="rtn", bits=4, group_size=32, formats=formats,
                           progress=False)
    files = [f for f in out.rglob("*") if f.suffix in (".safetensors", ".gguf") or f.name in TOKENIZER_FILES]
    written = sum(f.stat().st_size for f in files)
    if "," not in formats:
        assert p.output_bytes == written
    exported = [f for f in files if f.parent != out and f.suffix in (".safetensors", ".gguf")]
    assert p.output_bytes <= written <= p.output_bytes + 16 * 1024 * len(exported), (p.output_bytes, written)
