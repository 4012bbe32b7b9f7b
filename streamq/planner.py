"""`streamq plan`: a compress run planned before it starts. The sizes come from streamq.footprint (config.json
and the safetensors headers; no weight is read); this module makes the decisions that keep the run inside
--max-ram / --max-vram / --max-disk, or refuses it with the smallest budget that would fit, and prints it.

Decisions: where the activations live (ram when its slots fit --max-ram next to the block, else disk; only
when --offload is not given, and never ram for a run resuming from disk); which blocks run on the CPU because
they do not fit --max-vram (compress runs them there, RunOptions.cpu_blocks). Recorded, not chosen: samples per
forward (the pipeline runs one, AutoRound batch_size) and Hessians held at once (the true-sequential groups).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import psutil

from streamq import footprint
from streamq.config import QuantConfig
from streamq.methods import get_method
from streamq.errors import StreamqError
from streamq.io.blocks import build_layout
from streamq.io.checkpoint import Checkpoint
from streamq.memstat import release_free_heap
from streamq.device import resolve_device, resolve_dtype
from streamq.options import MANIFEST, RunOptions


@dataclass(frozen=True)
class BlockPlan:
    """One decoder block (bytes). peak_bytes: its high-water mark on `device`, above baseline and store."""

    index: int
    weight_bytes: int  # its tensors in the compute dtype
    largest_linear: str  # the Linear with the largest Hessian, name within the block, e.g. "mlp.down_proj"
    largest_linear_shape: tuple[int, int]  # (out, in)
    hessian_bytes: int  # its Hessian, in^2 * 4
    hessians_at_once_bytes: int  # the largest group of Hessians held together (0: RTN / AutoRound hold none)
    peak_bytes: int
    device: str  # where it runs: the run's device, or "cpu" when it does not fit --max-vram


@dataclass(frozen=True)
class Plan:
    """What a compress run will hold and where. Bytes throughout; None = no budget / not estimated."""

    model: str
    method: str
    device: str
    dtype: str  # compute dtype
    nsamples: int
    seqlen: int
    samples_per_forward: int
    n_blocks: int
    blocks: tuple[BlockPlan, ...]
    offload: str  # "ram" | "disk" | "none" (RTN reads no activations)
    offload_reason: str
    store_slot_bytes: int  # one slot: nsamples * seqlen * hidden * itemsize
    store_slots: int  # 2; 4 with AutoRound's fp stream
    store_bytes: int  # every slot, in RAM or on disk as offload says
    output_bytes: int
    baseline_rss_bytes: int
    peak_ram_bytes: int
    peak_vram_bytes: int  # 0 on the CPU
    peak_disk_bytes: int
    max_ram: int | None = None
    max_vram: int | None = None
    max_disk: int | None = None
    estimate_seconds: float | None = None  # from a micro-benchmark on this machine (streamq.estimate)
    estimate_basis: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cpu_fallback_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.device != self.device]


def make_plan(model, cfg: QuantConfig, opts: RunOptions, max_ram: int | None = None, max_vram: int | None = None,
              max_disk: int | None = None, fixed_offload: bool = True, benchmark: bool = False) -> Plan:
    """Plan compressing `model` with cfg/opts inside the budgets (bytes). fixed_offload: opts.offload is the
    user's; otherwise the plan picks it: with --max-ram, ram when it fits, else disk; without, disk (the
    default) unless only ram fits --max-disk. Raises StreamqError, one line naming the smallest budget that
    would fit, when nothing does. benchmark: time a few kernels here for the time estimate (streamq.estimate)."""
    ckpt = Checkpoint(model)
    layout = build_layout(ckpt)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, ckpt)
    f = footprint.facts(layout, ckpt, cfg, dtype, opts)
    release_free_heap()  # as compress() does before its blocks: the baseline its peak grows from
    baseline = psutil.Process().memory_info().rss
    method = get_method(cfg.method)
    if not cfg.calibrated:
        choices = ["none"]
    elif fixed_offload:
        choices = [opts.offload]
    else:
        choices = ["ram", "disk"] if max_ram is not None else ["disk", "ram"]
    tried = {off: footprint.predict(f, method.footprint, opts.seqlen, device, off, baseline, max_vram) for off in choices}
    fits = [off for off, p in tried.items() if _fits(p, max_ram, max_disk)]
    if not fits:
        raise StreamqError(_refusal(tried, max_ram, max_disk))
    offload = fits[0]
    if len(choices) == 1:
        reason = f"{cfg.method} reads no activations" if offload == "none" else "--offload as given"
    elif offload == choices[0]:
        reason = "fits --max-ram next to the block" if offload == "ram" else "the default, within the budgets"
    else:
        reason = f"{choices[0]} would need {_over(tried[choices[0]], max_ram, max_disk)}"
    p = tried[offload]
    blocks = []
    for i, (b, (peak, on)) in enumerate(zip(f["blocks"], p["blocks"])):
        name, (out, inp) = max(b["linears"].items(), key=lambda kv: (kv[1][1], kv[1][0]))
        held = 0 if method.footprint in ("rtn", "autoround") else max(
            [sum(b["linears"][n][1] ** 2 * 4 for n in g) for g in b["groups"]] + [b.get("expert_hessians", 0)])
        blocks.append(BlockPlan(i, b["weight_bytes"], name, (out, inp), inp * inp * 4, held, peak, on))
    estimate, basis = None, ""
    if benchmark:
        from streamq.estimate import estimate_seconds

        estimate, basis = estimate_seconds(f, cfg, opts, device, dtype)
    return Plan(
        model=str(ckpt.folder), method=cfg.method, device=str(device), dtype=str(dtype).removeprefix("torch."),
        nsamples=opts.nsamples, seqlen=opts.seqlen, samples_per_forward=f["samples_per_forward"],
        n_blocks=layout.n_blocks, blocks=tuple(blocks), offload=offload, offload_reason=reason,
        store_slot_bytes=f["slot_bytes"], store_slots=f["slots"],
        store_bytes=0 if offload == "none" else f["slots"] * f["slot_bytes"],
        output_bytes=f["output_bytes"], baseline_rss_bytes=baseline, peak_ram_bytes=p["ram"],
        peak_vram_bytes=p["vram"], peak_disk_bytes=p["disk"], max_ram=max_ram, max_vram=max_vram,
        max_disk=max_disk, estimate_seconds=estimate, estimate_basis=basis)


def apply_plan(model, out, cfg: QuantConfig, opts: RunOptions, fixed_offload: bool, max_ram: int | None = None,
               max_vram: int | None = None, max_disk: int | None = None) -> RunOptions:
    """compress()'s up-front check, before OUT is touched: plan within the budgets (refusing when nothing fits),
    bound the heap (footprint.bound_heap, which the RAM model assumes) and return opts with the planned offload.
    A run resuming in `out` keeps its activations on disk, the only store that survives a restart."""
    if not fixed_offload and _resuming(Path(out), opts):
        opts, fixed_offload = dataclasses.replace(opts, offload="disk"), True
    plan = make_plan(model, cfg, opts, max_ram, max_vram, max_disk, fixed_offload)
    footprint.bound_heap()
    offload = opts.offload if plan.offload == "none" else plan.offload
    return dataclasses.replace(opts, offload=offload, cpu_blocks=tuple(plan.cpu_fallback_blocks))


def fmt_size(n: int | None) -> str:
    """Bytes as a --max-* value, rounded up so that the text parsed back is at least n: 612MB, 1.24GB."""
    if n is None:
        return "-"
    if n < 10**3:
        return f"{n}B"
    if n < 10**6:
        return f"{math.ceil(n / 10**3)}kB"
    if n < 10**9:
        return f"{math.ceil(n / 10**6)}MB"
    return f"{math.ceil(n / 10**7) / 100:.2f}GB"


def _fits(p: dict, max_ram: int | None, max_disk: int | None) -> bool:
    return (max_ram is None or p["ram"] <= max_ram) and (max_disk is None or p["disk"] <= max_disk)


def _over(p: dict, max_ram: int | None, max_disk: int | None) -> str:
    parts = []
    if max_ram is not None and p["ram"] > max_ram:
        parts.append(f"{fmt_size(p['ram'])} of RAM > --max-ram {fmt_size(max_ram)}")
    if max_disk is not None and p["disk"] > max_disk:
        parts.append(f"{fmt_size(p['disk'])} of disk > --max-disk {fmt_size(max_disk)}")
    return " and ".join(parts)


WHERE = {"none": "", "ram": ", activations in RAM", "disk": ", activations on disk"}


def _refusal(tried: dict, max_ram: int | None, max_disk: int | None) -> str:
    """One line: which budget no plan fits, and the smallest value of it that would (the other kept)."""
    if max_ram is not None and any(max_disk is None or p["disk"] <= max_disk for p in tried.values()):
        off, p = min(((o, p) for o, p in tried.items() if max_disk is None or p["disk"] <= max_disk),
                     key=lambda kv: kv[1]["ram"])
        return (f"no plan fits --max-ram {fmt_size(max_ram)}: the smallest that fits is --max-ram "
                f"{fmt_size(p['ram'])} (predicted peak RSS{WHERE[off]})")
    if max_disk is not None and any(max_ram is None or p["ram"] <= max_ram for p in tried.values()):
        off, p = min(((o, p) for o, p in tried.items() if max_ram is None or p["ram"] <= max_ram),
                     key=lambda kv: kv[1]["disk"])
        return (f"no plan fits --max-disk {fmt_size(max_disk)}: the smallest that fits is --max-disk "
                f"{fmt_size(p['disk'])} (activation store and output{WHERE[off]})")
    off, p = min(tried.items(), key=lambda kv: kv[1]["ram"])
    return (f"no plan fits --max-ram {fmt_size(max_ram)} and --max-disk {fmt_size(max_disk)} together: the "
            f"smallest that fit are --max-ram {fmt_size(p['ram'])} --max-disk {fmt_size(p['disk'])}")


def _resuming(out: Path, opts: RunOptions) -> bool:
    """out holds an interrupted run past block 0 that this call will continue."""
    path = out / MANIFEST
    if opts.resume != "auto" or not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return not manifest.get("complete") and manifest.get("next_block", 0) > 0


def human(n: int) -> str:
    """Bytes for people: 1.23 GB, 456 MB, 12 kB (decimal units, as parse_size reads them)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{n} B"


