"""What a run writes: every output tensor planned before the first block (units of the shard writer), the
map from source tensors to the output tensors that stand for them, and a finished block's tensors packed
in the layout format (a streamq.formats module)."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from streamq.config import PACKABLE_BITS, QuantConfig
from streamq.errors import StreamqError
from streamq.formats import default_layout
from streamq.ignore import ignored_in_block, quantized_head, quantized_linears
from streamq.io.blocks import ModelLayout, block_names, non_block_names
from streamq.io.checkpoint import DTYPES, Checkpoint
from streamq.io.writer import TensorSpec, Unit
from streamq.quant.actquant import scale_names, scale_specs
from streamq.quant.grid import check_group_size


def block_unit(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, i: int,
               n_outliers: dict[str, int] | None = None, fmt=None) -> Unit:
    """Block i's output tensors in layout format fmt (a streamq.formats module; None = default_layout); checks
    its layers. Data-sized tensors (SpQR's outliers): the unit is marked sized_by_data, planned with none, and
    settled with n_outliers (Linear name -> count) once known."""
    fmt = fmt or default_layout(cfg)
    prefix = layout.block_prefix(i)
    linears = quantized_linears(layout, i, cfg)
    needed = {layout.source_name(prefix + n) for n, _ in layout.layers[i].named_parameters()}
    missing = sorted(needed - set(ckpt.tensors))
    if missing:
        raise StreamqError(f"{ckpt.folder}: tensor {missing[0]} is missing from the checkpoint")
    quantized = {layout.source_name(prefix + n + ".weight"): (n, m) for n, m in linears.items()}
    specs = []
    for name in block_names(layout, ckpt, i):
        if name in quantized:
            lin_name, lin = quantized[name]
            if cfg.bits in PACKABLE_BITS:  # 16 (prune only) has no groups
                check_group_size(lin.in_features, cfg.group_size, prefix + lin_name)
            try:
                shapes = fmt.linear_shapes(lin.out_features, lin.in_features, cfg, (n_outliers or {}).get(lin_name, 0))
            except StreamqError as e:
                raise StreamqError(f"{prefix}{lin_name}: {e}") from None
            stem = name[: -len("weight")]
            specs += [TensorSpec(stem + k, dtype, shape) for k, (shape, dtype) in shapes.items()]
        else:
            info = ckpt.tensors[name]
            specs.append(TensorSpec(name, DTYPES[info.dtype], info.shape))
    for name, (shape, dtype) in scale_specs(layout.block_linears(i), cfg, f"{ckpt.folder}: block {i}",
                                            ignored_in_block(layout, i, cfg)).items():  # actquant.py
        specs.append(TensorSpec(prefix + name, dtype, shape))
    return Unit(f"block.{i}", tuple(sorted(specs, key=lambda s: s.name)), sized_by_data=fmt.SIZED_BY_DATA)


def plan_units(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, fmt=None) -> list[Unit]:
    """Every output tensor's name, dtype and shape, known before any block runs (SpQR: up to the outlier
    counts, see block_unit); checks every layer."""
    fmt = fmt or default_layout(cfg)
    units = [block_unit(layout, ckpt, cfg, i, fmt=fmt) for i in range(layout.n_blocks)]
    rest = [TensorSpec(n, DTYPES[ckpt.tensors[n].dtype], ckpt.tensors[n].shape) for n in non_block_names(layout, ckpt)]
    head = quantized_head(layout, cfg)
    if head is not None:  # --quant-lm-head: its weight stands as its packed tensors
        name, lin = head
        shapes = fmt.linear_shapes(lin.out_features, lin.in_features, cfg)
        rest = [s for s in rest if s.name != name + ".weight"]
        rest += [TensorSpec(f"{name}.{k}", dtype, shape) for k, (shape, dtype) in shapes.items()]
    units.append(Unit("rest", tuple(sorted(rest, key=lambda s: s.name))))
    return units


def block_tensors(layout: ModelLayout, ckpt: Checkpoint, i: int, results: dict,
                  cfg: QuantConfig, fmt=None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Block i's output tensors: its Linears packed by layout format fmt (None = default_layout), the tensors
    in extra (block-relative name -> tensor: SmoothQuant's folded norms, in the source tensor's dtype, and the
    activation scales) as given, everything else copied unchanged. Results read back on demand (streamed
    experts' LazyResult, quant/expert_scratch.py) are packed when their tensors are taken from the returned
    mapping (PackedLater), so the block's packed experts are never all in memory."""
    extra = extra or {}
    fmt = fmt or default_layout(cfg)
    prefix = layout.block_prefix(i)
    out, later = {}, {}
    linears = layout.block_linears(i)
    for lin_name, (result, _) in results.items():
        stem = layout.source_name(f"{prefix}{lin_name}.weight")[: -len("weight")]
        if hasattr(result, "load"):
            lin = linears[lin_name]
            for k, (shape, dtype) in fmt.linear_shapes(lin.out_features, lin.in_features, cfg).items():
                later[stem + k] = (result, stem, k, dtype, tuple(shape))
            continue
        for k, t in fmt.pack(result, cfg).items():
            out[stem + k] = t.cpu()
    packed_weights = {layout.source_name(f"{prefix}{n}.weight") for n in results}
    for name in block_names(layout, ckpt, i):
        if name[len(prefix):] in extra:
            out[name] = extra[name[len(prefix):]].to(DTYPES[ckpt.tensors[name].dtype]).cpu()
        elif name not in packed_weights:
            out[name] = ckpt.get(name)
    for rel, t in extra.items():
        out.setdefault(prefix + rel, t.cpu())
    return PackedLater(out, later, fmt, cfg) if later else out


