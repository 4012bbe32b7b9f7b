"""GGUF export for llama.cpp / ollama: one .gguf file written with the `gguf` package's writer, tensor by tensor.

Exact where llama.cpp's block types hold streamq's grid (32 weights per block, one fp16 scale d each;
groups that are multiples of 32, or one group per row, repeat their scale in every 32-block):
  4 bits, symmetric (GPTQ or full-range grid, zero 8) -> Q4_0: w = d * (q - 8), q = streamq's code: bit-exact
  8 bits, symmetric (zero 128)                        -> Q8_0: w = d * (q - 128) as int8: bit-exact
  4 bits, asymmetric, zero z                          -> Q4_1: w = d * q + m with m = fp16(-d * z): exact
      where -d*z is an fp16 number, otherwise off by the rounding of m, |error| <= ulp16(m) / 2 per weight
Everything else (2/3 bits: the K-quants quantize their scales; 8-bit asym: Q8_0 has no zero; act-order
without static groups: GGUF has no g_idx; groups not a multiple of 32; SpQR) is refused with one line.
Norms are F32, embeddings and output head Q8_0 (llama.cpp's own rounding, gguf.quants) or F16.
Tensor names come from gguf's TensorNameMap; for llama/mistral, q_proj / k_proj rows are permuted the way
llama.cpp's convert_hf_to_gguf.py does (interleaved rotary halves), which moves whole rows: still exact.
"""
from __future__ import annotations

import numpy as np
import torch

from streamq.errors import StreamqError
from streamq.quant.actquant import refuse_activation_quant
from streamq.formats.gptq import GPTQTensors

NAME = "gguf"
ARCHES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}  # model_type -> MODEL_ARCH
PERMUTE_QK = {"llama", "mistral"}  # llama.cpp's LLAMA arch uses interleaved rotary (normal rope), not NEOX
HEAD_TYPES = ("q8_0", "f16")


def check(cfg) -> None:
    refuse_activation_quant(cfg, "gguf")  # only compressed-tensors describes it (quant/actquant.py)
    if cfg.method == "spqr":
        raise StreamqError("--format gguf: SpQR's outliers and second-level statistics have no GGUF type")
    if (cfg.bits, cfg.sym) not in ((4, True), (4, False), (8, True)):
        raise StreamqError(f"--format gguf maps only 4-bit (Q4_0 / Q4_1) and symmetric 8-bit (Q8_0) grids exactly, "
                           f"not {cfg.bits}-bit {'sym' if cfg.sym else 'asym'} (llama.cpp's K-quants quantize "
                           "their scales)")
    if cfg.act_order and not cfg.static_groups and cfg.group_size != -1:
        raise StreamqError("--format gguf has no g_idx: use --act-order with --static-groups")
    if cfg.group_size != -1 and cfg.group_size % 32:
        raise StreamqError(f"--format gguf: --group-size {cfg.group_size} is not a multiple of llama.cpp's 32-weight "
                           "blocks")


def quant_type(cfg):
    import gguf

    if cfg.bits == 8:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.Q4_0 if cfg.sym else gguf.GGMLQuantizationType.Q4_1


def ggml_blocks(t: GPTQTensors, cfg) -> np.ndarray:
    """One Linear's codes and statistics (groups in column order) -> uint8 [out, in/32 * block bytes], the
    ggml block layout of quant_type(cfg): fp16 d (Q4_1: then fp16 m), then the codes (Q4: byte j holds weight
    j in its low nibble and weight j + 16 in its high nibble; Q8_0: int8 q - 128)."""
    out_features, in_features = t.codes.shape
    if in_features % 32:
        raise StreamqError(f"--format gguf: in_features {in_features} is not a multiple of 32")
    G = t.scales.shape[0]
    per_group = in_features // G // 32  # 32-blocks per group
    d = t.scales.t().repeat_interleave(per_group, 1).half()  # [out, nb]
    codes = t.codes.to(torch.int32).reshape(out_features, -1, 32)
    parts = [d.view(torch.uint8).reshape(out_features, -1, 2)]
    if cfg.bits == 8:
        parts.append((codes - 128).to(torch.int8).view(torch.uint8))
    else:
        if not cfg.sym:
            z = t.zeros.t().repeat_interleave(per_group, 1).float()
            m = (-d.float() * z).half()
            parts.append(m.view(torch.uint8).reshape(out_features, -1, 2))
        parts.append((codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8))
    return torch.cat(parts, dim=2).reshape(out_features, -1).numpy()


def qk_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives a q_proj / k_proj weight of `rows` rows in n_head heads: each
    head's two rotary halves interleaved (its `permute`), as an index: new row i = old row perm[i]."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def permute_rows(t: GPTQTensors, perm: torch.Tensor) -> GPTQTensors:
    return GPTQTensors(t.codes[perm], t.scales[:, perm], t.zeros[:, perm], t.g_idx)


