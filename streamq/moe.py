"""Mixture-of-experts blocks: transformers' fused expert parameters as one nn.Linear per expert.

transformers 5 builds a block's routed experts as one module holding 3-D parameters (Mixtral, Qwen3-MoE,
DeepSeek-V3: gate_up_proj [experts, 2*inter, hidden], down_proj [experts, hidden, inter]) while checkpoints,
and the GPTQ layout vLLM reads for MoE models, hold one 2-D tensor per expert and projection
(`...experts.3.w1.weight`). Which checkpoint tensors make which fused parameter, and how (stacked over
experts, gate and up concatenated along dim 1), is read from transformers' own weight conversion mapping
(conversion_mapping.py), never from a table here. Each fused module is replaced in the meta skeleton by
RoutedExperts: the same computation with one nn.Linear per expert and projection, each called on exactly the
tokens the router sends to that expert. So every expert Linear is quantized on its own, with a Hessian from
its routed tokens only (calibration routes as the model does), and the router, which is no nn.Linear, stays
as it is. Expert layouts other than transformers' gated, concatenated, untransposed, bias-free one are a
one-line error.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from streamq.errors import StreamqError


class RoutedExperts(nn.Module):
    """Stands in for a fused experts module: children "0".."E-1", each holding nn.Linear layers named as in the
    checkpoint (gate, up: [inter, hidden]; down: [hidden, inter]).

    forward(hidden [tokens, hidden], top_k_index [tokens, k] int, top_k_weights [tokens, k]) -> [tokens, hidden],
    as transformers' eager experts forward: out[t] = sum over the k chosen experts e of
    w[t, e] * down_e(act(gate_e(x_t)) * up_e(x_t)). Every expert's Linears are called once per forward, on the
    rows routed to it (possibly none), all gate/up projections before any down projection, so the
    true-sequential passes (quant/stages.py) treat the experts' gate/up as one group and their downs as the next.
    """

    def __init__(self, n_experts: int, names: tuple[str, str, str], hidden: int, inter: int, act_fn: nn.Module,
                 dtype: torch.dtype, device: torch.device | str = "meta"):
        super().__init__()
        self.names = names  # (gate, up, down) Linear names inside each expert, e.g. ("w1", "w3", "w2")
        self.n_experts = n_experts
        self.act_fn = act_fn
        self.all_tokens = False  # calibration mode (see all_tokens below): every expert also sees every token
        for e in range(n_experts):
            expert = nn.Module()
            for name, (out_f, in_f) in zip(names, ((inter, hidden), (inter, hidden), (hidden, inter))):
                expert.add_module(name, nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype))
            self.add_module(str(e), expert)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routed, mids = [], []
        for e in range(self.n_experts):
            token, slot, x = routed_rows(hidden_states, top_k_index, e, self.all_tokens)
            mids.append(expert_mid(self._modules[str(e)], self.names, self.act_fn, x))
            routed.append((token, slot))
        for e, (token, slot) in enumerate(routed):
            add_expert_output(out, self._modules[str(e)], self.names, mids[e], token, slot, top_k_weights,
                              self.all_tokens)
        return out


def routed_rows(hidden_states: torch.Tensor, top_k_index: torch.Tensor, e: int,
                all_tokens: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot, x): the rows routed to expert e (top_k_index[token, slot] == e) and the rows the expert
    computes on (those, or every row in the all-tokens calibration mode)."""
    if top_k_index.is_meta:  # traced on the meta device (streamq inspect): no routing, every token
        token = torch.arange(top_k_index.shape[0], device="meta")
        slot = torch.zeros_like(token)
    else:
        token, slot = torch.where(top_k_index == e)
    return token, slot, hidden_states if all_tokens else hidden_states[token]


