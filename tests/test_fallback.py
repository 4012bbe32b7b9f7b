"""Out-of-memory fallback: a CUDA OOM retries the block leaner, then on the CPU, with warnings; a block whose
first attempt runs out of memory ends exactly as an undisturbed CPU run (GPTQ, SpQR), or about as well tuned
(AutoRound's smaller chunks: the same samples, gradients summed in another order)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import streamq
from streamq import blockwork
from streamq.errors import StreamqError
from streamq.fallback import attempts, with_fallback
from tests.conftest import make_tiny_model, output_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
RUN = dict(nsamples=8, seqlen=32, progress=False, device="cpu")


def test_cuda_oom_retries_lean_then_on_the_cpu():
    tried = []

    def compute(device, lean):
        tried.append((device, lean))
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"

    with pytest.warns(UserWarning) as caught:
        assert with_fallback(compute, CUDA, "block 3/32") == "done"
    assert tried == attempts(CUDA) == [(CUDA, False), (CUDA, True), (CPU, True)]
    messages = [str(w.message) for w in caught]
    assert "block 3/32: out of memory on cuda" in messages[0] and "retrying on cuda in smaller chunks" in messages[0]
    assert "retrying on cpu" in messages[1]


def test_out_of_memory_everywhere_is_a_one_line_error():
    def compute(device, lean):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 137438953472 bytes.\nmore")

    with warnings.catch_warnings(record=True), pytest.raises(StreamqError) as e:
        with_fallback(compute, CPU, "block 2/4")
    assert "block 2/4: out of memory on cpu even in smaller chunks" in str(e.value) and "\n" not in str(e.value)


def test_other_errors_are_not_retried():
    tried = []

    def compute(device, lean):
        tried.append(lean)
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError):
        with_fallback(compute, CUDA, "block 1/2")
    assert tried == [False]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("oom") / "llama", "llama", n_layers=3, shards=2)


def out_of_memory_unless_lean(monkeypatch, name: str) -> list:
    """streamq.blockwork.<name> raises torch.OutOfMemoryError on every block's first (not lean) attempt, as a
    GPU too small for the planned block would; returns the list of lean flags block_work was called with."""
    real_work, real, leans = blockwork.block_work, getattr(blockwork, name), []

    def work(*args):
        leans.append(args[9])  # block_work(..., dtype, lean, scratch, run_key)
        return real_work(*args)

    def oom(*args, **kwargs):
        if not leans[-1]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwork, "block_work", work)
    monkeypatch.setattr(blockwork, name, oom)
    return leans


@pytest.mark.parametrize("method", ["gptq", "spqr"])
def test_oom_block_retried_equals_an_undisturbed_run(src, tmp_path, monkeypatch, method):
    from streamq import pipeline

    kw = dict(RUN, method=method, calib=str(src / "calib.txt"), group_size=16)
    clean = streamq.compress(src, tmp_path / "clean", **kw)
    monkeypatch.setattr(pipeline, "block_work", lambda *a: blockwork.block_work(*a))  # resolve at call time
    leans = out_of_memory_unless_lean(monkeypatch, "quantize_block")
    with pytest.warns(UserWarning, match="block 1/3: out of memory on cpu .*retrying on cpu in smaller chunks"):
        retried = streamq.compress(src, tmp_path / "retried", **kw)
    assert leans == [False, True] * 3
    assert output_snapshot(retried) == output_snapshot(clean)


def block_errors(out) -> list[float]:
    """Per block, the relative output error of the quantized block (AutoRound reports it on every Linear)."""
    blocks = json.loads((out / "streamq_manifest.json").read_text())["blocks"]
    return [next(iter(blocks[str(i)]["layers"].values()))["error"] for i in range(len(blocks))]


def test_oom_autoround_block_retried_in_smaller_chunks(src, tmp_path, monkeypatch):
    """The chunked retry sums the same samples' gradients in two passes: signs of near-zero gradients may
    flip, so the codes are not bit-identical, but the tuning is about as good (block errors within 25% of the
    undisturbed run's; measured 0-16%) and far better than RTN."""
    from streamq import pipeline

    kw = dict(RUN, method="autoround", calib=str(src / "calib.txt"), iters=20, batch_size=4, group_size=16)
    clean = block_errors(streamq.compress(src, tmp_path / "clean", **kw))
    rtn = block_errors(streamq.compress(src, tmp_path / "rtn", **{**kw, "iters": 0}))
    monkeypatch.setattr(pipeline, "block_work", lambda *a: blockwork.block_work(*a))
    chunks = []
    real_step = blockwork.autoround_step
    monkeypatch.setattr(blockwork, "autoround_step", lambda *a, chunk=None, **kw: chunks.append(chunk) or real_step(
        *a, chunk=chunk, **kw))
    leans = out_of_memory_unless_lean(monkeypatch, "autoround_block")
    with pytest.warns(UserWarning, match="out of memory"):
        retried = block_errors(streamq.compress(src, tmp_path / "retried", **kw))
    assert leans == [False, True] * 3 and chunks == [None, 2] * 3
    for c, r, base in zip(clean, retried, rtn):
        assert r < 1.25 * c and r < 0.7 * base, (clean, retried, rtn)


def test_cache_emptied_once_the_failed_attempt_is_released(monkeypatch):
    """free_cached runs after the except block: no exception in flight, the failed attempt's tensors freed
    (inside the block, the traceback's frames would still hold them and the retry could run out again)."""
    import sys
    import weakref

    from streamq import fallback

    refs, seen = [], []

    def compute(device, lean):
        if not lean:
            held = torch.empty(1024)
            refs.append(weakref.ref(held))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return "done"

    monkeypatch.setattr(fallback, "free_cached", lambda d: seen.append((d, refs[0]() is None, sys.exc_info()[0])))
    with pytest.warns(UserWarning, match="retrying on cuda in smaller chunks"):
        assert with_fallback(compute, CUDA, "block 1/1") == "done"
    assert seen == [(CUDA, True, None)]


def test_cpu_retry_of_a_gpu_block_computes_in_fp32():
    from streamq.fallback import attempt_dtype

    assert attempt_dtype(CPU, CUDA, torch.float16) == torch.float32  # the OOM retry on the CPU
    assert attempt_dtype(CUDA, CUDA, torch.bfloat16) == torch.bfloat16
    assert attempt_dtype(CPU, CPU, torch.bfloat16) == torch.bfloat16  # a 16-bit CPU run asked for


def test_fp32_retry_of_a_16bit_run_writes_the_16bit_store(src, tmp_path, monkeypatch):
    """A float16 run whose blocks are all computed in fp32 (as the CPU retry of a GPU block is): inputs, kwargs
    and outputs cross between the fp16 store and the fp32 block; the codes are those of the fp16 run within
    its rounding (layer errors within 20% of it)."""
    from streamq import fallback, pipeline

    kw = dict(RUN, method="gptq", calib=str(src / "calib.txt"), group_size=16, dtype="float16")
    half = json.loads((streamq.compress(src, tmp_path / "half", **kw) / "streamq_manifest.json").read_text())
    dtypes = []
    monkeypatch.setattr(pipeline, "attempt_dtype",
                        lambda d, planned, dtype: dtypes.append(fallback.attempt_dtype(d, CUDA, dtype)) or dtypes[-1])
    mixed = json.loads((streamq.compress(src, tmp_path / "mixed", **kw) / "streamq_manifest.json").read_text())
    assert dtypes == [torch.float32] * 3 and mixed["fingerprint"]["compute dtype"] == "torch.float16"
    for i in range(3):
        for name, r in half["blocks"][str(i)]["layers"].items():
            assert abs(mixed["blocks"][str(i)]["layers"][name]["error"] - r["error"]) <= 0.2 * r["error"] + 1e-4
