"""io/checkpoint.py Checkpoint.read: a stored tensor's bytes read by their range, not through a memory map (whose
pages would count in RSS), checked finite in chunks; a file cut short after its header was checked is an error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamq.errors import StreamqError
from streamq.io.checkpoint import Checkpoint, check_stored_finite


def rss_kb(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    torch.manual_seed(0)
    save_file({"big": torch.randn(4096, 4096).to(torch.bfloat16), "small": torch.randn(3, 5)},
              str(tmp_path / "model.safetensors"))
    return tmp_path


def test_read_equals_safetensors_and_maps_no_file_pages(folder):
    ckpt = Checkpoint(folder, hash_reads=True)
    before = rss_kb("RssFile")
    big = ckpt.read("big")  # 32 MiB
    grown = rss_kb("RssFile") - before
    reference = load_file(str(folder / "model.safetensors"))
    assert torch.equal(big.view(torch.int16), reference["big"].view(torch.int16))
    assert torch.equal(ckpt.read("small"), reference["small"])
    assert grown < 4 << 10, f"RssFile grew {grown} kB while reading a 32 MiB tensor"
    assert set(ckpt.digests) == {"big", "small"}


def test_read_of_a_file_cut_short_after_its_header_was_checked(folder):
    ckpt = Checkpoint(folder)
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(StreamqError, match="cannot read tensor"):
        ckpt.read("big")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n, where", [(70, 0), (70, 9), (70, 69), (100_003, 50_001), (100_003, 100_002)])
def test_finite_check_finds_a_non_finite_value_anywhere(tmp_path, n, where, bad, dtype):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    check_stored_finite(t, tmp_path / "x.safetensors", "t")
    t[where] = bad
    with pytest.raises(StreamqError, match="t contains NaN or Inf"):
        check_stored_finite(t, tmp_path / "x.safetensors", "t")


def test_finite_check_passes_integers_and_empty_tensors(tmp_path):
    for t in (torch.arange(10, dtype=torch.int32), torch.empty(0, 7, dtype=torch.bfloat16)):
        check_stored_finite(t, tmp_path / "x.safetensors", "t")
