"""Benchmark: peak RSS of `streamq compress` at real Llama widths is flat in depth and matches `streamq plan`.

    python tools/bench_memory.py [--widths 7b,13b --blocks 2,8 --nsamples 4 --seqlen 256 --max-ram 20GB]

For each width and block count, writes a random-weight Llama with that width (7b: hidden 4096, inter 11008,
32 heads; 13b: 5120 / 13824 / 40; 65b: 8192 / 22016 / 64), that many blocks and a small vocabulary, as fp16
safetensors (one shard per block, written tensor by tensor: a block at a time in memory, never the model).
Then compresses it with GPTQ (4 bits, group 128) in a fresh subprocess under --max-ram (default: the RAM
available now) and --max-vram, after planning the same run there, and prints a markdown table: peak RSS
(ru_maxrss) against the plan's predicted peak, seconds per block measured (streamq_report.json) and estimated
by the plan's micro-benchmark, the share of block time spent waiting on IO, and peak VRAM. Models and outputs
go to a temporary folder under --work, removed at the end.

MoE widths (MOE_WIDTHS: Mixtral-8x7B, Qwen3-235B-A22B, DeepSeek-V3 block shapes; --experts N routed experts per
block) give the same rows for random-weight MoE models, whose routed experts streamq streams a group at a time
(quant/expert_stage.py); compare two --experts counts for the flat peak. --plan-only prints the plan alone
(sparse files), with --device cuda on a machine without a GPU the footprint model evaluated for CUDA in bf16.

    python tools/bench_memory.py --widths qwen3-235b-a22b --experts 8 --blocks 1 --nsamples 2 --seqlen 128
    python tools/bench_memory.py --widths deepseek-v3 --blocks 1 --plan-only --nsamples 128 --seqlen 2048 \
        --max-ram 16GB --max-vram 12GB --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTHS = {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40), "65b": (8192, 22016, 64)}
# MoE block shapes (the models' config.json values): config class, fields, the field holding the expert count.
# --experts N keeps the widths but builds N routed experts per block (a full DeepSeek-V3 block is 11 B
# parameters); --plan-only writes sparse files (headers, no data) and prints `streamq plan` for the budgets.
MOE_WIDTHS = {
    "mixtral-8x7b": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                           num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
                     "num_local_experts"),
    "qwen3-235b-a22b": ("Qwen3MoeConfig", dict(hidden_size=4096, moe_intermediate_size=1536, intermediate_size=12288,
                                               num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                                               num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                                               mlp_only_layers=[], norm_topk_prob=True), "num_experts"),
    "deepseek-v3": ("DeepseekV3Config", dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                                             num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
                                             n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=0,
                                             n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512,
                                             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
                    "n_routed_experts"),
}

CHILD = """
import json, sys, time
from streamq.memstat import peak_rss_bytes
import streamq
model, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = dict(nsamples=int(sys.argv[4]), seqlen=int(sys.argv[5]), calib=model + "/calib.txt", group_size=128,
          progress=False, **json.loads(sys.argv[6]))
plan = streamq.plan(model, max_ram=budget, **kw)
start = time.perf_counter()
streamq.compress(model, out, max_ram=budget, **kw)
report = json.load(open(out + "/streamq_report.json"))
print(json.dumps({"peak": peak_rss_bytes(), "plan": plan.to_dict(),
                  "block_seconds": [b["seconds"] for b in report["blocks"].values()],
                  "io_wait_seconds": report["io_wait_seconds_total"], "peak_vram": report["peak_vram_bytes"],
                  "seconds": time.perf_counter() - start}))
