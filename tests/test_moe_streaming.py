"""Routed experts streamed a group at a time inside a block (streamq/quant/expert_stage.py, expert_scratch.py):
the output equals the whole-block path's bit for bit (tiny Mixtral, Qwen3-MoE, DeepSeek-V3; GPTQ with and
without true-sequential, --moe-all-tokens, RTN; activations on disk or in RAM, without kept outputs), a run
killed between experts resumes byte-identically without solving the saved experts again, a scratch folder of
another run is not reused, and peak RSS does not grow with the expert count."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import streamq
import streamq.blockwork as blockwork
from streamq.quant import expert_stage
from streamq.quant.expert_scratch import ExpertScratch
from tests.conftest import make_tiny_model, output_snapshot
from tests.test_architectures import GPTQ, NS, SEQ

INTER = 32
VARIANTS = {
    "gptq": GPTQ,
    "gptq-no-true-sequential": dict(GPTQ, true_sequential=False),
    "gptq-all-tokens": dict(GPTQ, moe_all_tokens=True, act_order=True),
    "rtn": dict(method="rtn", bits=4, group_size=32),
    # --ignore of some expert Linears: they stay in fp, read from the source wherever the expert is used
    "gptq-ignore": dict(GPTQ, ignore=(r"re:.*experts\.1\..*", r"re:.*experts\.2\.(w2|down_proj)")),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("moe-stream"), {}

    def source(arch):
        if arch not in made:
            made[arch] = make_tiny_model(root / arch, arch, n_layers=2, shards=3, vary_1d=True, inter=INTER)
        return made[arch]
    return source


def compress(src, out, offload="disk", **cfg):
    return streamq.compress(src, out, calib=str(src / "calib.txt"), nsamples=NS, seqlen=SEQ, shard_size=40_000,
                            progress=False, offload=offload, **cfg)


def snapshot(out) -> dict:
    """output_snapshot with the report's mean error left out (a float sum over the layers in solve order)."""
    snap = output_snapshot(out)
    report = json.loads(snap.pop("streamq_report.json"))
    report.pop("mean_layer_error")
    return {**snap, "report": report}


def whole_block(monkeypatch, run):
    """run() with MoE blocks materialized whole (the path before experts were streamed)."""
    with monkeypatch.context() as m:
        m.setattr(blockwork, "streams_experts", lambda cfg: False)
        return run()


@pytest.mark.parametrize("arch,variant", [(a, v) for a in ("mixtral", "qwen3_moe", "deepseek_v3") for v in VARIANTS
                                          if a != "qwen3_moe" or v in ("gptq", "rtn")
                                          if v != "gptq-ignore" or a == "mixtral"])
def test_streamed_equals_whole_block(sources, one_thread, tmp_path, monkeypatch, arch, variant):
    """One expert per group (every accumulator crosses groups): codes, scales, the report and the next
    block's inputs (block 1 is solved on block 0's streamed outputs) equal the whole-block path's."""
    src, cfg = sources(arch), VARIANTS[variant]
    whole = whole_block(monkeypatch, lambda: compress(src, tmp_path / "whole", **cfg))
    monkeypatch.setattr(expert_stage, "GROUP_BYTES", 1)
    solved = []
    real = expert_stage._solve_group
    monkeypatch.setattr(expert_stage, "_solve_group", lambda m, experts, *a: solved.append(sorted(experts))
                        or real(m, experts, *a))
    streamed = compress(src, tmp_path / "streamed", **cfg)
    assert solved and all(len(g) == 1 for g in solved)
    assert snapshot(streamed) == snapshot(whole)


