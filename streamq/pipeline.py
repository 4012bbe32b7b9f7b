"""compress(): the only loop over decoder blocks, and the only place the pieces are tied together."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from streamq import __version__
from streamq.blockwork import block_work
from streamq.calib.capture import ModelEnds
from streamq.calib.data import calibration_windows, token_hash
from streamq.calib.store import ActivationStore
from streamq.config import QuantConfig
from streamq.device import peak_vram, reset_peak_vram, resolve_device, resolve_dtype
from streamq.errors import StreamqError
from streamq.fallback import CPU, attempt_dtype, with_fallback
from streamq.formats import get_format, output_config, resolve_formats
from streamq.formats import spqr as spqr_format
from streamq.footprint import bound_heap
from streamq.formats.export import export_missing
from streamq.ignore import head_tensors, loader_hints, quantized_linears, resolve_ignore
from streamq.io.blocks import ModelLayout, block_names, build_layout, non_block_names, release_block
from streamq.io.checkpoint import Checkpoint
from streamq.io.manifest import open_output, write_json_atomic, writer_lock
from streamq.io.prefetch import Prefetcher
from streamq.io.writebehind import WriteBehind
from streamq.interrupt import Interrupted
from streamq.io.writer import ShardWriter, plan_shards
from streamq.memstat import release_free_heap
from streamq.options import DEFAULT_CALIB, INDEX, MANIFEST, REPORT, TOKENIZER_FILES, WORK_DIR, RunOptions
from streamq.outputs import block_tensors, block_unit, plan_units, source_map
from streamq.progress import BlockProgress, phase
from streamq.quant.sparsegpt import SparseResult
from streamq.report import run_report
from streamq.tokenizer import load_tokenizer


def fingerprint(ckpt: Checkpoint, cfg: QuantConfig, opts: RunOptions, tokens: torch.Tensor | None,
                dtype: torch.dtype) -> dict:
    """What decides the output bytes; a resume must match it part by part."""
    layout_format, exports = resolve_formats(cfg, opts.formats)
    return {
        "source model": ckpt.fingerprint(),
        "method": cfg.to_dict(),
        "format": [layout_format, *exports],
        "calibration": None if tokens is None else f"{tuple(tokens.shape)} {token_hash(tokens)}",
        "compute dtype": str(dtype),
        "shard size": opts.shard_size,
        "streamq version": __version__,
    }


def compress(model: str | Path, out: str | Path, cfg: QuantConfig = QuantConfig(), opts: RunOptions = RunOptions(),
             should_stop: Callable[[], bool] = lambda: False) -> Path:
    """compress_locked() holding OUT's writer lock: one run per output folder at a time."""
    with writer_lock(Path(out)):
        return compress_locked(model, out, cfg, opts, should_stop)


