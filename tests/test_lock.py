"""One writer per output folder; readers refuse a folder a live run holds, and an unfinished or garbage one
(issue 13 items 3 and 7, first half)."""
from __future__ import annotations

import json
import shutil

import pytest

import streamq
from streamq import blockwork
from streamq.cli import main
from streamq.interrupt import Interrupted
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ["--method", "rtn", "--group-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("lock") / "m", "llama", n_layers=2, shards=2)


def cli(args, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.splitlines()


def test_second_writer_and_readers_are_refused_while_a_run_holds_the_folder(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    streamq.compress(model, out, method="rtn", group_size=32, progress=False)  # a finished folder, restarted below
    real, seen = blockwork.block_work, {}

    def meanwhile(*args, **kwargs):  # block 1 of the --restart run: every other command on OUT
        if args[2] == 1 and not seen:
            for name, argv in {"compress": ["compress", model, out, *FAST],
                               "eval": ["eval", out, "--data", model / "calib.txt", "--seqlen", "16",
                                        "--max-windows", "1", "--no-progress"],
                               "generate": ["generate", out, "Hello", "--max-new-tokens", "2"],
                               "verify": ["verify", out]}.items():
                seen[name] = cli(argv, capsys)
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwork, "block_work", meanwhile)
    assert main(["compress", str(model), str(out), *FAST, "--restart"]) == 0
    for name, (code, lines) in seen.items():
        assert code == 2 and len(lines) == 1 and "is writing this folder" in lines[0], (name, lines)
    monkeypatch.setattr(blockwork, "block_work", real)
    assert cli(["verify", out], capsys)[0] == 0  # the lock went with the run


def test_readers_refuse_an_unfinished_or_garbage_folder(model, tmp_path, capsys):
    out = tmp_path / "o"
    streamq.compress(model, out, method="rtn", group_size=32, progress=False)
    done = json.loads((out / "streamq_manifest.json").read_text())
    data = ["--data", model / "calib.txt", "--seqlen", "16", "--max-windows", "1", "--no-progress"]
    for manifest, words in (({**done, "complete": False}, "unfinished"), ("[1, 2]", "not a streamq manifest"),
                            ("{not json", "not valid JSON")):
        (out / "streamq_manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        for argv in (["eval", out, *data], ["generate", out, "Hi", "--max-new-tokens", "2"]):
            code, lines = cli(argv, capsys)
            assert code == 2 and len(lines) == 1 and words in lines[0], (argv[0], lines)
        with pytest.raises(streamq.StreamqError, match=words):
            streamq.load(out)
    (out / "streamq_manifest.json").write_text(json.dumps({**done, "complete": False}))
    code, _ = cli(["eval", out, *data, "--allow-incomplete"], capsys)  # forced: the shards are all there
    assert code == 0
    (out / "streamq_manifest.json").unlink()  # a quantized folder without a manifest: not streamq's
    code, lines = cli(["generate", out, "Hi"], capsys)
    assert code == 2 and "without streamq_manifest.json" in lines[0], lines


def test_interrupted_run_is_refused_by_eval(model, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(Interrupted):
        streamq.compress(model, out, method="rtn", group_size=32, progress=False, should_stop=lambda: True)
    shutil.copy(model / "config.json", out / "config.json")  # even with a config it is not a finished model
    code, lines = cli(["eval", out, "--data", model / "calib.txt", "--seqlen", "16", "--no-progress"], capsys)
    assert code == 2 and "unfinished streamq run (1 blocks written)" in lines[0], lines