@pytest.mark.parametrize("keep", ["ram", "none"])
def test_streamed_equals_whole_block_in_ram_and_without_kept_outputs(sources, one_thread, tmp_path, monkeypatch, keep):
    """Activations in RAM (kept outputs in RAM), and with no room to keep anything (as the out-of-memory retry:
    the block runs the streamed experts itself, one expert at a time, in every later pass). Mixtral: block 0's
    experts' outputs are block 1's inputs."""
    src = sources("mixtral")
    whole = whole_block(monkeypatch, lambda: compress(src, tmp_path / "whole", offload="ram", **GPTQ))
    if keep == "none":
        monkeypatch.setattr(blockwork, "KEEP_BYTES", 0)
    streamed = compress(src, tmp_path / "streamed", offload="ram", **GPTQ)
    assert snapshot(streamed) == snapshot(whole)


def test_killed_between_experts_resumes_byte_identical(sources, one_thread, tmp_path, monkeypatch):
    """Killed after the 2nd expert of block 0 is saved: the resumed run reads experts 0-1 back (not solved again),
    solves 2-3 and its output (block 1 is solved on block 0's outputs, which the saved experts' weights make)
    equals an uninterrupted run's."""
    src = sources("mixtral")
    whole = compress(src, tmp_path / "whole", **GPTQ)
    monkeypatch.setattr(expert_stage, "GROUP_BYTES", 1)
    real_save, saved = ExpertScratch.save, []

    def save(self, e, *a):
        real_save(self, e, *a)
        saved.append((self.folder.name, e))
        if saved[-1] == ("block.0", 1):
            raise KeyboardInterrupt
    monkeypatch.setattr(ExpertScratch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        compress(src, tmp_path / "cut", **GPTQ)
    scratch = tmp_path / "cut" / ".streamq-work" / "experts" / "block.0"
    assert sorted(p.name for p in scratch.glob("expert.*")) == ["expert.0.safetensors", "expert.1.safetensors"]
    saved.clear()
    compress(src, tmp_path / "cut", **GPTQ)
    assert saved == [("block.0", 2), ("block.0", 3), *(("block.1", e) for e in range(4))]
    assert snapshot(tmp_path / "cut") == snapshot(whole)
    assert not (tmp_path / "cut" / ".streamq-work").exists()


def test_scratch_of_another_run_is_not_reused(sources, one_thread, tmp_path, monkeypatch):
    """The scratch key is the run fingerprint (and device, dtype): another config gets another key, and a
    folder recorded under another key is emptied, not read."""
    src, keys = sources("mixtral"), []
    real_init = ExpertScratch.__init__
    monkeypatch.setattr(ExpertScratch, "__init__", lambda self, folder, key: keys.append(key)
                        or real_init(self, folder, key))
    compress(src, tmp_path / "a", **GPTQ)
    compress(src, tmp_path / "b", **dict(GPTQ, moe_min_tokens=3))
    assert len(set(keys[:2])) == 1 and len(set(keys)) == 2  # a's two blocks share a key, b's differs
    folder = tmp_path / "scratch"
    first = ExpertScratch(folder, "run a")
    first.save(0, {}, {})
    assert ExpertScratch(folder, "run a").done == {0: {}}
    again = ExpertScratch(folder, "run b")
    assert again.done == {} and not list(folder.glob("expert.*"))


CHILD = """
import json, sys
from streamq.memstat import peak_rss_bytes
import streamq
from streamq.quant import expert_stage
expert_stage.GROUP_BYTES = int(sys.argv[3])
streamq.compress(sys.argv[1], sys.argv[2], bits=4, group_size=64, calib=sys.argv[1] + "/calib.txt",
                 nsamples=2, seqlen=32, progress=False, device="cpu", offload="disk")
print(json.dumps({"peak_rss": peak_rss_bytes()}))
"""


def peak_rss(model, out, group_bytes: int) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # glibc's mmap threshold fixed at 128 KB: by default it rises to the size of the largest block freed, and
    # these test-sized expert tensors (0.25-1 MB; at real widths they are 10-60 MB, mapped anyway) then come
    # from a heap that freed groups fragment (measured +33 MB at 64 experts without it, +4 MB with it)
    env.update(OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(group_bytes)], capture_output=True, text=True,
                       check=True, env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_rss"]


def test_peak_rss_flat_in_expert_count(tmp_path):
    """One Qwen3-MoE block (hidden 512, experts 256 wide, fp16), expert groups of 8 (GROUP_BYTES): 64 experts
    peak no higher than 8 plus 24 MB. The 56 extra experts are 42 MB of fp16 source, 84 MB as fp32 weights,
    and their whole-block results and Hessians (fp32 weights, codes, [512, 512] Hessians) more than as much
    again."""
    kw = dict(arch="qwen3_moe", n_layers=1, shards=1, hidden=512, inter=256, dtype=torch.float16)
    few = make_tiny_model(tmp_path / "e8", experts=8, **kw)
    many = make_tiny_model(tmp_path / "e64", experts=64, **kw)
    group = 8 * expert_stage.expert_bytes(512, 256, 4)  # compute in fp32 on the CPU
    rss8, rss64 = peak_rss(few, tmp_path / "o8", group), peak_rss(many, tmp_path / "o64", group)
    assert rss64 <= rss8 + (24 << 20), (rss8 >> 20, rss64 >> 20)


def test_plan_counts_one_expert_group_not_all_experts(tmp_path, monkeypatch):
    """`streamq plan`: a streamed MoE block's weights, Hessians and peak are those of the rest of the block and
    one group of experts (8 here) whatever the expert count (but for the router's rows); SpQR (whole block)
    grows with it."""
    kw = dict(arch="qwen3_moe", n_layers=1, shards=1, hidden=128, inter=64)
    few = make_tiny_model(tmp_path / "e8", experts=8, **kw)
    many = make_tiny_model(tmp_path / "e64", experts=64, **kw)
    monkeypatch.setattr(expert_stage, "GROUP_BYTES", 8 * expert_stage.expert_bytes(128, 64, 4))

    def block(model, method):
        b = streamq.plan(model, method=method, nsamples=2, seqlen=32, group_size=32).blocks[0]
        return b.weight_bytes, b.hessians_at_once_bytes, b.peak_bytes
    router = 56 * 128 * 4  # the router's weight [experts, hidden] grows with the count (fp32 on the CPU)
    for method in ("gptq", "rtn"):
        (w8, h8, p8), (w64, h64, p64) = block(few, method), block(many, method)
        assert (w64 - w8, h64 - h8) == (router, 0) and p64 - p8 <= 1.25 * router + 1
    assert block(many, "spqr")[0] > block(few, "spqr")[0] + 56 * 3 * 128 * 64 * 4 - 1


def test_streamed_experts_packed_one_linear_at_a_time_while_written(sources, one_thread, tmp_path, monkeypatch):
    """A streamed block's expert results stay in the scratch until the shard writer takes their tensors: each
    expert Linear is read back and packed once, inside write_unit, holding one Linear's packed tensors."""
    from streamq.io.writer import ShardWriter
    from streamq.outputs import PackedLater
    from streamq.quant.expert_scratch import LazyResult

    loads, writing, held = [], [False], []
    real_load, real_write, real_get = LazyResult.load, ShardWriter.write_unit, PackedLater.__getitem__

    def write_unit(self, key, tensors):
        writing[0] = True
        try:
            return real_write(self, key, tensors)
        finally:
            writing[0] = False

    def get(self, name):
        t = real_get(self, name)
        held.append(len(self._packed))
        return t
    monkeypatch.setattr(LazyResult, "load", lambda self: loads.append((str(self.path), self.name, writing[0]))
                        or real_load(self))
    monkeypatch.setattr(ShardWriter, "write_unit", write_unit)
    monkeypatch.setattr(PackedLater, "__getitem__", get)
    compress(sources("mixtral"), tmp_path / "o", **GPTQ)
    names = [(p, n) for p, n, _ in loads]
    assert len(names) == len(set(names)) == 2 * 4 * 3 and all(during for _, _, during in loads)
    assert max(held) == 4  # qweight, qzeros, scales, g_idx of one Linear
