"""The command line: bad input gives one line on stderr, a non-zero exit, and no output marked complete."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from streamq.cli import main
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--nsamples", "2", "--seqlen", "16", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli") / "m", "llama", n_layers=2, shards=2)


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *words):
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("streamq: error:"), err
    for w in words:
        assert w in err, (w, err)


def assert_compress_refused(src, tmp_path, capsys, *words):
    """compress SRC fails with a one-line error naming words, and leaves nothing marked complete."""
    assert_one_line_error(*run_cli(["compress", str(src), str(tmp_path / "o"), *FAST], capsys), *words)
    assert_nothing_complete(tmp_path / "o")


def assert_nothing_complete(out):
    """A failed run marks nothing complete: no config.json, and a manifest (if any) that says not complete."""
    assert not (out / "config.json").exists()
    manifest = out / "streamq_manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["complete"] is False


def copy_model(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_compress_and_eval_and_generate(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(model), str(out), "--calib", str(model / "calib.txt"), *FAST]) == 0
    assert json.loads((out / "streamq_manifest.json").read_text())["complete"] is True
    assert main(["eval", str(out), "--data", str(model / "calib.txt"), "--seqlen", "32", "--max-windows", "2",
                 "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(out), "It was", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("It was")


@pytest.mark.parametrize("flags,words", [
    (["--bits", "5"], ["--bits 5"]),
    (["--group-size", "0"], ["--group-size 0"]),
    (["--group-size", "48"], ["48", "model.layers.0"]),
    (["--nsamples", "0"], ["--nsamples 0"]),
    (["--damp", "2"], ["--damp"]),
    (["--no-act-order", "--static-groups"], ["--static-groups"]),
    (["--iters", "5"], ["--iters", "--method gptq", "autoround"]),  # another method's flag: refused, not dropped
    (["--outlier-threshold", "0.2"], ["--outlier-threshold", "--method gptq", "spqr"]),
    (["--method", "rtn", "--act-order"], ["--act-order", "--method rtn"]),
    (["--method", "autoround", "--act-order"], ["--act-order", "--method autoround"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["--device"]),
    (["--shard-size", "lots"], ["lots"]),
])
def test_impossible_flags(model, tmp_path, capsys, flags, words):
    args = ["compress", str(model), str(tmp_path / "o"), "--calib", str(model / "calib.txt"), *FAST, *flags]
    with pytest.raises(SystemExit) if flags[0] == "--shard-size" else _no_raise() as exc:
        code = main(args)
    if exc is not None and hasattr(exc, "value"):
        code = exc.value.code
    assert_one_line_error(code, capsys.readouterr().err.strip(), *words)
    assert_nothing_complete(tmp_path / "o")


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_missing_model_folder(tmp_path, capsys):
    assert_one_line_error(*run_cli(["compress", str(tmp_path / "nope"), str(tmp_path / "o")], capsys), "not found")
    assert_nothing_complete(tmp_path / "o")


def test_unsupported_architecture(model, tmp_path, capsys):
    bad = copy_model(model, tmp_path / "gpt2")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    # GPT-2's blocks hold Conv1D layers, not nn.Linear: refused by structure (tests/test_architectures.py has more)
    assert_compress_refused(bad, tmp_path, capsys, "gpt2", "GPT2LMHeadModel", "nn.Linear")


def test_config_not_json(model, tmp_path, capsys):
    bad = copy_model(model, tmp_path / "badjson")
    (bad / "config.json").write_text("{ not json")
    assert_compress_refused(bad, tmp_path, capsys, "config.json", "JSON")


def test_config_without_model_type(model, tmp_path, capsys):
    bad = copy_model(model, tmp_path / "notype")
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert_compress_refused(bad, tmp_path, capsys, "model_type")


def test_pickle_checkpoint_refused(tmp_path, capsys, model):
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text((model / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    assert_compress_refused(bad, tmp_path, capsys, "pytorch_model.bin", "safetensors")


def test_truncated_safetensors(model, tmp_path, capsys):
    bad = copy_model(model, tmp_path / "trunc")
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_compress_refused(bad, tmp_path, capsys, "model-00002-of-00002.safetensors", "truncated")


def test_header_offsets_lie(model, tmp_path, capsys):
    bad = copy_model(model, tmp_path / "lie")
    shard = bad / "model-00001-of-00002.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    assert_compress_refused(bad, tmp_path, capsys, name)


def test_missing_tensor(model, tmp_path, capsys):
    bad = tmp_path / "missing"
    make_tiny_model(bad, "llama", n_layers=2, shards=1)
    from safetensors.torch import load_file
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    assert_compress_refused(bad, tmp_path, capsys, "model.layers.1.mlp.up_proj.weight", "missing")


def test_unusable_dtype(tmp_path, capsys):
    bad = tmp_path / "fp8"
    make_tiny_model(bad, "llama", n_layers=2, shards=1)
    from safetensors.torch import load_file
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, bad / "model.safetensors")
    assert_compress_refused(bad, tmp_path, capsys, "model.safetensors", name, "F8_E4M3", "cannot use")


def test_nan_weight(tmp_path, capsys):
    bad = tmp_path / "nan"
    make_tiny_model(bad, "llama", n_layers=2, shards=1)
    from safetensors.torch import load_file
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    out = tmp_path / "o"
    assert_one_line_error(*run_cli(["compress", str(bad), str(out), *FAST, "--calib", str(bad / "calib.txt")], capsys),
                          "model.layers.1.self_attn.k_proj.weight", "NaN")
    assert_nothing_complete(out)
    assert json.loads((out / "streamq_manifest.json").read_text())["complete"] is False


def test_calibration_text_too_short(model, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert_one_line_error(*run_cli(["compress", str(model), str(tmp_path / "o"), *FAST, "--calib", str(short)],
                                   capsys), "short.txt", "16")
    assert_nothing_complete(tmp_path / "o")


def test_folder_of_another_run_refused(model, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["compress", str(model), str(out), "--calib", str(model / "calib.txt"), *FAST]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli(["compress", str(model), str(out), "--calib", str(model / "calib.txt"), *FAST,
                         "--bits", "8"], capsys)
    assert_one_line_error(code, err, "method")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the other run's folder is left alone
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert_one_line_error(*run_cli(["compress", str(model), str(stranger), *FAST], capsys), "not a streamq output")
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


def test_cli_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "streamq.cli", "compress", str(tmp_path / "x"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
