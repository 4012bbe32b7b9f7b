"""A plain in-memory GPTQ/RTN/SpQR/SparseGPT reference on the full model, written as the IST-DASLab scripts do it: the
whole model in RAM, all calibration inputs of a layer in one tensor, the block list and the sequential groups
listed by hand per architecture (read off transformers' modeling code), Hessians as 2/n * sum x^T x
updated window by window in fp32 (IST's add_batch). Shares only the per-layer solvers and AutoRound's
per-block tuner (tested on their own) with streamq; SparseGPT's solver here is a plain loop of its own
(plain_sparsegpt), sharing only the RTN grid primitives (quant/grid.py)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM

from streamq.config import QuantConfig
from streamq.quant.autoround import autoround_block
from streamq.quant.gptq import gptq_quantize
from streamq.quant.hessian import relative_output_error
from streamq.quant.rtn import rtn_quantize
from streamq.quant.grid import dequantize, fit_grid, quantize_codes
from streamq.quant.spqr import spqr_quantize

_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
_GATED = [_ATTN, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
# model_type -> Linears grouped by the tensor they read, in execution order. Parallel attention + MLP blocks
# (Falcon-7B style, Cohere) feed one normed input to both, so their first group spans attention and MLP.
SEQUENTIAL = {
    "opt": [_ATTN, ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
    "falcon": [["self_attention.query_key_value", "mlp.dense_h_to_4h"], ["self_attention.dense"],
               ["mlp.dense_4h_to_h"]],
    "gpt_neox": [["attention.query_key_value"], ["attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]],
    "starcoder2": [_ATTN, ["self_attn.o_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "cohere": [_ATTN + ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.o_proj"], ["mlp.down_proj"]],
    "default": _GATED,  # llama, mistral, qwen2, qwen3, gemma2, gemma3_text, olmo2, granite
}
# model_type -> where the decoder blocks are
BLOCKS = {"opt": "model.decoder.layers", "falcon": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "default": "model.layers"}


class _Stop(Exception):
    pass


def load_with_block0_inputs(model_dir, tokens: torch.Tensor):
    """The full fp32 model (transformers' default attention), its decoder layers and name prefix, the inputs
    of layer 0 per window [1, seq, hidden], and each layer's forward kwargs (caught by hooks on every layer
    during one full forward: sliding-window layers get their own mask)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    prefix = BLOCKS.get(model.config.model_type, BLOCKS["default"])
    layers = model.get_submodule(prefix)
    inputs, kws = [], [dict() for _ in layers]

    def catch(module, args, kwargs, i):
        kws[i].update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")})

    def stop(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handles = [layer.register_forward_pre_hook(lambda m, a, k, i=i: catch(m, a, k, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(tokens[:1], use_cache=False)
    for h in handles:
        h.remove()
    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    for j in range(tokens.shape[0]):
        try:
            with torch.no_grad():
                model(tokens[j:j + 1], use_cache=False)
        except _Stop:
            pass
    handle.remove()
    return model, layers, prefix, inputs, kws


def ist_hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    """H = 2/n * sum x^T x over the n windows' inputs xs (each [tokens, in]), updated window by window in fp32
    as IST-DASLab's GPTQ.add_batch does (rescale, then add the sqrt(2/n)-scaled window)."""
    H = torch.zeros(xs[0].shape[-1], xs[0].shape[-1])
    for n, x in enumerate(xs, 1):
        H *= (n - 1) / n
        x = (2 / n) ** 0.5 * x.float()
        H.addmm_(x.t(), x)
    return H


def _forward(layer, inputs: list, kw: dict) -> list:
    with torch.no_grad():
        outs = [layer(x, **kw) for x in inputs]
    return [x[0] if isinstance(x, tuple) else x for x in outs]


def reference_autoround(model_dir, tokens: torch.Tensor, cfg: QuantConfig):
    """AutoRound on the full model in RAM, all windows of a layer in one tensor, quantized-input mode: each layer
    is tuned on the quantized model's inputs toward the fp model's outputs (cfg.fp_targets, the reference's two
    streams), or toward the fp layer's outputs on the quantized inputs. Returns (fake-quantized model,
    {full linear name: QuantResult})."""
    model, layers, prefix, inputs, kws = load_with_block0_inputs(model_dir, tokens)
    fp_inputs = inputs
    results = {}
    for i, layer in enumerate(layers):
        kw = kws[i]
        fp_outputs = _forward(layer, fp_inputs if cfg.fp_targets else inputs, kw)
        X, Y = torch.cat(inputs), torch.cat(fp_outputs)
        tuned = autoround_block(layer, lambda idx: X[idx], lambda idx: Y[idx], len(inputs), kw, cfg,
                                torch.device("cpu"))
        results.update({f"{prefix}.{i}.{n}": r for n, (r, _) in tuned.items()})
        inputs, fp_inputs = _forward(layer, inputs, kw), fp_outputs
    return model, results


@torch.no_grad()
def reference_spqr(model_dir, tokens: torch.Tensor, cfg: QuantConfig):
    """SpQR on the full model in RAM: the same capture, sequential groups and Hessians as reference_quantize,
    each layer solved by spqr_quantize. Returns (fake-quantized model, {full linear name: SpQRResult})."""
    assert cfg.method == "spqr"
    model, results, _ = reference_quantize(model_dir, tokens, cfg)
    return model, results


def group_inputs(layer, group: list[str], inputs: list, kw: dict) -> dict[str, list[torch.Tensor]]:
    """One forward of layer over inputs, collecting each Linear of group's inputs as [tokens, in] rows."""
    mods = dict(layer.named_modules())
    xs = {n: [] for n in group}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in group]
    for x in inputs:
        layer(x, **kw)
    for h in hooks:
        h.remove()
    return xs


@torch.no_grad()
def reference_quantize(model_dir, tokens: torch.Tensor, cfg: QuantConfig, follow: dict | None = None):
    """Returns (fake-quantized model, {full linear name: QuantResult}, {full name: (gptq_err, rtn_err)});
    method "spqr": SpQRResults and no errors (see reference_spqr); "sparsegpt": see reference_sparsegpt.
    follow: {full linear name: weight [out, in]} that replaces the layer's own result once it is solved, so each
    later layer is solved on the inputs those weights give (a per-layer check, free of cascades)."""
    model, layers, prefix, inputs, kws = load_with_block0_inputs(model_dir, tokens)
    results, errors = {}, {}
    groups = SEQUENTIAL.get(model.config.model_type, SEQUENTIAL["default"])
    for i, layer in enumerate(layers):
        kw = kws[i]
        mods = dict(layer.named_modules())
        for group in groups:
            xs = group_inputs(layer, group, inputs, kw)
            for n in group:
                if f"{prefix}.{i}.{n}" in cfg.ignore:  # exact names: left in fp, still run for later groups
                    continue
                H = ist_hessian(xs[n])
                W = mods[n].weight.data.clone()
                if cfg.method == "rtn":
                    r = rtn_quantize(W, cfg)
                elif cfg.method == "spqr":
                    r = spqr_quantize(W, H, cfg)
                elif cfg.method == "sparsegpt":
                    r = plain_sparsegpt(W, H, cfg)
                    errors[f"{prefix}.{i}.{n}"] = (W, H)  # the layer's source weight and Hessian
                else:
                    r = gptq_quantize(W, H, cfg).result
                    errors[f"{prefix}.{i}.{n}"] = (relative_output_error(W, r.weight, H),
                                                   relative_output_error(W, rtn_quantize(W, cfg).weight, H))
                mods[n].weight.data = r.weight if follow is None else follow[f"{prefix}.{i}.{n}"].float()
                results[f"{prefix}.{i}.{n}"] = r
        inputs = _forward(layer, inputs, kw)
    return model, results, errors


class PlainSparse(NamedTuple):
    """plain_sparsegpt's result: weight [out, in] fp32, codes / scales / zeros (None with bits 16), mask."""

    weight: torch.Tensor
    codes: torch.Tensor | None  # [out, in] long
    scales: torch.Tensor | None  # [n_groups, out]
    zeros: torch.Tensor | None  # [n_groups, out]
    mask: torch.Tensor  # [out, in] bool, True = pruned


@torch.no_grad()
def reference_sparsegpt(model_dir, tokens: torch.Tensor, cfg: QuantConfig, follow: dict | None = None):
    """SparseGPT on the full model in RAM (reference_quantize's capture, groups and Hessians), each layer solved
    by plain_sparsegpt. Returns (pruned model, {full linear name: PlainSparse}, {full name: (W, H)}: each
    layer's source weight and the Hessian it was solved with). follow: see reference_quantize; a mask decision
    near a tie can flip between two fp32 roundings of the same Hessian and would otherwise move every later
    layer's inputs."""
    assert cfg.method == "sparsegpt"
    return reference_quantize(model_dir, tokens, cfg, follow)


def plain_sparsegpt(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> PlainSparse:
    """Textbook SparseGPT in fp64, one column at a time, with the explicit inverse: choose the mask (score
    w^2 / d, d = the column's diagonal of H^-1 once every earlier column is eliminated; unstructured: the
    int(sparsity * rows * width) lowest of every block_columns-wide block, N:M: the N lowest of each row's M
    columns, ties to the lower index), zero the pruned weights, round the rest (GPTQ grid per group fitted on the
    updated weights with the known pruned ones 0; bits 16: fp16), spread the error over the later columns with
    row i of H^-1, then eliminate column i from H^-1 (Schur complement). No Cholesky, no lazy batches."""
    W, H = W.double().clone(), H.double().clone()
    rows, n = W.shape
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.damp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    d, elim = [], Hinv.clone()  # d[j]: H^-1's diagonal at j once columns < j are eliminated
    for j in range(n):
        d.append(elim[j, j].item())
        elim -= torch.outer(elim[:, j], elim[j, :]) / d[j]
    N, M = (int(v) for v in cfg.mask_structure.split(":"))
    quantized = cfg.bits != 16
    gs = n if cfg.group_size == -1 or not quantized else cfg.group_size
    mask = torch.zeros(rows, n, dtype=torch.bool)
    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, n, dtype=torch.long)
    scales, zeros = [], []
    for i in range(n):
        if M == 0 and i % cfg.block_columns == 0:
            e = min(i + cfg.block_columns, n)
            scores = [W[r, c].item() ** 2 / d[c] for r in range(rows) for c in range(i, e)]
            for idx in sorted(range(len(scores)), key=lambda k: scores[k])[:int(len(scores) * cfg.sparsity)]:
                mask[idx // (e - i), i + idx % (e - i)] = True
        if M and i % M == 0:
            for r in range(rows):
                scores = [W[r, c].item() ** 2 / d[c] for c in range(i, i + M)]
                for k in sorted(range(M), key=lambda k: scores[k])[:N]:
                    mask[r, i + k] = True
        if quantized and i % gs == 0:
            scale, zero = fit_grid(torch.where(mask[:, i:i + gs], 0.0, W[:, i:i + gs]), cfg.bits, cfg.sym,
                                   cfg.full_range)
            scales.append(scale)
            zeros.append(zero)
        q = torch.where(mask[:, i], 0.0, W[:, i])[:, None]
        if quantized:
            code = quantize_codes(q, scale, zero, cfg.maxq)
            codes[:, i] = code[:, 0].long()
            q = dequantize(code, scale, zero)
        else:
            q = q.half().double()
        Q[:, i] = q[:, 0]
        W[:, i:] -= torch.outer((W[:, i] - Q[:, i]) / Hinv[i, i], Hinv[i, i:])
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    if not quantized:
        return PlainSparse(Q.float(), None, None, None, mask)
    return PlainSparse(Q.float(), codes, torch.stack(scales).float(), torch.stack(zeros).float(), mask)


# Mixture-of-experts blocks (tests/test_moe.py), read off transformers' modeling code: the attention groups,
# the sparse-MoE module, the names a checkpoint gives each expert's (gate, up, down), and the shared expert's
# groups, which run after the routed experts on the MoE input itself.
_MLA = [["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"], ["self_attn.q_b_proj"], ["self_attn.kv_b_proj"],
        ["self_attn.o_proj"]]
MOE = {  # model_type -> (attention groups, MoE module, checkpoint name of the MoE module, expert Linears, shared)
    "mixtral": (_GATED[:2], "mlp", "block_sparse_moe", ("w1", "w3", "w2"), []),
    "qwen3_moe": (_GATED[:2], "mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), []),
    "deepseek_v3": (_MLA, "mlp", "mlp", ("gate_proj", "up_proj", "down_proj"),
                    [["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"], ["mlp.shared_experts.down_proj"]]),
}


def _solve(W, H, cfg):
    return rtn_quantize(W, cfg) if cfg.method == "rtn" else gptq_quantize(W, H, cfg).result


@torch.no_grad()
def reference_quantize_moe(model_dir, tokens: torch.Tensor, cfg: QuantConfig):
    """GPTQ / RTN of an MoE model in RAM, on transformers' own fused experts: each expert's rows of
    gate_up_proj / down_proj solved as a Linear with the Hessian of the tokens its router picked (captured at the
    experts module's input: hidden [tokens, hidden], top_k_index [tokens, k]); down_proj's inputs recomputed by
    hand, act(x Wg^T) * (x Wu^T), from the quantized gate/up rows. An expert with fewer than cfg.moe_min_tokens
    tokens gets an identity Hessian; with cfg.moe_all_tokens every expert's Hessian is over every token.
    Returns (fake-quantized model, {checkpoint Linear name: QuantResult}, {checkpoint Linear name: tokens})."""
    model, layers, prefix, inputs, kws = load_with_block0_inputs(model_dir, tokens)
    attn, moe_name, moe_ckpt, (g, u, d), shared = MOE[model.config.model_type]
    results, counts = {}, {}

    def solve_plain(layer, i, groups):
        mods = dict(layer.named_modules())
        for group in groups:
            xs = group_inputs(layer, group, inputs, kws[i])
            for n in group:
                r = _solve(mods[n].weight.data.clone(), ist_hessian(xs[n]), cfg)
                mods[n].weight.data = r.weight
                results[f"{prefix}.{i}.{n}".replace(f".{moe_name}.", f".{moe_ckpt}.")] = r

    def routed(layer, i, experts):
        seen = []
        h = experts.register_forward_pre_hook(lambda m, a: seen.append((a[0], a[1])))
        for x in inputs:
            layer(x, **kws[i])
        h.remove()
        return seen  # per window: (hidden [tokens, hidden], top_k_index [tokens, k])

    for i, layer in enumerate(layers):
        moe = layer.get_submodule(moe_name)
        if not hasattr(moe, "experts"):  # a dense block (DeepSeek-V3's first)
            solve_plain(layer, i, attn + [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
            inputs = _forward(layer, inputs, kws[i])
            continue
        solve_plain(layer, i, attn)
        ex = moe.experts
        inter = ex.down_proj.shape[2]
        stem = f"{prefix}.{i}.{moe_ckpt}.experts"
        xs = [[hid if cfg.moe_all_tokens else hid[(idx == e).any(-1)] for hid, idx in routed(layer, i, ex)]
              for e in range(ex.num_experts)]
        for e in range(ex.num_experts):
            n_tok = sum(x.shape[0] for x in xs[e])
            H = ist_hessian(xs[e]) if n_tok >= cfg.moe_min_tokens else torch.eye(ex.gate_up_proj.shape[2])
            for part, name in ((slice(0, inter), g), (slice(inter, 2 * inter), u)):
                r = _solve(ex.gate_up_proj.data[e, part].clone(), H, cfg)
                ex.gate_up_proj.data[e, part] = r.weight
                results[f"{stem}.{e}.{name}"], counts[f"{stem}.{e}.{name}"] = r, n_tok
        xs = [[hid if cfg.moe_all_tokens else hid[(idx == e).any(-1)] for hid, idx in routed(layer, i, ex)]
              for e in range(ex.num_experts)]
        for e in range(ex.num_experts):
            mids = [ex.act_fn(x @ ex.gate_up_proj[e, :inter].t()) * (x @ ex.gate_up_proj[e, inter:].t()) for x in xs[e]]
            n_tok = sum(x.shape[0] for x in xs[e])
            H = ist_hessian(mids) if n_tok >= cfg.moe_min_tokens else torch.eye(inter)
            r = _solve(ex.down_proj.data[e].clone(), H, cfg)
            ex.down_proj.data[e] = r.weight
            results[f"{stem}.{e}.{d}"], counts[f"{stem}.{e}.{d}"] = r, n_tok
        solve_plain(layer, i, shared)
        inputs = _forward(layer, inputs, kws[i])
    return model, results, counts
