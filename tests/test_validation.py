"""Validation at the edge (issue 13 items 5, 6, 7 second half, 8, 9, 10): every bad header / config / index /
manifest / quantization_config gives one line on stderr, exit 2 (verify: its problem lines, exit 1), and never
an output marked complete."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

import streamq
from streamq.cli import main
from streamq.verify import verify
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--method", "rtn", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(source model with 4 layers in one shard, its finished RTN output)."""
    tmp = tmp_path_factory.mktemp("validation")
    model = make_tiny_model(tmp / "m", "llama", n_layers=4, shards=1)
    out = streamq.compress(model, tmp / "out", method="rtn", group_size=32, progress=False)
    return model, out


def cli(args, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.splitlines()


def refused(args, capsys, *words) -> None:
    code, lines = cli(args, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("streamq: error:"), (code, lines)
    assert all(w in lines[0] for w in words), (words, lines)


def nothing_complete(out) -> None:
    m = out / "streamq_manifest.json"
    assert not m.exists() or json.loads(m.read_text())["complete"] is False


def rewrite_header(shard, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


Q = "model.layers.0.self_attn.q_proj.weight"


def _set(h, name, key, value):
    h[name][key] = value
    return h


@pytest.mark.parametrize("edit,words", [
    (lambda h: {**h, Q: "not an object"}, [Q, "not an object"]),
    (lambda h: [h], ["not a JSON object"]),
    (lambda h: _set(h, Q, "shape", [-64, -64]), [Q, "shape"]),
    (lambda h: {**h, Q: {k: v for k, v in h[Q].items() if k != "data_offsets"}}, [Q, "data_offsets"]),
    (lambda h: _set(h, Q, "dtype", "F16"), [Q, "inconsistent"]),
    (lambda h: _set(h, Q, "shape", [64, "64"]), [Q, "shape"]),
    (lambda h: _set(h, Q, "data_offsets", [0, 1e300]), [Q, "data_offsets"]),
])
def test_bad_header_entry(base, tmp_path, capsys, edit, words):
    model = shutil.copytree(base[0], tmp_path / "m")
    rewrite_header(model / "model.safetensors", edit)
    refused(["compress", model, tmp_path / "o", *FAST], capsys, "model.safetensors", *words)
    nothing_complete(tmp_path / "o")


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 96, ["model.embed_tokens.weight", "[320, 96]"]),
    ("num_hidden_layers", "four", ["num_hidden_layers"]),
    ("num_hidden_layers", -1, ["num_hidden_layers"]),
    ("num_hidden_layers", 2, ["num_hidden_layers 2", "4"]),  # item 6: would silently drop blocks 2 and 3
    ("num_hidden_layers", 6, ["num_hidden_layers 6", "model.layers.4"]),
    ("intermediate_size", 96, ["model.layers.0.mlp", "shape"]),
    ("vocab_size", 1e30, ["vocab_size"]),
])
def test_config_disagreeing_with_the_checkpoint(base, tmp_path, capsys, field, value, words):
    model = shutil.copytree(base[0], tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    refused(["compress", model, tmp_path / "o", *FAST], capsys, "config.json", *words)
    nothing_complete(tmp_path / "o")


def test_index_weight_map_not_an_object(base, tmp_path, capsys):
    model = shutil.copytree(base[0], tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    refused(["compress", model, tmp_path / "o", *FAST], capsys, "index", "weight_map")


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shards_outside_the_model_folder_are_refused(base, tmp_path, capsys, where):
    """Item 8: a model folder must be self-contained."""
    model = shutil.copytree(base[0], tmp_path / "m")
    outside = tmp_path / "outside.safetensors"
    os.replace(model / "model.safetensors", outside)
    if where == "symlink":
        (model / "model.safetensors").symlink_to(outside)
        name = "model.safetensors"
    else:
        name = "../outside.safetensors" if where == "parent" else str(outside)
        weight_map = dict.fromkeys(json.loads(json.dumps(_names(outside))), name)
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(["compress", model, tmp_path / "o", *FAST], capsys, "outside the model folder")


def _names(shard) -> list[str]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


def test_out_that_is_a_file_or_unwritable(base, tmp_path, capsys):
    model = base[0]
    (tmp_path / "file").write_text("x")
    refused(["compress", model, tmp_path / "file", *FAST], capsys, "not a folder")
    refused(["compress", model, tmp_path / "file" / "o", *FAST], capsys, "cannot write there")


@pytest.mark.parametrize("manifest,words", [("{garbage", ["not valid JSON"]), ('{"complete": true}', ["field"]),
                                            ("[]", ["not a streamq manifest"])])
def test_bad_manifest_in_out(base, tmp_path, capsys, manifest, words):
    model, out0 = base
    out = shutil.copytree(out0, tmp_path / "o")
    (out / "streamq_manifest.json").write_text(manifest)
    refused(["compress", model, out, *FAST], capsys, "streamq_manifest.json", *words, "--restart")
    code, lines = cli(["verify", out], capsys)
    assert code == 1 and len(lines) == 1 and all(w in lines[0] for w in words), lines


def set_qconfig(out, **changes) -> None:
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    for k, v in changes.items():
        if v is None:
            q.pop(k)
        else:
            q[k] = v
    if changes.get("quant_method", 0) is None:
        config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes", [dict(bits=3), dict(bits=99), dict(group_size=7), dict(group_size=0),
                                     dict(group_size=64), dict(bits=None), dict(quant_method=None)])