def compress_locked(model: str | Path, out: str | Path, cfg: QuantConfig, opts: RunOptions,
                    should_stop: Callable[[], bool]) -> Path:
    """Compress the model folder `model` into the GPTQ-format folder `out`, one decoder block at a time.

    1. Open the source: safetensors headers checked, skeleton built on the meta device, every layer checked
       against the config and the output tensors planned into shards.
    2. Tokenize the calibration windows (GPTQ only; RTN is data-free).
    3. Open the output folder: fresh, or resumed from its manifest when the run fingerprint matches.
    4. Capture block-0 inputs into the activation store (skipped when resuming past block 0).
    5. Per block: materialize, quantize, write its outputs (next block's inputs) to the other store slot,
       pack it, then on the write-behind thread write its tensors into their shard (SpQR: the block's own
       shard, laid out from its outlier counts now) and record it in the manifest, data first, manifest last,
       while the next block computes (the store is not written again before that record is done).
       Stop here (Interrupted) when should_stop() says so: the folder resumes with the same call.
    6. Write the non-block tensors, config.json, tokenizer, index and report; mark the manifest complete.
    7. Export the further formats of opts.formats from the finished folder into OUT/<format>/.
    The layout (what the shards hold) is a format module of streamq/formats chosen by opts.formats.
    """
    out = Path(out)
    bound_heap()  # large temporaries get their own mappings, returned when freed: on SmolLM2 -40 MB per block
    layout_format, exports = resolve_formats(cfg, opts.formats)
    fmt = get_format(layout_format)
    ckpt = Checkpoint(model, hash_reads=True)  # 1
    layout = build_layout(ckpt)
    cfg = resolve_ignore(layout, ckpt, cfg)  # --ignore patterns -> the exact names of the Linears left in fp
    units = plan_units(layout, ckpt, cfg, fmt)
    writer = ShardWriter(out, plan_shards(units, opts.shard_size))
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, ckpt)

    tokens = None  # 2
    if cfg.calibrated:  # the method's data, or activation statistics (smoothing, static / KV-cache scales)
        phase(f"tokenizing the calibration text into {opts.nsamples} windows of {opts.seqlen} tokens", opts.progress)
        tokenizer = load_tokenizer(ckpt.folder)
        tokens = calibration_windows(tokenizer, opts.calib or str(DEFAULT_CALIB), opts.nsamples, opts.seqlen, opts.seed)
        del tokenizer
        release_free_heap()
        longest = ckpt.config.get("max_position_embeddings")
        if longest and opts.seqlen > longest:  # rotary models run past it, but on positions never trained
            logging.getLogger("streamq").warning(f"warning: --seqlen {opts.seqlen} exceeds the model's "
                                                 f"max_position_embeddings {longest}")

    plan = {**writer.plan(), "source": source_map(layout, ckpt, cfg, fmt)}
    files = [*writer.names, *(n + ".partial" for n in writer.names), INDEX, "config.json", REPORT, WORK_DIR,
             *TOKENIZER_FILES, *exports]
    run_fingerprint = fingerprint(ckpt, cfg, opts, tokens, dtype)
    manifest = open_output(out, run_fingerprint, plan, files, opts.resume)  # 3
    run_key = hashlib.sha256(json.dumps(run_fingerprint, sort_keys=True).encode()).hexdigest()  # expert scratch
    ckpt.check_digests(manifest.get("source_sha256", {}) if not manifest["complete"] else {})
    settle_written_units(layout, ckpt, cfg, writer, manifest, fmt)
    check_written_units(writer, manifest, plan["source"])
    if manifest["complete"]:
        if not opts.keep_activations:  # left behind when a finished run was killed while deleting them
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        export_missing(out, exports)
        return out
    readahead = Prefetcher(ckpt)  # block i + 1's weights are read while block i computes
    readahead.start(manifest["next_block"], block_names(layout, ckpt, manifest["next_block"]))
    store, kwargs = None, [{}] * layout.n_blocks  # per block: the kwargs the model calls it with
    if tokens is not None:
        phase(f"resuming at block {manifest['next_block'] + 1}/{layout.n_blocks}" if manifest["next_block"] else
              f"capturing block-0 inputs: the embeddings of {len(tokens)} calibration windows", opts.progress)
        store, kwargs = prepare_store(layout, ckpt, tokens, out, opts, device, dtype, manifest, cfg.fp_stream)  # 4

    release_free_heap()  # what tokenizing and the capture freed
    progress = BlockProgress(layout.n_blocks, manifest["next_block"], opts.progress, device, store)
    writes = WriteBehind()  # block i is written and recorded while block i + 1 computes
    if store is not None:  # ... but the store slot a resume would restart from is kept until then
        store.before_write = writes.wait
    try:
        for i in range(manifest["next_block"], layout.n_blocks):  # 5
            release_free_heap()  # what the last block freed: the peak is one block's, not the sum of theirs
            start, store_io = time.perf_counter(), store.io_seconds if store else 0.0
            io_wait = readahead.wait(i)
            if i + 1 < layout.n_blocks:
                readahead.start(i + 1, block_names(layout, ckpt, i + 1))
            slot = manifest["slot"]
            planned = CPU if i in opts.cpu_blocks else device
            work = lambda dev, lean: block_work(layout, ckpt, i, store, slot, kwargs[i], cfg, dev,  # noqa: E731
                                                attempt_dtype(dev, planned, dtype), lean, expert_scratch(out, i),
                                                run_key)
            reset_peak_vram(device)
            results, extra = with_fallback(work, planned, f"block {i + 1}/{layout.n_blocks}")
            io_wait += writes.wait()  # block i - 1 is on disk: the manifest and the writer are ours again
            if store is not None:
                manifest["slot"] = store.other(slot)
            layers = layer_records(results, cfg)
            if units[i].sized_by_data:  # SpQR: the outlier counts size the block's own shard
                writer.settle(block_unit(layout, ckpt, cfg, i, {n: r["n_outliers"] for n, r in layers.items()}, fmt))
                manifest["plan"].update(writer.plan())
            tensors = block_tensors(layout, ckpt, i, results, cfg, fmt, extra)
            del results, extra
            release_block(layout, i)
            io_wait += store.io_seconds - store_io if store else 0.0
            seconds = time.perf_counter() - start
            manifest["blocks"][str(i)] = {"layers": layers, "seconds": seconds, "io_wait_seconds": io_wait,
                                          "peak_vram_bytes": peak_vram(device)}
            manifest.setdefault("source_sha256", {}).update(ckpt.digests)  # what a resume must find unchanged
            manifest["next_block"] = i + 1
            writes.submit(lambda i=i, tensors=tensors: record_block(out, writer, manifest, i, tensors, store))
            del tensors
            progress.block_done(i, layers, seconds, io_wait)
            if should_stop():  # SIGINT/SIGTERM: stop once block i is on disk
                writes.wait()
                raise Interrupted(i + 1, layout.n_blocks)
        writes.wait()
    finally:
        readahead.close()
        if store is not None:
            store.before_write = None
            if store.spill is not None:
                store.spill.close()  # the files the blocks' kept intermediates reused
        writes.close()  # last: it re-raises a failed pending write
    progress.close()

    release_free_heap()  # what the last block freed, before the non-block tensors are read
    finish(out, ckpt, layout, cfg, opts, writer, manifest, device, fmt)  # 6
    if (out / WORK_DIR / "experts").exists():  # the parent of the blocks' expert scratch folders (MoE runs)
        shutil.rmtree(out / WORK_DIR / "experts", ignore_errors=True)
        with contextlib.suppress(OSError):  # the work folder of a data-free run held only that
            (out / WORK_DIR).rmdir()
    if store is not None and not opts.keep_activations:
        store.delete()
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    export_missing(out, exports)  # 7
    return out


