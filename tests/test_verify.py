"""`streamq verify`: passes on a fresh output; one line per problem (flipped byte, missing shard, unfinished run,
index or source coverage gaps) and exit 1 otherwise."""
from __future__ import annotations

import json
import shutil

import pytest

import streamq
from streamq.cli import main
from streamq.interrupt import Interrupted
from streamq.verify import verify
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(nsamples=2, seqlen=16, group_size=32, shard_size=30_000, progress=False)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(source model, a finished output of it with one shard per block + one for the rest)."""
    tmp = tmp_path_factory.mktemp("verify")
    model = make_tiny_model(tmp / "m", "llama", n_layers=2, shards=2)
    out = streamq.compress(model, tmp / "out", calib=str(model / "calib.txt"), **RUN)
    assert len(list(out.glob("*.safetensors"))) == 3
    return model, out


def cli_verify(out, capsys) -> tuple[int, list[str]]:
    code = main(["verify", str(out)])
    return code, capsys.readouterr().err.splitlines()


def test_fresh_output_verifies(fresh, capsys):
    _, out = fresh
    assert verify(out) == []
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: ok"


@pytest.mark.parametrize("where,words", [("data", ["bytes", "block.1", "sha256"]), ("header", ["header"])])
def test_flipped_byte_is_caught(fresh, tmp_path, capsys, where, words):
    out = shutil.copytree(fresh[1], tmp_path / "o")
    shard = out / "model-00002-of-00003.safetensors"  # block.1
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len + 1000 if where == "data" else 8 + header_len // 2] ^= 0x10
    shard.write_bytes(raw)
    code, lines = cli_verify(out, capsys)
    assert code == 1 and len(lines) >= 1 and all(shard.name in ln for ln in lines), lines
    assert all(any(w in ln for ln in lines) for w in words), lines


def test_missing_shard_is_caught(fresh, tmp_path, capsys):
    out = shutil.copytree(fresh[1], tmp_path / "o")
    (out / "model-00003-of-00003.safetensors").unlink()
    code, lines = cli_verify(out, capsys)
    assert code == 1 and lines == [f"{out / 'model-00003-of-00003.safetensors'}: shard missing"]


def test_incomplete_run_is_caught(fresh, tmp_path, capsys):
    model, _ = fresh
    out = tmp_path / "o"
    with pytest.raises(Interrupted):  # the pipeline's safe stop, asked for after the first block
        streamq.compress(model, out, calib=str(model / "calib.txt"), should_stop=lambda: True, **RUN)
    code, lines = cli_verify(out, capsys)
    assert code == 1 and len(lines) == 1 and "incomplete run (1 of 2 blocks written" in lines[0], lines


def test_index_and_source_coverage_are_checked(fresh, tmp_path, capsys):
    out = shutil.copytree(fresh[1], tmp_path / "o")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    dropped = "model.layers.0.mlp.down_proj.qweight"
    del index["weight_map"][dropped]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    manifest["plan"]["source"]["model.layers.9.mlp.up_proj.weight"] = ["model.layers.9.mlp.up_proj.qweight"]
    (out / "streamq_manifest.json").write_text(json.dumps(manifest))
    code, lines = cli_verify(out, capsys)
    assert code == 1 and len(lines) == 2, lines
    assert "model.layers.9.mlp.up_proj.weight is not represented" in lines[0]
    assert dropped in lines[1] and "model.safetensors.index.json" in lines[1]


def test_not_an_output_folder(tmp_path, capsys):
    assert cli_verify(tmp_path, capsys) == (1, [f"{tmp_path}: no streamq_manifest.json; not a streamq output folder"])