def test_quantization_config_that_disagrees_with_the_tensors(base, tmp_path, capsys, changes):
    """Item 5 (generate / load refuse) and item 7 (verify checks the config against the tensors)."""
    out = shutil.copytree(base[1], tmp_path / "o")
    set_qconfig(out, **changes)
    problems = verify(out)
    assert problems and all("config.json" in p for p in problems), problems
    if changes != dict(quant_method=None):  # without one the folder reads as a plain fp checkpoint
        refused(["generate", out, "Hi", "--max-new-tokens", "2"], capsys, "config.json")
        with pytest.raises(streamq.StreamqError):
            streamq.load(out)


@pytest.mark.parametrize("mutation", ["rename qzeros", "qweight shape"])
def test_packed_tensors_that_lie(base, tmp_path, capsys, mutation):
    out = shutil.copytree(base[1], tmp_path / "o")
    name = "model.layers.1.mlp.up_proj.qzeros" if mutation == "rename qzeros" else "model.layers.1.mlp.up_proj.qweight"

    def edit(h):
        if mutation == "rename qzeros":
            h["model.layers.1.mlp.up_proj.qzerox"] = h.pop(name)
        else:
            h[name]["shape"] = h[name]["shape"][::-1]  # same bytes, transposed shape
        return h

    rewrite_header(out / "model.safetensors", edit)
    refused(["generate", out, "Hi", "--max-new-tokens", "2"], capsys, "model.layers.1.mlp.up_proj")
    with pytest.raises(streamq.StreamqError, match="model.layers.1.mlp.up_proj"):
        streamq.load(out)


def test_resume_hint_does_not_repeat_restart(base, tmp_path, capsys):
    """Item 9: following the hint after a stop must continue the run, not restart it or refuse."""
    import signal

    from streamq import cli as cli_module

    model = base[0]
    real = cli_module.stop_on_signals

    class Stop:
        def __enter__(self):
            class Request:
                signum, exit_code = signal.SIGINT, 130

                def __call__(self):
                    return True
            return Request()

        def __exit__(self, *a):
            return False

    for flags in (["--restart"], ["--no-resume"]):
        out = tmp_path / flags[0].strip("-")
        cli_module.stop_on_signals = Stop
        try:
            code, lines = cli(["compress", model, out, *FAST, *flags], capsys)
        finally:
            cli_module.stop_on_signals = real
        assert code == 130 and "--restart" not in lines[0] and "--no-resume" not in lines[0], lines
        assert f"streamq compress {model} {out}" in lines[0]


def test_max_ram_reported_as_given(base, tmp_path, capsys):
    refused(["compress", base[0], tmp_path / "o", *FAST, "--max-ram", "1KB"], capsys, "--max-ram 1kB")


def test_seqlen_above_max_position_embeddings_warns(base, tmp_path, capsys, caplog):
    model = base[0]
    out = tmp_path / "o"
    code = main(["compress", str(model), str(out), "--group-size", "32", "--no-progress", "--nsamples", "1",
                 "--seqlen", "600", "--calib", str(model / "calib.txt")])
    assert code == 0
    assert "--seqlen 600" in caplog.text and "max_position_embeddings 512" in caplog.text


@pytest.mark.parametrize("name", ["a,b.txt", "c:d.txt"])
def test_calibration_path_with_comma_or_colon(base, tmp_path, capsys, name):
    model = base[0]
    calib = tmp_path / name
    shutil.copy(model / "calib.txt", calib)
    assert main(["compress", str(model), str(tmp_path / "o"), "--group-size", "32", "--no-progress",
                 "--nsamples", "2", "--seqlen", "16", "--calib", str(calib)]) == 0
