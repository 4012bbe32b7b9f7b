"""`streamq` command line: argparse -> one package function per command; no logic here."""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import signal
import sys

from streamq.errors import StreamqError
from streamq.interrupt import Interrupted, stop_on_signals

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 2**29; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse would print the whole usage)
        sys.stderr.write(f"streamq: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="streamq", description="Compress LLMs block by block on machines too small to hold them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="quantize a Hugging Face model folder into a GPTQ-format (or SpQR) folder")
    c.add_argument("model", help="source model folder (config.json + *.safetensors)")
    c.add_argument("out", help="output folder")
    c.add_argument("--method", default="gptq", choices=["gptq", "rtn", "autoround", "spqr"])
    c.add_argument("--preset", default=None, help="a named recipe: autoround light (50 iters, lr 5e-3) | best "
                   "(1000 iters, 512 samples); spqr near-lossless (w4 g16, qq 3/3/16, outlier threshold 0.2, "
                   "act-order, damp 1.0, asym, 128 samples); explicit flags win")
    # Method flags default to None (= the QuantConfig default, or the preset's value) so a preset can fill them.
    c.add_argument("--bits", type=int, default=None, help="2, 3, 4 or 8 (default 4)")
    c.add_argument("--group-size", type=int, default=None, help="input columns per scale; -1 = per channel (128)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid (default; spqr: refused, it is asym only)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points "
                     "(the default of --method spqr)")
    c.add_argument("--full-range", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid on all 2^bits levels, scale = +-max|w|/2^(bits-1) (auto-round's; the "
                   "default of --method autoround with --sym)")
    c.add_argument("--act-order", action="store_true", default=None,
                   help="quantize columns by descending Hessian diagonal")
    c.add_argument("--static-groups", action="store_true", help="with --act-order: fit group grids up front")
    c.add_argument("--damp", type=float, default=None, help="Hessian dampening, fraction of mean diag (0.01)")
    c.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                   help="collect all Hessians of a block in one pass")
    c.add_argument("--calib", default=None, help="calibration .txt/.jsonl/folder or spec 'a.jsonl:num=64,b.txt'; "
                   "default: the shipped Jane Austen excerpt")
    c.add_argument("--nsamples", type=int, default=None, help="calibration windows (128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per window (2048)")
    c.add_argument("--seed", type=int, default=0)
    a = c.add_argument_group("AutoRound")
    a.add_argument("--iters", type=int, default=None, help="signed-gradient steps per block (200); 0 = RTN")
    a.add_argument("--lr", type=float, default=None, help="step size, decaying linearly to 0 (1/iters)")
    a.add_argument("--batch-size", type=int, default=None, help="samples per forward pass (8)")
    a.add_argument("--grad-accum", type=int, default=None, help="forward passes per step (1)")
    a.add_argument("--no-minmax-tuning", dest="minmax_tuning", action="store_false", default=None,
                   help="tune the rounding only, not the per-group min/max range")
    a.add_argument("--no-fp-targets", dest="fp_targets", action="store_false", default=None,
                   help="tune toward the fp block run on the quantized inputs instead of the fp model's own block "
                   "outputs (which take a second activation stream: twice the store)")
    q = c.add_argument_group("SpQR")
    q.add_argument("--qq-scale-bits", type=int, default=None,
                   help="bits of the second-level quantization of group scales (with --qq-zero-bits; default: "
                   "fp16 scales)")
    q.add_argument("--qq-zero-bits", type=int, default=None, help="bits of the second-level quantization of zeros")
    q.add_argument("--qq-groupsize", type=int, default=None, help="output rows per second-level scale/zero (16)")
    q.add_argument("--outlier-threshold", type=float, default=None,
                   help="tau: weights whose error exceeds tau * mean sensitivity stay fp16 (inf = none; default inf)")
    q.add_argument("--simplified-outliers", action="store_true", default=None,
                   help="fit group grids on all weights instead of leaving likely outliers out")
    _add_compute_flags(c, offload_default=None)
    c.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="output shard limit (5GB)")
    resume = c.add_mutually_exclusive_group()
    resume.add_argument("--restart", dest="resume", action="store_const", const="restart", default="auto",
                        help="discard an earlier run's state in OUT")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="refuse to touch an existing OUT")
    c.add_argument("--keep-activations", action="store_true", help="keep the activation store after the run")
    c.add_argument("--no-progress", dest="progress", action="store_false")
    b = c.add_argument_group("budgets (planned up front; see streamq plan)")
    b.add_argument("--max-ram", type=parse_size, default=None, help="peak RAM, e.g. 16GB")
    b.add_argument("--max-vram", type=parse_size, default=None, help="peak GPU memory, e.g. 10GB")
    b.add_argument("--max-disk", type=parse_size, default=None, help="activation store + output, e.g. 100GB")

    pl = sub.add_parser("plan", help="print a compress run's plan (bytes per block, peak RAM/VRAM/disk, time) "
                        "without running it; takes compress's flags")
    pl.add_argument("model", help="source model folder (config.json + *.safetensors)")
    for action in c._actions:  # compress's options, shared as argparse's parents= would share them
        if action.option_strings and action.dest != "help":
            pl._add_action(action)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--no-benchmark", dest="benchmark", action="store_false",
                    help="skip the micro-benchmark behind the time estimate")

    e = sub.add_parser("eval", help="streaming perplexity of a source or compressed folder")
    e.add_argument("model")
    e.add_argument("--data", required=True, help="text file (stride = seqlen windows)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="only the first N windows")
    _add_compute_flags(e, offload_default="ram")
    e.add_argument("--no-progress", dest="progress", action="store_false")

    g = sub.add_parser("generate", help="greedy continuation by a compressed model")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--device", default="cpu")

    ins = sub.add_parser("inspect", help="what streamq finds in a model folder: its decoder blocks, the Linears "
                         "per block and their true-sequential groups, shapes, usable group sizes, test coverage")
    ins.add_argument("model", help="model folder (config.json + *.safetensors)")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")

    v = sub.add_parser("verify", help="check an output folder against its manifest: every shard byte, every tensor")
    v.add_argument("out", help="a streamq output folder")

    d = sub.add_parser("demo", help="fetch SmolLM2-135M, compress it, compare perplexity, generate")
    d.add_argument("--out", default=None, help="output folder (default: in the streamq cache)")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--method", default="gptq", choices=["gptq", "rtn", "autoround"])
    return p


def _add_compute_flags(p: argparse.ArgumentParser, offload_default: str) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | float16 | bfloat16")
    p.add_argument("--offload", default=offload_default, choices=["disk", "ram"],
                   help=f"where block activations live ({offload_default or 'disk; with --max-ram: ram if it fits'})")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import streamq

    if args.command == "compress":
        kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "model", "out")}
        with stop_on_signals() as stop:  # first Ctrl-C / SIGTERM: stop after the current block
            try:
                out = streamq.compress(args.model, args.out, should_stop=stop, **kwargs)
            except Interrupted as e:
                print(f"streamq: {e} on {signal.Signals(stop.signum).name}; to resume, run the same command again: "
                      f"streamq {shlex.join(argv)}", file=sys.stderr)
                return stop.exit_code
        print(f"wrote {out}")
    elif args.command == "plan":
        from streamq.planner import format_plan

        kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "model", "json", "benchmark")}
        plan = streamq.plan(args.model, benchmark=args.benchmark, **kwargs)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    elif args.command == "inspect":
        from streamq.inspect import format_inspection, inspect_model

        report = inspect_model(args.model)
        print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    elif args.command == "verify":
        from streamq.verify import verify

        problems = verify(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print(f"{args.out}: ok")
    elif args.command == "eval":
        ppl = streamq.evaluate(args.model, args.data, args.seqlen, max_windows=args.max_windows, device=args.device,
                               dtype=args.dtype, offload=args.offload, progress=args.progress)
        print(f"perplexity {ppl:.4f}")
    elif args.command == "generate":
        from streamq.loading import generate

        print(args.prompt + generate(args.model, args.prompt, args.max_new_tokens, args.device))
    elif args.command == "demo":
        from streamq.demo import run_demo

        run_demo(args.out, args.bits, args.method)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args, argv)
    except StreamqError as e:
        if args.debug:
            raise
        print(f"streamq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
