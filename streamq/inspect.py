"""`streamq inspect MODEL`: what streamq finds in a model folder, before any run.

From config.json, the safetensors headers and one forward of a few tokens through the model's own
embeddings (calib/capture.py: the blocks stay on the meta device), it reports where the decoder blocks
are and which module runs them, the modules before and after them, the kwargs each block is called with,
each block's Linears with their shapes grouped in true-sequential order (traced by quant/stages.py's hooks on
a meta-device forward of the block, so no block weights are read), which group sizes divide each Linear's
input, and whether the family is among those tests/test_architectures.py covers.
"""
from __future__ import annotations

import torch
from torch import nn

from streamq.calib.capture import ModelEnds, to_meta
from streamq.io.blocks import build_layout
from streamq.io.checkpoint import Checkpoint
from streamq.quant.stages import trace

# config.model_type of the families tests/test_architectures.py runs end to end (a test keeps this equal to
# its list). Informational only: support is decided by structure (io/blocks.py), not by this list.
TESTED = ("cohere", "falcon", "gemma2", "gemma3_text", "gpt_neox", "granite", "llama", "mistral", "olmo2", "opt",
          "phi3", "qwen2", "qwen3", "starcoder2")
GROUP_SIZES = (32, 64, 128, 256)
PROBE_TOKENS = 8  # the length of the probe forward: enough to build every mask and position embedding


@torch.no_grad()
def inspect_model(folder) -> dict:
    """The structure report of a model folder as plain data (what `streamq inspect --json` prints)."""
    ckpt = Checkpoint(folder)
    layout = build_layout(ckpt)
    cpu = torch.device("cpu")
    ends = ModelEnds(layout, ckpt, cpu, torch.float32, with_head=False)
    ran: list[str] = []
    names = {m: n for n, m in layout.model.named_modules()}
    leaves = [m for m in layout.decoder.modules() if _is_leaf(m) and not _in_blocks(names[m], layout)]
    hooks = [m.register_forward_hook(lambda m, a, o: ran.append(names[m])) for m in leaves]
    try:
        hidden, kwargs = ends.capture(torch.zeros(1, PROBE_TOKENS, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
        ends.release()
    before = list(dict.fromkeys(ran))
    after = [n for n, m in layout.model.named_modules()
             if _is_leaf(m) and n not in before and not _in_blocks(n, layout)]
    blocks = []
    for i, block in enumerate(layout.layers):
        linears = layout.block_linears(i)
        groups = trace(block, to_meta(hidden), to_meta(kwargs[i])).groups
        blocks.append([[{"name": n, "shape": [linears[n].out_features, linears[n].in_features],
                         "bias": linears[n].bias is not None,
                         "group_sizes": [g for g in GROUP_SIZES if linears[n].in_features % g == 0]}
                        for n in group] for group in groups])
    calls = {}
    for k in kwargs[0]:
        kinds = len({id(kw[k]) for kw in kwargs})
        calls[k] = "None" if all(kw[k] is None for kw in kwargs) else f"{kinds} kinds" if kinds > 1 else "shared"
    return {
        "model": str(ckpt.folder), "class": type(layout.model).__name__, "model_type": layout.config.model_type,
        "tested": layout.config.model_type in TESTED,
        "blocks_path": layout.layers_prefix[:-1], "n_blocks": layout.n_blocks,
        "block_class": type(layout.layers[0]).__name__,
        "decoder": layout.decoder_prefix[:-1] or "(the model)", "decoder_class": type(layout.decoder).__name__,
        "before_blocks": [_described(layout.model, n) for n in before],
        "after_blocks": [_described(layout.model, n) for n in after],
        "block_kwargs": calls,  # name -> None | shared (one object for all blocks) | N kinds (per layer type)
        "blocks": blocks,
    }


def _is_leaf(m: nn.Module) -> bool:
    """A module with tensors of its own (embeddings, norms, rotary, head), not a container."""
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _in_blocks(name: str, layout) -> bool:
    return name.startswith(layout.layers_prefix)


def _described(model: nn.Module, name: str) -> str:
    return f"{name} ({type(model.get_submodule(name)).__name__})"


def format_inspection(r: dict) -> str:
    """The report as text: one line per fact, then block 0's Linears by group (and which blocks differ)."""
    lines = [
        f"model       {r['model']}",
        f"class       {r['class']} (model_type {r['model_type']}; "
        f"{'covered by tests/test_architectures.py' if r['tested'] else 'not covered by the tests: its structure was found, results unverified'})",
        f"blocks      {r['blocks_path']}.0..{r['n_blocks'] - 1}: {r['n_blocks']} x {r['block_class']}, "
        f"run by {r['decoder']} ({r['decoder_class']})",
        f"before      {', '.join(r['before_blocks']) or '-'}",
        f"after       {', '.join(r['after_blocks']) or '-'}",
        f"block call  {', '.join(f'{k} ({v})' for k, v in r['block_kwargs'].items()) or '-'} "
        f"(on a {PROBE_TOKENS}-token probe: sliding-window masks differ only past the window)",
    ]
    first = r["blocks"][0]
    differ = [i for i, b in enumerate(r["blocks"]) if b != first]
    n_linears = sum(len(g) for g in first)
    lines.append(f"linears     {n_linears} per block in {len(first)} true-sequential groups"
                 + (f" (blocks {differ} differ; block 0 shown)" if differ else " (the same in every block)"))
    lines.append(f"  {'group':<6}{'linear':<34}{'[out, in]':<16}{'bias':<6}group sizes dividing in")
    for g, group in enumerate(first, 1):
        for lin in group:
            sizes = " ".join(map(str, lin["group_sizes"])) or "none"
            no = [str(s) for s in GROUP_SIZES if s not in lin["group_sizes"]]
            lines.append(f"  {g:<6}{lin['name']:<34}{str(lin['shape']):<16}{'yes' if lin['bias'] else 'no':<6}"
                         f"{sizes}{' (not ' + ' '.join(no) + ')' if no else ''}")
    return "\n".join(lines)
