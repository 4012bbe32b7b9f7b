"""tools/gpu_check.py in its --cpu-smoke mode (toy sizes on the CPU): the kernel timings and one random-model
compression in a child process end in a JSON + markdown report; a failing section is recorded, not fatal."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_writes_the_report(gpu_check, tmp_path):
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "kernels,block65b"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke"
    k = report["sections"]["kernels"]
    assert {(r["bits"], r["batch"]) for r in k["gptq"]} == {(4, 1), (4, 16), (8, 1), (8, 16)}
    assert all(r["rel_error"] < 1e-3 and r["fused_ms"] > 0 for r in k["gptq"]) and k["spqr"]["rel_error"] < 1e-3
    b = report["sections"]["block65b"]
    assert "error" not in b, b
    assert b["seconds_per_block"] > 0 and b["peak_rss_bytes"] > 10**7 and 0 <= b["io_wait_share"] < 1
    assert b["arguments"]["max_ram"] == "16GB" and b["mean_layer_error"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| 256x256 | 4 | 1 |" in md and "block65b:" in md and "peak RSS" in md


def test_failing_and_late_sections_are_recorded(gpu_check, tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setitem(gpu_check.SECTIONS, "kernels", broken)
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "kernels"]) == 0
    got = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["kernels"]
    assert got["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--sections", "block65b", "--budget-s", "-1"]) == 0
    assert "skipped" in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["block65b"]


def test_refuses_to_run_without_a_gpu_unless_smoke(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
