"""Progress over blocks: block i/N, ETA, per-block layer error, RAM / VRAM / store disk in use, and the share of
time spent waiting on IO; and one-line announcements of the phases before the blocks (phase()).

On a terminal it is a tqdm bar on stderr; when stderr is not a terminal (a log file, a pipe) it is one plain line
per block instead, so a log holds no carriage-return redraws."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

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


def is_terminal() -> bool:
    return sys.stderr.isatty()


def phase(message: str, enabled: bool = True) -> None:
    """Announce a phase of a run on stderr as it starts (e.g. "tokenizing the calibration text")."""
    if enabled:
        print(f"streamq: {message}", file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


def iter_blocks(items: Iterable, total: int, desc: str, enabled: bool = True) -> Iterator:
    """Iterate items (total of them) with progress labelled desc: a tqdm bar on a terminal, else a line
    "desc: block i/N done (elapsed, ETA)" per item on stderr."""
    if not enabled or is_terminal():
        yield from tqdm(items, total=total, desc=desc, unit="block", disable=not enabled, dynamic_ncols=True)
        return
    start = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        elapsed = time.perf_counter() - start
        print(f"{desc}: block {i + 1}/{total} done ({_clock(elapsed)} elapsed, "
              f"ETA {_clock(elapsed / (i + 1) * (total - i - 1))})", file=sys.stderr, flush=True)


class BlockProgress:
    """compress()'s per-block progress: a bar with a line per block on a terminal, the line alone elsewhere."""

    def __init__(self, n_blocks: int, first: int, enabled: bool, device: torch.device, store):
        self.device, self.store = device, store
        self.n_blocks, self.first, self.start = n_blocks, first, time.perf_counter()
        self.seconds = self.io_wait = 0.0
        self.lines_only = enabled and not is_terminal()
        self.bar = tqdm(total=n_blocks, initial=first, desc="blocks", unit="block",
                        disable=not enabled or self.lines_only, dynamic_ncols=True)

    def block_done(self, i: int, layers: dict[str, dict], seconds: float, io_wait: float) -> None:
        """layers: Linear name -> its report record (LayerReport fields: error, warning, ...); seconds: the
        block's wall time, io_wait: the part of it spent blocked on reads and writes."""
        self.seconds, self.io_wait = self.seconds + seconds, self.io_wait + io_wait
        errors = {name: r["error"] for name, r in layers.items()}
        worst = max(errors, key=errors.get)
        fields = {"io": f"{100 * self.io_wait / max(self.seconds, 1e-9):.0f}%",
                  **memory_postfix(self.device, self.store.path if self.store else None)}
        line = (f"block {i + 1}/{self.n_blocks}: mean layer error {sum(errors.values()) / len(errors):.5f}, "
                f"worst {worst} {errors[worst]:.5f}")
        warnings = "".join(f"\n  warning {n}: {r['warning']}" for n, r in layers.items() if r.get("warning"))
        if self.lines_only:
            elapsed, done = time.perf_counter() - self.start, i + 1 - self.first
            eta = elapsed / done * (self.n_blocks - i - 1)
            print(f"{line}; {seconds:.1f} s, ETA {_clock(eta)}, " + ", ".join(f"{k} {v}" for k, v in fields.items())
                  + warnings, file=sys.stderr, flush=True)
            return
        self.bar.set_postfix(err=f"{sum(errors.values()) / len(errors):.4f}", **fields)
        self.bar.write(line + warnings)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
