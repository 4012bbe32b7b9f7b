"""What a compress run holds in memory and on disk, from config.json and the safetensors headers alone.

Bytes throughout; c = compute dtype itemsize; Wc = a block's tensors in the compute dtype; for a Linear L
[out, in]: Hu = in^2 * 4 (its fp32 Hessian) and Wu = out * in * 4. On the CPU:

    peak RAM  = baseline + RUN_OVERHEAD + store_ram + max(capture, block_0 .. block_n-1, finish) + pending
    pending   = the largest block's packed output tensors: block i's wait for their write-behind while block
                i + 1 computes (io/writebehind.py)
    store_ram = slots * nsamples * seqlen * hidden * c  offload ram: every slot (2; AutoRound's fp stream 4)
              | PREFETCH * seqlen * hidden * c           offload disk: the samples in flight
    capture   = embeddings in c + max(one of them as read, fwd)                            stage 4
    block_i   = BLOCK_SLACK * (Wc + max(read,                                              materialize
                                        H_group + fwd + 2 * seqlen * in_max * 4 + R + K,  Hessian pass
                                        H_group + solver(L) + R + K))                      solve, worst L
    K         = min(kept, KEEP_BYTES) with offload ram; 0 with offload disk, where they go to a scratch file
                beside the store (quant/kept.py; kept bytes count in peak disk instead)
    kept      = nsamples * seqlen * (hidden + inter) * c: true-sequential GPTQ/SpQR's kept intermediates
                (quant/stages.py; at most the attention output and the down projection's input)
    solver(L) = max(4 Hu + Wu, Hu + 3 Wu + 4 min(Wu, ERROR_CHUNK)) + SOLVER_SLACK  (+ Wu when c != 4)
    read      = a tensor as read: its mapped source bytes when it is cast (0 when it is not)
    fwd       = seqlen * (8 * hidden + 4 * inter) * c      one sample through the block (sdpa, no mask)
    R         = results kept until the block is packed: uint8 codes, + fp32 weights when c != 4
    finish    = every non-block tensor as a mapped view
    H_group   = sum of Hu over Linears whose Hessians are collected together; the pipeline finds its
                true-sequential groups by tracing a forward, here they are the Linears of one parent module
                with equal in_features (q/k/v/o for q/k/v: an upper bound); without true-sequential, all
    baseline  = this process's RSS when planning (torch, transformers and the meta skeleton imported)
    MoE block with streamed experts (GPTQ / RTN, quant/expert_stage.py): Wc = the rest of the block + one group
                of experts (expert_stage.GROUP_BYTES); H_group of the experts' phase = one group's gate/up and
                down Hessians; R counts the rest's Linears (solved experts go to the scratch, counted in peak
                disk); K adds, with offload ram, their inputs and summed outputs for every sample; pending
                counts one expert Linear's packed tensors (outputs.PackedLater), not all of them

solver(L) is fitted to ru_maxrss of gptq_quantize + relative_output_error on six shapes from 1024 to 11008
wide with bound_heap() in force (an upper bound, within 110 MB or 10%): the Cholesky phase holds the working H
and two of (damped copy, factor, inverse, its factor) at a time plus LAPACK's column-major copy; the column
loop holds Hinv, the working W, Q and uint8 codes; the error takes rows a chunk at a time (4 temporaries).
(W.float() is a copy when c != 4.)
BLOCK_SLACK covers the heap fragmentation a previous block leaves (the second block measured 15-20% above the
first at equal shapes while the pipeline still held block i's results through block i+1; since that was fixed,
2 and 8 blocks at 7B width peak the same, at 0.78 of the plan: the factor is conservative). SpQR is planned as GPTQ.

On a CUDA device the block terms count against VRAM, plus VRAM_RESERVE (context, allocator slack); the host
keeps the tensor being read and CUDA_HOST_OVERHEAD. RTN: no Hessians, solver 6 Wu, no store, no forward.
AutoRound (rougher): 9 fp32 copies of every Linear (weights, offsets, grads, best iterate, saved qdq) and
samples_per_forward samples with their autograd activations (3 fwd each).
peak disk = store and kept (offload disk: every slot) + output (planned shards; SpQR counted without outliers) +
tokenizer files.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from streamq.config import QuantConfig
from streamq.quant.expert_stage import experts_per_group, streams_experts
from streamq.quant.stages import EXPERT_PASS_BYTES
from streamq.io.blocks import ModelLayout, block_names, non_block_names
from streamq.io.checkpoint import DTYPES, Checkpoint
from streamq.io.writer import ShardWriter, plan_shards
from streamq.methods import get_method
from streamq.options import TOKENIZER_FILES, RunOptions
from streamq.outputs import plan_units
from streamq.quant.stages import KEEP_BYTES

RUN_OVERHEAD = 64 << 20  # added after planning: tokenizer, calibration, zarr, tqdm (measured 30 MB); heap noise
PREFETCH = 3  # disk store samples in memory at once: the one in use, the one being read, its copy
SOLVER_SLACK = 16 << 20  # LAPACK workspaces and small temporaries of one Linear's solve
ERROR_CHUNK = 16 << 20  # row chunk of relative_output_error (its default chunk_bytes); 4 such temporaries
BLOCK_SLACK = 1.25
VRAM_RESERVE = 512 << 20  # CUDA context and caching-allocator slack, not seen by max_memory_allocated
CUDA_HOST_OVERHEAD = 1 << 30  # host RSS of an initialized CUDA runtime (an assumption: no GPU to measure on)
MMAP_THRESHOLD = 4 << 20  # see bound_heap()
TRIM_THRESHOLD = 16 << 20  # see bound_heap()


def facts(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, dtype: torch.dtype, opts: RunOptions) -> dict:
    """The sizes the model needs: per block (weights, read, Linears [out, in], Hessian groups), embeddings,
    non-block tensors, store and output."""
    c = dtype.itemsize
    hf = layout.config
    hidden = hf.hidden_size
    inter = getattr(hf, "intermediate_size", None) or getattr(hf, "ffn_dim", None) or 4 * hidden

    def in_compute(name: str) -> int:
        info = ckpt.tensors[name]
        return math.prod(info.shape) * c if DTYPES[info.dtype].is_floating_point else ckpt.nbytes(name)

    def as_read(name: str) -> int:
        """A tensor already in the compute dtype is used as the mapped view itself, counted in Wc."""
        info = ckpt.tensors[name]
        cast = DTYPES[info.dtype].is_floating_point and DTYPES[info.dtype] != dtype
        return ckpt.nbytes(name) if cast else 0

    blocks = []
    for i in range(layout.n_blocks):
        names = block_names(layout, ckpt, i)
        linears = {n: (m.out_features, m.in_features) for n, m in layout.block_linears(i).items()}
        b = {"weight_bytes": sum(map(in_compute, names)), "read_bytes": max(map(as_read, names), default=0),
             "linears": linears, "groups": hessian_groups(linears, cfg.true_sequential)}
        if streams_experts(cfg):
            b.update(streamed_experts_facts(layout, i, b, c, in_compute, opts))
        blocks.append(b)
    # stage 4 materializes the decoder without its blocks (embeddings, positions, final norm)
    layers = next(n for n, m in layout.decoder.named_modules() if m is layout.layers) + "."
    decoder = next(n for n, m in layout.model.named_modules() if m is layout.decoder) + "."
    embed = [decoder + n for n, _ in layout.decoder.named_parameters()
             if not n.startswith(layers) and decoder + n in ckpt.tensors]
    rest = non_block_names(layout, ckpt)
    from streamq.formats import get_format, resolve_formats
    from streamq.formats.export import planned_bytes

    layout_format, exports = resolve_formats(cfg, opts.formats)  # OUT's shards in their own format's shapes
    units = plan_units(layout, ckpt, cfg, fmt=get_format(layout_format))
    writer = ShardWriter(Path("."), plan_shards(units, opts.shard_size))  # no IO
    output = writer.total_size() + sum(len(h) for h in writer.headers if h is not None)
    output += sum((ckpt.folder / n).stat().st_size for n in TOKENIZER_FILES if (ckpt.folder / n).exists())
    output += sum(planned_bytes(layout, ckpt, cfg, name, opts.shard_size) for name in exports)  # OUT/<format>/
    return {
        "c": c, "hidden": hidden, "inter": inter, "blocks": blocks,
        "embed_bytes": sum(map(in_compute, embed)),
        "embed_read_bytes": max(map(as_read, embed), default=0),
        "rest_bytes": sum(map(ckpt.nbytes, rest)) + max((math.prod(ckpt.tensors[n].shape) for n in rest), default=0),
        "slot_bytes": opts.nsamples * opts.seqlen * hidden * c,
        "slots": 4 if cfg.fp_stream else 2,
        "sample_bytes": opts.seqlen * hidden * c,
        "fwd_bytes": opts.seqlen * (8 * hidden + 4 * inter) * c,
        "output_bytes": output,
        "pending_bytes": max((pending_bytes(layout, blocks, k, u) for k, u in writer.units.items()
                              if k.startswith("block.")), default=0),
        "scratch_bytes": max((sum(o * i + 5 * o * math.ceil(i / max(1, cfg.group_size)) + 4 * i
                                  for o, i in (b["linears"][n] for n in b.get("experts", ()))) for b in blocks),
                             default=0),
        "kept_bytes": opts.nsamples * opts.seqlen * (hidden + inter) * c
        if get_method(cfg.method).footprint == "gptq" and cfg.true_sequential else 0,
        "samples_per_forward": min(cfg.batch_size, opts.nsamples) if get_method(cfg.method).footprint == "autoround" else 1,
    }


def pending_bytes(layout: ModelLayout, blocks: list[dict], key: str, unit) -> int:
    """A block's packed bytes held while the write-behind writes it: all of them, but of streamed experts
    (packed from the scratch one Linear at a time, outputs.PackedLater) only the largest Linear's."""
    i = int(key.split(".")[1])
    stems = {layout.source_name(f"{layout.block_prefix(i)}{n}.weight")[:-len("weight")]
             for n in blocks[i].get("experts", ())}
    per: dict[str, int] = {}
    for spec in unit.specs:
        stem = spec.name.rsplit(".", 1)[0] + "."
        if stem in stems:
            per[stem] = per.get(stem, 0) + spec.nbytes
    return unit.nbytes - sum(per.values()) + max(per.values(), default=0)


