"""QuantLinear / SpQRLinear on the CPU torch path: the codes unpacked once (uint8) give the same weights as the
packed buffers, and loading new buffers or moving the module forgets them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamq.formats.gptq import dequantize_gptq, pack_gptq
from streamq.qlinear import QuantLinear, SpQRLinear
from tests.test_formats_gptq import random_result
from tests.test_kernels_spqr import layer


@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_cache_equals_packed_weights_and_is_refreshed(act_order):
    q = QuantLinear(128, 64, 4, 32, bias=False)
    packed = [pack_gptq(random_result(64, 128, 4, 32, act_order, seed=s), 4) for s in (1, 2)]
    q.load_state_dict(packed[0])
    x = torch.randn(3, 128)
    torch.testing.assert_close(q(x), F.linear(x, dequantize_gptq(packed[0], 4)))
    assert q.unpacked is not None and q.unpacked.codes.dtype == torch.uint8
    assert torch.equal(q.dequantized_weight(), dequantize_gptq(packed[0], 4))  # from the cache, bit for bit
    q.load_state_dict(packed[1])  # new buffers: the cache must not serve the old weights
    assert q.unpacked is None
    assert torch.equal(q.dequantized_weight(), dequantize_gptq(packed[1], 4))
    q.to(torch.float64)
    assert q.unpacked is None


def test_spqr_linear_cpu_cache_is_refreshed(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch path, whatever the test session set
    layers = [layer(seed=s) for s in (0, 1)]
    with torch.device("meta"):
        q = SpQRLinear(96, 40, layers[0][1], bias=False)
    for tensors, _, r in layers:
        q.load_state_dict(tensors, assign=True)
        assert q.unpacked is None
        token = torch.randn(1, 1, 96)  # batch-1 decoding takes the cached path too
        torch.testing.assert_close(q(token), F.linear(token, r.weight))
        assert q.unpacked.codes.dtype == torch.uint8 and torch.equal(q.dequantized_weight(), r.weight)
