"""A full disk (ENOSPC) while writing a shard, the activation store or the manifest: one line naming the file
and the bytes still to write, a non-zero exit, nothing marked complete, and a re-run finishes byte-identical."""
from __future__ import annotations

import builtins
import errno
import json
import re

import pytest

import streamq.calib.store
import streamq.io.manifest
import streamq.io.writer
from streamq.cli import main
from tests.conftest import make_tiny_model, output_snapshot
from tests.faults import InterceptedFile, full_disk_pwrite, write_half

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(argv for an output folder, the snapshot of an undisturbed run)."""
    tmp = tmp_path_factory.mktemp("diskfull")
    model = make_tiny_model(tmp / "m", "llama", n_layers=2, shards=2)

    def argv(out):
        return ["compress", str(model), str(out), "--calib", str(model / "calib.txt"), "--nsamples", "2",
                "--seqlen", "16", "--group-size", "32", "--shard-size", "30000", "--offload", "disk", "--no-progress"]

    assert main(argv(tmp / "ref")) == 0
    return argv, output_snapshot(tmp / "ref")


def full_after(n_writes: int):
    """An open() whose files take n_writes write() calls, then write half the next one and raise ENOSPC."""
    count = [0]

    def on_write(f, data):
        count[0] += 1
        if count[0] > n_writes:
            write_half(f, data)
            raise OSError(errno.ENOSPC, "No space left on device")

    return lambda *a, **k: InterceptedFile(builtins.open(*a, **k), on_write)


def fill_disk(where: str, monkeypatch) -> None:
    if where == "shard":  # 31 writes per block unit (header + 30 tensors): this is mid block.1
        monkeypatch.setattr(streamq.io.writer, "open", full_after(40), raising=False)
    elif where == "manifest":  # the first manifest, block 0's, then block 1's fails
        monkeypatch.setattr(streamq.io.manifest, "open", full_after(2), raising=False)
    else:  # the 5th sample written: block 1's first output into slot a (block 0 read two from a, wrote two to b)
        monkeypatch.setattr(streamq.calib.store, "pwrite_all",
                            full_disk_pwrite(streamq.calib.store.pwrite_all, fail_at=5))


@pytest.mark.parametrize("where,file", [("shard", "model-00002-of-00003.safetensors.partial"),
                                        ("store", ".streamq-work/activations/a/c/0/0/0"),
                                        ("manifest", "streamq_manifest.json")])
def test_disk_full_is_one_line_and_resumable(setup, tmp_path, monkeypatch, capsys, where, file):
    argv, ref = setup
    out = tmp_path / "o"
    fill_disk(where, monkeypatch)
    code = main(argv(out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"streamq: error: {out / file}: disk full")
    needed = int(re.search(r"\(([\d,]+) bytes still to write", err).group(1).replace(",", ""))
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert manifest["complete"] is False and not (out / "streamq_manifest.json.tmp").exists()
    plan = manifest["plan"]
    if where == "shard":  # the rest of the output: block.1 and the non-block tensors, + the last shard's header
        assert needed == sum(u["end"] - u["begin"] for k, u in plan["units"].items() if k != "block.0") \
            + plan["units"]["rest"]["begin"]
    elif where == "store":  # slot a's two samples of [16 tokens, 64 hidden] float32
        assert needed == 2 * 16 * 64 * 4
    else:
        assert needed > 1000
    monkeypatch.undo()  # space freed: the same command finishes the run
    assert main(argv(out)) == 0
    assert output_snapshot(out) == ref
