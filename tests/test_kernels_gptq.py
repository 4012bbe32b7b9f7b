"""GPTQ kernels (on CUDA, else Triton's CPU interpreter) against the plain-torch reference: int4 / int8, groups of
32 / 64 / 128, 1-16 tokens fused (with and without split-K), more tokens through the dequantization; the
launchers' fallback; QuantLinear's choice of path. Shapes are small (interpreter time)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from streamq.formats.gptq import dequantize_gptq, pack_gptq
from streamq.kernels import gptq as kernels
from streamq.qlinear import QuantLinear
from tests.test_formats_gptq import random_result
from tests.test_kernels_spqr import device, needs_triton  # noqa: F401 (the device fixture)


def packed(bits, gs, out=96, inp=256, act_order=False, seed=0):
    """A GPTQ layer; out=96 leaves a partial 64-wide output tile."""
    return pack_gptq(random_result(out, inp, bits, gs, act_order, seed=seed), bits)


def to(tensors: dict, dev) -> dict:
    return {k: v.to(dev) for k, v in tensors.items()}


@needs_triton
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_matmul_matches_reference(device, bits, gs):
    t = packed(bits, gs, seed=bits + gs)
    W = dequantize_gptq(t, bits)
    t = to(t, device)
    assert kernels.use_triton(t["qweight"]) and kernels.kernel_fits(bits, 256, 96, 256 // gs, t["g_idx"])
    assert torch.equal(kernels.gptq_dequantize(t, bits).cpu(), W)  # the same fp32 operations
    g = torch.Generator().manual_seed(1)
    for m, split_k in ((1, 1), (1, 2), (5, None), (16, 4)):
        x = torch.randn(m, 256, generator=g)
        y = kernels.gptq_linear(x.to(device), t, bits, split_k=split_k).cpu()
        torch.testing.assert_close(y, x @ W.T, rtol=1e-5, atol=1e-5)
    x16 = torch.randn(3, 256, generator=g).half()
    y16 = kernels.gptq_linear(x16.to(device), t, bits).cpu()
    # the dequantized tile is rounded to fp16 before the fp32-accumulated dot: ~2^-11 relative per product
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), x16.float() @ W.T, rtol=4e-3, atol=4e-3 * W.abs().max().item())


@needs_triton
def test_more_tokens_dequantize_then_matmul(device, monkeypatch):
    t = to(packed(4, 32), device)
    W = dequantize_gptq(t, 4).cpu()
    fused = []
    real = kernels._kernels

    def spy():
        k = real()
        fused.append(True)
        return k
    monkeypatch.setattr(kernels, "_kernels", spy)
    x = torch.randn(2, 9, 256)  # 18 tokens > MAX_FUSED
    torch.testing.assert_close(kernels.gptq_linear(x.to(device), t, 4).cpu(), x @ W.T, rtol=1e-5, atol=1e-5)
    assert fused == [True]  # one launch: the dequantization


def test_kernel_fits_only_static_groups_4_and_8_bits():
    for bits in (4, 8):
        t = packed(bits, 32)
        assert kernels.kernel_fits(bits, 256, 96, 8, t["g_idx"])
        assert not kernels.kernel_fits(bits, 256, 96, 8, packed(bits, 32, act_order=True, seed=3)["g_idx"])
    assert not kernels.kernel_fits(2, 256, 96, 8, packed(2, 32)["g_idx"])
    assert not kernels.kernel_fits(3, 256, 96, 8, packed(3, 32)["g_idx"])


def test_launchers_fall_back_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    t = packed(4, 64)
    assert not kernels.use_triton(t["qweight"])
    x = torch.randn(2, 3, 256)
    W = dequantize_gptq(t, 4)
    assert torch.equal(kernels.gptq_linear(x, t, 4), F.linear(x, W))
    assert torch.equal(kernels.gptq_dequantize(t, 4, torch.float16), W.half())


@needs_triton
@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_on_the_kernel_path(device, monkeypatch, act_order):
    """Static groups take the kernels (no unpacked copy kept); act-order layouts the codes unpacked once."""
    from streamq import qlinear

    t = packed(4, 32, act_order=act_order, seed=5)
    W, bias = dequantize_gptq(t, 4), torch.randn(96)
    unpacks = []
    real_unpack = qlinear.unpack_gptq
    monkeypatch.setattr(qlinear, "unpack_gptq", lambda *a: unpacks.append(1) or real_unpack(*a))
    q = QuantLinear(256, 96, 4, 32, bias=True)
    q.load_state_dict({**t, "bias": bias})
    q.to(device)
    for shape in ((1, 1, 256), (3, 256), (4, 5, 256)):
        x = torch.randn(*shape)
        torch.testing.assert_close(q(x.to(device)).cpu(), F.linear(x, W, bias), rtol=1e-5, atol=1e-5)
    assert q.fits_kernel is (not act_order)
    assert unpacks == ([] if not act_order else [1])  # never re-unpacked per forward


@pytest.mark.gpu
def test_compiled_kernels_at_model_width():
    """On a GPU, compiled (not interpreted): a 4096 x 4096 int4 g128 layer at batch 1 and 16 in fp16."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    t = to(pack_gptq(random_result(4096, 4096, 4, 128, False, seed=7), 4), "cuda")
    W = dequantize_gptq(t, 4)
    for m in (1, 16, 64):
        x = torch.randn(m, 4096, device="cuda").half()
        ref = x.float() @ W.T
        y = kernels.gptq_linear(x, t, 4)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_triton
def test_groups_not_a_power_of_two_take_smaller_tiles(device):
    """Groups of 48: K tiles of 16 (tl.arange needs powers of two; a tile never straddles two groups)."""
    t = pack_gptq(random_result(64, 192, 4, 48, False, seed=9), 4)
    W = dequantize_gptq(t, 4)
    t = to(t, device)
    assert kernels.kernel_fits(4, 192, 64, 4, t["g_idx"])
    x = torch.randn(2, 192)
    torch.testing.assert_close(kernels.gptq_linear(x.to(device), t, 4).cpu(), x @ W.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(kernels.gptq_dequantize(t, 4).cpu(), W)
