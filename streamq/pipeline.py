"""compress(): the only loop over decoder blocks, and the only place the pieces are tied together."""
from __future__ import annotations

import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from streamq import __version__
from streamq.blockwork import block_work
from streamq.calib.capture import ModelEnds
from streamq.calib.data import calibration_windows, token_hash
from streamq.calib.store import ActivationStore
from streamq.config import QuantConfig
from streamq.errors import OtherRunError, StreamqError
from streamq.fallback import CPU, with_fallback
from streamq.formats import spqr as spqr_format
from streamq.formats.gptq import pack_gptq, packed_shapes
from streamq.io.blocks import ModelLayout, block_names, build_layout, non_block_names, release_block
from streamq.io.checkpoint import DTYPES, Checkpoint
from streamq.io.manifest import read_json, write_json_atomic
from streamq.io.prefetch import Prefetcher
from streamq.io.writebehind import WriteBehind
from streamq.interrupt import Interrupted
from streamq.io.writer import ShardWriter, TensorSpec, Unit, plan_shards
from streamq.progress import BlockProgress
from streamq.quant.grid import check_group_size

MANIFEST = "streamq_manifest.json"
REPORT = "streamq_report.json"
WORK_DIR = ".streamq-work"
DEFAULT_CALIB = Path(__file__).parent / "data" / "calib.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
GB = 1 << 30


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run except the method. Units: shard_size in bytes; seqlen in tokens."""

    calib: str | None = None  # path or spec string; None = the shipped calibration text
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: auto = float32 on CPU, the checkpoint's 16-bit dtype on GPU
    offload: str = "disk"  # where block inputs live: disk (zarr) | ram
    shard_size: int = 5 * 10**9
    resume: str = "auto"  # auto: continue a matching run | restart: discard it | never: refuse a used folder
    keep_activations: bool = False
    progress: bool = True
    cpu_blocks: tuple[int, ...] = ()  # blocks run on the CPU whatever the device (planned from --max-vram)

    def __post_init__(self):
        if self.offload not in ("disk", "ram"):
            raise StreamqError(f"--offload {self.offload!r}: choose disk or ram")
        if self.nsamples < 1 or self.seqlen < 1:
            raise StreamqError(f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: both must be positive")
        if self.shard_size < 1:
            raise StreamqError(f"--shard-size {self.shard_size}: must be positive")
        if self.resume not in ("auto", "restart", "never"):
            raise StreamqError(f"resume mode {self.resume!r}: choose auto, restart or never")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StreamqError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamqError(f"--device {name}: no CUDA GPU is visible to torch")
    return device


def resolve_dtype(name: str, device: torch.device, ckpt: Checkpoint) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if str(ckpt.config.get("dtype", ckpt.config.get("torch_dtype"))) == "bfloat16" else torch.float16
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise StreamqError(f"--dtype {name!r}: choose auto, float32, float16 or bfloat16")
    return table[name]


def linear_shapes(cfg: QuantConfig, lin: nn.Linear, n_outliers: int = 0) -> dict:
    """Suffix -> (shape, dtype) of one quantized Linear's packed tensors (SpQR: holding n_outliers outliers)."""
    if cfg.method == "spqr":
        return spqr_format.packed_shapes(lin.out_features, lin.in_features, cfg, n_outliers)
    return packed_shapes(lin.out_features, lin.in_features, cfg.bits, cfg.group_size)


def block_unit(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, i: int,
               n_outliers: dict[str, int] | None = None) -> Unit:
    """Block i's output tensors; checks its layers. SpQR's outlier tensors are sized by the data: the unit is
    marked sized_by_data, planned with none, and settled with n_outliers (Linear name -> count) once known."""
    prefix = layout.block_prefix(i)
    linears = layout.block_linears(i)
    needed = {prefix + n for n, _ in layout.layers[i].named_parameters()}
    missing = sorted(needed - set(ckpt.tensors))
    if missing:
        raise StreamqError(f"{ckpt.folder}: tensor {missing[0]} is missing from the checkpoint")
    quantized = {prefix + n + ".weight": (n, m) for n, m in linears.items()}
    specs = []
    for name in block_names(layout, ckpt, i):
        if name in quantized:
            lin_name, lin = quantized[name]
            check_group_size(lin.in_features, cfg.group_size, prefix + lin_name)
            try:
                shapes = linear_shapes(cfg, lin, (n_outliers or {}).get(lin_name, 0))
            except StreamqError as e:
                raise StreamqError(f"{prefix}{lin_name}: {e}") from None
            stem = name[: -len("weight")]
            specs += [TensorSpec(stem + k, dtype, shape) for k, (shape, dtype) in shapes.items()]
        else:
            info = ckpt.tensors[name]
            specs.append(TensorSpec(name, DTYPES[info.dtype], info.shape))
    return Unit(f"block.{i}", tuple(sorted(specs, key=lambda s: s.name)), sized_by_data=cfg.method == "spqr")


