"""Solved routed experts of one block on disk, so they leave RAM at once and a killed run resumes between experts.

A block whose routed experts are streamed (quant/expert_stage.py) saves each solved expert's Linears as one
safetensors file `expert.E.safetensors` in the block's scratch folder (OUT/.streamq-work/experts/block.I):
codes [out, in] uint8, scales [groups, out] fp32, zeros [groups, out] uint8, g_idx [in] int32 per Linear;
the fake-quantized weight is not stored, it is exactly scales[g_idx] * (codes - zeros) (methods.QuantResult's
invariant). The file is fsynced and renamed into place, then `record.json` (written atomically) lists it with
its Linears' LayerReports. The record carries a key (the run fingerprint, the compute device and dtype): a
folder with another key is deleted, never reused. The pipeline deletes a block's folder once the block is
recorded in the manifest.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from streamq.formats.gptq import GPTQTensors, dense_gptq
from streamq.io.manifest import fsync_path, read_json, write_json_atomic
from streamq.methods import QuantResult

RECORD = "record.json"
FIELDS = ("codes", "scales", "zeros", "g_idx")  # QuantResult's fields a packer reads (the weight follows)


class LazyResult:
    """A solved expert Linear in the scratch folder: load() reads its QuantResult back (weight recomputed)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def load(self) -> QuantResult:
        with safe_open(str(self.path), framework="pt") as f:
            codes, scales, zeros, g_idx = (f.get_tensor(f"{self.name}.{k}") for k in FIELDS)
        weight = dense_gptq(GPTQTensors(codes, scales, zeros, g_idx))  # exact: the QuantResult invariant
        return QuantResult(weight, codes, scales, zeros, g_idx)


class ExpertScratch:
    """The scratch folder of one block: done (expert -> {Linear name: LayerReport as a dict}) lists what it holds."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key
        record = self.folder / RECORD
        try:
            saved = read_json(record) if record.exists() else {}
        except ValueError:  # torn by a crash: never possible with the atomic write, but not worth a refusal
            saved = {}
        if saved.get("key") != key:
            shutil.rmtree(self.folder, ignore_errors=True)
            saved = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.done: dict[int, dict[str, dict]] = {int(e): r for e, r in saved.get("experts", {}).items()}

    def path(self, e: int) -> Path:
        return self.folder / f"expert.{e}.safetensors"

    def save(self, e: int, results: dict[str, QuantResult], reports: dict[str, object]) -> None:
        """Persist expert e's solved Linears (by block-relative name) durably, then record them."""
        tensors = {f"{n}.{k}": getattr(r, k).detach().to("cpu").contiguous() for n, r in results.items() for k in FIELDS}
        tmp = self.path(e).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        fsync_path(tmp)
        os.replace(tmp, self.path(e))
        fsync_path(self.folder)
        self.done[e] = {n: asdict(r) for n, r in reports.items()}
        write_json_atomic(self.folder / RECORD, {"key": self.key, "experts": {str(k): v for k, v in self.done.items()}})

    def result(self, e: int, name: str) -> LazyResult:
        return LazyResult(self.path(e), name)

    def weight(self, e: int, name: str) -> torch.Tensor:
        return self.result(e, name).load().weight
