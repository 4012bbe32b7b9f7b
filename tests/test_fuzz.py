"""Property-style fuzzing of everything streamq parses (issue 13): headers, configs, indexes, manifests and
quantization_configs of a tiny model and its output are mutated (byte flips, type swaps, missing keys, huge
numbers), and compress / verify / load / eval run in-process through `streamq.cli.main` on each. Properties:
  - exit code 0 or 2 (verify: 0 or 1), and on 2 exactly one `streamq: error:` line on stderr; never a
    traceback (any exception escaping main fails the test);
  - never a wrong result called good: a compress that exits 0 leaves a folder `verify` passes whose shards
    are the unmutated run's bytes (output mutations) or that verifies (source mutations); a folder verify
    passes loads to the reference logits.
Seeded (STREAMQ_FUZZ_SEED, default 13), 550 mutations in all; prints the outcomes by class.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import streamq
from streamq.cli import main
from streamq.interrupt import Interrupted
from streamq.verify import verify
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ_SEED = int(os.environ.get("STREAMQ_FUZZ_SEED", "13"))
# mutations per target; 550 in all
PER_TARGET = {"source header": 120, "source config": 90, "source index": 40, "output manifest": 80,
              "interrupted manifest": 60, "output quantization_config": 70, "output shard header": 60,
              "output index": 30}
RTN = ["--method", "rtn", "--group-size", "32", "--no-progress"]
ODD_VALUES = [None, True, False, 0, -1, 1, 3, 7, 99, 2**31, 2**63, -2**63, 1e300, float("nan"), "", "four", "F16",
              [], [0, 1], [-1], {}, {"a": 1}, "../outside.safetensors", "/etc/passwd"]


def mutate_json(obj, rng: random.Random):
    """One random structural mutation somewhere in a JSON value: delete a key / item, swap a value's type, put
    a huge or negative number, add a key, or replace the whole value. Returns the new value."""
    obj = copy.deepcopy(obj)
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, path + [k])
        elif isinstance(v, list):
            for i, x in enumerate(v[:8]):
                walk(x, path + [i])

    walk(obj, [])
    path = rng.choice(paths)
    if not path:
        return rng.choice(ODD_VALUES + [[obj]])
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key, op = path[-1], rng.random()
    if op < 0.25:
        del parent[key]
    elif op < 0.35 and isinstance(parent, dict):
        parent[rng.choice(["x", "__metadata__", "dtype", "shape", "complete"])] = rng.choice(ODD_VALUES)
    elif op < 0.5 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([-parent[key], parent[key] * 2 + 1, parent[key] + 1, 10**18])
    else:
        parent[key] = rng.choice(ODD_VALUES)
    return obj


def flip_bytes(raw: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    raw = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        raw[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(raw)


def mutate_json_file(path: Path, rng: random.Random) -> None:
    raw = path.read_bytes()
    if rng.random() < 0.25:
        path.write_bytes(flip_bytes(raw, rng, 0, len(raw)))
    else:
        path.write_text(json.dumps(mutate_json(json.loads(raw), rng)))


def mutate_header(path: Path, rng: random.Random) -> None:
    """A safetensors file: its header JSON mutated (data section kept), or bytes flipped in the length or header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if rng.random() < 0.3:
        path.write_bytes(flip_bytes(raw, rng, 0, 8 + n))
        return
    new = json.dumps(mutate_json(json.loads(raw[8:8 + n]), rng)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


class Outcomes:
    def __init__(self):
        self.counts = Counter()

    def run(self, target: str, argv: list, capsys) -> int:
        """main(argv) in-process; asserts the exit code and the stderr properties."""
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        ok_codes = (0, 1) if argv[0] == "verify" else (0, 2)
        assert code in ok_codes, (target, argv[0], code, err[-3:])
        assert not any("Traceback" in ln for ln in err), (target, argv[0], err)
        if code == 2:
            errors = [ln for ln in err if ln.startswith("streamq: error:")]
            assert len(errors) == 1 and err[-1] == errors[0], (target, argv[0], err)
        self.counts[f"{target} / {argv[0]} -> exit {code}"] += 1
        return code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(source model in 2 shards with an index, its finished RTN output in 3 shards, the output's shard bytes,
    reference logits of streamq.load(output) on fixed ids, the same run stopped after block 1)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_model(tmp / "m", "llama", n_layers=2, shards=2)
    run = dict(method="rtn", group_size=32, shard_size=30_000, progress=False)
    out = streamq.compress(model, tmp / "out", **run)
    with pytest.raises(Interrupted):
        streamq.compress(model, tmp / "stopped", should_stop=lambda: True, **run)
    shards = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert len(shards) == 3
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = streamq.load(out)(ids).logits
    return model, out, shards, ids, logits, tmp / "stopped"


def loads_to_reference(out: Path, ids, logits) -> None:
    with torch.no_grad():
        torch.testing.assert_close(streamq.load(out)(ids).logits, logits)


def test_fuzz_everything_streamq_parses(world, tmp_path, capsys):
    model, out0, shards, ids, ref_logits, stopped = world
    rng = random.Random(FUZZ_SEED)
    outcomes, start = Outcomes(), time.perf_counter()
    capsys.readouterr()
    for target, n in PER_TARGET.items():
        for k in range(n):
            case = tmp_path / f"{target.replace(' ', '_')}{k}"
            if target.startswith("source"):
                src = Path(shutil.copytree(model, case / "m"))
                if target == "source header":
                    mutate_header(src / f"model-0000{rng.randint(1, 2)}-of-00002.safetensors", rng)
                elif target == "source config":
                    mutate_json_file(src / "config.json", rng)
                else:
                    mutate_json_file(src / "model.safetensors.index.json", rng)
                if outcomes.run(target, ["compress", src, case / "o", *RTN], capsys) == 0:
                    assert verify(case / "o") == [], (target, k)  # exit 0: a complete folder that verifies
            elif target == "interrupted manifest":  # a resume reads it back: exit 0 only to the true output
                out = Path(shutil.copytree(stopped, case / "o"))
                mutate_json_file(out / "streamq_manifest.json", rng)
                if outcomes.run(target, ["compress", model, out, *RTN, "--shard-size", "30000"], capsys) == 0:
                    assert verify(out) == [], (target, k)
                    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == shards
            else:
                out = Path(shutil.copytree(out0, case / "o"))
                if target == "output manifest":
                    mutate_json_file(out / "streamq_manifest.json", rng)
                elif target == "output quantization_config":
                    config = json.loads((out / "config.json").read_text())
                    config["quantization_config"] = mutate_json(config["quantization_config"], rng)
                    (out / "config.json").write_text(json.dumps(config))
                elif target == "output shard header":
                    mutate_header(out / rng.choice(sorted(shards)), rng)
                else:
                    mutate_json_file(out / "model.safetensors.index.json", rng)
                verified = outcomes.run(target, ["verify", out], capsys) == 0
                if verified:  # verify's ok means the folder loads to the reference model
                    loads_to_reference(out, ids, ref_logits)
                if target == "output manifest":
                    if outcomes.run(target, ["compress", model, out, *RTN, "--shard-size", "30000"], capsys) == 0:
                        assert verify(out) == [], (target, k)
                        assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == shards
                else:
                    outcomes.run(target, ["generate", out, "It", "--max-new-tokens", "1"], capsys)
                    if k % 10 == 0:
                        outcomes.run(target, ["eval", out, "--data", model / "calib.txt", "--seqlen", "16",
                                              "--max-windows", "1", "--no-progress"], capsys)
            shutil.rmtree(case)
    total = sum(PER_TARGET.values())
    print(f"\nfuzz (seed {FUZZ_SEED}): {total} mutations, {sum(outcomes.counts.values())} runs in "
          f"{time.perf_counter() - start:.0f} s; outcomes by class:\n  "
          + "\n  ".join(f"{c}: {n}" for c, n in sorted(outcomes.counts.items())))
    assert total >= 500
