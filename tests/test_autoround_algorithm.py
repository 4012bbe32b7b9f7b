"""AutoRound's algorithm checked independently of streamq's code: a one-Linear block whose signed-gradient steps,
min/max factor updates and best-iterate choice are derived by hand here (the chain rule written out, no autograd),
compared with autoround_block's losses and final weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from streamq.config import QuantConfig
from streamq.quant.autoround import autoround_block

BITS, MAXQ = 2, 3
NS, SEQ, OUT, IN = 3, 2, 2, 4


class OneLinear(nn.Module):
    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(IN, OUT, bias=False)
        self.lin.weight.data = W.clone()

    def forward(self, x, **kwargs):
        return self.lin(x)


def by_hand(W, V, a, b):
    """Q(W) on the asymmetric grid of [a * min(W), b * max(W)] per row, and the partial derivatives of Q's
    entries with respect to V (elementwise), a and b (per row), round() and the fp16 cast passed straight
    through. Shapes: W, V [out, in]; a, b [out]."""
    wmin, wmax = W.amin(1).clamp(max=0), W.amax(1).clamp(min=0)
    s = ((b * wmax - a * wmin) / MAXQ).half().float()  # the checkpoint's fp16 scale
    z_raw = -a * wmin / s
    z = z_raw.round().clamp(1, MAXQ)
    z_inside = ((z_raw.round() >= 1) & (z_raw.round() <= MAXQ)).float()
    r = (W / s[:, None] + V).round() + z[:, None]
    inside = ((r >= 0) & (r <= MAXQ)).float()  # clamp passes the gradient where it does not cut
    q = r.clamp(0, MAXQ)
    Q = s[:, None] * (q - z[:, None])
    dQ_dV = s[:, None] * inside
    dQ_ds = (q - z[:, None]) - inside * W / s[:, None]  # d/ds of s * (round(W/s + V) + z - z), z fixed
    dQ_dz = s[:, None] * (inside - 1)
    ds_da, ds_db = -wmin / MAXQ, wmax / MAXQ
    dz_da = z_inside * (-wmin / s + a * wmin / s**2 * ds_da)
    dz_db = z_inside * (a * wmin / s**2 * ds_db)
    dQ_da = dQ_ds * ds_da[:, None] + dQ_dz * dz_da[:, None]
    dQ_db = dQ_ds * ds_db[:, None] + dQ_dz * dz_db[:, None]
    return Q, dQ_dV, dQ_da, dQ_db


def reference_run(W, X, Y, iters: int, lr: float):
    """The paper's loop: loss = mean squared error of X Q^T against Y, grads by the chain rule, p -= lr_t
    sign(grad) with lr_t = lr (1 - t / iters), V clamped to [-0.5, 0.5], a, b to [0, 1]; the weights of the
    lowest-loss iterate are returned. -> (losses per iteration, best Q, index of the best, factors moved)."""
    V, a, b = torch.zeros_like(W), torch.ones(OUT), torch.ones(OUT)
    losses, iterates, moved = [], [], False
    for t in range(iters):
        Q, dV, da, db = by_hand(W, V, a, b)
        err = X @ Q.T - Y  # [NS, SEQ, OUT]
        losses.append(err.pow(2).mean().item())
        iterates.append(Q)
        G = 2 * torch.einsum("nso,nsi->oi", err, X)  # d(sum of squares)/dQ: [out, in]
        step = lr * (1 - t / iters)
        V = (V - step * torch.sign(G * dV)).clamp(-0.5, 0.5)
        a_new = (a - step * torch.sign((G * da).sum(1))).clamp(0, 1)
        b_new = (b - step * torch.sign((G * db).sum(1))).clamp(0, 1)
        moved |= bool((a_new != a).any() or (b_new != b).any())
        a, b = a_new, b_new
    best = min(range(iters), key=losses.__getitem__)
    return losses, iterates[best], best, moved


LRS, ITERS = (0.05, 0.1, 0.2), 4


def case():
    """W [out, in], X [NS, SEQ, in] and the fp Linear's outputs Y = X W^T (the targets)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(OUT, IN, generator=g)
    X = torch.randn(NS, SEQ, IN, generator=g)
    return W, X, X @ W.T


@pytest.mark.parametrize("lr", LRS)
def test_one_linear_matches_the_hand_derived_steps(lr):
    W, X, Y = case()
    iters = ITERS
    cfg = QuantConfig(method="autoround", bits=BITS, group_size=-1, sym=False, full_range=False, iters=iters,
                      lr=lr, batch_size=NS)  # one minibatch = every sample: the steps are deterministic
    block, losses = OneLinear(W), []
    results = autoround_block(block, lambda idx: X[idx], lambda idx: Y[idx], NS, {}, cfg, torch.device("cpu"),
                              on_iter=lambda i, loss: losses.append(loss))
    want_losses, want_Q, best, _ = reference_run(W, X, Y, iters, lr)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    result, loss = results["lin"]
    assert loss == pytest.approx(want_losses[best], rel=1e-5)
    torch.testing.assert_close(result.weight, want_Q, rtol=0, atol=1e-6)
    torch.testing.assert_close(block.lin.weight.data, want_Q, rtol=0, atol=1e-6)


def test_the_cases_exercise_every_rule():
    """The parametrized case above is not vacuous: its runs move the min/max factors, pick an iterate that is
    neither the RTN start nor the last, keep the RTN start, and keep the last."""
    W, X, Y = case()
    runs = [reference_run(W, X, Y, ITERS, lr) for lr in LRS]
    assert all(moved for *_, moved in runs)
    bests = {best for _, _, best, _ in runs}
    assert 0 in bests and ITERS - 1 in bests and bests & set(range(1, ITERS - 1)), bests
