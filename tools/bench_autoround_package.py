"""Side by side: intel's auto-round package on the same model, calibration windows and tuning settings.

auto-round is not a streamq dependency; install it beside streamq in a throw-away environment:

    python -m venv /tmp/arenv --system-site-packages && /tmp/arenv/bin/pip install auto-round
    /tmp/arenv/bin/python tools/bench_autoround_package.py --calib ../shared/data/austen-calib.txt \
        --data ../shared/data/austen-test.txt --bits 4 --iters 50 --lr 5e-3 --batch-size 4 --nsamples 32

The calibration windows are streamq's own (same file, tokenizer, seed), auto-round exports its GPTQ format,
and the perplexity comes from `streamq eval` on that folder (so this also checks that streamq reads it).
The row is appended to the same JSON lines file as tools/bench_smollm2.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamq.memstat import peak_rss_bytes

sys.path.insert(0, str(Path(__file__).parent))
from bench_smollm2 import common_arguments, step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(p, nsamples=32)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()

    import torch
    import auto_round
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamq.calib.data import calibration_windows
    from streamq.fetch import ensure_smollm2

    model_dir = a.model or str(ensure_smollm2())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenizer, a.calib, a.nsamples, a.calib_seqlen, seed=0)
    out = a.work / f"auto-round-w{a.bits}g{a.group_size}"
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tuner = auto_round.AutoRound(model, tokenizer=tokenizer, bits=a.bits, group_size=a.group_size, sym=True,
                                 iters=a.iters, lr=a.lr, batch_size=a.batch_size, nsamples=a.nsamples,
                                 seqlen=a.calib_seqlen, dataset=[w[None] for w in windows], device_map="cpu",
                                 seed=0)
    tuner.quantize_and_save(str(out), format="auto_gptq")
    seconds = time.perf_counter() - t
    rss_mb = peak_rss_bytes() / 2**20
    folder = next(p for p in [out, *out.iterdir()] if (p / "config.json").exists())
    ev = step({"kind": "eval", "model": str(folder), "data": a.data, "seqlen": a.seqlen, "windows": a.windows})
    row = {"config": f"auto-round {auto_round.__version__} w{a.bits} g{a.group_size} iters={a.iters} lr={a.lr} "
                     f"batch_size={a.batch_size} nsamples={a.nsamples}",
           "ppl": ev["ppl"], "compress_seconds": seconds, "compress_peak_rss_mb": rss_mb,
           "eval_seconds": ev["seconds"], "eval_peak_rss_mb": ev["peak_rss_mb"]}
    a.work.mkdir(parents=True, exist_ok=True)
    with open(a.work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