def plan_units(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig) -> list[Unit]:
    """Every output tensor's name, dtype and shape, known before any block runs (SpQR: up to the outlier
    counts, see block_unit); checks every layer."""
    units = [block_unit(layout, ckpt, cfg, i) for i in range(layout.n_blocks)]
    rest = [TensorSpec(n, DTYPES[ckpt.tensors[n].dtype], ckpt.tensors[n].shape) for n in non_block_names(layout, ckpt)]
    units.append(Unit("rest", tuple(sorted(rest, key=lambda s: s.name))))
    return units


def block_tensors(layout: ModelLayout, ckpt: Checkpoint, i: int, results: dict,
                  cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Block i's output tensors: its Linears packed (GPTQ or SpQR layout), everything else copied unchanged."""
    prefix = layout.block_prefix(i)
    out = {}
    for lin_name, (result, _) in results.items():
        packed = spqr_format.pack_spqr(result, cfg) if cfg.method == "spqr" else pack_gptq(result, cfg.bits)
        for k, t in packed.items():
            out[f"{prefix}{lin_name}.{k}"] = t.cpu()
    packed_weights = {f"{prefix}{n}.weight" for n in results}
    for name in block_names(layout, ckpt, i):
        if name not in packed_weights:
            out[name] = ckpt.get(name)
    return out


def fingerprint(ckpt: Checkpoint, cfg: QuantConfig, opts: RunOptions, tokens: torch.Tensor | None,
                dtype: torch.dtype) -> dict:
    """What decides the output bytes; a resume must match it part by part."""
    return {
        "source model": ckpt.fingerprint(),
        "method": cfg.to_dict(),
        "calibration": None if tokens is None else f"{tuple(tokens.shape)} {token_hash(tokens)}",
        "compute dtype": str(dtype),
        "shard size": opts.shard_size,
        "streamq version": __version__,
    }


def source_map(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig) -> dict[str, list[str]]:
    """Source tensor -> the output tensors standing for it: a quantized Linear's weight -> its packed GPTQ
    (or SpQR) tensors, anything else -> itself. Recorded in the manifest so `streamq verify` needs no source."""
    packed = {}
    for i in range(layout.n_blocks):
        for name, lin in layout.block_linears(i).items():
            stem = f"{layout.block_prefix(i)}{name}."
            shapes = linear_shapes(cfg, lin)
            packed[stem + "weight"] = [stem + k for k in shapes]
    return {name: packed.get(name, [name]) for name in ckpt.names()}


def open_output(out: Path, fp: dict, plan: dict, resume: str) -> dict:
    """Create, resume or refuse the output folder. Returns the manifest to continue from.

    plan: the output layout (shards, units, source map), recorded once in a fresh manifest."""
    manifest_path = out / MANIFEST
    fresh = {"fingerprint": fp, "plan": plan, "next_block": 0, "slot": "a", "units": {}, "blocks": {},
             "complete": False}
    # A run killed while writing its first manifest leaves only that file's temporary: still an empty folder.
    if out.exists() and {p.name for p in out.iterdir()} - {MANIFEST + ".tmp"}:
        if not manifest_path.exists():
            raise StreamqError(f"{out}: folder exists and is not a streamq output; choose an empty or new folder")
        if resume == "never":
            raise StreamqError(f"{out}: holds an earlier run; remove it, or drop --no-resume to continue it")
        if resume == "restart":  # the manifest goes last (replaced below), so a killed restart can be restarted
            for p in out.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.name != MANIFEST:
                    p.unlink()
        else:
            manifest = read_json(manifest_path)
            changed = [k for k in fp if manifest["fingerprint"].get(k) != fp[k]]
            if changed:
                raise OtherRunError(f"{out}: belongs to another run ({', '.join(changed)} changed); "
                                   "use --restart to discard it or choose another folder")
            return manifest
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest_path, fresh)
    return fresh


