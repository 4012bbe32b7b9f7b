"""quantize_block: bit-identical to plain true-sequential GPTQ (a full block forward per group, one Hessian per
Linear), while sharing Hessians between Linears that read one tensor and computing each stage of the block once."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from streamq.calib.capture import run_block
from streamq.calib.data import calibration_windows
from streamq.config import QuantConfig
from streamq.io.scratch import ScratchFiles
from streamq.quant.kept import SpilledList
from streamq.quant.block import quantize_block
from streamq.quant.gptq import gptq_quantize
from streamq.quant.hessian import HessianAccumulator
from streamq.quant.stages import plan, trace
from tests.conftest import ARCHITECTURES, make_tiny_model
from tests.reference import load_with_block0_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
NS, SEQ = 5, 40


def input_groups(block: nn.Module, x: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Linears grouped by the tensor they read, in call order (the test's own probe)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        run_block(block, x, kwargs)
    for h in hooks:
        h.remove()
    groups = []
    for name, t in calls:
        match = [g for g in groups if g[1] is t]
        if match:
            match[0][0].append(name)
        else:
            groups.append(([name], t))
    return [g for g, _ in groups]


@torch.no_grad()
def plain_true_sequential(block, xs, kwargs, cfg):
    """Per group: every sample through the whole block, one accumulator per Linear; then the outputs."""
    mods = dict(block.named_modules())
    results = {}
    for group in input_groups(block, xs[0], kwargs):
        accs = {n: HessianAccumulator(mods[n].in_features) for n in group}
        hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: accs[n].add(a[0])) for n in group]
        for x in xs:
            run_block(block, x, kwargs)
        for h in hooks:
            h.remove()
        for n in group:
            r = gptq_quantize(mods[n].weight.detach().float(), accs[n].H, cfg).result
            mods[n].weight.data = r.weight
            results[n] = r
    return results, [run_block(block, x, kwargs) for x in xs]


def block_and_inputs(tmp_path, arch):
    src = make_tiny_model(tmp_path / arch, arch, n_layers=1)
    tokens = calibration_windows(AutoTokenizer.from_pretrained(src), str(src / "calib.txt"), NS, SEQ)
    _, layers, _, inputs, kw = load_with_block0_inputs(src, tokens)
    return layers[0], inputs, kw[0]  # block 0 and the kwargs the model calls it with


class LinearCalls:
    """Counts each Linear's completed forward calls (a pass stopped at its input does not count)."""

    def __init__(self, block):
        self.n = {}
        self.hooks = [m.register_forward_hook(lambda m, a, o, n=n: self.n.__setitem__(n, self.n.get(n, 0) + 1))
                      for n, m in block.named_modules() if isinstance(m, nn.Linear)]

    def remove(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("act_order", [False, True])
def test_block_bit_identical_to_plain_true_sequential(tmp_path, arch, act_order):
    block, xs, kw = block_and_inputs(tmp_path, arch)
    cfg = QuantConfig(bits=4, group_size=32, act_order=act_order, static_groups=act_order)
    plain = copy.deepcopy(block)
    want, want_out = plain_true_sequential(plain, xs, kw, cfg)
    got_out = []
    calls = LinearCalls(block)
    got = quantize_block(block, lambda: iter(xs), kw, cfg, torch.device("cpu"), emit=got_out.append)
    calls.remove()
    assert set(got) == set(want)
    for name, r in want.items():
        g = got[name][0]
        for field in ("weight", "codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(g, field), getattr(r, field)), f"{arch} {name}.{field}"
    assert len(got_out) == NS
    for a, b in zip(got_out, want_out):
        assert torch.equal(a, b)
    # each Linear runs once per sample, plus once in the probe (today: up to 5 times per sample)
    assert max(calls.n.values()) <= NS + 1, calls.n


@pytest.mark.parametrize("keep", [0, SEQ * 64 * 4])  # nothing kept / one hidden-wide output per sample
def test_block_within_keep_budget_still_bit_identical(tmp_path, keep):
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    cfg = QuantConfig(bits=4, group_size=32)
    plain = copy.deepcopy(block)
    want, want_out = plain_true_sequential(plain, xs, kw, cfg)
    t = trace(block, xs[0], kw)
    p = plan(t, True, keep)
    assert p.peak_bytes <= keep and plan(t, True, None).peak_bytes > keep
    got_out = []
    got = quantize_block(block, lambda: iter(xs), kw, cfg, torch.device("cpu"), emit=got_out.append, keep_bytes=keep)
    assert all(torch.equal(got[n][0].codes, r.codes) for n, r in want.items())
    assert all(torch.equal(a, b) for a, b in zip(got_out, want_out))


def test_plan_llama_replays_attention_and_mlp(tmp_path):
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    p = plan(trace(block, xs[0], kw), True, None)
    assert p.build == {"self_attn": 1, "mlp": 3}  # built from o_proj / down_proj inputs after their solves
    assert p.replay[-1] == ["self_attn", "mlp"]  # the output pass runs only norms and residual adds
    # a norm whose only reader is replayed is not run: input_layernorm once attention is replayed, and so on
    assert p.skip == [[], [], ["input_layernorm"], ["input_layernorm"], ["input_layernorm", "post_attention_layernorm"]]


class NormThenMLP(nn.Module):
    """x + mlp(norm(x)); residual_from_norm: norm(x) + mlp(norm(x)) (the block's own code reads the norm's output, as
    Bloom's apply_residual_connection_post_layernorm does); identity: the norm's output passes an nn.Identity."""

    def __init__(self, residual_from_norm=False, identity=False, d=32):
        super().__init__()
        self.norm, self.ident = nn.LayerNorm(d), nn.Identity() if identity else None
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.residual_from_norm = residual_from_norm

    def forward(self, x):
        h = self.norm(x)
        h = self.ident(h) if self.ident is not None else h
        return (h if self.residual_from_norm else x) + self.mlp(h)


@pytest.mark.parametrize("variant, skipped", [({}, ["norm"]), ({"residual_from_norm": True}, []),
                                              ({"identity": True}, [])])
def test_a_module_is_skipped_only_where_nothing_else_reads_its_output(variant, skipped):
    torch.manual_seed(0)
    block, xs = NormThenMLP(**variant).eval(), [torch.randn(1, 12, 32) for _ in range(NS)]
    p = plan(trace(block, xs[0], {}), True, None)
    assert p.replay[-1] == ["mlp"] and p.skip[-1] == skipped
    cfg = QuantConfig(bits=4, group_size=32)
    want, want_out = plain_true_sequential(copy.deepcopy(block), xs, {}, cfg)
    got_out = []
    got = quantize_block(block, lambda: iter(xs), {}, cfg, torch.device("cpu"), emit=got_out.append)
    assert all(torch.equal(got[n][0].codes, r.codes) for n, r in want.items())
    assert all(torch.equal(a, b) for a, b in zip(got_out, want_out))


def test_hessians_shared_by_linears_reading_one_tensor(tmp_path, monkeypatch):
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    seen = {}  # accumulator (kept alive, so ids stay distinct) -> adds
    orig = HessianAccumulator.add

    def counting_add(self, x):
        seen[self] = seen.get(self, 0) + 1
        orig(self, x)

    monkeypatch.setattr(HessianAccumulator, "add", counting_add)
    quantize_block(block, lambda: iter(xs), kw, QuantConfig(bits=4, group_size=32), torch.device("cpu"))
    assert len(seen) == 4  # q/k/v, o, gate/up, down: one accumulator per input tensor
    assert set(seen.values()) == {NS}


@pytest.mark.parametrize("act_order", [False, True])
def test_block_spilled_to_disk_bit_identical_and_holds_nothing_in_ram(tmp_path, monkeypatch, act_order):
    """spill=folder: every kept intermediate goes through the scratch file (nothing kept in a RAM list), and the
    results equal plain true-sequential GPTQ."""
    block, xs, kw = block_and_inputs(tmp_path, "llama")
    cfg = QuantConfig(bits=4, group_size=32, act_order=act_order, static_groups=act_order)
    want, want_out = plain_true_sequential(copy.deepcopy(block), xs, kw, cfg)
    written = []
    orig = SpilledList.append
    monkeypatch.setattr(SpilledList, "append", lambda self, out: (written.append(out), orig(self, out)))
    got_out = []
    got = quantize_block(block, lambda: iter(xs), kw, cfg, torch.device("cpu"), emit=got_out.append,
                         spill=str(tmp_path))
    # llama, per sample: attention's o_proj inputs, then its output (replayed in three passes); the MLP's down_proj
    # inputs, whose output (replayed in the output pass only) is built there as it is read (kept.BuiltOnRead)
    assert len(written) == 3 * NS
    for name, r in want.items():
        for field in ("weight", "codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(got[name][0], field), getattr(r, field)), f"{name}.{field}"
    assert all(torch.equal(a, b) for a, b in zip(got_out, want_out))


def test_spilled_list_round_trip(tmp_path):
    kept = SpilledList(tmp_path)
    items = [torch.randn(1, 3, 5), (torch.randn(2, 4).to(torch.bfloat16), None), torch.zeros(0)]
    for x in items:
        kept.append(x)
    assert len(kept) == 3 and list(tmp_path.iterdir()) == []  # unnamed file
    back = list(kept)
    assert torch.equal(back[0], items[0]) and isinstance(back[1], tuple) and back[1][1] is None
    assert back[1][0].dtype == torch.bfloat16 and torch.equal(back[1][0], items[1][0])
    assert torch.equal(kept[2], items[2]) and back[0] is not items[0]
    kept.close()


def test_spilled_lists_reuse_the_pool_files_and_read_only_their_own_bytes(tmp_path):
    """A list spilled into a ScratchFiles pool gives its file back on close, cut to what it wrote; the next list
    takes that file and reads its own (shorter) items, not the stale bytes of the last one."""
    pool = ScratchFiles(tmp_path)
    first = SpilledList(pool)
    big = [torch.randn(64, 32) for _ in range(3)]
    for x in big:
        first.append(x)
    f = first._file
    first.close()
    assert not f.closed and os.fstat(f.fileno()).st_size == 3 * 64 * 32 * 4
    second = SpilledList(pool)
    assert second._file is f  # reused, not a fresh file
    small = [torch.arange(6, dtype=torch.float32).reshape(2, 3) + k for k in range(2)]
    for x in small:
        second.append(x)
    assert all(torch.equal(a, b) for a, b in zip(second, small)) and len(second) == 2
    third = SpilledList(pool)  # the pool is empty while `second` holds its file: a fresh one
    assert third._file is not f
    second.close()
    third.close()
    assert os.fstat(f.fileno()).st_size == 2 * 6 * 4 and list(tmp_path.iterdir()) == []
    second.close()  # a second close gives nothing back twice
    assert len(pool._free) == 2
    pool.close()
    assert f.closed
    late = SpilledList(pool)  # a list closed after its pool: its file is closed, not kept
    f2 = late._file
    late.close()
    assert f2.closed and pool._free == []


def test_spilled_list_disk_full_is_one_line_error(tmp_path, monkeypatch):
    import errno

    from streamq.errors import StreamqError
    from streamq.io import fileread

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileread.os, "pwrite", full)
    kept = SpilledList(tmp_path)
    with pytest.raises(StreamqError, match="disk full"):
        kept.append(torch.ones(4))
    kept.close()

    monkeypatch.undo()
    real, calls = os.pwrite, []

    def short_then_full(fd, data, offset):  # a short write, then the disk is full: 6 of 16 bytes remain
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, data[:10], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileread.os, "pwrite", short_then_full)
    kept = SpilledList(tmp_path)
    with pytest.raises(StreamqError, match=r"disk full \(6 bytes still to write"):
        kept.append(torch.ones(4))
    kept.close()