"""


def write_model(folder: Path, hidden: int, inter: int, heads: int, n_blocks: int) -> Path:
    """A random-weight fp16 Llama (tied nothing, vocab from a small trained tokenizer), one shard per block."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tests.conftest import make_tokenizer, sample_text

    folder.mkdir(parents=True)
    tok = make_tokenizer()
    tok.save_pretrained(folder)
    (folder / "calib.txt").write_text(sample_text(), encoding="utf-8")
    vocab = len(tok)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n_blocks,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    config.dtype = torch.float16
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, std):  # one fp32 tensor at a time, then fp16
        return (torch.randn(*shape, generator=gen) * std).half()

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    n = n_blocks + 1
    weight_map = {}
    for i in range(n_blocks):
        p = f"model.layers.{i}."
        tensors = {p + name + ".weight": rand(*s, std=s[1] ** -0.5) for name, s in shapes.items()}
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.float16)
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    rest = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0), "lm_head.weight": rand(vocab, hidden, std=0.02),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(rest, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_moe_model(folder: Path, width: str, n_blocks: int, experts: int | None, sparse: bool = False) -> Path:
    """A random-weight fp16 MoE model of MOE_WIDTHS[width], one shard per block, experts saved one tensor per
    expert (transformers' own save-time conversion, run on the meta skeleton for the names and shapes).
    sparse: only the safetensors headers, the data a hole (for `streamq plan`, which reads headers alone)."""
    import struct

    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from tests.conftest import make_tokenizer, sample_text

    name, fields, count = MOE_WIDTHS[width]
    folder.mkdir(parents=True)
    tok = make_tokenizer()
    tok.save_pretrained(folder)
    (folder / "calib.txt").write_text(sample_text(), encoding="utf-8")
    config = getattr(transformers, name)(**{**fields, **({count: experts} if experts else {})}, vocab_size=len(tok),
                                         num_hidden_layers=n_blocks, max_position_embeddings=4096,
                                         tie_word_embeddings=False)
    config.dtype = torch.float16
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  revert_weight_conversion(AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(
                      config).state_dict()).items()}
    gen = torch.Generator().manual_seed(0)
    n = n_blocks + 1
    weight_map = {}
    for i in range(n):
        prefix = f"model.layers.{i}."
        names = [k for k in shapes if k.startswith(prefix)] if i < n_blocks else \
            [k for k in shapes if not k.startswith("model.layers.")]
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        if sparse:  # header: name -> dtype, shape, offsets; then a hole of the data's size
            header, offset = {}, 0
            for k in names:
                size = 2 * int(torch.Size(shapes[k]).numel())
                header[k] = {"dtype": "F16", "shape": list(shapes[k]), "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            with open(folder / fname, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + offset)
        else:
            tensors = {k: torch.ones(shapes[k], dtype=torch.float16) if len(shapes[k]) == 1 else
                       (torch.randn(*shapes[k], generator=gen) * shapes[k][-1] ** -0.5).half() for k in names}
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            del tensors
        weight_map.update(dict.fromkeys(names, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def run(model: Path, out: Path, budget: int, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), str(budget), str(a.nsamples),
                        str(a.seqlen), json.dumps(a.gpu)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"compress of {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plan_moe(model: Path, a: argparse.Namespace) -> None:
    """Print `streamq plan` of model under --max-ram / --max-vram (--device as given; --device cuda where torch
    sees no GPU: the planner's footprint model evaluated for a CUDA device in bfloat16, see plan_as_cuda)."""
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        return plan_as_cuda(model, a)
    args = [sys.executable, "-m", "streamq.cli", "plan", str(model), "--nsamples", str(a.nsamples), "--seqlen",
            str(a.seqlen), "--no-benchmark", "--device", a.device]
    args += ["--max-ram", str(a.max_ram)] if a.max_ram else []
    args += ["--max-vram", str(a.max_vram)] if a.max_vram else []
    r = subprocess.run(args, capture_output=True, text=True)
    print(f"$ streamq plan {model.name} ... (exit {r.returncode})\n{r.stdout}{r.stderr}")


def plan_as_cuda(model: Path, a: argparse.Namespace) -> None:
    """streamq.footprint's prediction for model on a CUDA device in bfloat16 (no GPU needed: it is arithmetic
    on the shapes), with the blocks that do not fit --max-vram planned on the CPU as the planner does."""
    import psutil
    import torch

    from streamq import footprint
    from streamq.config import QuantConfig
    from streamq.io.blocks import build_layout
    from streamq.io.checkpoint import Checkpoint
    from streamq.options import RunOptions

    ckpt = Checkpoint(model)
    cfg, opts = QuantConfig(group_size=128), RunOptions(nsamples=a.nsamples, seqlen=a.seqlen)
    f = footprint.facts(build_layout(ckpt), ckpt, cfg, torch.bfloat16, opts)
    p = footprint.predict(f, "gptq", a.seqlen, torch.device("cuda"), "disk", psutil.Process().memory_info().rss,
                          a.max_vram)
    GB = 10**9
    print(f"$ footprint of {model.name} on cuda in bfloat16, {a.nsamples} x {a.seqlen} tokens, offload disk, "
          f"--max-vram {a.max_vram / GB if a.max_vram else 0:.1f} GB (no GPU here: the planner's model alone)")
    for i, (b, (peak, on)) in enumerate(zip(f["blocks"], p["blocks"])):
        print(f"  block {i}: weights {b['weight_bytes'] / GB:.2f} GB, peak {peak / GB:.2f} GB on {on}")
    print(f"  peak RAM {p['ram'] / GB:.2f} GB, peak VRAM {p['vram'] / GB:.2f} GB, peak disk {p['disk'] / GB:.2f} GB")


def main() -> None:
    import psutil

    from streamq.cli import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="7b", help=f"comma-separated of {', '.join(WIDTHS)} or hidden/inter/heads")
    p.add_argument("--blocks", default="2,8", help="block counts per width, comma-separated")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-ram", type=parse_size, default=None, help="budget (default: RAM available now)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    p.add_argument("--work", type=Path, default=None, help="folder for models and outputs (default: temp)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--max-vram", type=parse_size, default=None, help="VRAM budget for --device cuda/auto")
    p.add_argument("--experts", type=int, default=None, help=f"MoE widths ({', '.join(MOE_WIDTHS)}): routed "
                   "experts per block (default: the model's)")
    p.add_argument("--plan-only", action="store_true", help="MoE widths: print `streamq plan` for the budgets "
                   "(sparse files: headers only) instead of compressing")
    a = p.parse_args()
    a.gpu = {"device": a.device, **({"max_vram": a.max_vram} if a.max_vram else {})}
    budget = a.max_ram or psutil.virtual_memory().available
    GB = 10**9
    rows = []
    work = Path(tempfile.mkdtemp(prefix="streamq-bench-memory-", dir=a.work))
    try:
        for width in a.widths.split(","):
            moe = width in MOE_WIDTHS
            hidden, inter, heads = (0, 0, 0) if moe else WIDTHS.get(width) or map(int, width.split("/"))
            for n in map(int, a.blocks.split(",")):
                if moe and a.plan_only:
                    plan_moe(write_moe_model(work / f"{width}-{n}", width, n, a.experts, sparse=True), a)
                    continue
                model = write_moe_model(work / f"{width}-{n}", width, n, a.experts) if moe else \
                    write_model(work / f"{width}-{n}", hidden, inter, heads, n)
                got = run(model, work / f"{width}-{n}-out", budget, a)
                shutil.rmtree(work / f"{width}-{n}")
                shutil.rmtree(work / f"{width}-{n}-out")
                plan = got["plan"]
                per_block = sum(got["block_seconds"]) / n
                io_share = got["io_wait_seconds"] / max(sum(got["block_seconds"]), 1e-9)
                label = f"{width} ({hidden}/{inter}/{heads})" if width in WIDTHS else width
                if moe:
                    label = f"{width} ({a.experts or 'all'} experts)"
                rows.append(f"| {label} | {n} | {got['peak'] / GB:.2f} GB "
                            f"| {plan['peak_ram_bytes'] / GB:.2f} GB | {got['peak'] / plan['peak_ram_bytes']:.2f} "
                            f"| {plan['baseline_rss_bytes'] / GB:.2f} GB | {plan['offload']} | {per_block:.0f} "
                            f"| {plan['estimate_seconds'] / n:.0f} | {100 * io_share:.1f}% "
                            f"| {got['peak_vram'] / GB:.2f} GB | {got['seconds']:.0f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"GPTQ w4 g128, {a.nsamples} samples x {a.seqlen} tokens, --device {a.device}, --max-ram "
          f"{budget / GB:.1f} GB{f', --max-vram {a.max_vram / GB:.1f} GB' if a.max_vram else ''}, "
          f"OMP_NUM_THREADS={a.threads or 'default'}\n")
    print("| width (hidden/inter/heads) | blocks | peak RSS | predicted | measured/predicted | baseline | offload "
          "| s/block | s/block estimated | IO wait | peak VRAM | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
