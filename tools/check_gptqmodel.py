"""Load a streamq GPTQ folder in transformers through gptqmodel's torch backend and compare its logits with
streamq.load on real text (not in CI: gptqmodel 7.6 + optimum pull datasets/pandas/pyarrow/torchao and
another numpy; they installed as wheels in ~80 s here with torch 2.13).

    pip install "gptqmodel==7.6.*" optimum torch==2.13.0
    python tools/check_gptqmodel.py OUT --data ../shared/data/austen-test.txt --tokens 383
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a streamq output folder in the gptq layout")
    p.add_argument("--data", required=True, help="text file; its first --tokens tokens are scored")
    p.add_argument("--tokens", type=int, default=383)
    args = p.parse_args()

    import json

    import streamq
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    bits = json.load(open(f"{args.out}/config.json"))["quantization_config"]["bits"]
    ids = AutoTokenizer.from_pretrained(args.out)(open(args.data).read(), return_tensors="pt").input_ids
    ids = ids[:, : args.tokens]
    ours = streamq.load(args.out)
    theirs = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32, device_map="cpu",
                                                  quantization_config=GPTQConfig(bits=bits, backend="torch"))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits

    def ppl(logits):
        return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])).item()

    print(f"gptqmodel {type(theirs.model.layers[0].self_attn.q_proj).__name__}: max |logit diff| "
          f"{(a - b).abs().max().item():.4f}, perplexity gptqmodel {ppl(b):.3f} / streamq {ppl(a):.3f}")


if __name__ == "__main__":
    main()