class PackedLater(Mapping):
    """A block's output tensors by name: `ready` as given, the tensors of the results in `later` (name ->
    (result with load(), stem, packed tensor key, dtype, shape)) packed when taken, one Linear's at a time.
    describe() gives every tensor's (dtype, shape) without packing (io/writer.py checks the plan with it)."""

    def __init__(self, ready: dict, later: dict, fmt, cfg: QuantConfig):
        self.ready, self.later, self.fmt, self.cfg = ready, later, fmt, cfg
        self._stem, self._packed = None, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.ready:
            return self.ready[name]
        result, stem, key, _, _ = self.later[name]
        if stem != self._stem:
            self._stem, self._packed = stem, {}  # the previous Linear's tensors go before the next is read
            self._packed = {k: t.cpu() for k, t in self.fmt.pack(result.load(), self.cfg).items()}
        return self._packed[key]

    def __iter__(self):
        return iter([*self.ready, *self.later])

    def __len__(self) -> int:
        return len(self.ready) + len(self.later)

    def describe(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {**{n: (t.dtype, tuple(t.shape)) for n, t in self.ready.items()},
                **{n: (d, s) for n, (_, _, _, d, s) in self.later.items()}}


def source_map(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, fmt=None) -> dict[str, list[str]]:
    """Source tensor -> the output tensors standing for it: a quantized Linear's weight -> its packed tensors
    in layout format fmt (None = default_layout), anything else -> itself. Recorded in the manifest so
    `streamq verify` needs no source."""
    fmt = fmt or default_layout(cfg)
    packed = {}
    for i in range(layout.n_blocks):
        for name, lin in quantized_linears(layout, i, cfg).items():
            stem = layout.source_name(f"{layout.block_prefix(i)}{name}.weight")[: -len("weight")]
            shapes = fmt.linear_shapes(lin.out_features, lin.in_features, cfg)
            packed[stem + "weight"] = [stem + k for k in shapes]
        skip = ignored_in_block(layout, i, cfg)
        for name, target in scale_names(layout.block_linears(i), cfg, skip=skip).items():
            stem = f"{layout.block_prefix(i)}{target.split(':', 1)[1]}.weight"  # a scale stands with its Linear
            packed.setdefault(stem, [stem]).append(layout.block_prefix(i) + name)
    head = quantized_head(layout, cfg)
    if head is not None:
        shapes = fmt.linear_shapes(head[1].out_features, head[1].in_features, cfg)
        packed[head[0] + ".weight"] = [f"{head[0]}.{k}" for k in shapes]
    return {name: packed.get(name, [name]) for name in ckpt.names()}
