"""`streamq inspect`: the report of a model folder (the per-family structure is checked in
tests/test_architectures.py)."""
from __future__ import annotations

import json

from streamq.cli import main
from tests.conftest import make_tiny_model


def test_inspect_prints_blocks_groups_and_group_sizes(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "neox", "gpt_neox", n_layers=3, shards=2, hidden=96, inter=192)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "gpt_neox.layers.0..2: 3 x GPTNeoXLayer, run by gpt_neox (GPTNeoXModel)" in text
    assert "before      gpt_neox.embed_in (Embedding), gpt_neox.rotary_emb" in text
    assert "after       gpt_neox.final_layer_norm (LayerNorm), lm_head (Linear)" in text
    assert "4 per block in 4 true-sequential groups (the same in every block)" in text
    assert "  1     attention.query_key_value         [288, 96]       yes   32 (not 64 128 256)" in text
    assert "  4     mlp.dense_4h_to_h                 [96, 192]       yes   32 64 (not 128 256)" in text
    assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [len(b) for b in report["blocks"]] == [4, 4, 4] and report["tested"]


def test_inspect_of_unknown_model_type_is_one_line(tmp_path, capsys):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "nosuchnet"}))
    assert main(["inspect", str(src)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "model type 'nosuchnet' is unknown to transformers" in err
