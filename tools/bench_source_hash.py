"""How long source integrity costs: sha256 of every tensor of a 7B-shaped checkpoint, as a resume re-hashes it.

Writes a synthetic folder of random bf16 tensors with Llama-7B's shapes (4096 x 4096 attention, 11008 x 4096
MLP), `--gb` GB of them (a real 7B is 13.5 GB; the rate is what matters), then times
  read:   Checkpoint.get with hash_reads (what a compress run adds to each block's read), and
  resume: Checkpoint.check_digests on every tensor (what a resume does for the blocks already written),
and prints MB/s and the projected seconds for a 13.5 GB model. The folder is deleted afterwards. The files
are fresh in the page cache, so this measures hashing, not the disk.

    python tools/bench_source_hash.py --gb 3 --dir /tmp
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from streamq.io.checkpoint import Checkpoint

SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
          "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
SEVEN_B = 13.5e9  # bytes of Llama-2-7B in bf16


def write_folder(folder: Path, gb: float) -> int:
    """Blocks of 7B-shaped random bf16 tensors, one shard per block, until `gb` GB; returns the bytes."""
    total, i = 0, 0
    while total < gb * 1e9:
        block = {f"model.layers.{i}.{n}.weight": torch.randn(s, dtype=torch.bfloat16) for n, s in SHAPES.items()}
        save_file(block, str(folder / f"model-{i:05d}.safetensors"))
        total += sum(t.numel() * 2 for t in block.values())
        i += 1
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="synthetic checkpoint size (keep disk use modest)")
    p.add_argument("--dir", default=None, help="where to write it (default: the system temp folder)")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="streamq-hashbench-", dir=args.dir))
    try:
        nbytes = write_folder(folder, args.gb)
        ckpt = Checkpoint(folder, hash_reads=True)
        start = time.perf_counter()
        for name in ckpt.names():
            ckpt.get(name)
        read = time.perf_counter() - start
        ckpt.digests.clear()
        start = time.perf_counter()
        for name in ckpt.names():
            ckpt.get(name)
        hashed_read = time.perf_counter() - start
        digests = dict(ckpt.digests)
        start = time.perf_counter()
        ckpt.check_digests(digests)
        resume = time.perf_counter() - start
        plain = Checkpoint(folder)
        start = time.perf_counter()
        for name in plain.names():
            plain.get(name)
        unhashed = time.perf_counter() - start
    finally:
        shutil.rmtree(folder)
    mb = nbytes / 1e6
    print(f"{nbytes / 1e9:.2f} GB in {len(digests)} tensors (first read, page cache warm-up: {read:.1f} s)")
    print(f"read with hashing:   {mb / hashed_read:7.0f} MB/s (without: {mb / unhashed:.0f} MB/s); hashing adds "
          f"{(hashed_read - unhashed) * SEVEN_B / nbytes:.0f} s to a 13.5 GB 7B run")
    print(f"resume re-hash:      {mb / resume:7.0f} MB/s -> {resume * SEVEN_B / nbytes:.0f} s for all of a 13.5 GB 7B")


if __name__ == "__main__":
    main()
