"""Peak RSS of `streamq export` (VmHWM of a fresh child process, streamq.memstat), against the folder's largest
shard and largest tensor: export streams shard by shard (layout formats) or tensor by tensor (GGUF).

    python tools/measure_export_memory.py ~/.cache/streamq/SmolLM2-135M-Instruct-gptq-w4g64 --work /tmp/export-mem \
        [--formats gguf,compressed-tensors]

"after imports" is the child's high-water mark once torch, transformers' safetensors, gguf and
compressed-tensors are imported, before the export starts; "export" is the high-water mark at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from streamq.memstat import peak_rss_bytes
import gguf, compressed_tensors, torch
from streamq.formats.export import export
from streamq.formats import gguf_file, compressed_tensors as ct, gptq
base = peak_rss_bytes()
export(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4]))
print(json.dumps({"imports": base, "export": peak_rss_bytes()}))
"""


def export_peak(src: Path, name: str, dst: Path, **options) -> dict:
    """{"imports": bytes, "export": bytes}: one export in a fresh child (one heap arena, one thread)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), name, str(dst), json.dumps(options)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def largest(src: Path) -> tuple[int, int]:
    """(largest shard file, largest tensor) of a folder, bytes."""
    from streamq.io.checkpoint import Checkpoint

    ckpt = Checkpoint(src)
    return max(f.stat().st_size for f in ckpt.files), max(ckpt.nbytes(n) for n in ckpt.names())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="a finished streamq output folder")
    p.add_argument("--work", required=True)
    p.add_argument("--formats", default="gguf,compressed-tensors")
    args = p.parse_args()
    shard, tensor = largest(Path(args.src))
    mb = 1e-6
    print(f"{args.src}: largest shard {shard * mb:.1f} MB, largest tensor {tensor * mb:.1f} MB")
    print("| export | peak RSS after imports | peak RSS of the export | export - imports |")
    print("|---|---|---|---|")
    for name in args.formats.split(","):
        dst = Path(args.work) / name
        shutil.rmtree(dst, ignore_errors=True)
        r = export_peak(Path(args.src), name, dst)
        print(f"| {name} | {r['imports'] * mb:.0f} MB | {r['export'] * mb:.0f} MB | "
              f"{(r['export'] - r['imports']) * mb:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
