"""`streamq` command line: argparse -> one package function per command; no logic here."""
from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import signal
import sys

from pathlib import Path

from streamq.config import PRESETS
from streamq.errors import StreamqError
from streamq.interrupt import Interrupted, stop_on_signals
from streamq.methods import names

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"  # = streamq.perplexity.HELDOUT, without importing torch

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 2**29; a bare number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the text already names its default, or the default is
    None (the text says what happens then) or a switch's False/True."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or isinstance(action.default, bool) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given (so --recipe may set what only a default set)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line on stderr, exit 2 (argparse would print the whole usage)
        sys.stderr.write(f"streamq: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="streamq", description="Compress LLMs block by block on machines too small to hold them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (also accepted "
                   "after the command)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="quantize a Hugging Face model folder into a GPTQ-format (or SpQR) folder")
    c.add_argument("model", help="source model folder (config.json + *.safetensors)")
    c.add_argument("out", help="output folder (created; an interrupted run there is resumed)")
    c.add_argument("--method", default="gptq", choices=names(), action=_Given,
                   help="gptq: error-compensating solve per Linear; rtn: round to nearest (no data); autoround: "
                   "signed-gradient rounding per block; spqr: small groups, quantized scales, fp16 outliers; sparsegpt: "
                   "prune and quantize in one pass")
    c.add_argument("--preset", default=None, choices=sorted({n for recipes in PRESETS.values() for n in recipes}),
                   help="a named recipe (default: none): autoround light (50 iters, lr 5e-3) | best "
                   "(1000 iters, 512 samples); spqr near-lossless (w4 g16, qq 3/3/16, outlier threshold 0.2, "
                   "act-order, damp 1.0, asym, 128 samples); explicit flags win")
    # Method flags default to None (= the QuantConfig default, or the preset's value) so a preset can fill them.
    c.add_argument("--bits", type=int, default=None, help="bits per weight: 2, 3, 4 or 8 (default 4); sparsegpt "
                   "also 16 = prune only, fp16 weights")
    c.add_argument("--group-size", type=int, default=None, help="input columns per scale; -1 = per "
                   "channel (default 128)")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric grid (default; spqr: refused, it is asym only)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with zero points "
                     "(the default of --method spqr)")
    c.add_argument("--full-range", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid on all 2^bits levels, scale = +-max|w|/2^(bits-1) (auto-round's; the "
                   "default of --method autoround with --sym)")
    c.add_argument("--grid-search", choices=("minmax", "mse"), default=None,
                   help="each group's grid from its min/max range, or mse: the shrunk range (factors 1 to 0.21) with "
                   "the smallest sum |w - q|^2.4, as IST-DASLab/gptq's mse search (gptq, rtn, sparsegpt; default: "
                   "mse for gptq, minmax for rtn and sparsegpt)")
    c.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize columns by descending Hessian diagonal (default: on for gptq)")
    c.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ with --act-order: fit group grids up front, so g_idx stays the column order "
                   "(default: on with --act-order)")
    c.add_argument("--damp", type=float, default=None,
                   help="GPTQ: Hessian dampening, fraction of mean diag (default 0.01)")
    c.add_argument("--no-true-sequential", dest="true_sequential", action="store_false", default=None,
                   help="GPTQ: collect all Hessians of a block in one pass (default: per input group)")
    c.add_argument("--moe-min-tokens", type=int, default=None,
                   help="MoE: routed experts that calibration sends fewer tokens get round-to-nearest (an identity "
                   "Hessian), with a warning listing them (default 16)")
    c.add_argument("--moe-all-tokens", action="store_true", default=None,
                   help="MoE: every expert's Hessian from every calibration token, not only those routed to it "
                   "(llm-compressor's calibrate-all-experts; the block outputs stay the model's; default: off)")
    c.add_argument("--calib", default=None, help="calibration .txt/.jsonl/folder or spec 'a.jsonl:num=64,b.txt'; "
                   "default: the shipped Jane Austen excerpt")
    c.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seeds the choice of calibration windows and the method")
    a = c.add_argument_group("AutoRound")
    a.add_argument("--iters", type=int, default=None, help="signed-gradient steps per block "
                   "(default 200); 0 = RTN")
    a.add_argument("--lr", type=float, default=None, help="step size, decaying linearly to 0 "
                   "(default 1/iters)")
    a.add_argument("--batch-size", type=int, default=None, help="samples per forward pass (default 8)")
    a.add_argument("--grad-accum", type=int, default=None, help="forward passes per step (default 1)")
    a.add_argument("--no-minmax-tuning", dest="minmax_tuning", action="store_false", default=None,
                   help="tune the rounding only, not the per-group min/max range (default: both)")
    a.add_argument("--no-fp-targets", dest="fp_targets", action="store_false", default=None,
                   help="tune toward the fp block run on the quantized inputs instead of the fp model's own block "
                   "outputs (the default, which takes a second activation stream: twice the store)")
    q = c.add_argument_group("SpQR")
    q.add_argument("--qq-scale-bits", type=int, default=None,
                   help="bits of the second-level quantization of group scales (with --qq-zero-bits; default: "
                   "fp16 scales)")
    q.add_argument("--qq-zero-bits", type=int, default=None,
                   help="bits of the second-level quantization of zeros (default: fp16 zeros)")
    q.add_argument("--qq-groupsize", type=int, default=None,
                   help="output rows per second-level scale/zero (default 16)")
    q.add_argument("--outlier-threshold", type=float, default=None,
                   help="tau: weights whose error exceeds tau * mean sensitivity stay fp16 (inf = none; default inf)")
    q.add_argument("--simplified-outliers", action="store_true", default=None,
                   help="fit group grids on all weights instead of leaving likely outliers out (default: off)")
    r = c.add_argument_group("ignore lists and recipes")  # streamq/ignore.py, streamq/recipe.py
    r.add_argument("--ignore", action="append", default=None, metavar="PATTERN",
                   help="leave a Linear unquantized, copied unchanged (repeatable): its checkpoint name "
                   "(model.layers.3.mlp.down_proj) or 're:REGEX' matched from the name's start, as llm-compressor's "
                   "ignore lists; a pattern matching nothing is an error (default: none)")
    r.add_argument("--recipe", default=None, metavar="FILE",
                   help="an llm-compressor / SparseML recipe YAML (stages of SparseGPT / GPTQ / Quantization / "
                   "SmoothQuant modifiers) or a MindSpore-style quantization_config, filling the method flags; a flag "
                   "that contradicts it is an error (default: none)")
    r.add_argument("--quant-lm-head", action="store_true", default=None,
                   help="also quantize the output head, rounded to nearest on the method's grid (refused with tied "
                   "embeddings; default: the head stays fp)")
    s = c.add_argument_group("SparseGPT")
    s.add_argument("--sparsity", type=float, default=None,
                   help="fraction of each Linear's weights pruned, in [0, 1) (default 0.5; N/M with an N:M mask)")
    s.add_argument("--mask-structure", default=None,
                   help="0:0 = unstructured (default), N:M = N zeros in every M consecutive input columns (2:4)")
    sq = c.add_argument_group("SmoothQuant and activation quantization (every method; see streamq/quant/actquant.py)")
    sq.add_argument("--smooth-alpha", type=float, default=None,
                    help="SmoothQuant migration strength in [0, 1], e.g. 0.5: fold per-channel activation scales into "
                    "each norm and the Linears reading it before quantizing (default: no smoothing)")
    sq.add_argument("--act-bits", type=int, default=None,
                    help="8: int8 activations (W8A8, with --bits 8 --group-size -1; --format compressed-tensors) "
                    "(default: 16-bit activations)")
    sq.add_argument("--act-dynamic", action=argparse.BooleanOptionalAction, default=None,
                    help="per-token dynamic activation scales; --no-act-dynamic: static per-tensor scales "
                    "calibrated on the calibration data (default: dynamic)")
    sq.add_argument("--kv-cache", default=None,
                    help="int8 | fp8: calibrate per-layer k/v cache scales from the k/v projections' outputs "
                    "(--format compressed-tensors; default: 16-bit cache)")
    _add_compute_flags(c, offload_default=None)
    c.add_argument("--format", dest="formats", default=None,
                   help="output format(s), comma-separated: gptq (default) | compressed-tensors | gguf | spqr "
                   "(the default of --method spqr) | dense (of --bits 16); the first of gptq/compressed-tensors/"
                   "spqr/dense is OUT's layout, "
                   "each further one is exported into OUT/<format>/")
    c.add_argument("--shard-size", type=parse_size, default=5 * 10**9, help="output shard limit (default 5GB)")
    resume = c.add_mutually_exclusive_group()
    resume.add_argument("--restart", dest="resume", action="store_const", const="restart", default="auto",
                        help="discard an earlier run's state in OUT (default: resume a matching run)")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="refuse to touch an existing OUT (default: resume a matching run)")
    c.add_argument("--keep-activations", action="store_true",
                   help="keep the activation store after the run (default: deleted)")
    _add_progress_flag(c)
    _add_debug_flag(c)
    b = c.add_argument_group("budgets (planned up front; see streamq plan)")
    b.add_argument("--max-ram", type=parse_size, default=None, help="peak RAM, e.g. 16GB (default: no limit)")
    b.add_argument("--max-vram", type=parse_size, default=None, help="peak GPU memory, e.g. 10GB (default: no limit)")
    b.add_argument("--max-disk", type=parse_size, default=None,
                   help="activation store + output, e.g. 100GB (default: no limit)")

    pl = sub.add_parser("plan", help="print a compress run's plan (bytes per block, peak RAM/VRAM/disk, time) "
                        "without running it; takes compress's flags")
    pl.add_argument("model", help="source model folder (config.json + *.safetensors)")
    for action in c._actions:  # compress's options, shared as argparse's parents= would share them
        if action.option_strings and action.dest != "help":
            pl._add_action(action)
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (default: a table)")
    pl.add_argument("--no-benchmark", dest="benchmark", action="store_false",
                    help="skip the micro-benchmark behind the time estimate (default: run it, a few seconds)")

    e = sub.add_parser("eval", help="streaming perplexity of a source or compressed folder")
    e.add_argument("model", help="a source model folder or a streamq output folder")
    e.add_argument("--data", default=str(HELDOUT), help="text file, cut into non-overlapping windows of --seqlen "
                   "tokens (default: the shipped held-out text, streamq/data/heldout.txt)")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    e.add_argument("--max-windows", type=int, default=None, help="only the first N windows (default: all)")
    _add_compute_flags(e, offload_default="ram")
    _add_progress_flag(e)
    _add_debug_flag(e)
    e.add_argument("--allow-incomplete", action="store_true",
                   help="read an unfinished or manifest-less folder (default: refused)")

    g = sub.add_parser("generate", help="greedy continuation by a compressed model, printed as it is generated")
    g.add_argument("model", help="a streamq output folder")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    g.add_argument("--allow-incomplete", action="store_true",
                   help="read an unfinished or manifest-less folder (default: refused)")
    _add_debug_flag(g)

    ins = sub.add_parser("inspect", help="what streamq finds in a model folder: its decoder blocks, the Linears "
                         "per block and their true-sequential groups, shapes, usable group sizes, test coverage")
    ins.add_argument("model", help="model folder (config.json + *.safetensors)")
    ins.add_argument("--json", action="store_true", help="print the report as JSON (default: a table)")
    _add_debug_flag(ins)

    v = sub.add_parser("verify", help="check an output folder against its manifest: every shard byte, every tensor")
    v.add_argument("out", help="a streamq output folder")
    _add_debug_flag(v)

    x = sub.add_parser("export", help="convert a finished output folder into another format (no recomputing)")
    x.add_argument("out", help="a finished streamq output folder")
    x.add_argument("--format", required=True, help="the format to write (required): gptq | compressed-tensors | gguf")
    x.add_argument("--to", default=None, help="destination folder (default: OUT/<format>)")
    x.add_argument("--head-type", default="q8_0", choices=["q8_0", "f16", "f32"],
                   help="gguf: type of the embeddings and output head (default q8_0)")
    _add_debug_flag(x)

    d = sub.add_parser("demo", help="fetch SmolLM2-135M, compress it, compare perplexity, generate")
    d.add_argument("--out", default=None, help="output folder (default: $STREAMQ_CACHE or ~/.cache/streamq, "
                   "as SmolLM2-135M-Instruct-METHOD-wBITSg64)")
    d.add_argument("--bits", type=int, default=4, help="bits per weight")
    d.add_argument("--method", default="gptq", choices=["gptq", "rtn", "autoround"], help="compression method")
    _add_debug_flag(d)
    return p


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar or phase lines (default: a bar on a terminal, one line per block otherwise)")