def record_block(out: Path, writer: ShardWriter, manifest: dict, i: int, tensors: dict[str, torch.Tensor],
                 store: ActivationStore | None) -> None:
    """Make the store slots block i wrote durable and write its tensors into their shard, then the manifest that
    records it (data first)."""
    if store is not None:
        store.sync()
    manifest["units"][f"block.{i}"] = writer.write_unit(f"block.{i}", tensors)
    write_json_atomic(out / MANIFEST, manifest)
    if expert_scratch(out, i).exists():  # the block's solved experts are in its shard now
        shutil.rmtree(expert_scratch(out, i), ignore_errors=True)


def expert_scratch(out: Path, i: int) -> Path:
    """Block i's folder of solved routed experts (quant/expert_scratch.py), while the block is unrecorded."""
    return out / WORK_DIR / "experts" / f"block.{i}"


def layer_records(results: dict, cfg: QuantConfig) -> dict[str, dict]:
    """The block report's entry per Linear: its LayerReport; SpQR adds the outlier count (which also sizes the
    block's shard on resume) and the bits per parameter as the SpQR paper counts them; SparseGPT the achieved
    sparsity (share of weights its mask pruned) and the share of stored weights that are 0 (pruned, or kept
    but rounded to the zero code)."""
    records = {}
    for name, (result, report) in results.items():
        records[name] = asdict(report)
        if isinstance(result, SparseResult):
            records[name]["sparsity"] = result.pruned / result.weight.numel()
            records[name]["zero_fraction"] = (result.weight == 0).sum().item() / result.weight.numel()
        if cfg.method == "spqr":
            out_features, in_features = result.codes.shape
            records[name]["n_outliers"] = result.n_outliers
            records[name]["bits_per_parameter"] = spqr_format.bits_per_parameter(out_features, in_features, cfg,
                                                                                 result.n_outliers)
    return records


def settle_written_units(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, writer: ShardWriter,
                         manifest: dict, fmt) -> None:
    """On resume, lay out the data-sized (SpQR) blocks already written, from the outlier counts in their reports
    (which must record exactly the block's Linears)."""
    for i in map(int, manifest["blocks"]):
        if set(manifest["blocks"][str(i)]["layers"]) != set(quantized_linears(layout, i, cfg)):
            raise StreamqError(f"{writer.folder}: {MANIFEST} records other layers for block {i}; use --restart")
        if writer.units[f"block.{i}"].sized_by_data:
            counts = {n: r["n_outliers"] for n, r in manifest["blocks"][str(i)]["layers"].items()}
            writer.settle(block_unit(layout, ckpt, cfg, i, counts, fmt))


