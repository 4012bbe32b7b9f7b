"""Crash safety: a compression SIGKILLed anywhere, or stopped by SIGINT/SIGTERM, resumes with the same command
to an output byte-identical to an uninterrupted run's (manifest and report: apart from TIMING_FIELDS).

Runs are real processes forked from one "fork server" (a `python -c` script that pays the torch/transformers
imports once and forks before any torch compute, so no thread pool is copied): each child installs the test's
kill hooks (below, never in the package) and calls `streamq.cli.main`. A hook counts events (activation-store
writes and renames, shard writes, JSON writes and renames, block starts, finish(), rmtree) and SIGKILLs its
own process at the n-th event of one kind; a write hook first writes half of its bytes, so the kill lands
mid-tensor / mid-file. Kills are chained on one output folder (each next kill drawn from the work that is
left), then a plain run finishes it and the folder is compared with the reference.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from streamq.verify import verify
from tests.conftest import make_tiny_model, output_snapshot

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611
KILLS = 24  # injected kill points at least (each a SIGKILLed process); more until every category was hit
CHAIN = 4  # kills on one folder before a plain run finishes it
N_BLOCKS = 4

SERVER = r'''
import json, os, signal, sys, time, traceback
import streamq.cli, streamq.pipeline, streamq.verify
from streamq.io.blocks import build_layout
from streamq.io.checkpoint import Checkpoint
from tests.faults import InterceptedFile, write_half
build_layout(Checkpoint(sys.argv[1]))  # imports transformers' llama modules; meta device, so no compute

def install(job):
    """Hooks of one child: count events, SIGKILL at job["kill"] = [kind, n], pause at a block, log events."""
    import builtins, shutil
    import streamq.io.manifest as M, streamq.io.writer as W, streamq.pipeline as P, streamq.blockwork as B
    from streamq.calib.store import ActivationStore
    counts, log, phase = {}, [], ["setup"]

    def event(kind, torn=None):
        counts[kind] = counts.get(kind, 0) + 1
        log.append([kind, phase[0]])
        if job.get("kill") == [kind, counts[kind]]:
            if torn is not None:
                torn()
            os.kill(os.getpid(), signal.SIGKILL)

    def torn(kind):  # a file whose write a kill can cut in half
        return lambda f, data: event(kind, torn=lambda: (write_half(f, data), f.flush()))

    W.open = lambda *a, **k: InterceptedFile(builtins.open(*a, **k), torn("shard.write"))
    M.open = lambda *a, **k: InterceptedFile(builtins.open(*a, **k), torn("json.write"))

    def wrap(owner, name, before):
        original = getattr(owner, name)
        def hooked(*a, **k):
            before(*a, **k)
            return original(*a, **k)
        setattr(owner, name, hooked)

    def rename_kind(src, dst, *a, **k):
        src, dst = str(src), str(dst)
        event("store.rename" if ".streamq-work" in src else "shard.rename" if src.endswith(".partial")
              else "shard.reopen" if dst.endswith(".partial") else "json.rename" if src.endswith(".tmp") else "rename")

    def block_start(layout, ckpt, i, *a):
        phase[0] = f"block {i}"
        pause = job.get("pause")
        if pause and pause["block"] == i:
            open(pause["marker"], "w").close()
            time.sleep(pause["seconds"])
        event("block.start")

    def finish_start(*a):
        phase[0] = "finish"
        event("finish.start")

    wrap(ActivationStore, "write", lambda *a: event("store.write"))
    wrap(ActivationStore, "sync", lambda *a: event("store.sync"))  # (flush syncs too)
    wrap(os, "replace", rename_kind)
    wrap(shutil, "rmtree", lambda *a, **k: event("rmtree"))
    wrap(os, "unlink", lambda *a, **k: event("unlink"))
    wrap(B, "load_block", block_start)
    original_finish = P.finish
    def finish(*a):
        finish_start()
        original_finish(*a)
        phase[0] = "cleanup"
    P.finish = finish
    return log

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            log = install(job)
            rc = streamq.cli.main(job["argv"])
            if job.get("events"):
                with open(job["events"], "w") as f:
                    json.dump(log, f)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    print(json.dumps({"pid": pid}), flush=True)
    deadline = time.monotonic() + job["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            print(json.dumps({"rc": "timeout"}), flush=True)
            break
        time.sleep(0.005)
'''


class ForkServer:
    """Runs compressions as forked children of one warm interpreter. start() -> pid; wait() -> exit code
    (negative: killed by that signal)."""

    def __init__(self, model: Path, logs: Path):
        self.logs = logs
        # One torch thread: tiny matmuls on a busy machine run ~3x faster without a second spinning thread.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model)], cwd=ROOT, text=True, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.n = 0

    def start(self, argv: list[str], timeout: float = 300, **hooks) -> int:
        self.n += 1
        self.stderr = self.logs / f"{self.n}.err"
        job = {"argv": argv, "timeout": timeout, "stdout": str(self.logs / f"{self.n}.out"),
               "stderr": str(self.stderr), **hooks}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> int:
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        rc = json.loads(line)["rc"]
        assert rc != "timeout", f"run {self.n} hung: {self.stderr.read_text()[-2000:]}"
        return rc

    def run(self, argv: list[str], **hooks) -> int:
        self.start(argv, **hooks)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def make_harness(tmp: Path, flags: list[str]):
    """(server, argv(out), tmp, the uninterrupted reference run's snapshot, its events as [kind, phase] pairs,
    its seconds) for compress runs with `flags`."""
    model = make_tiny_model(tmp / "m", "llama", n_layers=N_BLOCKS, shards=2)
    (tmp / "logs").mkdir()
    server = ForkServer(model, tmp / "logs")

    def argv(out: Path) -> list[str]:
        return ["compress", str(model), str(out), "--calib", str(model / "calib.txt"), "--nsamples", "2",
                "--seqlen", "16", "--group-size", "32", "--shard-size", "60000", "--offload", "disk",
                "--no-progress", "--device", "cpu", *flags]

    server.start(argv(tmp / "ref"), events=str(tmp / "events.json"))
    start = time.perf_counter()
    assert server.wait() == 0, server.stderr.read_text()
    seconds = time.perf_counter() - start
    ref = output_snapshot(tmp / "ref")
    assert len([n for n in ref if n.endswith(".safetensors")]) >= 3  # several output shards
    return server, argv, tmp, ref, json.loads((tmp / "events.json").read_text()), seconds


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """GPTQ runs (see make_harness)."""
    h = make_harness(tmp_path_factory.mktemp("killresume"), [])
    yield h
    h[0].close()


# AutoRound (a few iterations: the kill points are in the bookkeeping, not the tuning loop) and SpQR (data-sized
# shards laid out from the manifest's outlier counts on resume).
OTHER_METHODS = {"autoround": ["--method", "autoround", "--iters", "4"], "spqr": ["--method", "spqr"]}
OTHER_KILLS = 20  # per method; one kill point costs about one tiny run (~0.5 s idle, 1-2 s on a loaded 2-core box)


@pytest.fixture(scope="module", params=sorted(OTHER_METHODS))
def method_harness(request, tmp_path_factory):
    h = make_harness(tmp_path_factory.mktemp(f"killresume-{request.param}"), OTHER_METHODS[request.param])
    yield h
    h[0].close()


def category(kind: str, phase: str) -> str:
    return f"{kind}@{phase.split()[0]}"  # e.g. json.write@block, shard.write@finish, store.write@setup


def remaining_events(out: Path, events: list) -> list | None:
    """The reference's events that a run resuming `out` will repeat (None: nothing left to do)."""
    manifest = out / "streamq_manifest.json"
    if not manifest.exists():
        return events
    m = json.loads(manifest.read_text())
    if m["complete"]:
        return None
    b = m["next_block"]
    marker = ["block.start", f"block {b}"] if b < N_BLOCKS else ["finish.start", "finish"]
    return events[2:] if b == 0 else events[events.index(marker):]  # a resumed run writes no first manifest


