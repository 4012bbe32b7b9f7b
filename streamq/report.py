"""streamq_report.json: what a finished run did, computed from the per-layer records in its manifest.

Every aggregate is summed over the layers in one fixed order (blocks by index, layers by name) with math.fsum,
so a run that was killed and resumed, whose manifest was read back with its keys in another order, reports
the same numbers to the last bit as an uninterrupted one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict

import torch

from streamq import __version__
from streamq.io.writer import ShardWriter, TensorSpec
from streamq.memstat import peak_rss_bytes


def layers_in_order(blocks: dict[str, dict]) -> Iterator[tuple[int, str, dict]]:
    """(block index, Linear name, its record) over the manifest's "blocks", by block index then name."""
    for i in sorted(blocks, key=int):
        layers = blocks[i]["layers"]
        for name in sorted(layers):
            yield int(i), name, layers[name]


def run_report(ckpt, layout, cfg, opts, writer: ShardWriter, manifest: dict, device: torch.device,
               fmt) -> dict:
    """streamq_report.json: arguments, per-layer error, time per block, peak memory, bits per weight (stored
    bytes; SpQR also as its paper counts them, with the outlier share, overall and per layer in "blocks").

    fmt: the run's layout format (a streamq.formats module), whose linear_shapes size each Linear's tensors."""
    blocks = manifest["blocks"]
    errors, weights, stored_bytes, outliers, paper_bits = [], [], [], [], []
    for i, name, record in layers_in_order(blocks):
        lin = layout.block_linears(i)[name]
        n_weights = lin.in_features * lin.out_features
        n_outliers = record.get("n_outliers", 0)
        errors.append(record["error"])
        weights.append(n_weights)
        shapes = fmt.linear_shapes(lin.out_features, lin.in_features, cfg, n_outliers)
        stored_bytes.append(sum(TensorSpec("", d, s).nbytes for s, d in shapes.values()))
        outliers.append(n_outliers)
        paper_bits.append(record.get("bits_per_parameter", 0.0) * n_weights)  # SpQR: bits/parameter * parameters
    by_index = [blocks[i] for i in sorted(blocks, key=int)]
    quant_weights = max(1, sum(weights))
    report = {
        "streamq_version": __version__,
        "source": str(ckpt.folder),
        "method": cfg.to_dict(),
        "options": asdict(opts),
        "device": str(device),
        "blocks": blocks,
        "mean_layer_error": math.fsum(errors) / max(1, len(errors)),
        "seconds_total": math.fsum(b["seconds"] for b in by_index),
        "io_wait_seconds_total": math.fsum(b.get("io_wait_seconds", 0.0) for b in by_index),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_vram_bytes": max((b.get("peak_vram_bytes", 0) for b in by_index), default=0),  # reset per block
        "bits_per_quantized_weight": 8 * sum(stored_bytes) / quant_weights,
        "output_bytes": writer.total_size(),
        "shards": writer.names,
        "ignored_linears": list(cfg.ignore),  # --ignore: left in fp, copied unchanged (streamq/ignore.py)
        "quant_lm_head": cfg.quant_lm_head,
    }
    records = [r for _, _, r in layers_in_order(blocks)]
    if records and all("sparsity" in r for r in records):  # SparseGPT: shares of all block weights
        for key in ("sparsity", "zero_fraction"):
            report[key] = math.fsum(r[key] * w for r, w in zip(records, weights)) / quant_weights
    if cfg.method == "spqr":
        report.update(bits_per_parameter=math.fsum(paper_bits) / quant_weights, n_outliers=sum(outliers),
                      outlier_share=sum(outliers) / quant_weights)
    return report
