"""GGUF export for llama.cpp / ollama: one .gguf file written with the `gguf` package's writer, tensor by tensor.

Exact where llama.cpp's block types hold streamq's grid (32 weights per block, one fp16 scale d each;
groups that are multiples of 32, or one group per row, repeat their scale in every 32-block):
  4 bits, symmetric (GPTQ or full-range grid, zero 8) -> Q4_0: w = d * (q - 8), q = streamq's code: bit-exact
  8 bits, symmetric (zero 128)                        -> Q8_0: w = d * (q - 128) as int8: bit-exact
  4 bits, asymmetric, zero z                          -> Q4_1: w = d * q + m with m = fp16(-d * z): exact
      where -d*z is an fp16 number, otherwise off by the rounding of m, |error| <= ulp16(m) / 2 per weight
Everything else (2/3 bits: the K-quants quantize their scales; 8-bit asym: Q8_0 has no zero; act-order
without static groups: GGUF has no g_idx; groups not a multiple of 32; SpQR) is refused with one line.
Norms are F32, embeddings and output head Q8_0 (llama.cpp's own rounding, gguf.quants), F16 or F32.
Tensor names come from gguf's TensorNameMap; the architectures and their transforms (row orders, Gemma's
norm shift, hyperparameter keys) are in gguf_arch.py.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from streamq.errors import StreamqError
from streamq.formats.gguf_arch import arch_of, head_dim, n_heads
from streamq.quant.actquant import refuse_activation_quant
from streamq.formats.gptq import GPTQTensors

NAME = "gguf"
HEAD_TYPES = ("q8_0", "f16", "f32")
WEIGHT_TYPES = ("exact", "f32")


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


def planned_bytes(layout, ckpt, cfg, head_type: str = "q8_0") -> int:
    """Tensor data bytes of the GGUF file export() will write (no header or vocabulary), from the model's
    layout before any block runs: quantized Linears in quant_type(cfg) blocks, 2-D non-block tensors as the
    head type, everything else F32."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[quant_type(cfg)]
    q8_block, q8_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    total, linears = 0, set()
    for i in range(layout.n_blocks):
        for name, lin in layout.block_linears(i).items():
            linears.add(f"{layout.block_prefix(i)}{name}.weight")
            total += lin.out_features * lin.in_features // block * nbytes
    for name in ckpt.names():
        if name in linears:
            continue
        shape = ckpt.tensors[name].shape
        n = math.prod(shape)
        if len(shape) == 2 and not name.startswith(layout.layers_prefix) and head_type != "f32":
            total += n // q8_block * q8_bytes if head_type == "q8_0" and shape[-1] % 32 == 0 else 2 * n
        else:
            total += 4 * n
    return total


def permute_rows(t: GPTQTensors, perm: torch.Tensor) -> GPTQTensors:
    return GPTQTensors(t.codes[perm], t.scales[:, perm], t.zeros[:, perm], t.g_idx)


def export(ckpt, source, cfg, out, head_type: str = "q8_0", weight_type: str = "exact"):
    """Write ckpt (a finished folder in layout format `source`) as out/model-<type>.gguf, one tensor at a time.
    weight_type "f32": the quantized Linears dequantized to F32 instead (model-F32.gguf, the same weights
    without llama.cpp's quantized dot products, for checking)."""
    import gguf

    from streamq.formats.export import quantized_stems

    if head_type not in HEAD_TYPES:
        raise StreamqError(f"--head-type {head_type!r}: choose {' or '.join(HEAD_TYPES)}")
    if weight_type not in WEIGHT_TYPES:
        raise StreamqError(f"gguf weight_type {weight_type!r}: choose {' or '.join(WEIGHT_TYPES)}")
    config = ckpt.config
    spec = arch_of(config)
    arch = getattr(gguf.MODEL_ARCH, spec.gguf)
    n_blocks, src_cfg = config["num_hidden_layers"], ckpt.quant_format[1]
    names = gguf.get_tensor_name_map(arch, n_blocks)
    qtype = quant_type(cfg) if weight_type == "exact" else gguf.GGMLQuantizationType.F32
    path = out / f"model-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    write_metadata(writer, config, spec, ckpt.folder, qtype)
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
            plan.append((gname, name, "head" if gname in ("token_embd.weight", "output.weight") else "f32"))
    if any(g is None for g, _, _ in plan):
        raise StreamqError(f"--format gguf: no llama.cpp name for Linear {next(n for g, n, _ in plan if g is None)}")

    def row_order(stem: str, rows: int):
        return spec.rows(stem.rstrip("."), rows, config) if spec.rows else None

    def tensor(name, kind):
        """(array, raw type or None) of one output tensor."""
        if kind == "linear":
            parts = {k: ckpt.get(name + k) for k in source.tensor_names(src_cfg)}
            if weight_type == "f32":
                w = source.dequantize(parts, src_cfg).float()
                perm = row_order(name, w.shape[0])
                return (w if perm is None else w[perm]).contiguous().numpy(), None
            t = source.unpack(parts, src_cfg)
            perm = row_order(name, t.codes.shape[0])
            return ggml_blocks(t if perm is None else permute_rows(t, perm), cfg), qtype
        w = ckpt.get(name).float()
        if name.endswith(".bias") and w.dim() == 1:
            perm = row_order(name[: -len("bias")], w.shape[0])
            w = w if perm is None else w[perm]
        if spec.norm_shift and name.endswith("norm.weight"):
            w = w + spec.norm_shift
        if kind == "head" and head_type == "q8_0" and w.shape[-1] % 32 == 0:  # as info() decides
            return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        if kind == "head" and head_type == "f16":
            return w.half().numpy(), None
        return w.contiguous().numpy(), None

    def info(name, kind):
        """(shape, numpy dtype, bytes, raw type) of one output tensor, from the headers alone."""
        if kind == "linear":
            if name + "g_idx" in ckpt.tensors:
                rows, cols = ckpt.tensors[name + "scales"].shape[1], ckpt.tensors[name + "g_idx"].shape[0]
            else:
                rows, cols = ckpt.get(name + "weight_shape").tolist()
            if weight_type == "f32":
                return (rows, cols), np.float32, 4 * rows * cols, None
            raw = qtype
        else:
            shape = ckpt.tensors[name].shape
            rows, cols = (1, shape[0]) if len(shape) == 1 else shape
            if kind != "head" or head_type == "f32":
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


def write_metadata(writer, config: dict, spec, folder, qtype) -> None:
    """llama.cpp's hyperparameter keys (common ones, then the architecture's own: gguf_arch) and a GPT-2 BPE
    tokenizer from tokenizer.json (gguf.vocab)."""
    import gguf

    n_head, n_kv = n_heads(config)
    dim = head_dim(config)
    rope = config.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    rotary = config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    # the model's own name, as the converter takes it from the folder (llama.cpp sets vocabulary attributes by
    # it: a "phi3" name expects Phi-3's special tokens)
    writer.add_name(Path(config.get("_name_or_path") or folder).name or config["architectures"][0])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config.get("intermediate_size") or config.get("ffn_hidden_size")
                                   or 4 * config["hidden_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(int(dim * rotary))
    writer.add_rope_freq_base(float(config.get("rope_theta", full.get("rope_theta", 10000.0))))
    eps = next((config[k] for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
                if config.get(k) is not None), 1e-6)
    (writer.add_layer_norm_rms_eps if spec.norm == "rms" else writer.add_layer_norm_eps)(float(eps))
    if spec.extra:
        spec.extra(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype.name]
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
