"""The command line as a newcomer meets it: help that states every default, --debug after the command, eval on
the shipped held-out text by default, progress a log file can hold, generate streaming its tokens."""
from __future__ import annotations

import argparse

import pytest

from streamq.cli import build_parser, main
from streamq.errors import StreamqError
from streamq.perplexity import HELDOUT
from tests.conftest import loaded_model_perplexity, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny 2-block model and its RTN output folder (data-free: fast)."""
    tmp = tmp_path_factory.mktemp("usage")
    src = make_tiny_model(tmp / "m", "llama", n_layers=2, shards=1)
    assert main(["compress", str(src), str(tmp / "out"), "--method", "rtn", "--group-size", "32",
                 "--no-progress"]) == 0
    return src, tmp / "out"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_says_its_default():
    commands = subparsers(build_parser())
    assert {"compress", "plan", "eval", "generate", "verify", "demo"} <= set(commands)
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"streamq {name} {action.dest}: no help text"
            if action.option_strings:
                text = formatter._get_help_string(action) % {"default": action.default}
                assert ("default" in text) or (action.required and "required" in text), f"streamq {name} {action.option_strings[0]}: help names no default: {text}"
    compress_help = commands["compress"].format_help()
    assert "{best,light,near-lossless}" in compress_help  # --preset lists its choices
    assert "(default: 2048)" in compress_help and "(default: gptq)" in compress_help


def test_debug_is_accepted_before_and_after_the_command(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert main(["compress", missing, str(tmp_path / "o")]) == 2  # one-line error
    assert "streamq: error:" in capsys.readouterr().err
    for argv in (["--debug", "compress", missing, str(tmp_path / "o")], ["compress", missing, str(tmp_path / "o"),
                                                                          "--debug"], ["eval", missing, "--debug"]):
        with pytest.raises(StreamqError):  # the traceback, not the one-line error
            main(argv)


def test_eval_defaults_to_the_shipped_heldout_text_and_counts_windows(compressed, capsys):
    _, out = compressed
    assert main(["eval", str(out), "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("on 2 windows x 32 tokens (62 predicted)"), line
    expected = loaded_model_perplexity(out, HELDOUT, 32, 2)  # the full transformers model on the same windows
    assert float(line.split()[1]) == pytest.approx(expected, rel=1e-3)


def test_progress_without_a_terminal_is_one_line_per_block(compressed, tmp_path, capsys):
    src, out = compressed  # capsys: stderr is not a terminal
    assert main(["compress", str(src), str(tmp_path / "g"), "--calib", str(src / "calib.txt"), "--nsamples", "2",
                 "--seqlen", "32", "--group-size", "32"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert any("tokenizing the calibration text into 2 windows of 32 tokens" in s for s in lines), err
    assert any("capturing block-0 inputs" in s for s in lines), err
    blocks = [s for s in lines if s.startswith("block ")]
    assert [s.split(":")[0] for s in blocks] == ["block 1/2", "block 2/2"], err
    assert all("ETA" in s and "RAM" in s for s in blocks), err
    assert main(["eval", str(out), "--seqlen", "32", "--max-windows", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and [s.split(" done")[0] for s in err.splitlines()] == ["eval: block 1/2", "eval: block 2/2"]


def test_generate_streams_each_token_as_it_comes(compressed, capsys, monkeypatch):
    from transformers import TextStreamer

    from streamq.loading import generate

    _, out = compressed
    puts = []
    put = TextStreamer.put
    monkeypatch.setattr(TextStreamer, "put", lambda self, value: (puts.append(value.numel()), put(self, value))[1])
    assert main(["generate", str(out), "It was", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert len(puts) == 1 + 4  # the prompt, then each of the 4 new tokens on its own (this model emits no eos)
    assert printed == "It was" + generate(out, "It was", 4) + "\n"
