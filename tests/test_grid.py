"""RTN primitives: reference semantics, the fp16/zero-point deviations, and the dequantization invariant."""
import pytest
import torch

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.quant.grid import check_group_size, dequantize, fit_grid, full_range_scale, quantize_codes
from streamq.quant.rtn import rtn_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_grid(x, bits, sym):
    """IST-DASLab/gptq find_params (weight, per channel), plus streamq's fp16 scale and zero clamp."""
    maxq = 2**bits - 1
    tmp = torch.zeros(x.shape[0])
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    both = (xmin == 0) & (xmax == 0)
    xmin[both] = -1
    xmax[both] = +1
    scale = ((xmax - xmin) / maxq).half().float()
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def expanded(r):
    """scales[g_idx[c], r] * (codes[r, c] - zeros[g_idx[c], r]) in fp32."""
    g = r.g_idx.long()
    return r.scales[g].t() * (r.codes.float() - r.zeros[g].t().float())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_fit_grid_matches_reference(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    w[3] = 0  # empty row: grid [-1, 1]
    w[5] = w[5].abs() + 0.1  # no negative value
    w[7] = -w[7].abs()  # no positive value
    scale, zero = fit_grid(w, bits, sym)
    ref_scale, ref_zero = reference_grid(w.clone(), bits, sym)
    assert torch.equal(scale, ref_scale) and torch.equal(zero, ref_zero)
    assert torch.equal(scale.half().float(), scale)
    assert scale[3] == torch.tensor(2 / (2**bits - 1)).half().float()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_zero_and_asym_zero_at_least_one(bits):
    maxq = 2**bits - 1
    w = torch.randn(16, 32)
    _, zero = fit_grid(w, bits, sym=True)
    assert torch.all(zero == (maxq + 1) / 2)
    positive = torch.rand(16, 32) + 0.5  # the reference's zero would be 0 here
    _, zero = fit_grid(positive, bits, sym=False)
    assert torch.all(zero == 1)
    _, zero = fit_grid(torch.randn(16, 32), bits, sym=False)
    assert zero.min() >= 1 and zero.max() <= maxq


def test_tiny_scale_uses_smallest_fp16_normal():
    w = torch.full((2, 8), 1e-12)
    w[:, 0] = -1e-12
    scale, zero = fit_grid(w, 4, sym=True)
    assert torch.all(scale == 2.0**-14)
    codes = quantize_codes(w, scale, zero, 15)
    assert torch.all(codes == 8)


def test_quantize_dequantize_grid_points():
    scale = torch.tensor([0.5, 0.25])
    zero = torch.tensor([8.0, 3.0])
    w = torch.tensor([[-4.0, -4.2, 0.26, 3.5, 9.0], [-0.75, 0.1, 0.13, 3.0, -5.0]])
    codes = quantize_codes(w, scale, zero, 15)
    assert codes.tolist() == [[0, 0, 9, 15, 15], [0, 3, 4, 15, 0]]  # round half to even: 0.13/0.25 -> 1
    assert dequantize(codes, scale, zero).tolist() == [[-4, -4, 0.5, 3.5, 3.5], [-0.75, 0, 0.25, 3.0, -0.75]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_invariant_exact(bits, group_size, sym):
    torch.manual_seed(0)
    W = torch.randn(40, 96) * 0.02
    r = rtn_quantize(W, QuantConfig(method="rtn", bits=bits, group_size=group_size, sym=sym))
    n_groups = 1 if group_size == -1 else 96 // group_size
    assert r.weight.dtype == torch.float32 and r.codes.dtype == torch.uint8 and r.zeros.dtype == torch.uint8
    assert r.scales.shape == (n_groups, 40) and r.g_idx.dtype == torch.int32
    assert torch.equal(r.weight, expanded(r))
    assert int(r.codes.max()) <= 2**bits - 1
    assert torch.equal(r.scales.half().float(), r.scales)
    # half a step from rounding, plus fp16 shrinking of the scale (sym) or the zero clamp's shift (asym)
    step = r.scales[r.g_idx.long()].t()
    assert torch.all((W - r.weight).abs() <= step)
    assert ((W - r.weight).abs() <= step / 2 * 1.0001).float().mean() > 0.95


def test_check_group_size_names_the_layer():
    check_group_size(4096, 128, "model.layers.0.mlp.down_proj")
    check_group_size(11008, -1, "model.layers.0.mlp.down_proj")
    with pytest.raises(StreamqError, match=r"model\.layers\.3\.mlp\.down_proj.*128.*11000") as e:
        check_group_size(11000, 128, "model.layers.3.mlp.down_proj")
    assert "\n" not in str(e.value)


def test_full_range_grid_puts_the_larger_side_on_code_0():
    """auto-round's int_sym: scale = +-max|w| / 2^(bits-1), signed so the larger side is code 0; all 16 levels."""
    w = torch.tensor([[-1.0, 0.5, 0.0], [-0.5, 1.0, 0.25]])
    scale, zero = fit_grid(w, 4, sym=True, full_range=True)
    assert torch.equal(scale, torch.tensor([1 / 8, -1 / 8])) and torch.equal(zero, torch.tensor([8.0, 8.0]))
    codes = quantize_codes(w, scale[:, None], zero[:, None], 15)
    assert torch.equal(codes, torch.tensor([[0.0, 12, 8], [12, 0, 6]]))
    assert torch.equal(dequantize(codes, scale[:, None], zero[:, None]), w)
    assert torch.equal(full_range_scale(torch.zeros(1), torch.zeros(1), 3), torch.tensor([2.0**-14]))
    with pytest.raises(StreamqError, match="full-range"):
        QuantConfig(sym=False, full_range=True)