def compress(model: str | Path, out: str | Path, cfg: QuantConfig = QuantConfig(), opts: RunOptions = RunOptions(),
             should_stop: Callable[[], bool] = lambda: False) -> Path:
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
    """
    out = Path(out)
    ckpt = Checkpoint(model)  # 1
    layout = build_layout(ckpt)
    units = plan_units(layout, ckpt, cfg)
    writer = ShardWriter(out, plan_shards(units, opts.shard_size))
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device, ckpt)

    tokens = None  # 2
    if cfg.method != "rtn":
        tokenizer = load_tokenizer(ckpt.folder)
        tokens = calibration_windows(tokenizer, opts.calib or str(DEFAULT_CALIB), opts.nsamples, opts.seqlen, opts.seed)

    plan = {**writer.plan(), "source": source_map(layout, ckpt, cfg)}
    manifest = open_output(out, fingerprint(ckpt, cfg, opts, tokens, dtype), plan, opts.resume)  # 3
    if manifest["complete"]:
        if not opts.keep_activations:  # left behind when a finished run was killed while deleting them
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        return out
    writer.folder.mkdir(parents=True, exist_ok=True)
    settle_written_units(layout, ckpt, cfg, writer, manifest)
    check_written_units(writer, manifest)
    readahead = Prefetcher(ckpt)  # block i + 1's weights are read while block i computes
    readahead.start(manifest["next_block"], block_names(layout, ckpt, manifest["next_block"]))
    store, kwargs = None, [{}] * layout.n_blocks  # per block: the kwargs the model calls it with
    if tokens is not None:
        store, kwargs = prepare_store(layout, ckpt, tokens, out, opts, device, dtype, manifest, cfg.fp_stream)  # 4

    progress = BlockProgress(layout.n_blocks, manifest["next_block"], opts.progress, device, store)
    writes = WriteBehind()  # block i is written and recorded while block i + 1 computes
    if store is not None:  # ... but the store slot a resume would restart from is kept until then
        store.before_write = writes.wait
    try:
        for i in range(manifest["next_block"], layout.n_blocks):  # 5
            start, store_io = time.perf_counter(), store.io_seconds if store else 0.0
            io_wait = readahead.wait(i)
            if i + 1 < layout.n_blocks:
                readahead.start(i + 1, block_names(layout, ckpt, i + 1))
            slot = manifest["slot"]
            work = lambda dev, lean: block_work(layout, ckpt, i, store, slot, kwargs[i], cfg, dev, dtype, lean)  # noqa
            results = with_fallback(work, CPU if i in opts.cpu_blocks else device, f"block {i + 1}/{layout.n_blocks}")
            io_wait += writes.wait()  # block i - 1 is on disk: the manifest and the writer are ours again
            if store is not None:
                manifest["slot"] = store.other(slot)
            layers = layer_records(results, cfg)
            if units[i].sized_by_data:  # SpQR: the outlier counts size the block's own shard
                writer.settle(block_unit(layout, ckpt, cfg, i, {n: r["n_outliers"] for n, r in layers.items()}))
                manifest["plan"].update(writer.plan())
            tensors = block_tensors(layout, ckpt, i, results, cfg)
            del results
            release_block(layout, i)
            io_wait += store.io_seconds - store_io if store else 0.0
            seconds = time.perf_counter() - start
            manifest["blocks"][str(i)] = {"layers": layers, "seconds": seconds, "io_wait_seconds": io_wait}
            manifest["next_block"] = i + 1
            writes.submit(lambda i=i, tensors=tensors: record_block(out, writer, manifest, i, tensors))
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
        writes.close()  # last: it re-raises a failed pending write
    progress.close()

    finish(out, ckpt, layout, cfg, opts, writer, manifest, device)  # 6
    if store is not None and not opts.keep_activations:
        store.delete()
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return out


def record_block(out: Path, writer: ShardWriter, manifest: dict, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write block i's tensors into their shard, then the manifest that records it (data first)."""
    manifest["units"][f"block.{i}"] = writer.write_unit(f"block.{i}", tensors)
    write_json_atomic(out / MANIFEST, manifest)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise StreamqError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def layer_records(results: dict, cfg: QuantConfig) -> dict[str, dict]:
    """The block report's entry per Linear: its LayerReport; SpQR adds the outlier count (which also sizes the
    block's shard on resume) and the bits per parameter as the SpQR paper counts them."""
    records = {}
    for name, (result, report) in results.items():
        records[name] = asdict(report)
        if cfg.method == "spqr":
            out_features, in_features = result.codes.shape
            records[name]["n_outliers"] = result.n_outliers
            records[name]["bits_per_parameter"] = spqr_format.bits_per_parameter(out_features, in_features, cfg,
                                                                                 result.n_outliers)
    return records