def draw_kill(rng: random.Random, todo: list, left: list) -> tuple[list, str] | None:
    """The first category in `todo` that still occurs in `left` (moved to the back: categories not reachable
    now keep their turn), and a random occurrence of it: [kind, n-th event of that kind in the run]."""
    for cat in todo:
        hits = [p for p, (kind, phase) in enumerate(left) if category(kind, phase) == cat]
        if hits:
            todo.remove(cat)
            todo.append(cat)
            p = rng.choice(hits)
            kind = left[p][0]
            return [kind, sum(1 for k, _ in left[:p + 1] if k == kind)], cat
    return None


def kill_chains(harness, n_kills: int, seed: int) -> None:
    """Chains of up to CHAIN kills on one folder, each drawn from the work left, then a plain run; every folder
    must end byte-identical to the reference, until n_kills kills were made and every category was hit."""
    server, argv, tmp, ref, events, _ = harness
    rng = random.Random(seed)
    categories = sorted({category(k, p) for k, p in events})
    todo = categories.copy()
    rng.shuffle(todo)
    tried = resumed = identical = 0
    kinds = Counter()
    for chain in range(40):
        if tried >= n_kills and set(kinds) == set(categories):
            break
        out = tmp / f"chain{chain}"
        kills = []
        while len(kills) < CHAIN and (left := remaining_events(out, events)):
            drawn = draw_kill(rng, todo, left)
            if drawn is None:
                break
            spec, cat = drawn
            rc = server.run(argv(out), kill=spec)
            if rc == 0:  # the resumed run was shorter than the reference guessed: it finished unharmed
                break
            assert rc == -signal.SIGKILL, f"kill {spec} after {kills}: exit {rc}\n{server.stderr.read_text()[-3000:]}"
            kills.append(spec)
            kinds[cat] += 1
        tried += len(kills)
        assert server.run(argv(out)) == 0, f"resume after kills {kills} failed:\n{server.stderr.read_text()[-3000:]}"
        resumed += len(kills)
        got = output_snapshot(out)
        assert got.keys() == ref.keys(), f"kills {kills}: files differ: {set(got) ^ set(ref)}"
        assert got == ref, f"kills {kills}: bytes differ in {[n for n in ref if got[n] != ref[n]]}"
        assert verify(out) == []
        identical += len(kills)
    print(f"\ninjected kill points: tried {tried}, resumed {resumed}, identical {identical}; by category: "
          + ", ".join(f"{c} {n}" for c, n in sorted(kinds.items())))
    assert tried >= n_kills and resumed == identical == tried
    assert set(kinds) == set(categories)  # every kind of write, in every phase it occurs in


