"""The progress bar over blocks: block i/N, ETA, per-block layer error, RAM / VRAM / store disk in use, and the
share of time spent waiting on IO."""
from __future__ import annotations

import os

import psutil
import torch
from tqdm import tqdm

GiB = 1 << 30


def memory_postfix(device: torch.device, store_path: str | None) -> dict[str, str]:
    """Current RSS, VRAM (allocated) and activation-store size, in GiB, as tqdm postfix fields."""
    fields = {"RAM": f"{psutil.Process().memory_info().rss / GiB:.2f}G"}
    if device.type == "cuda":
        fields["VRAM"] = f"{torch.cuda.memory_allocated(device) / GiB:.2f}G"
    if store_path and os.path.isdir(store_path):
        size = sum(e.stat().st_size for e in _walk(store_path))
        fields["disk"] = f"{size / GiB:.2f}G"
    return fields


def _walk(path: str):
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        else:
            yield entry


class BlockProgress:
    def __init__(self, n_blocks: int, first: int, enabled: bool, device: torch.device, store):
        self.device, self.store = device, store
        self.seconds = self.io_wait = 0.0
        self.bar = tqdm(total=n_blocks, initial=first, desc="blocks", unit="block", disable=not enabled,
                        dynamic_ncols=True)

    def block_done(self, i: int, layers: dict[str, dict], seconds: float, io_wait: float) -> None:
        """layers: Linear name -> its report record (LayerReport fields: error, warning, ...); seconds: the
        block's wall time, io_wait: the part of it spent blocked on reads and writes."""
        self.seconds, self.io_wait = self.seconds + seconds, self.io_wait + io_wait
        errors = {name: r["error"] for name, r in layers.items()}
        worst = max(errors, key=errors.get)
        self.bar.set_postfix(err=f"{sum(errors.values()) / len(errors):.4f}",
                             io=f"{100 * self.io_wait / max(self.seconds, 1e-9):.0f}%",
                             **memory_postfix(self.device, self.store.path if self.store else None))
        self.bar.write(f"block {i + 1}/{self.bar.total}: mean layer error {sum(errors.values()) / len(errors):.5f}, "
                       f"worst {worst} {errors[worst]:.5f}" + "".join(
                           f"\n  warning {n}: {r['warning']}" for n, r in layers.items() if r.get("warning")))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
