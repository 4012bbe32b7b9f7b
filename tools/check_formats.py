"""Every output format in the client that deploys it, on a real model: compress (RTN, data-free, or reuse
finished folders), export compressed-tensors and GGUF, and compare each client's logits with streamq.load on
the first --tokens tokens of --data. The README's compatibility table comes from this script and
tests/test_formats.py.

    python tools/check_formats.py ~/.cache/streamq/SmolLM2-135M-Instruct --data ../shared/data/austen-test.txt \
        --work /tmp/formats-check [--grids w4g64-sym,w4g32-asym,w4g32-full-range,w8-sym]

Clients: transformers + compressed-tensors (direct; and dequantize=True, the path asym needs), the gguf
package's dequantization of the GGUF tensors (llama.cpp's block formats; llama.cpp itself:
tools/check_llamacpp.py), and transformers + gptqmodel (torch backend) when gptqmodel and optimum import.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

GRIDS = {
    "w4g64-sym": dict(bits=4, group_size=64),
    "w4g32-asym": dict(bits=4, group_size=32, sym=False),
    "w4g32-full-range": dict(bits=4, group_size=32, full_range=True),
    "w8-sym": dict(bits=8, group_size=64),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True, help="folder for the outputs")
    p.add_argument("--grids", default=",".join(GRIDS))
    p.add_argument("--tokens", type=int, default=383)
    args = p.parse_args()

    import gguf
    import streamq
    from streamq.formats.export import export
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    ids = AutoTokenizer.from_pretrained(args.model)(Path(args.data).read_text(), return_tensors="pt").input_ids
    ids = ids[:, : args.tokens]

    def run(model):
        with torch.no_grad():
            logits = model(ids).logits.float()
        return logits, math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())

    rows = []
    for grid in args.grids.split(","):
        out = Path(args.work) / grid
        streamq.compress(args.model, out, method="rtn", formats="gptq,compressed-tensors", progress=False,
                         **GRIDS[grid])
        ref, ref_ppl = run(streamq.load(out))
        ct = out / "compressed-tensors"
        clients = {"transformers + compressed-tensors (direct)": {},
                   "transformers + compressed-tensors, dequantize=True": dict(
                       quantization_config=CompressedTensorsConfig(dequantize=True))}
        for client, kw in clients.items():
            try:
                logits, ppl = run(AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32, **kw))
                rows.append((grid, client, "yes", f"{(logits - ref).abs().max().item():.4f}",
                             f"{ppl:.3f} / {ref_ppl:.3f}"))
            except Exception as e:  # noqa: BLE001  (a client's failure is a row of the table)
                rows.append((grid, client, f"no: {type(e).__name__}", "-", "-"))
        try:
            import gptqmodel  # noqa: F401
            from transformers import GPTQConfig

            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                         quantization_config=GPTQConfig(bits=GRIDS[grid]["bits"],
                                                                                        backend="torch"))
            logits, ppl = run(model)
            rows.append((grid, "transformers + gptqmodel 7.6 (torch backend)", "yes",
                         f"{(logits - ref).abs().max().item():.4f}", f"{ppl:.3f} / {ref_ppl:.3f}"))
        except ImportError:
            pass
        if GRIDS[grid]["bits"] in (4, 8):
            path = next(export(out, "gguf", Path(args.work) / f"{grid}-gguf").glob("*.gguf"))
            exact, worst, n = 0, 0.0, 0
            model = streamq.load(out)
            by_name = {f"blk.{i}.{g}.weight": layer.get_submodule(h) for i, layer in enumerate(model.model.layers)
                       for h, g in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                                    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                                    ("mlp.down_proj", "ffn_down"))}  # q/k: row-permuted, checked in the tests
            for t in gguf.GGUFReader(path).tensors:
                if t.name in by_name:
                    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                    diff = (w - by_name[t.name].dequantized_weight()).abs().max().item()
                    exact += diff == 0
                    worst, n = max(worst, diff), n + 1
            rows.append((grid, f"gguf {path.stem.split('-')[-1]} (gguf.quants dequantize)", "-",
                         f"weights bit-exact {exact}/{n}, max err {worst:.2g}", "-"))
    print("| grid | client | loads | max abs logit diff | ppl client / streamq |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