def check_written_units(writer: ShardWriter, manifest: dict, source: dict) -> None:
    """On resume (or a re-run of a finished run), the manifest's output plan must be this run's, and every unit
    it calls done must still hash the same on disk."""
    if manifest["plan"] != {**writer.plan(), "source": source}:
        raise StreamqError(f"{writer.folder}: the output plan in {MANIFEST} differs from this run's (edited or "
                           "damaged); use --restart")
    for key, digest in manifest["units"].items():
        if writer.unit_digest(key) != digest:
            raise StreamqError(f"{writer.folder}: the bytes of {key} on disk do not match the manifest "
                               "(a shard was damaged or removed); use --restart")


def prepare_store(layout, ckpt, tokens, out, opts, device, dtype, manifest,
                  fp_stream: bool) -> tuple[ActivationStore, list[dict]]:
    """Open (or create and fill with block-0 inputs) the activation store, with a second (fp) stream for
    AutoRound's targets when fp_stream; return it and each block's kwargs."""
    n, seqlen = tokens.shape
    hidden = layout.config.hidden_size
    path = str(out / WORK_DIR / "activations")
    ends = ModelEnds(layout, ckpt, device, dtype, with_head=False)
    try:
        kwargs = ends.block_kwargs(tokens[:1])
        if opts.offload == "disk" and manifest["next_block"] > 0:
            return ActivationStore.on_disk(path, n, seqlen, hidden, dtype, create=False, fp_stream=fp_stream), kwargs
        if opts.offload == "disk":
            shutil.rmtree(path, ignore_errors=True)  # ours; a run killed while creating it may have left a torn one
            store = ActivationStore.on_disk(path, n, seqlen, hidden, dtype, create=True, fp_stream=fp_stream)
        else:
            if manifest["next_block"] > 0:
                raise StreamqError(f"{out}: the interrupted run kept its activations in RAM; "
                                   "resume needs --offload disk (or --restart)")
            store = ActivationStore.in_ram(n, seqlen, hidden, dtype, fp_stream)
        for j in range(n):
            store.write("a", j, ends.block_inputs(tokens[j:j + 1])[0])
        store.flush("a")
        return store, kwargs
    finally:
        ends.release()


def finish(out: Path, ckpt: Checkpoint, layout: ModelLayout, cfg: QuantConfig, opts: RunOptions,
           writer: ShardWriter, manifest: dict, device: torch.device, fmt) -> None:
    """Non-block tensors, config, tokenizer, index, report; the manifest's complete flag goes last."""
    import json

    from streamq.io.manifest import write_bytes_atomic

    if "rest" not in manifest["units"]:
        rest = {n: ckpt.get(n) for n in non_block_names(layout, ckpt)}
        head = head_tensors(layout, ckpt, cfg, fmt)  # --quant-lm-head: the head's packed tensors replace its weight
        if head:
            del rest[next(iter(head)).rpartition(".")[0] + ".weight"]
        manifest["units"]["rest"] = writer.write_unit("rest", {**rest, **head})
        manifest.setdefault("source_sha256", {}).update(ckpt.digests or {})
        write_json_atomic(out / MANIFEST, manifest)
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).exists():
            write_bytes_atomic(out / name, (ckpt.folder / name).read_bytes())
    if len(writer.names) > 1:
        write_json_atomic(out / INDEX,
                          {"metadata": {"total_size": writer.total_size()}, "weight_map": writer.weight_map()})
    quantized = [layout.block_prefix(i) + n for i in range(layout.n_blocks) for n in quantized_linears(layout, i, cfg)]
    q = {**fmt.quantization_config(cfg, f"streamq:{__version__}"), **loader_hints(quantized, cfg, fmt.NAME)}
    config = output_config(ckpt.config, q, type(layout.model).__name__)
    write_bytes_atomic(out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_json_atomic(out / REPORT, run_report(ckpt, layout, cfg, opts, writer, manifest, device, fmt))
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST, manifest)