def expert_mid(expert: nn.Module, names: tuple[str, str, str], act_fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(gate(x)) * up(x): the down projection's input [rows, inter]."""
    gate, up, _ = names
    return act_fn(getattr(expert, gate)(x)) * getattr(expert, up)(x)


def add_expert_output(out: torch.Tensor, expert: nn.Module, names: tuple[str, str, str], mid: torch.Tensor,
                      token: torch.Tensor, slot: torch.Tensor, top_k_weights: torch.Tensor, all_tokens: bool) -> None:
    """out[token] += w[token, slot] * down(mid) for the rows routed to the expert (in place, as index_add_)."""
    y = getattr(expert, names[2])(mid)
    y = (y[token] if all_tokens else y) * top_k_weights[token, slot, None]
    out.index_add_(0, token, y.to(out.dtype))


@contextlib.contextmanager
def all_tokens(block: nn.Module, on: bool = True):
    """While it lasts, every routed expert of block computes on every token (its Linears' Hessians see them
    all: llm-compressor's calibrate-all-experts option), its output still counting only the tokens routed to
    it, so the block's outputs are those of the model."""
    experts = [m for m in block.modules() if isinstance(m, RoutedExperts)] if on else []
    for m in experts:
        m.all_tokens = True
    try:
        yield
    finally:
        for m in experts:
            m.all_tokens = False


def is_expert_linear(name: str, block: nn.Module) -> bool:
    """Whether the Linear called name (relative to block) is a routed expert's projection."""
    parts = name.split(".")
    return len(parts) >= 3 and isinstance(block.get_submodule(".".join(parts[:-2])), RoutedExperts)


def parallel_key(name: str, block: nn.Module) -> str | None:
    """"mlp.experts.*.w1" for an expert Linear "mlp.experts.3.w1": Linears with one key read inputs that do not
    depend on each other (different experts), so they can share a Hessian pass; None for any other Linear."""
    if not is_expert_linear(name, block):
        return None
    parts = name.split(".")
    return ".".join(parts[:-2] + ["*", parts[-1]])


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """Modules of block (by relative name) that hold 3-D parameters: fused experts."""
    return {n: m for n, m in block.named_modules()
            if any(p.dim() == 3 for p in m.parameters(recurse=False))}


def _check_layout(module: nn.Module, where: str) -> tuple[int, int, int]:
    """(experts, hidden, inter) of a fused experts module in the one layout RoutedExperts computes."""
    params = dict(module.named_parameters(recurse=False))
    flags = {k: getattr(module, k, None) for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                  "has_post_expert_norm")}
    expected = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                "has_post_expert_norm": False}
    odd = [f"{k}={v}" for k, v in flags.items() if v is not None and v != expected[k]]
    if set(params) != {"gate_up_proj", "down_proj"} or odd or not hasattr(module, "act_fn"):
        raise StreamqError(f"{where}: unsupported MoE experts layout {type(module).__name__} "
                           f"(parameters {sorted(params)}{', ' + ', '.join(odd) if odd else ''}); streamq quantizes "
                           "gated experts with gate_up_proj [E, 2*inter, hidden] and down_proj [E, hidden, inter]")
    e, two_inter, hidden = params["gate_up_proj"].shape
    if tuple(params["down_proj"].shape) != (e, hidden, two_inter // 2) or two_inter % 2:
        raise StreamqError(f"{where}: unsupported MoE experts shapes gate_up_proj {list(params['gate_up_proj'].shape)}"
                           f", down_proj {list(params['down_proj'].shape)}")
    return e, hidden, two_inter // 2


def _conversions(model: nn.Module):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def unfuse_experts(model: nn.Module, layers: nn.ModuleList, layers_prefix: str, ckpt_names: list[str],
                   where: str) -> dict[str, str]:
    """Replace every fused experts module of the blocks by a RoutedExperts (meta device), its Linears named as
    the checkpoint's per-expert tensors after transformers' renamings. Returns module parameter name -> the
    checkpoint tensor name where they differ (Mixtral: `.mlp.` holds what the checkpoint calls
    `.block_sparse_moe.`); empty for a model without fused experts."""
    if not any(fused_experts(b) for b in layers):
        return {}
    from transformers.core_model_loading import Concatenate, MergeModulelist, rename_source_key

    renamings, converters = _conversions(model)
    source_names, parts = {}, {}  # parts: fused parameter's full name -> {(expert, Linear name)}
    # a quantized folder holds a Linear as its packed tensors (qweight, scales, ...): its .weight is named too
    stems = sorted({n.rsplit(".", 1)[0] + ".weight" for n in ckpt_names})
    for name in [*ckpt_names, *stems]:
        renamed = rename_source_key(name, renamings, [])[0]
        if renamed != name:
            source_names[renamed] = name
    for name in stems:
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is not None:
            conv = next(c for c in converters if pattern in c.source_patterns)
            parts.setdefault(target, []).append((rename_source_key(name, renamings, [])[0], pattern, conv))
    for i, block in enumerate(layers):
        for rel, module in fused_experts(block).items():
            full = f"{layers_prefix}{i}.{rel}"
            n_experts, hidden, inter = _check_layout(module, f"{where}: {full}")
            names = []
            for pname, ops in (("gate_up_proj", (MergeModulelist, Concatenate)), ("down_proj", (MergeModulelist,))):
                found = parts.get(f"{full}.{pname}")
                if not found:
                    if f"{full}.{pname}" in ckpt_names:
                        raise StreamqError(f"{where}: the checkpoint stores {full}.{pname} fused; streamq reads "
                                           "checkpoints with one tensor per expert")
                    raise StreamqError(f"{where}: no checkpoint tensors for {full}.{pname} (per-expert names "
                                       "as transformers' conversion mapping gives them)")
                conv = found[0][2]
                kinds = tuple(type(op) for op in conv.operations)
                if kinds != ops or conv.operations[0].dim != 0 or (len(ops) == 2 and conv.operations[1].dim != 1):
                    raise StreamqError(f"{where}: unsupported MoE checkpoint layout for {full}.{pname} "
                                       f"(transformers converts it with {[type(op).__name__ for op in conv.operations]})")
                projs = {}
                for renamed, pattern, _ in found:
                    tail = renamed[len(full) + 1:].split(".")  # "3", "w1", "weight"
                    if not renamed.startswith(full + ".") or len(tail) != 3 or not tail[0].isdigit() \
                            or tail[2] != "weight":
                        raise StreamqError(f"{where}: unsupported per-expert tensor name {renamed} for {full}")
                    projs.setdefault(conv.source_patterns.index(pattern), set()).add((int(tail[0]), tail[1]))
                for k in sorted(projs):
                    proj = min(p for _, p in projs[k])
                    if len({p for _, p in projs[k]}) != 1 or sorted(e for e, _ in projs[k]) != list(range(n_experts)):
                        raise StreamqError(f"{where}: {full}.*.{proj}: the checkpoint does not hold one tensor "
                                           f"for each of the {n_experts} experts")
                    names.append(proj)
            if len(names) != 3:
                raise StreamqError(f"{where}: unsupported MoE checkpoint layout for {full} (projections {names})")
            dtype = module.gate_up_proj.dtype
            stand_in = RoutedExperts(n_experts, tuple(names), hidden, inter, module.act_fn, dtype)
            parent_name, _, attr = rel.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, stand_in)
    return source_names