def streamed_experts_facts(layout: ModelLayout, i: int, b: dict, c: int, in_compute, opts: RunOptions) -> dict:
    """Block i's terms when its routed experts are streamed (quant/expert_stage.py; {} for a block without):
    its weights are the rest of the block plus one group of experts, its Hessian groups the rest's plus one
    group of experts' ("experts": Linear names, "expert_hessians": bytes), the experts' results are not kept
    (R counts the rest's); their inputs (hidden, top-k index and weights, "expert_inputs") are kept per sample
    and their output (a kept output, K) accumulated per sample."""
    from streamq.moe import is_expert_linear

    block, prefix = layout.layers[i], layout.block_prefix(i)
    experts = [n for n in b["linears"] if is_expert_linear(n, block)]
    if not experts:
        return {}
    inter, hidden = b["linears"][experts[0]]
    per = min(experts_per_group(hidden, inter, c), len(experts) // 3)
    top_k = getattr(layout.config, "num_experts_per_tok", 8)
    rest = set(b["linears"]) - set(experts)
    weights = sum(in_compute(layout.source_name(f"{prefix}{n}.weight")) for n in experts)
    tokens = opts.nsamples * opts.seqlen
    return {"weight_bytes": b["weight_bytes"] - weights + per * 3 * hidden * inter * c,
            "groups": [g for g in ([n for n in g if n in rest] for g in b["groups"]) if g],
            "experts": experts, "expert_hessians": per * 4 * (hidden ** 2 + inter ** 2),
            "expert_inputs": tokens * (hidden * c + top_k * (8 + c)), "expert_outputs": tokens * hidden * c}


def hessian_groups(linears: dict[str, tuple[int, int]], true_sequential: bool) -> list[list[str]]:
    """Names of the Linears whose Hessians are held together (see the module docstring)."""
    if not true_sequential:
        return [list(linears)]
    groups: dict[tuple[str, int], list[str]] = {}
    for name, (_, inp) in linears.items():
        groups.setdefault((name.rpartition(".")[0], inp), []).append(name)
    return merge_expert_groups(list(groups.values()), linears)


def merge_expert_groups(groups: list[list[str]], linears: dict[str, tuple[int, int]]) -> list[list[str]]:
    """Routed experts' groups collected in one pass (quant/stages.py sequential_passes): the experts'
    gate/up, then their downs, EXPERT_PASS_BYTES of Hessians at most per pass."""
    merged, open_chunk = [], {}  # open_chunk: (role, in_features) -> (index in merged, bytes held)
    for group in groups:
        role, inp = expert_role(group[0]), linears[group[0]][1]
        h = sum(linears[n][1] ** 2 * 4 for n in group)
        if role is None:
            merged.append(list(group))
            continue
        k, held = open_chunk.get((role, inp), (None, 0))
        if k is not None and held + h <= EXPERT_PASS_BYTES:
            merged[k] += group
            open_chunk[(role, inp)] = (k, held + h)
        else:
            merged.append(list(group))
            open_chunk[(role, inp)] = (len(merged) - 1, h)
    return merged


def expert_role(name: str) -> str | None:
    """"mlp.experts.*.gate" for a routed expert's Linear (RoutedExperts names them <experts>.<e>.<proj>):
    the gate and up of one expert share a group here, so the role is the group's parent minus the index."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-2].isdigit() and parts[-3] == "experts":
        return ".".join(parts[:-2]) + ".*"
    return None


def solver_bytes(method: str, out: int, inp: int, c: int) -> int:
    """Transient bytes of solving one Linear [out, in] beyond its Hessian and weight."""
    hu, wu = inp * inp * 4, out * inp * 4
    copy = wu if c != 4 else 0
    if method == "rtn":
        return 6 * wu + copy
    return max(4 * hu + wu, hu + 3 * wu + 4 * min(wu, ERROR_CHUNK)) + SOLVER_SLACK + copy


def block_bytes(b: dict, f: dict, method: str, seqlen: int, offload: str = "ram") -> int:
    """A block's high-water mark on its compute device, above the baseline and the store."""
    c, fwd = f["c"], f["fwd_bytes"]
    params = sum(o * i for o, i in b["linears"].values())
    if method == "autoround":
        batch = f["samples_per_forward"]
        phases = [9 * params * 4 + batch * (3 * fwd + 2 * f["sample_bytes"] + seqlen * f["hidden"] * 4)]
    elif method == "rtn":
        phases = [max(solver_bytes("rtn", o, i, c) for o, i in b["linears"].values())]
    else:
        keep = min(f["kept_bytes"], KEEP_BYTES) if offload == "ram" else 0
        experts = set(b.get("experts", ()))
        if experts and offload == "ram":  # the streamed experts' inputs and summed outputs, every sample
            keep += b["expert_inputs"] + b["expert_outputs"]
        params = sum(o * i for n, (o, i) in b["linears"].items() if n not in experts)  # experts go to the scratch
        results = params * (1 + (4 if c != 4 else 0)) + keep  # R + K
        phases, helds = [], []
        for group in b["groups"]:
            held = sum(b["linears"][n][1] ** 2 * 4 for n in group)
            in_max = max(b["linears"][n][1] for n in group)
            phases.append(held + fwd + 2 * seqlen * in_max * 4 + results)
            phases.append(held + max(solver_bytes(method, *b["linears"][n], c) for n in group) + results)
            helds.append(held)
        if experts:  # one group of experts at a time (one group of the rest may still hold its Hessians)
            held = b["expert_hessians"] + (helds[0] if len(helds) == 1 else 0)
            phases.append(held + fwd + results)
            phases.append(held + max(solver_bytes(method, *b["linears"][n], c) for n in experts) + results)
    return int(BLOCK_SLACK * (b["weight_bytes"] + max(b["read_bytes"], *phases)))


def predict(f: dict, method: str, seqlen: int, device: torch.device, offload: str, baseline: int,
            max_vram: int | None) -> dict:
    """Peak RAM / VRAM / disk for one offload choice ("ram" | "disk" | "none"), and per block (peak, device):
    a block that does not fit --max-vram on a CUDA device is planned on the CPU."""
    cuda = device.type == "cuda"
    store_ram = {"ram": f["slots"] * f["slot_bytes"], "disk": PREFETCH * f["sample_bytes"], "none": 0}[offload]
    blocks, ram, vram = [], [f["rest_bytes"]], []
    for b in f["blocks"]:
        peak = block_bytes(b, f, method, seqlen, offload)
        on = "cpu" if not cuda or (max_vram is not None and peak + VRAM_RESERVE > max_vram) else str(device)
        if on == "cpu":
            ram.append(peak)
        else:
            ram.append(b["read_bytes"])
            vram.append(peak)
        blocks.append((peak, on))
    if offload != "none":  # stage 4: embeddings on the device, each tensor read through the host
        if cuda:
            vram.append(f["embed_bytes"] + f["fwd_bytes"])
            ram.append(f["embed_read_bytes"])
        else:
            ram.append(f["embed_bytes"] + max(f["embed_read_bytes"], f["fwd_bytes"]))
    return {
        "ram": baseline + RUN_OVERHEAD + store_ram + max(ram) + f["pending_bytes"] + (CUDA_HOST_OVERHEAD if cuda else 0),
        "vram": max(vram) + VRAM_RESERVE if vram else 0,
        "disk": f["output_bytes"] + f["scratch_bytes"]
        + (f["slots"] * f["slot_bytes"] + f["kept_bytes"] if offload == "disk" else 0),
        "blocks": blocks,
    }


def bound_heap(threshold: int = MMAP_THRESHOLD, keep: int = TRIM_THRESHOLD) -> bool:
    """Ask glibc to give every allocation of `threshold` bytes or more its own mapping, returned to the OS when
    freed. By default glibc raises that threshold as large blocks are freed (up to 32 MiB) and keeps freed
    blocks in a heap it rarely shrinks: a GPTQ block's RSS then measured 25-40% above its live tensors, varying
    run to run; with the threshold fixed it follows the model above. Smaller temporaries (a block forward's
    per-sample tensors, the GPTQ column loop's) still come from the heap, which keeps up to `keep` bytes of free
    memory at its top instead of glibc's 128 KiB once a threshold is fixed: otherwise each sample's temporaries
    are handed back and page-faulted in again (SmolLM2-135M GPTQ, tools/bench_heap.py: 3.1-3.8M page faults a run
    with 128 KiB, 2.2-2.7M with 16 MiB, 2.0M with 64 MiB, which held 20-35 MB more at the peak than 16 MiB).
    Process-wide: compress() sets it on every run (and apply_plan with a --max-* budget).
    An explicit setting wins: with MALLOC_MMAP_THRESHOLD_ or a glibc.malloc.mmap_threshold tunable in the
    environment nothing is changed, with MALLOC_TRIM_THRESHOLD_ or a trim_threshold tunable only the mmap threshold
    is set. Returns whether the mmap threshold was set (False also where there is no glibc mallopt)."""
    import ctypes
    import ctypes.util
    import os

    def explicit(name: str) -> bool:
        return f"MALLOC_{name.upper()}_" in os.environ or name in os.environ.get("GLIBC_TUNABLES", "")

    if explicit("mmap_threshold"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not explicit("trim_threshold"):
            libc.mallopt(-1, keep)  # -1: M_TRIM_THRESHOLD (malloc.h)
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
