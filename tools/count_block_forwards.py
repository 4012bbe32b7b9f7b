"""Full-forward equivalents per block of quantize_block's GPTQ, counted with hooks (not timed).

    .venv/bin/python tools/count_block_forwards.py [MODEL_DIR] [--nsamples 8] [--seqlen 128] [--baseline OLD_BLOCK.py] [--rounds 2]

MODEL_DIR: a Hugging Face model folder (default: a tiny random Llama, as the tests build). Block 0 is quantized
(GPTQ w4 g64, true-sequential) on nsamples random-token windows, including the pass that produces its outputs.
Reported, for block 0 traced and for a twin of it that reuses the trace (quant/twins.py): Linear work run
(multiply-adds of every completed Linear call) and attention-core calls (scaled_dot_product_attention), each
divided by what one forward of the block over the samples does. With --baseline (e.g. `git show
520bf8f:streamq/quant/block.py > /tmp/old_block.py`) that file's quantize_block, followed by one plain output
pass as blockwork ran it, is counted too.
"""
from __future__ import annotations

import argparse
import sys
import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from streamq.calib.capture import run_block
from streamq.config import QuantConfig
from streamq.quant import twins
from streamq.quant.block import quantize_block


def block0(model_dir: str | None):
    from transformers import AutoModelForCausalLM
    if model_dir is None:
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import make_tiny_model
        model_dir = make_tiny_model(Path(tempfile.mkdtemp()) / "llama", "llama", n_layers=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model


def inputs(model, nsamples: int, seqlen: int):
    layers = model.get_decoder().layers
    xs, kw = [], {}

    class Stop(Exception):
        pass

    def catch(module, args, kwargs):
        xs.append(args[0] if args else kwargs["hidden_states"])
        kw.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
        raise Stop

    h = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(nsamples):
        try:
            with torch.no_grad():
                model(torch.randint(0, model.config.vocab_size, (1, seqlen), generator=g), use_cache=False)
        except Stop:
            pass
    h.remove()
    kw["use_cache"] = False
    return layers[0], xs, kw


def count(run, block, nsamples: int) -> tuple[float, float]:
    macs = {n: m.in_features * m.out_features for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    done = {"mac": 0, "sdpa": 0}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: done.__setitem__("mac", done["mac"] + macs[n])) for n in macs]
    sdpa = F.scaled_dot_product_attention

    def counted(*a, **k):
        done["sdpa"] += 1
        return sdpa(*a, **k)

    F.scaled_dot_product_attention = counted  # measurement only
    try:
        run()
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return done["mac"] / (nsamples * sum(macs.values())), done["sdpa"] / nsamples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--baseline")
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds (interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    block, xs, kw = inputs(block0(args.model), args.nsamples, args.seqlen)
    cfg = QuantConfig(bits=4, group_size=64 if block.mlp.down_proj.in_features % 64 == 0 else 32) \
        if hasattr(block, "mlp") else QuantConfig(bits=4, group_size=32)
    cpu = torch.device("cpu")

    def first(b):  # as block 0 of a run: traced (a later twin block reuses the trace, quant/twins.py)
        twins.forget()
        quantize_block(b, lambda: iter(xs), kw, cfg, cpu, emit=lambda y: None)

    runs = {"now, first block (traced)": first,
            "now, a twin block (trace reused)": lambda b: quantize_block(b, lambda: iter(xs), kw, cfg, cpu,
                                                                         emit=lambda y: None),
            "now, nothing kept (keep_bytes=0)":
                lambda b: quantize_block(b, lambda: iter(xs), kw, cfg, cpu, emit=lambda y: None, keep_bytes=0)}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_block", args.baseline)
        old = importlib.util.module_from_spec(spec)
        sys.modules["baseline_block"] = old
        spec.loader.exec_module(old)

        def baseline(b):
            old.quantize_block(b, lambda: iter(xs), kw, cfg, cpu)
            with torch.no_grad():
                for x in xs:
                    run_block(b, x, kw)
        runs["baseline + output pass"] = baseline
    seconds = {name: [] for name in runs}
    for k in range(args.rounds):  # interleaved, so machine load hits every variant alike
        for name, run in runs.items():
            b = copy.deepcopy(block)
            start = time.perf_counter()
            linear, attn = count(lambda: run(b), b, len(xs))
            seconds[name].append(time.perf_counter() - start)
            if k == args.rounds - 1:
                print(f"{name}: Linear work {linear:.2f} forwards, attention {attn:.2f} forwards per block; "
                      f"wall {' / '.join(f'{t:.1f}' for t in seconds[name])} s")


if __name__ == "__main__":
    main()