def settle_written_units(layout: ModelLayout, ckpt: Checkpoint, cfg: QuantConfig, writer: ShardWriter,
                         manifest: dict) -> None:
    """On resume, lay out the data-sized (SpQR) blocks already written, from the outlier counts in their reports."""
    for i in map(int, manifest["blocks"]):
        if writer.units[f"block.{i}"].sized_by_data:
            counts = {n: r["n_outliers"] for n, r in manifest["blocks"][str(i)]["layers"].items()}
            writer.settle(block_unit(layout, ckpt, cfg, i, counts))


def check_written_units(writer: ShardWriter, manifest: dict) -> None:
    """On resume, every unit the manifest calls done must still hash the same on disk."""
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
           writer: ShardWriter, manifest: dict, device: torch.device) -> None:
    """Non-block tensors, config, tokenizer, index, report; the manifest's complete flag goes last."""
    import json

    from streamq.io.manifest import write_bytes_atomic

    if "rest" not in manifest["units"]:
        manifest["units"]["rest"] = writer.write_unit("rest", {n: ckpt.get(n) for n in non_block_names(layout, ckpt)})
        write_json_atomic(out / MANIFEST, manifest)
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).exists():
            write_bytes_atomic(out / name, (ckpt.folder / name).read_bytes())
    if len(writer.names) > 1:
        write_json_atomic(out / "model.safetensors.index.json",
                          {"metadata": {"total_size": writer.total_size()}, "weight_map": writer.weight_map()})
    config = dict(ckpt.config)
    config["quantization_config"] = quantization_config(cfg)
    write_bytes_atomic(out / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    write_json_atomic(out / REPORT, run_report(ckpt, layout, cfg, opts, writer, manifest, device))
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST, manifest)


def quantization_config(cfg: QuantConfig) -> dict:
    """config.json's quantization_config as transformers / vLLM read GPTQ checkpoints (SpQR: formats/spqr.py)."""
    if cfg.method == "spqr":
        return spqr_format.quantization_config(cfg, f"streamq:{__version__}")
    return {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": cfg.bits, "group_size": cfg.group_size,
        "desc_act": cfg.act_order, "sym": cfg.sym, "static_groups": cfg.static_groups,
        "true_sequential": cfg.true_sequential, "damp_percent": cfg.damp,
        "quantizer": [f"streamq:{__version__}"], "streamq_method": cfg.method,
    }


def run_report(ckpt, layout, cfg, opts, writer: ShardWriter, manifest: dict, device) -> dict:
    """streamq_report.json: arguments, per-layer error, time per block, peak memory, bits per weight (stored
    bytes; SpQR also as its paper counts them, with the outlier share, overall and per layer in "blocks")."""
    quant_bytes = quant_weights = n_outliers = 0
    paper_bits = 0.0  # SpQR: sum over layers of bits per parameter * parameters
    for i in range(layout.n_blocks):
        layers = manifest["blocks"][str(i)]["layers"]
        for name, lin in layout.block_linears(i).items():
            shapes = linear_shapes(cfg, lin, layers[name].get("n_outliers", 0))
            quant_weights += lin.in_features * lin.out_features
            quant_bytes += sum(TensorSpec("", d, s).nbytes for s, d in shapes.values())
            n_outliers += layers[name].get("n_outliers", 0)
            paper_bits += layers[name].get("bits_per_parameter", 0.0) * lin.in_features * lin.out_features
    blocks = manifest["blocks"]
    report = {
        "streamq_version": __version__,
        "source": str(ckpt.folder),
        "method": cfg.to_dict(),
        "options": asdict(opts),
        "device": str(device),
        "blocks": blocks,
        "mean_layer_error": sum(r["error"] for b in blocks.values() for r in b["layers"].values())
        / max(1, sum(len(b["layers"]) for b in blocks.values())),
        "seconds_total": sum(b["seconds"] for b in blocks.values()),
        "io_wait_seconds_total": sum(b.get("io_wait_seconds", 0.0) for b in blocks.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
        "bits_per_quantized_weight": 8 * quant_bytes / max(1, quant_weights),
        "output_bytes": writer.total_size(),
        "shards": writer.names,
    }
    if cfg.method == "spqr":
        report.update(bits_per_parameter=paper_bits / max(1, quant_weights), n_outliers=n_outliers,
                      outlier_share=n_outliers / max(1, quant_weights))
    return report
