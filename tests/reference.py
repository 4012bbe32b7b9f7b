"""A plain in-memory GPTQ/RTN/SpQR reference on the full model, written as the IST-DASLab scripts do it: the
whole model in RAM, all calibration inputs of a layer in one tensor, the sequential groups listed by hand per
architecture, Hessians as 2/n * sum x^T x. Shares only the per-layer solvers and AutoRound's per-block tuner
(tested on their own) with streamq."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from streamq.config import QuantConfig
from streamq.quant.autoround import autoround_block
from streamq.quant.gptq import gptq_quantize
from streamq.quant.hessian import relative_output_error
from streamq.quant.rtn import rtn_quantize
from streamq.quant.spqr import spqr_quantize

SEQUENTIAL = {
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "default": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
}


class _Stop(Exception):
    pass


def load_with_block0_inputs(model_dir, tokens: torch.Tensor):
    """The full fp32 model, its decoder layers and name prefix, and the inputs of layer 0 per window
    [1, seq, hidden] with the layers' forward kwargs, caught by a hook."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    layers = model.get_decoder().layers
    prefix = next(n for n, m in model.named_modules() if m is layers)
    inputs, kw = [], {}

    def catch(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        kw.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for j in range(tokens.shape[0]):
        try:
            with torch.no_grad():
                model(tokens[j:j + 1], use_cache=False)
        except _Stop:
            pass
    handle.remove()
    kw["use_cache"] = False
    return model, layers, prefix, inputs, kw


def _forward(layer, inputs: list, kw: dict) -> list:
    with torch.no_grad():
        outs = [layer(x, **kw) for x in inputs]
    return [x[0] if isinstance(x, tuple) else x for x in outs]


def reference_autoround(model_dir, tokens: torch.Tensor, cfg: QuantConfig):
    """AutoRound on the full model in RAM, all windows of a layer in one tensor, quantized-input mode: each layer
    is tuned on the quantized model's inputs toward the fp model's outputs (cfg.fp_targets, the reference's two
    streams), or toward the fp layer's outputs on the quantized inputs. Returns (fake-quantized model,
    {full linear name: QuantResult})."""
    model, layers, prefix, inputs, kw = load_with_block0_inputs(model_dir, tokens)
    fp_inputs = inputs
    results = {}
    for i, layer in enumerate(layers):
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


@torch.no_grad()
def reference_quantize(model_dir, tokens: torch.Tensor, cfg: QuantConfig):
    """Returns (fake-quantized model, {full linear name: QuantResult}, {full name: (gptq_err, rtn_err)});
    method "spqr": SpQRResults and no errors (see reference_spqr)."""
    model, layers, prefix, inputs, kw = load_with_block0_inputs(model_dir, tokens)
    results, errors = {}, {}
    groups = SEQUENTIAL.get(model.config.model_type, SEQUENTIAL["default"])
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for group in groups:
            xs = {n: [] for n in group}
            hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
                     for n in group]
            for x in inputs:
                layer(x, **kw)
            for h in hooks:
                h.remove()
            for n in group:
                X = torch.cat(xs[n]).double()  # [tokens, in]
                H = (2.0 / len(inputs) * X.T @ X).float()
                W = mods[n].weight.data.clone()
                if cfg.method == "rtn":
                    r = rtn_quantize(W, cfg)
                elif cfg.method == "spqr":
                    r = spqr_quantize(W, H, cfg)
                else:
                    r = gptq_quantize(W, H, cfg).result
                    errors[f"{prefix}.{i}.{n}"] = (relative_output_error(W, r.weight, H),
                                                   relative_output_error(W, rtn_quantize(W, cfg).weight, H))
                mods[n].weight.data = r.weight
                results[f"{prefix}.{i}.{n}"] = r
        inputs = _forward(layer, inputs, kw)
    return model, results, errors
