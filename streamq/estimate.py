"""A rough run time for `streamq plan`: a few kernels timed on this machine, scaled by the model's shapes.

Measured (each the best of 2, shapes capped so the whole benchmark takes seconds):
    R   flop/s of [256, in] @ [in, out] in the compute dtype (the forward) and in fp32 (Hessians, solver)
    R64 flop/s of the same in fp64 (relative_output_error)
    t_chol  seconds of a Cholesky of [n, n] fp32, n = min(in_max, 2048), scaled by (in / n)^3
    t_col   seconds per column of gptq_quantize on [min(out, 4096), 128], scaled by out / 4096 above that
Per block (tokens = nsamples * seqlen, P = the block's Linear parameters, B = 128 lazy-batch columns):
    forward  = passes * (2 * tokens * P + 2 * tokens * seqlen * hidden) / R
               passes = 1 (outputs to the next slot) + per true-sequential group the share of P up to it
    hessians = sum over Linears of 2 * tokens * in^2 / R32
    solve    = sum over Linears of 4 t_chol(in) + t_col * in + out * in * (in + B) / R32 + 4 * out * in^2 / R64
RTN: 50 flop per weight / R32. AutoRound: 2 forwards + iters * 3 forwards (with backward) of batch_size *
grad_accum samples + 30 flop per weight per step. SpQR: GPTQ with t_col doubled. Not counted: reading the
checkpoint and the activation store (disk speed), Python overhead outside the column loop.
"""
from __future__ import annotations

import time

import torch

from streamq.config import QuantConfig
from streamq.methods import get_method


def _best_of(fn, device: torch.device, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure(in_max: int, out_max: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The kernel rates above on `device`: flop/s in dtype / fp32 / fp64, Cholesky seconds at size n, and
    seconds per GPTQ column at out_b rows."""
    from streamq.quant.gptq import gptq_quantize

    gen = torch.Generator().manual_seed(0)
    k, n_in, n_out = 256, min(in_max, 4096), min(out_max, 4096)
    rates = {}
    for name, dt in (("compute", dtype), ("fp32", torch.float32), ("fp64", torch.float64)):
        x = torch.randn(k, n_in, generator=gen).to(device, dt)
        w = torch.randn(n_in, n_out, generator=gen).to(device, dt)
        rates[name] = 2 * k * n_in * n_out / _best_of(lambda: x @ w, device)
    n = min(in_max, 2048)
    a = torch.randn(n, n + 16, generator=gen).to(device)
    h = a @ a.T / n + torch.eye(n, device=device)
    t_chol = _best_of(lambda: torch.linalg.cholesky(h), device)
    cols = min(128, in_max)
    W = torch.randn(n_out, cols, generator=gen).to(device)
    a = torch.randn(cols, cols + 16, generator=gen).to(device)
    H = a @ a.T / cols + 0.1 * torch.eye(cols, device=device)
    cfg = QuantConfig(group_size=-1)
    t_col = _best_of(lambda: gptq_quantize(W, H, cfg), device) / cols
    return {"flops": rates, "chol_n": n, "chol_s": t_chol, "col_rows": n_out, "col_s": t_col}


def block_seconds(b: dict, facts: dict, cfg: QuantConfig, tokens: int, seqlen: int, m: dict) -> float:
    """Seconds for one block (b: a block of footprint.facts) by the formula in the module docstring."""
    R, R32, R64 = m["flops"]["compute"], m["flops"]["fp32"], m["flops"]["fp64"]
    lin = b["linears"]
    P = sum(o * i for o, i in lin.values())
    forward = (2 * tokens * P + 2 * tokens * seqlen * facts["hidden"]) / R
    model = get_method(cfg.method).estimate  # the time model the method is planned as
    if model == "rtn":
        return 50 * P / R32
    if model == "autoround":
        step_tokens = min(cfg.batch_size * cfg.grad_accum, tokens // seqlen) * seqlen
        step = 3 * (2 * step_tokens * P) / R + 30 * P / R32
        return 2 * forward + cfg.iters * step
    done, passes = 0, 1.0
    for group in b["groups"]:
        done += sum(lin[n][0] * lin[n][1] for n in group)
        passes += done / P
    col_s = m["col_s"] * (2 if model == "spqr" else 1)
    weight_ops = 0.0
    for out, inp in lin.values():
        weight_ops += 2 * tokens * inp * inp / R32
        weight_ops += 4 * m["chol_s"] * (inp / m["chol_n"]) ** 3
        weight_ops += col_s * inp * max(1.0, out / m["col_rows"])
        weight_ops += out * inp * (inp + cfg.block_columns) / R32 + 4 * out * inp * inp / R64
    return passes * forward + weight_ops


def estimate_seconds(facts: dict, cfg: QuantConfig, opts, device: torch.device,
                     dtype: torch.dtype) -> tuple[float, str]:
    """(seconds for the whole run, one line saying what was measured)."""
    shapes = [shape for b in facts["blocks"] for shape in b["linears"].values()]
    in_max, out_max = max(i for _, i in shapes), max(o for o, _ in shapes)
    m = measure(in_max, out_max, device, dtype)
    tokens = opts.nsamples * opts.seqlen
    total = sum(block_seconds(b, facts, cfg, tokens, opts.seqlen, m) for b in facts["blocks"])
    basis = (f"estimate from a micro-benchmark on {device}: {m['flops']['compute'] / 1e9:.0f} GFLOP/s "
             f"{str(dtype).removeprefix('torch.')} matmul, {m['flops']['fp64'] / 1e9:.0f} fp64, Cholesky "
             f"{m['chol_n']}^2 {m['chol_s'] * 1e3:.0f} ms, GPTQ {m['col_s'] * 1e6:.0f} us/column; disk IO not counted")
    return total, basis
