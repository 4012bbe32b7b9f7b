"""`streamq demo` end to end on a tiny stand-in for SmolLM2 (no network): it compresses, evaluates and generates,
and redoes its own cache folder when another streamq version left it there, but never discards a user's folder."""
from __future__ import annotations

import json

import pytest

from streamq import demo
from streamq.errors import OtherRunError
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_and_redoes_its_stale_cache_folder(tmp_path, monkeypatch, capsys):
    src = make_tiny_model(tmp_path / "SmolLM2-tiny", "llama", n_layers=2, shards=1)
    monkeypatch.setattr(demo, "ensure_smollm2", lambda: src)
    monkeypatch.setattr(demo, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(demo, "DEMO", {**demo.DEMO, "nsamples": 2, "seqlen": 64})
    monkeypatch.setattr(demo, "EVAL", {"seqlen": 64, "max_windows": 2})
    first = demo.run_demo(None, 4, "rtn")
    assert first["ppl_compressed"] > 0 and "perplexity on 2 x 64 held-out tokens" in capsys.readouterr().out
    out = tmp_path / "cache" / "SmolLM2-tiny-rtn-w4g64"
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    manifest["fingerprint"]["streamq version"] = "0.0.1"  # as an older streamq would have left it
    (out / "streamq_manifest.json").write_text(json.dumps(manifest))
    again = demo.run_demo(None, 4, "rtn")
    assert again["ppl_compressed"] == first["ppl_compressed"]
    assert json.loads((out / "streamq_manifest.json").read_text())["fingerprint"]["streamq version"] != "0.0.1"
    older = {k: v for k, v in json.loads((out / "streamq_manifest.json").read_text()).items() if k != "files"}
    (out / "streamq_manifest.json").write_text(json.dumps(older))  # a manifest from before the 'files' field
    assert demo.run_demo(None, 4, "rtn")["ppl_compressed"] == first["ppl_compressed"]
    assert "files" in json.loads((out / "streamq_manifest.json").read_text())
    (out / "streamq_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OtherRunError, match="belongs to another run"):  # --out given: the user's folder
        demo.run_demo(str(out), 4, "rtn")


def test_demo_announces_its_phases_in_order(tmp_path, monkeypatch, capsys):
    """Fetch, calibration tokenizing, embedding capture, each block, the two evaluations (told apart), generation:
    each on stderr as it starts, one line each (stderr is not a terminal here)."""
    src = make_tiny_model(tmp_path / "SmolLM2-tiny", "llama", n_layers=2, shards=1)
    monkeypatch.setattr(demo, "ensure_smollm2", lambda: src)
    monkeypatch.setattr(demo, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(demo, "DEMO", {**demo.DEMO, "group_size": 32, "nsamples": 2, "seqlen": 32})
    monkeypatch.setattr(demo, "EVAL", {"seqlen": 32, "max_windows": 1})
    demo.run_demo(None, 4, "gptq")
    err = capsys.readouterr().err
    assert "\r" not in err
    expected = ["streamq: model: SmolLM2-135M-Instruct", "streamq: compressing", "streamq: tokenizing the calibration",
                "streamq: capturing block-0 inputs", "block 1/2:", "block 2/2:", "streamq: perplexity of the source",
                "eval source: block 1/2", "eval source: block 2/2", "eval compressed: block 1/2",
                "eval compressed: block 2/2", "streamq: generating"]
    lines = err.splitlines()
    found = [next((n for n, line in enumerate(lines) if line.startswith(e)), None) for e in expected]
    assert None not in found and found == sorted(found), (dict(zip(expected, found)), err)