def _add_debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: absent after the command, the top-level --debug (or its False) stands
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show tracebacks instead of one-line errors (default: off)")


def _add_compute_flags(p: argparse.ArgumentParser, offload_default: str) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when visible, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (float32 on CPU, the checkpoint's 16-bit "
                   "type on GPU) | float32 | float16 | bfloat16")
    p.add_argument("--offload", default=offload_default, choices=["disk", "ram"],
                   help="where block activations live (default: "
                   f"{offload_default or 'disk; with --max-ram: ram if it fits'})")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import streamq

    if args.command == "compress":
        kwargs = _with_recipe({k: v for k, v in vars(args).items() if k not in ("command", "debug", "model", "out")})
        with stop_on_signals() as stop:  # first Ctrl-C / SIGTERM: stop after the current block
            try:
                out = streamq.compress(args.model, args.out, should_stop=stop, **kwargs)
            except Interrupted as e:
                again = [a for a in argv if a not in ("--restart", "--no-resume")]  # these would restart / refuse
                print(f"streamq: {e} on {signal.Signals(stop.signum).name}; to resume, run the same command again: "
                      f"streamq {shlex.join(again)}", file=sys.stderr)
                return stop.exit_code
        print(f"wrote {out}")
    elif args.command == "plan":
        from streamq.planner import format_plan

        kwargs = _with_recipe({k: v for k, v in vars(args).items()
                               if k not in ("command", "debug", "model", "json", "benchmark")})
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
        from streamq.io.manifest import reading
        from streamq.perplexity import evaluate_text

        with reading(args.model, args.allow_incomplete):
            result = evaluate_text(args.model, args.data, args.seqlen, max_windows=args.max_windows,
                                   device=args.device, dtype=args.dtype, offload=args.offload, progress=args.progress)
        print(result.line())
    elif args.command == "generate":
        from streamq.loading import generate

        print(args.prompt, end="", flush=True)  # the continuation follows token by token
        generate(args.model, args.prompt, args.max_new_tokens, args.device, allow_incomplete=args.allow_incomplete,
                 stream=True)
    elif args.command == "export":
        from streamq.formats.export import export

        options = {"head_type": args.head_type} if args.format == "gguf" else {}
        print(f"wrote {export(args.out, args.format, args.to or Path(args.out) / args.format, **options)}")
    elif args.command == "demo":
        from streamq.demo import run_demo

        run_demo(args.out, args.bits, args.method)
    return 0


def _with_recipe(kwargs: dict) -> dict:
    """compress / plan keyword arguments with --recipe's values filled in (streamq/recipe.py); method gptq unless
    the flags or the recipe name one."""
    recipe, given = kwargs.pop("recipe", None), kwargs.pop("given", ())
    if recipe is not None:
        from streamq.recipe import merge_flags, read_recipe

        kwargs = merge_flags(read_recipe(recipe), {**kwargs, "method": kwargs["method"] if "method" in given else None})
    kwargs["method"] = kwargs.get("method") or "gptq"
    return kwargs


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
