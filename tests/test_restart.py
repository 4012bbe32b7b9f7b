"""--restart is crash-safe and deletes only what streamq wrote; a folder streamq did not create is refused by name
(issue 13 items 2 and 4)."""
from __future__ import annotations

import json
import pathlib

import pytest

import streamq
from streamq.errors import StreamqError
from streamq.verify import verify
from tests.conftest import make_tiny_model, output_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(method="rtn", group_size=32, progress=False)  # RTN: data-free, so a run takes a fraction of a second


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """(source model, a finished single-shard output, its snapshot)."""
    tmp = tmp_path_factory.mktemp("restart")
    model = make_tiny_model(tmp / "m", "llama", n_layers=2, shards=2)
    out = streamq.compress(model, tmp / "out", **RUN)
    assert (out / "model.safetensors").exists()
    return model, out, output_snapshot(out)


def without_options(snap: dict) -> dict:
    """A snapshot with the report's "options" dropped: a --restart run records resume="restart" there."""
    report = json.loads(snap["streamq_report.json"])
    report.pop("options")
    return {**snap, "streamq_report.json": report}


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    return pathlib.Path(shutil.copytree(src, dst))


def test_restart_killed_after_deleting_the_shard_resumes_to_a_true_output(done, tmp_path, monkeypatch):
    """kill -9 just after --restart deleted model.safetensors: the next plain run must not call the folder done."""
    model, out0, ref = done
    out = copy(out0, tmp_path / "o")
    real_unlink = pathlib.Path.unlink

    def unlink_then_die(self, *a, **k):
        real_unlink(self, *a, **k)
        if self.name == "model.safetensors":
            raise KeyboardInterrupt  # the process dies here: nothing after this line runs

    monkeypatch.setattr(pathlib.Path, "unlink", unlink_then_die)
    with pytest.raises(KeyboardInterrupt):
        streamq.compress(model, out, resume="restart", **RUN)
    monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
    assert not json.loads((out / "streamq_manifest.json").read_text())["complete"]
    streamq.compress(model, out, **RUN)
    assert verify(out) == []
    assert output_snapshot(out) == ref


def test_restart_leaves_files_streamq_did_not_write(done, tmp_path):
    model, out0, ref = done
    out = copy(out0, tmp_path / "o")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.bin").write_bytes(b"x")
    streamq.compress(model, out, resume="restart", **RUN)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "keep.bin").read_bytes() == b"x"
    assert verify(out) == []
    got = output_snapshot(out)
    got = {k: v for k, v in got.items() if k not in ("notes.txt", "sub", "sub/keep.bin")}
    assert without_options(got) == without_options(ref)


def test_restart_removes_stale_files_of_the_earlier_run(done, tmp_path):
    """A run with other shards: the earlier run's shards, which the new plan does not have, are gone after."""
    model, _, ref = done
    out = tmp_path / "o"
    streamq.compress(model, out, shard_size=30_000, **RUN)
    assert (out / "model.safetensors.index.json").exists()
    streamq.compress(model, out, resume="restart", **RUN)
    assert without_options(output_snapshot(out)) == without_options(ref)


def test_a_folder_streamq_did_not_create_is_refused_by_name(done, tmp_path):
    model, _, _ = done
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for resume in ("auto", "restart"):
        with pytest.raises(StreamqError, match="notes.txt"):
            streamq.compress(model, out, resume=resume, **RUN)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
