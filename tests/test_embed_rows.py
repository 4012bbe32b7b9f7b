"""calib/embed_rows.py: block-0 inputs captured from embedding rows gathered out of the memory-mapped checkpoint
equal those of the materialized table bit for bit (Gemma's scaled embeddings, tied embeddings, OPT's learned
positions, a bf16 checkpoint cast to fp32), the table is never materialized, and the resume digest is recorded."""
import hashlib

import pytest
import safetensors.torch
import torch
from torch import nn

from streamq.calib.capture import ModelEnds
from streamq.errors import StreamqError
from streamq.io.blocks import build_layout
from streamq.io.checkpoint import Checkpoint, _raw_bytes
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def capture_both(src, ids, dtype=torch.float32):
    """(rows-served capture, materialized-table capture, the rows-served ModelEnds) of ids [1, seq]."""
    ckpt = Checkpoint(src, hash_reads=True)
    layout = build_layout(ckpt)
    ends = ModelEnds(layout, ckpt, torch.device("cpu"), dtype, with_head=False)
    assert ends.rows is not None and ends.rows.module.weight.is_meta  # the table stays unmaterialized
    seen = []  # the table the embedding module looks its ids up in, per call
    hook = ends.rows.module.register_forward_hook(lambda m, a, o: seen.append((m.weight.shape, a[0].clone())))
    got = ends.capture(ids)
    hook.remove()
    ends.release()
    full_ckpt = Checkpoint(src)
    full_layout = build_layout(full_ckpt)
    full = ModelEnds(full_layout, full_ckpt, torch.device("cpu"), dtype, with_head=True)  # the table, materialized
    try:
        want = _capture_materialized(full, ids)
    finally:
        full.release()
    return got, want, ends, seen, ckpt


def _capture_materialized(full: ModelEnds, ids):
    """Block-0 inputs through the decoder of a with_head ModelEnds (its embedding table materialized)."""
    from streamq.calib.capture import traced_forward

    trace, _ = traced_forward(full.layout, lambda: full.layout.decoder(input_ids=ids, use_cache=False))
    return trace.hidden, trace.kwargs


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("arch,tie,dtype", [("llama", True, torch.float32), ("gemma3_text", None, torch.float32),
                                            ("gemma2", None, torch.float32), ("opt", None, torch.float32),
                                            ("qwen2", False, torch.bfloat16)],
                         ids=["llama-tied", "gemma3-scaled", "gemma2", "opt", "qwen2-bf16-source"])
def test_capture_from_gathered_rows_equals_the_materialized_table(tmp_path, arch, tie, dtype):
    src = make_tiny_model(tmp_path / arch, arch, n_layers=2, shards=2, tie=tie, dtype=dtype)
    ids = torch.tensor([[5, 9, 5, 300, 0, 17, 9, 42, 1, 2, 3, 299]])  # repeats, id 0 (Gemma's pad), the last rows
    (hidden, kwargs), (want_hidden, want_kwargs), ends, seen, ckpt = capture_both(src, ids)
    assert hidden.dtype == torch.float32 and torch.equal(hidden, want_hidden)
    assert same(kwargs, want_kwargs)
    unique = ids.unique()
    assert seen[0][0] == (len(unique), ends.rows.module.embedding_dim)  # only the rows the window needs
    assert torch.equal(unique[seen[0][1]], ids)  # renumbered into those rows
    recorded = dict(ckpt.digests)  # the resume digest: the stored bytes, as Checkpoint.get records them
    stored = Checkpoint(src).read(ends.rows.source)
    assert recorded[ends.rows.source] == hashlib.sha256(_raw_bytes(stored)).hexdigest()


def test_bad_ids_and_non_finite_rows_are_one_line_errors(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    ckpt = Checkpoint(src)
    layout = build_layout(ckpt)
    ends = ModelEnds(layout, ckpt, torch.device("cpu"), torch.float32, with_head=False)
    vocab = ends.rows.info.shape[0]
    with pytest.raises(StreamqError, match=rf"token id {vocab} is outside .*embed_tokens.weight's {vocab} rows"):
        ends.capture(torch.tensor([[1, vocab]]))
    assert ends.rows.module.weight.is_meta and ends.rows.module.padding_idx == layout.decoder.embed_tokens.padding_idx
    table = ckpt.read(ends.rows.source).clone()  # the same table with one NaN, in another checkpoint
    table[7, 3] = float("nan")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((src / "config.json").read_text())
    safetensors.torch.save_file({ends.rows.source: table}, str(tmp_path / "bad" / "x.safetensors"))
    bad = Checkpoint(tmp_path / "bad")
    ends.rows.ckpt, ends.rows.info = bad, bad.tensors[ends.rows.source]
    assert ends.capture(torch.tensor([[1, 2]]))[0].isfinite().all()  # rows without the NaN: fine
    with pytest.raises(StreamqError, match="contains NaN or Inf"):
        ends.capture(torch.tensor([[1, 7]]))


def test_head_ends_and_non_lookup_embeddings_keep_the_materialized_table(tmp_path):
    src = make_tiny_model(tmp_path / "m", "llama", n_layers=1, shards=1)
    ckpt = Checkpoint(src)
    layout = build_layout(ckpt)
    head = ModelEnds(layout, ckpt, torch.device("cpu"), torch.float32, with_head=True)
    assert head.rows is None and not layout.decoder.embed_tokens.weight.is_meta
    head.release()
    layout.decoder.embed_tokens.max_norm = 1.0  # renormalizes the table in place on lookup: not served by rows
    ends = ModelEnds(layout, ckpt, torch.device("cpu"), torch.float32, with_head=False)
    assert ends.rows is None and isinstance(layout.decoder.embed_tokens, nn.Embedding)
    assert not layout.decoder.embed_tokens.weight.is_meta
    ends.release()