def test_kill_anywhere_then_resume_is_byte_identical(harness):
    kill_chains(harness, KILLS, SEED)


def test_autoround_and_spqr_killed_anywhere_resume_byte_identical(method_harness):
    kill_chains(method_harness, OTHER_KILLS, SEED + 2)


RESTART_KILLS = 20


def without_options(snap: dict) -> dict:
    """A snapshot without the report's "options" (a run that finished a --restart records resume="restart")."""
    report = json.loads(snap["streamq_report.json"])
    report.pop("options")
    return {**snap, "streamq_report.json": report}


def test_kill_during_restart_then_plain_run_is_byte_identical(harness):
    """`--restart` over a finished folder (plus a file that is not streamq's) SIGKILLed at any of its events, then
    the plain command: the same output as the reference, the foreign file still there, never an early success."""
    server, argv, tmp, ref, _, _ = harness
    shutil.copytree(tmp / "ref", tmp / "restart-log")
    assert server.run(argv(tmp / "restart-log") + ["--restart"], events=str(tmp / "restart-events.json")) == 0
    events = json.loads((tmp / "restart-events.json").read_text())
    rng = random.Random(SEED + 3)
    todo = sorted({category(k, p) for k, p in events})
    rng.shuffle(todo)
    kinds = Counter()
    for n in range(RESTART_KILLS):
        out = Path(shutil.copytree(tmp / "ref", tmp / f"restart{n}"))
        (out / "notes.txt").write_text("not streamq's")
        spec, cat = draw_kill(rng, todo, events)
        rc = server.run(argv(out) + ["--restart"], kill=spec)
        assert rc == -signal.SIGKILL, f"kill {spec}: exit {rc}\n{server.stderr.read_text()[-3000:]}"
        kinds[cat] += 1
        assert server.run(argv(out)) == 0, f"after kill {spec}:\n{server.stderr.read_text()[-3000:]}"
        assert (out / "notes.txt").read_text() == "not streamq's"
        got = {k: v for k, v in output_snapshot(out).items() if k != "notes.txt"}
        assert without_options(got) == without_options(ref), f"kill {spec}: {[k for k in ref if got.get(k) != ref[k]]}"
        assert verify(out) == []
    print(f"\n--restart kill points: {RESTART_KILLS}, all resumed identical; by category: "
          + ", ".join(f"{c} {n}" for c, n in sorted(kinds.items())))


def test_timer_sigkill_then_resume_is_byte_identical(harness):
    """Real SIGKILLs from outside at random times of a run (not at a hooked event)."""
    server, argv, tmp, ref, _, seconds = harness
    rng = random.Random(SEED + 1)
    killed = []
    for attempt in range(8):
        out = tmp / f"timer{attempt}"
        pid = server.start(argv(out))
        delay = rng.uniform(0.05, 0.95) * seconds
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already finished and reaped
            pass
        if server.wait() == 0:  # finished before the timer: no kill point
            continue
        killed.append(round(delay, 2))
        assert server.run(argv(out)) == 0, server.stderr.read_text()[-3000:]
        assert output_snapshot(out) == ref, f"after a timer kill at {delay:.2f} s"
        if len(killed) == 2:
            break
    print(f"\ntimer SIGKILLs at {killed} s into a {seconds:.1f} s run: resumed, identical")
    assert killed


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_after_the_block_and_resumes(harness, signum, code):
    server, argv, tmp, ref, _, _ = harness
    out, marker = tmp / f"sig{signum}", tmp / f"sig{signum}.started"
    pid = server.start(argv(out), pause={"block": 1, "seconds": 2.0, "marker": str(marker)})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, server.stderr.read_text()
        time.sleep(0.02)
    os.kill(pid, signum)  # while block 1 (the second) is starting
    assert server.wait() == code
    lines = [ln for ln in server.stderr.read_text().splitlines() if ln.startswith("streamq:")]
    assert len(lines) == 1, lines
    assert f"stopped after block 2/{N_BLOCKS}" in lines[0] and signal.Signals(signum).name in lines[0]
    assert f"run the same command again: streamq {' '.join(argv(out))}" in lines[0]
    manifest = json.loads((out / "streamq_manifest.json").read_text())
    assert manifest["next_block"] == 2 and manifest["complete"] is False
    assert server.run(argv(out)) == 0
    assert output_snapshot(out) == ref
