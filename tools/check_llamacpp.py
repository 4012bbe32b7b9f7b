"""Run a streamq GGUF export in llama.cpp (llama-cpp-python) and compare its perplexity with `streamq eval`
on the same windows (not in CI: llama-cpp-python builds from source for ~2 h on 2 cores).

    pip install llama-cpp-python
    streamq export OUT --format gguf                  # OUT/gguf/model-Q4_0.gguf (or Q4_1 / Q8_0)
    python tools/check_llamacpp.py OUT --data ../shared/data/austen-test.txt --seqlen 512 --windows 4

Windows are streamq's (`streamq.calib.data.eval_windows`: non-overlapping seqlen-token windows, each predicting
tokens 1..seqlen-1), fed to llama.cpp as token ids so both score the same tokens. Q4 files crashed llama.cpp
in llama_decode on an AMX CPU unless the extra buffer types are off (use_extra_bufts=False, set here).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a streamq output folder with gguf/*.gguf inside (streamq export OUT --format gguf)")
    p.add_argument("--data", required=True)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args()

    import streamq
    from llama_cpp import Llama
    from streamq.calib.data import eval_windows
    from transformers import AutoTokenizer

    gguf = next((Path(args.out) / "gguf").glob("*.gguf"))
    windows = eval_windows(AutoTokenizer.from_pretrained(args.out), args.data, args.seqlen, args.windows)
    llm = Llama(str(gguf), n_ctx=args.seqlen, logits_all=True, verbose=False, use_extra_bufts=False)
    nll, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[: len(row)], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
            logits.max(1, keepdims=True)
        nll -= sum(logp[i, row[i + 1]] for i in range(len(row) - 1))
        count += len(row) - 1
    ours = streamq.evaluate(args.out, args.data, args.seqlen, max_windows=args.windows, progress=False)
    theirs = math.exp(nll / count)
    print(f"{gguf.name}: perplexity llama.cpp {theirs:.3f} / streamq eval {ours:.3f} "
          f"({100 * (theirs / ours - 1):+.2f}%)")


if __name__ == "__main__":
    main()
