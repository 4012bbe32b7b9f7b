"""llama.cpp itself, driven through its C API (libllama) with ctypes: load a GGUF, score token ids, return the
logits of every position. Used by tests/test_gguf_llamacpp.py and tools/check_llamacpp.py.

The library is the CPU build node-llama-cpp ships on npm (`@node-llama-cpp/linux-x64@3.22.1`: libllama,
libggml-base and one libggml-cpu-<variant>.so per instruction set, built from ggml-org/llama.cpp release
v0.5.0 on Ubuntu 22.04, GLIBC <= 2.34); tools/fetch_llamacpp.sh puts it in a folder: the repository's .llamacpp
(the README's test command), or the one STREAMQ_LLAMACPP_LIB names. The struct layouts below are llama.h's of
exactly that release (the source ships in the main node-llama-cpp@3.22.1 package as llama/gitRelease.bundle,
commit de3ff815); checked against gcc's offsetof: llama_model_params 80 bytes, llama_context_params 160, llama_batch 56.

Numerics are pinned for comparisons: K/V cache in F32 (llama.cpp's default is F16), flash attention off,
extra (repacking) buffer types off by default (Q4 files crashed llama_decode in them on an AMX CPU).
"""
from __future__ import annotations

import ctypes as C
import os
from pathlib import Path

import numpy as np

ENV = "STREAMQ_LLAMACPP_LIB"
LIBRARY = "libllama.v0.5.0.so"


class ModelParams(C.Structure):
    _fields_ = [("devices", C.c_void_p), ("tensor_buft_overrides", C.c_void_p), ("n_gpu_layers", C.c_int32),
                ("split_mode", C.c_int), ("load_mode", C.c_int), ("lazy_mode", C.c_int), ("main_gpu", C.c_int32),
                ("tensor_split", C.c_void_p), ("progress_callback", C.c_void_p),
                ("progress_callback_user_data", C.c_void_p), ("kv_overrides", C.c_void_p),
                ("vocab_only", C.c_bool), ("check_tensors", C.c_bool), ("use_extra_bufts", C.c_bool),
                ("no_host", C.c_bool), ("no_alloc", C.c_bool), ("load_mtp", C.c_bool)]


class ContextParams(C.Structure):
    _fields_ = [*((n, C.c_uint32) for n in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq",
                                             "n_outputs_max", "n_outputs_max_per_seq")),
                ("n_threads", C.c_int32), ("n_threads_batch", C.c_int32),
                *((n, C.c_int) for n in ("ctx_type", "rope_scaling_type", "pooling_type", "attention_type",
                                          "flash_attn_type")),
                *((n, C.c_float) for n in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor",
                                            "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")),
                ("yarn_orig_ctx", C.c_uint32), ("defrag_thold", C.c_float),
                ("cb_eval", C.c_void_p), ("cb_eval_user_data", C.c_void_p), ("type_k", C.c_int), ("type_v", C.c_int),
                ("abort_callback", C.c_void_p), ("abort_callback_data", C.c_void_p),
                *((n, C.c_bool) for n in ("embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full",
                                           "kv_unified")),
                ("samplers", C.c_void_p), ("n_samplers", C.c_size_t), ("ctx_other", C.c_void_p)]


class Batch(C.Structure):
    _fields_ = [("n_tokens", C.c_int32), ("token", C.POINTER(C.c_int32)), ("embd", C.POINTER(C.c_float)),
                ("pos", C.POINTER(C.c_int32)), ("n_seq_id", C.POINTER(C.c_int32)),
                ("seq_id", C.POINTER(C.POINTER(C.c_int32))), ("logits", C.POINTER(C.c_int8))]


assert (C.sizeof(ModelParams), C.sizeof(ContextParams), C.sizeof(Batch)) == (80, 160, 56)
LOG_CALLBACK = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
_quiet = LOG_CALLBACK(lambda level, text, data: None)  # kept alive for the process: llama.cpp holds the pointer
_lib = None


DEFAULT_DIR = Path(__file__).resolve().parent.parent / ".llamacpp"  # where the README's test command fetches it


def library_dir() -> Path | None:
    """The folder STREAMQ_LLAMACPP_LIB names, else the repository's .llamacpp when it holds the library, else
    None."""
    value = os.environ.get(ENV)
    if value:
        return Path(value)
    return DEFAULT_DIR if (DEFAULT_DIR / LIBRARY).exists() else None


def _library(folder: Path):
    global _lib
    if _lib is None:
        lib = C.CDLL(str(folder / LIBRARY), mode=C.RTLD_GLOBAL)
        ggml = C.CDLL(str(folder / "libggml.v0.5.0.so"), mode=C.RTLD_GLOBAL)
        sig = {"llama_model_default_params": (ModelParams, []), "llama_context_default_params": (ContextParams, []),
               "llama_model_load_from_file": (C.c_void_p, [C.c_char_p, ModelParams]),
               "llama_init_from_model": (C.c_void_p, [C.c_void_p, ContextParams]),
               "llama_model_get_vocab": (C.c_void_p, [C.c_void_p]), "llama_vocab_n_tokens": (C.c_int32, [C.c_void_p]),
               "llama_get_memory": (C.c_void_p, [C.c_void_p]), "llama_memory_clear": (None, [C.c_void_p, C.c_bool]),
               "llama_batch_init": (Batch, [C.c_int32, C.c_int32, C.c_int32]), "llama_batch_free": (None, [Batch]),
               "llama_decode": (C.c_int32, [C.c_void_p, Batch]), "llama_get_logits": (C.POINTER(C.c_float), [C.c_void_p]),
               "llama_free": (None, [C.c_void_p]), "llama_model_free": (None, [C.c_void_p]),
               "llama_log_set": (None, [LOG_CALLBACK, C.c_void_p]), "llama_backend_init": (None, [])}
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        ggml.ggml_backend_load_all_from_path.argtypes = [C.c_char_p]
        lib.llama_log_set(_quiet, None)
        ggml.ggml_backend_load_all_from_path(str(folder).encode())  # the CPU variant that fits this CPU
        lib.llama_backend_init()
        _lib = lib
    return _lib


class Llama:
    """One GGUF loaded in llama.cpp with a context of n_ctx tokens; logits(ids) scores one sequence from an
    empty cache. Use as a context manager (frees the context and the model)."""

    def __init__(self, path, n_ctx: int, folder: Path | None = None, threads: int = 2, extra_bufts: bool = False):
        folder = folder or library_dir()
        if folder is None:
            raise RuntimeError(f"set {ENV} to the folder holding {LIBRARY} (tools/fetch_llamacpp.sh)")
        self.lib = lib = _library(Path(folder))
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers, mp.use_extra_bufts = 0, extra_bufts
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_seq_max, cp.n_threads, cp.n_threads_batch = 1, threads, threads
        cp.flash_attn_type, cp.type_k, cp.type_v, cp.no_perf = 0, 0, 0, True  # FA off, F32 K/V cache
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    def logits(self, ids) -> np.ndarray:
        """Token ids [n] -> logits [n, n_vocab] float32, position i predicting token i + 1."""
        ids = [int(i) for i in ids]
        n = len(ids)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"{n} tokens for a context of {self.n_ctx}")
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            out = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n, self.n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)
        return out

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
