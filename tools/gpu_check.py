"""The GPU check of issue 17 in one run (<= 9 minutes on an H100/H200, no network): writes gpu_check.json and
gpu_check.md to --out (default $OUT, else ./gpu_check_out).

1. tests: the gpu-marked tests and the kernel tests, compiled (not interpreted), through pytest;
2. kernels: GPTQ int4 g128 (and int8) fused dequant-matmul vs dequantize-then-matmul vs an fp16 matmul, for
   4096x4096, 8192x8192 and 28672x8192 ([out, in]) at batch 1 and 16, correctness against the torch reference
   first, with a few launch configs timed; the SpQR near-lossless matvec vs fp16 at 8192x8192;
3. block65b: one LLaMA-65B-width block (hidden 8192, MLP 22016, random fp16 weights) compressed with GPTQ on
   64 x 2048 calibration tokens under --max-vram 12GB --max-ram 16GB: peak VRAM, peak RSS, s/block, IO-wait share;
4. model7b: a 7B-width (4096 / 11008) 32-block random model end to end under --max-vram 8GB: time, peak VRAM.
Sections 3 and 4 run `streamq.compress` in a child process (its ru_maxrss is the peak RSS). A section that fails
records its error and the next one runs; one that would start past --budget-s is recorded as skipped.

zarr and its needs travel as wheels (the rest is in the GPU image): `sh tools/gpu_wheels.sh` here fetches them
into .whl/ (~10 MB); then one device run, carrying ".whl", timeout 600:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py     # installs this checkout (-e, offline) if it is not

--cpu-smoke runs every section at toy sizes on the CPU in seconds (the torch references stand in for the
kernels), so the script itself is tested (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GB = 10**9
FULL = {
    "kernel_shapes": [(4096, 4096), (8192, 8192), (28672, 8192)], "batches": [1, 16], "spqr_shape": (8192, 8192),
    "block65b": dict(hidden=8192, inter=22016, heads=64, kv_heads=64, n_layers=1, nsamples=64, seqlen=2048,
                     max_vram="12GB", max_ram="16GB"),
    "model7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, n_layers=32, nsamples=32, seqlen=2048,
                    max_vram="8GB"),
}
SMOKE = {
    "kernel_shapes": [(256, 256)], "batches": [1, 16], "spqr_shape": (64, 256),
    "block65b": dict(hidden=64, inter=128, heads=4, kv_heads=4, n_layers=1, nsamples=4, seqlen=32,
                     max_vram=None, max_ram="16GB"),
    "model7b": dict(hidden=64, inter=128, heads=4, kv_heads=4, n_layers=2, nsamples=4, seqlen=32, max_vram=None),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    p.add_argument("--budget-s", type=float, default=470,
                   help="no section starts after this many seconds; one in flight is stopped 50 s later")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (tests the script)")
    p.add_argument("--sections", default="tests,kernels,block65b,model7b")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (use --cpu-smoke to test the script on the CPU)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    problem = ensure_streamq()
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    sizes = {**(SMOKE if smoke else FULL), "deadline": start + args.budget_s + 50}
    device = "cpu" if smoke else "cuda"
    report = {"mode": "cpu-smoke" if smoke else "gpu", "device": _device_name(device), "torch": torch.__version__,
              "triton": _version("triton"), "sections": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=None if smoke else "/tmp") as tmp:
        for name in args.sections.split(","):
            if time.perf_counter() - start > args.budget_s:
                report["sections"][name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
                continue
            t0 = time.perf_counter()
            try:
                result = SECTIONS[name](sizes, device, Path(tmp), smoke)
            except Exception as e:  # recorded; the next section still runs
                result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"}
            result["section_seconds"] = round(time.perf_counter() - t0, 2)
            report["sections"][name] = result
            _write(args.out, report)  # after every section: a run killed at its limit keeps what it measured
            print(f"gpu_check: {name} done in {result['section_seconds']} s", flush=True)
    report["total_seconds"] = round(time.perf_counter() - start, 2)
    _write(args.out, report)
    return 0


def ensure_streamq() -> str | None:
    """Install this checkout (editable, no dependencies, offline) when streamq.kernels is not importable: the
    child processes and pytest import streamq as installed. Returns what is still missing, or None."""
    try:
        import zarr  # noqa: F401
    except ImportError:
        return "zarr is not installed: carry its wheels (see this script's docstring)"
    try:
        import streamq.kernels  # noqa: F401
        return None
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--no-build-isolation", "-e", str(ROOT)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"pip install -e {ROOT} failed: {_last_line(r.stderr)}"


def run_tests(sizes, device, tmp: Path, smoke: bool) -> dict:
    """pytest on the gpu-marked tests and the kernel test files (compiled on the GPU: no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--junitxml", str(tmp / "j.xml")]
    cmd += ["-m", "gpu", "tests/test_device.py"] if smoke else [
        "tests/test_kernels_gptq.py", "tests/test_kernels_spqr.py", "tests/test_device.py", "tests/test_16bit.py"]
    left = lambda: max(30.0, sizes["deadline"] - time.perf_counter())  # noqa: E731
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left())
    out = {"command": " ".join(cmd[1:]), "exit_code": r.returncode, "summary": _last_line(r.stdout)}
    if not smoke:  # the gpu-marked tests of the whole suite
        cmd2 = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
        r2 = subprocess.run(cmd2, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left())
        out.update(gpu_marked_exit_code=r2.returncode, gpu_marked_summary=_last_line(r2.stdout))
        if r2.returncode:
            out["gpu_marked_tail"] = r2.stdout[-3000:]
    if r.returncode:
        out["tail"] = r.stdout[-3000:]
    return out