def export(ckpt, source, cfg, out, head_type: str = "q8_0"):
    """Write ckpt (a finished folder in layout format `source`) as out/model-<type>.gguf, one tensor at a time."""
    import gguf

    from streamq.formats.export import quantized_stems

    if head_type not in HEAD_TYPES:
        raise StreamqError(f"--head-type {head_type!r}: choose {' or '.join(HEAD_TYPES)}")
    config = ckpt.config
    model_type = config["model_type"]
    if model_type not in ARCHES:
        raise StreamqError(f"--format gguf: model_type {model_type!r} is not one streamq maps to llama.cpp "
                           f"({', '.join(ARCHES)})")
    if config.get("rope_scaling"):
        raise StreamqError("--format gguf: rope_scaling is not mapped yet (llama.cpp needs its own keys for it)")
    arch = getattr(gguf.MODEL_ARCH, ARCHES[model_type])
    n_blocks, src_cfg = config["num_hidden_layers"], ckpt.quant_format[1]
    names = gguf.get_tensor_name_map(arch, n_blocks)
    qtype = quant_type(cfg)
    path = out / f"model-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(writer, config, ckpt.folder, qtype)
    stems = set(quantized_stems(ckpt, source))
    plan = []  # (gguf name, source name, kind) in file order
    for name in sorted(ckpt.names()):
        stem = name.rsplit(".", 1)[0] + "."
        if stem in stems and not name.endswith(".bias"):
            if name.endswith("." + source.tensor_names(src_cfg)[0]):
                plan.append((names.get_name(stem + "weight", try_suffixes=(".weight",)), stem, "linear"))
        else:
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise StreamqError(f"--format gguf: no llama.cpp name for tensor {name}")
            kind = "head" if name.endswith(("embed_tokens.weight", "lm_head.weight")) else "f32"
            plan.append((gname, name, kind))
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])

    def tensor(name, kind):
        """(array, raw type or None) of one output tensor."""
        if kind == "linear":
            t = source.unpack({k: ckpt.get(name + k) for k in source.tensor_names(src_cfg)}, src_cfg)
            if model_type in PERMUTE_QK and name.endswith(("q_proj.", "k_proj.")):
                t = permute_rows(t, qk_permutation(t.codes.shape[0], n_head if "q_proj" in name else n_kv))
            return ggml_blocks(t, cfg), qtype
        w = ckpt.get(name).float()
        if model_type in PERMUTE_QK and name.endswith(("q_proj.bias", "k_proj.bias")):
            w = w[qk_permutation(w.shape[0], n_head if "q_proj" in name else n_kv)]
        if kind == "head" and head_type == "q8_0" and w.shape[-1] % 32 == 0:  # as info() decides
            return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        if kind == "head":
            return w.half().numpy(), None
        return w.numpy(), None

    def info(name, kind):
        """(shape, numpy dtype, bytes, raw type) of one output tensor, from the headers alone."""
        if kind == "linear":
            if name + "g_idx" in ckpt.tensors:
                rows, cols = ckpt.tensors[name + "scales"].shape[1], ckpt.tensors[name + "g_idx"].shape[0]
            else:
                rows, cols = ckpt.get(name + "weight_shape").tolist()
            raw = qtype
        else:
            shape = ckpt.tensors[name].shape
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            if kind != "head":
                return shape, np.float32, 4 * rows * cols, None
            if head_type == "f16" or cols % 32:
                return shape, np.float16, 2 * rows * cols, None
            raw = gguf.GGMLQuantizationType.Q8_0
        block, nbytes = gguf.GGML_QUANT_SIZES[raw]
        return (rows, cols // block * nbytes), np.uint8, rows * cols // block * nbytes, raw

    for gname, name, kind in plan:  # tensor infos first (from the headers), then the data, one tensor at a time
        shape, dtype, nbytes, raw = info(name, kind)
        writer.add_tensor_info(gname, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gname, name, kind in plan:
        writer.write_tensor_data(tensor(name, kind)[0])
    writer.close()
    return path


def write_metadata(writer, config: dict, folder, qtype) -> None:
    """llama.cpp's hyperparameter keys and a GPT-2 BPE tokenizer from tokenizer.json (gguf.vocab)."""
    import gguf

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_name(config.get("_name_or_path") or config["architectures"][0])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype.name]
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        vocab = gguf.vocab.BpeVocab(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise StreamqError(f"--format gguf: {folder} has no GPT-2 style BPE tokenizer.json ({e})") from None
    tokens, scores, types = (list(v) for v in zip(*vocab.all_tokens()))
    for i in range(len(tokens), config["vocab_size"]):  # embedding rows beyond the tokenizer, as the converter pads
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.vocab.SpecialVocab(folder, load_merges=True).add_to_gguf(writer, quiet=True)
