"""SpQR kernels (on CUDA, else Triton's CPU interpreter) against their torch references, the launchers' choice,
SpQRLinear. Without CUDA the kernels run in Triton's interpreter, which works only if Triton is first imported
with TRITON_INTERPRET=1 set: tests/conftest.py sets it before anything imports Triton (`device` checks)."""
import sys

import pytest
import torch
import torch.nn.functional as F

from streamq.formats.spqr import dequantize_spqr, pack_spqr
from streamq.kernels import spqr as kernels
from streamq.qlinear import SpQRLinear
from streamq.quant.spqr import spqr_quantize
from tests.spqr_reference import QQ, problem, spqr

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")


def interpreter_usable() -> bool:
    """Triton's interpreter runs our kernels only if Triton is first imported under TRITON_INTERPRET=1 (it jits its
    own tl.sum/tl.max at import); in a full test run transformers (torch._dynamo) has imported it long before."""
    standard = sys.modules.get("triton.language.standard")
    return standard is None or type(standard.sum).__name__ == "InterpretedFunction"


@pytest.fixture
def device(monkeypatch) -> str:
    """Where the launchers' Triton path runs: CUDA when there is one, else CPU under TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        return "cuda"
    assert interpreter_usable(), "Triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return "cpu"


def to(tensors: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in tensors.items()}


QQ4 = dict(qq_scale_bits=4, qq_zero_bits=4, qq_groupsize=8)


def layer(out=40, inp=96, bits=4, qq=QQ4, act_order=True, tau=0.2, seed=0):
    """A quantized layer with outliers: (packed tensors, cfg, engine result). out=40, inp=96 leave partial
    BLOCK_OUT / BLOCK_IN tiles."""
    W, H, _ = problem(out=out, inp=inp, seed=seed, spikes=8)
    cfg = spqr(bits=bits, group_size=16, act_order=act_order, outlier_threshold=tau, **qq)
    r = spqr_quantize(W, H, cfg)
    return pack_spqr(r, cfg), cfg, r


CASES = [dict(bits=4), dict(bits=3, out=32, qq=QQ), dict(bits=2, out=64, qq=QQ, act_order=False),
         dict(bits=3, out=32, qq={}), dict(bits=8, qq={}, tau=float("inf"))]
IDS = ["4bit-qq4", "3bit-qq3", "2bit-qq3-identity", "3bit-fp16-stats", "8bit-fp16-stats-no-outliers"]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_reference(device, case):
    tensors, cfg, r = layer(**case)
    tensors = to(tensors, device)
    assert kernels.use_triton(tensors["qweight"])
    W = kernels.spqr_dequantize(tensors, cfg).cpu()
    assert torch.equal(W, dequantize_spqr(tensors, cfg).cpu()) and torch.equal(W, r.weight)  # same fp32 operations
    x = torch.randn(96, generator=torch.Generator().manual_seed(1))
    y = kernels.spqr_matvec(x.to(device), tensors, cfg).cpu()
    torch.testing.assert_close(y, r.weight @ x, rtol=1e-5, atol=1e-5)
    y16 = kernels.spqr_matvec(x.half().to(device), tensors, cfg).cpu()
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16, (r.weight @ x.half().float()).half(), rtol=2e-3, atol=2e-3)


def test_launchers_fall_back_to_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tensors, cfg, r = layer()
    assert not kernels.use_triton(tensors["qweight"])
    assert torch.equal(kernels.spqr_dequantize(tensors, cfg), r.weight)
    x = torch.randn(96)
    torch.testing.assert_close(kernels.spqr_matvec(x, tensors, cfg), r.weight @ x)


def test_spqr_linear_loads_and_matches_dense(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check_spqr_linear("cpu")


@needs_triton
def test_spqr_linear_triton(device):
    check_spqr_linear(device)


def check_spqr_linear(device):
    tensors, cfg, r = layer()
    bias = torch.randn(40)
    with torch.device("meta"):
        q = SpQRLinear(96, 40, cfg, bias=True)
    assert q.outlier_col.shape == (0,)
    # the outlier buffers take the checkpoint's data-dependent sizes
    q.load_state_dict(to({**tensors, "bias": bias}, device), assign=True)
    assert q.outlier_col.shape == (r.n_outliers,) and r.n_outliers > 0
    assert torch.equal(q.dequantized_weight().cpu(), r.weight)
    x = torch.randn(3, 5, 96)
    torch.testing.assert_close(q(x.to(device)).cpu(), F.linear(x, r.weight, bias))
    token = torch.randn(1, 1, 96)  # batch-1 decoding: the fused matvec
    torch.testing.assert_close(q(token.to(device)).cpu(), F.linear(token, r.weight, bias), rtol=1e-5, atol=1e-5)



@needs_triton
def test_dequantize_straight_into_16_bits(device):
    """A prefill forward's W is made in the activations' dtype (no fp32 copy of the weight): within fp16 rounding
    of the dense part plus that of the outlier sum."""
    tensors, cfg, r = layer()
    W16 = kernels.spqr_dequantize(to(tensors, device), cfg, torch.float16).cpu()
    assert W16.dtype == torch.float16
    torch.testing.assert_close(W16.float(), r.weight, rtol=2e-3, atol=1e-3 * r.weight.abs().max().item())
