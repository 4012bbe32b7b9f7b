"""A block's trace (stages.trace) reused by the next block when the two are twins.

The blocks of a model are mostly alike: the same module tree, parameter shapes and per-layer settings, called
with inputs of the same shapes. trace() records only names, call order, byte counts and who read what, so a
twin's trace is the one its twin gave; reusing it skips trace()'s hooked forward of one sample (a block then runs
1.00 full forwards instead of 1 + 1/nsamples: tools/count_block_forwards.py). Twins are judged by block_signature: the
module tree (names, classes, parameter and buffer shapes and dtypes), each module's plain settings (ints,
floats, bools, strings, None and tuples of them, e.g. a sliding window or whether the layer applies RoPE;
`layer_idx` aside), and the shapes, dtypes and devices of the call's tensors (other call arguments by value). A
block with routed experts never reuses one: which experts a sample calls depends on the data.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from streamq.moe import RoutedExperts
from streamq.quant.expert_stage import StreamedExperts
from streamq.quant.stages import Trace, trace

_PLAIN = (int, float, bool, str, type(None))
_last: list = []  # at most one (signature, Trace): the previous block's


def block_signature(block: nn.Module, kwargs: dict, device: torch.device) -> tuple:
    """What a block's trace depends on besides its input's values (see the module docstring); hashable."""
    modules = []
    for name, m in block.named_modules():
        tensors = [(n, tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(recurse=False),
                                                              *m.named_buffers(recurse=False)]]
        settings = [(k, v) for k, v in sorted(vars(m).items())
                    if not k.startswith("_") and k != "layer_idx" and _plain(v)]
        modules.append((name, type(m).__module__, type(m).__qualname__, tuple(tensors), tuple(settings)))
    call = [(tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else
            (type(a).__qualname__, a if _plain(a) else id(a)) for a in tree_leaves(kwargs)]
    return type(block), str(device), tuple(sorted(kwargs)), tuple(call), tuple(modules)


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v))


def twin_trace(block: nn.Module, sample: Callable[[], torch.Tensor], kwargs: dict, device: torch.device) -> Trace:
    """trace(block, sample(), kwargs), or the previous block's trace where block is its twin (sample() not
    called then). sample: one calibration input [1, seq, hidden] on device."""
    key = block_signature(block, kwargs, device)
    if _last and _last[0][0] == key:
        return _last[0][1]
    _last.clear()
    t = trace(block, sample(), kwargs)
    if not t.parallel and not any(isinstance(m, (RoutedExperts, StreamedExperts)) for m in block.modules()):
        _last.append((key, t))
    return t


def forget() -> None:
    """Drop the remembered trace: the next block is traced whatever it is."""
    _last.clear()