def kernels(sizes, device, tmp: Path, smoke: bool) -> dict:
    """Correctness against the torch reference, then median times (ms) and speedups of the GPTQ and SpQR kernels."""
    import torch.nn.functional as F

    from streamq.kernels import gptq, spqr
    from streamq.kernels.launch import use_triton

    results = {"gptq": [], "spqr": None, "compiled": use_triton(torch.empty(1, device=device))}
    for out_f, in_f in sizes["kernel_shapes"]:
        for bits in (4, 8):
            t = random_gptq(out_f, in_f, bits, 128, device)
            W16 = gptq.gptq_dequantize(t, bits, torch.float16)
            for m in sizes["batches"]:
                x = torch.randn(m, in_f, device=device, dtype=torch.float16)
                ref = gptq.matmul_reference(x.float(), t, bits)
                y = gptq.gptq_linear(x, t, bits)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                row = {"out": out_f, "in": in_f, "bits": bits, "group": 128, "batch": m, "rel_error": err,
                       "fused_ms": _time(lambda: gptq.gptq_linear(x, t, bits), device),
                       "dequant_matmul_ms": _time(lambda: F.linear(x, gptq.gptq_dequantize(t, bits, x.dtype)), device),
                       "fp16_matmul_ms": _time(lambda: F.linear(x, W16), device)}
                if not smoke and bits == 4:  # a few launch configs: (BLOCK_N, BLOCK_K, num_warps)
                    row["configs_ms"] = {str(c): _time(lambda c=c: gptq.gptq_linear(x, t, bits, config=c), device)
                                         for c in [(32, 128, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]}
                row["speedup_vs_fp16"] = row["fp16_matmul_ms"] / row["fused_ms"]
                row["speedup_vs_dequant"] = row["dequant_matmul_ms"] / row["fused_ms"]
                results["gptq"].append(row)
    out_f, in_f = sizes["spqr_shape"]
    tensors, cfg = random_spqr(out_f, in_f, device)
    x = torch.randn(in_f, device=device, dtype=torch.float16)
    ref = spqr.matvec_reference(x.float(), tensors, cfg)
    y = spqr.spqr_matvec(x, tensors, cfg)
    W16 = spqr.spqr_dequantize(tensors, cfg, torch.float16)
    row = {"out": out_f, "in": in_f, "config": "near-lossless (4-bit, g16, 3-bit stats, 1% outliers)",
           "rel_error": ((y.float() - ref).norm() / ref.norm()).item(),
           "matvec_ms": _time(lambda: spqr.spqr_matvec(x, tensors, cfg), device),
           "fp16_matvec_ms": _time(lambda: W16 @ x, device)}
    row["speedup_vs_fp16"] = row["fp16_matvec_ms"] / row["matvec_ms"]
    results["spqr"] = row
    return results


def block65b(sizes, device, tmp: Path, smoke: bool) -> dict:
    return compress_random(tmp / "b65", sizes["block65b"], device, smoke, sizes["deadline"])


def model7b(sizes, device, tmp: Path, smoke: bool) -> dict:
    return compress_random(tmp / "m7", sizes["model7b"], device, smoke, sizes["deadline"])


SECTIONS = {"tests": run_tests, "kernels": kernels, "block65b": block65b, "model7b": model7b}

CHILD = """
import json, sys, time
from streamq.memstat import peak_rss_bytes
import streamq
from streamq.cli import parse_size
src, out, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for k in ("max_vram", "max_ram"):
    if kw.get(k):
        kw[k] = parse_size(kw[k])
start = time.perf_counter()
streamq.compress(src, out, **kw)
print(json.dumps({"wall_seconds": time.perf_counter() - start,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def compress_random(folder: Path, shape: dict, device: str, smoke: bool, deadline: float) -> dict:
    """A random llama of the given widths, compressed with GPTQ (4-bit, g128) in a child process (killed at
    deadline, a perf_counter time); its figures."""
    t0 = time.perf_counter()
    src = random_llama(folder / "src", shape, device)
    made = time.perf_counter() - t0
    kw = dict(method="gptq", bits=4, group_size=32 if smoke else 128, nsamples=shape["nsamples"],
              seqlen=shape["seqlen"], calib=f"{ROOT / 'streamq' / 'data' / 'calib.txt'}:concat=True",
              device=device, progress=False, max_vram=shape.get("max_vram"), max_ram=shape.get("max_ram"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if smoke else None  # toy sizes: threads only add hand-offs
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(folder / "out"), json.dumps(kw)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=max(30.0, deadline - time.perf_counter()))
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1][:500], "arguments": kw}
    child = json.loads(r.stdout.strip().splitlines()[-1])
    report = json.loads((folder / "out" / "streamq_report.json").read_text())
    blocks = report["blocks"]
    seconds = report["seconds_total"]
    return {"arguments": kw, "model": shape, "make_model_seconds": round(made, 1),
            "wall_seconds": round(child["wall_seconds"], 2), "seconds_per_block": seconds / len(blocks),
            "io_wait_share": report["io_wait_seconds_total"] / max(seconds, 1e-9),
            "peak_vram_bytes": report["peak_vram_bytes"], "peak_rss_bytes": child["peak_rss_bytes"],
            "peak_vram_per_block": [b.get("peak_vram_bytes", 0) for b in blocks.values()],
            "mean_layer_error": report["mean_layer_error"], "options": report["options"]}


def random_llama(folder: Path, shape: dict, device: str) -> Path:
    """A llama folder with random fp16 weights (std 0.02, norms 1), one shard per block, a small trained BPE
    tokenizer (tests/conftest.py's) and the shipped calibration text; weights drawn on `device`."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tests.conftest import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    h, inter, n = shape["hidden"], shape["inter"], shape["n_layers"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=gen, device=device, dtype=torch.float16) * 0.02).cpu()

    head_dim = h // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    weight_map = {}
    for i in range(n):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
             p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
             p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
             p + "mlp.down_proj.weight": rand(h, inter),
             p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
             p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
        name = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
        del t
    rest = {"model.embed_tokens.weight": rand(len(tok), h), "model.norm.weight": torch.ones(h, dtype=torch.float16),
            "lm_head.weight": rand(len(tok), h)}
    name = f"model-{n + 1:05d}-of-{n + 1:05d}.safetensors"
    save_file(rest, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False)
    config.dtype = torch.float16
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_gptq(out_f: int, in_f: int, bits: int, gs: int, device: str) -> dict:
    """Packed GPTQ tensors of random codes (any int32 word is valid codes), scales ~1e-3, static groups."""
    g = torch.Generator(device=device).manual_seed(out_f + in_f + bits)
    G = in_f // gs

    def words(*s):
        return torch.randint(-2**31, 2**31 - 1, s, generator=g, device=device, dtype=torch.int64).to(torch.int32)

    return {"qweight": words(in_f * bits // 32, out_f), "qzeros": words(G, out_f * bits // 32),
            "scales": (torch.rand(G, out_f, generator=g, device=device) * 2e-3 + 1e-4).half(),
            "g_idx": (torch.arange(in_f, device=device, dtype=torch.int32) // gs)}


def random_spqr(out_f: int, in_f: int, device: str):
    """Random tensors in the SpQR layout of the near-lossless preset, 1% outliers: (tensors, cfg)."""
    from streamq.config import PRESETS, QuantConfig
    from streamq.formats.spqr import packed_shapes

    preset = {k: v for k, v in PRESETS["spqr"]["near-lossless"].items() if k != "nsamples"}
    cfg = QuantConfig(method="spqr", **preset)
    per_row = max(1, in_f // 100)
    g = torch.Generator(device=device).manual_seed(1)
    t = {}
    for name, (shape, dtype) in packed_shapes(out_f, in_f, cfg, out_f * per_row).items():
        if dtype == torch.int32:
            t[name] = torch.randint(-2**31, 2**31 - 1, shape, generator=g, device=device,
                                    dtype=torch.int64).to(torch.int32)
        else:
            t[name] = (torch.rand(shape, generator=g, device=device) * 1e-3 + 1e-4).to(dtype)
    t["perm"] = torch.randperm(in_f, generator=g, device=device).to(torch.int32)
    t["outlier_row_ptr"] = torch.arange(out_f + 1, device=device, dtype=torch.int32) * per_row
    cols = torch.rand(out_f, in_f, generator=g, device=device).argsort(dim=1)[:, :per_row].sort(dim=1).values
    t["outlier_col"] = cols.reshape(-1).to(torch.int16)  # in_f <= 32768: the uint16 pattern is the value
    return t, cfg


def _time(fn, device: str, iters: int = 50) -> float:
    """Median milliseconds of fn() over iters calls after warm-up (CUDA events on the GPU)."""
    for _ in range(3 if device == "cpu" else 10):
        fn()
    if device == "cpu":
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def _write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The report as a short markdown page: one table per kernel family, one line per compression."""
    s = report["sections"]
    lines = [f"# streamq gpu_check ({report['mode']})", "", f"device: {report['device']}; torch {report['torch']}; "
             f"triton {report['triton']}", ""]
    t = s.get("tests", {})
    if t:
        lines += [f"tests: {t.get('summary', t.get('error', t.get('skipped')))}"
                  + (f"; gpu-marked: {t['gpu_marked_summary']}" if "gpu_marked_summary" in t else ""), ""]
    k = s.get("kernels", {})
    if "gptq" in k:
        lines += ["| GPTQ [out, in] | bits | batch | fused ms | dequant+matmul ms | fp16 ms | x fp16 | rel err |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['out']}x{r['in']} | {r['bits']} | {r['batch']} | {r['fused_ms']:.4f} | "
                  f"{r['dequant_matmul_ms']:.4f} | {r['fp16_matmul_ms']:.4f} | {r['speedup_vs_fp16']:.2f} | "
                  f"{r['rel_error']:.1e} |" for r in k["gptq"]]
        r = k["spqr"]
        lines += ["", f"SpQR matvec {r['out']}x{r['in']}: {r['matvec_ms']:.4f} ms vs fp16 {r['fp16_matvec_ms']:.4f} ms "
                  f"(x{r['speedup_vs_fp16']:.2f}), rel err {r['rel_error']:.1e}", ""]
    elif k:
        lines += [f"kernels: {k}", ""]
    for name in ("block65b", "model7b"):
        r = s.get(name)
        if r is None:
            continue
        if "peak_vram_bytes" in r:
            lines.append(f"{name}: {r['seconds_per_block']:.1f} s/block, wall {r['wall_seconds']:.0f} s, peak VRAM "
                         f"{r['peak_vram_bytes'] / GB:.2f} GB, peak RSS {r['peak_rss_bytes'] / GB:.2f} GB, IO wait "
                         f"{100 * r['io_wait_share']:.1f}% ({r['arguments']['nsamples']}x{r['arguments']['seqlen']} "
                         f"tokens, max_vram {r['arguments']['max_vram']}, max_ram {r['arguments']['max_ram']})")
        else:
            lines.append(f"{name}: {r.get('error', r.get('skipped'))}")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