def format_plan(p: Plan) -> str:
    """The plan as a table for `streamq plan`: one row per run of identical blocks, then the totals."""
    rows = [("blocks", "weights", "largest Linear [out x in]", "its Hessian", "Hessians held", "peak", "on")]
    runs: list[list[BlockPlan]] = []
    for b in p.blocks:
        if runs and dataclasses.replace(runs[-1][-1], index=b.index) == b:
            runs[-1].append(b)
        else:
            runs.append([b])
    for run in runs:
        b = run[0]
        rows.append((f"{b.index}" if len(run) == 1 else f"{b.index}-{run[-1].index}", human(b.weight_bytes),
                     f"{b.largest_linear} {b.largest_linear_shape[0]}x{b.largest_linear_shape[1]}",
                     human(b.hessian_bytes), human(b.hessians_at_once_bytes), human(b.peak_bytes), b.device))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"plan: {p.model}", f"  {p.method} on {p.device} in {p.dtype}; {p.nsamples} samples x {p.seqlen} tokens, "
             f"{p.samples_per_forward} per forward; {p.n_blocks} blocks"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]

    def budget(n: int | None) -> str:
        return f"  (budget {human(n)})" if n is not None else ""

    store = ("none (RTN reads no activations)" if p.offload == "none" else
             f"{p.store_slots} slots x {human(p.store_slot_bytes)} = {human(p.store_bytes)} "
             f"{'in RAM' if p.offload == 'ram' else 'on disk'} ({p.offload_reason})")
    lines += [
        f"  activation store  {store}",
        f"  output            {human(p.output_bytes)}",
        f"  baseline RSS      {human(p.baseline_rss_bytes)} (this process: torch, transformers, the skeleton)",
        f"  peak RAM          {human(p.peak_ram_bytes)}{budget(p.max_ram)}",
        f"  peak VRAM         {human(p.peak_vram_bytes) if p.peak_vram_bytes else '-'}{budget(p.max_vram)}",
        f"  peak disk         {human(p.peak_disk_bytes)}{budget(p.max_disk)}",
    ]
    if p.cpu_fallback_blocks:
        lines.append(f"  CPU fallback      blocks {p.cpu_fallback_blocks} do not fit --max-vram and run on the CPU")
    if p.estimate_seconds is not None:
        lines.append(f"  time (estimate)   {_duration(p.estimate_seconds)} ({p.estimate_basis})")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"~{seconds:.0f} s"
    if seconds < 7200:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
