"""streamq/calib/data.py: text loading, spec strings, seeded calibration windows, eval windows, hashes."""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from streamq.calib import data
from streamq.calib.data import CalibSource, calibration_windows, eval_windows, load_texts, parse_calib_spec, token_hash
from streamq.errors import StreamqError
from streamq.options import DEFAULT_CALIB
from tests.tokenizer_fixtures import PARAGRAPHS, build_tiny_tokenizer, tiny_tokenizer  # noqa: F401

AUSTEN = DEFAULT_CALIB  # the shipped text (streamq/data/calib.txt)
TEXT = "\n".join(PARAGRAPHS * 6)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def is_slice(window: torch.Tensor, stream: list[int]) -> bool:
    w, n = window.tolist(), len(window)
    return any(stream[s:s + n] == w for s in range(len(stream) - n + 1))


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, docs: list[str]) -> str:
    return write(path, "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))


# -- load_texts ---------------------------------------------------------------------------------------

def test_load_txt_jsonl_and_sorted_folder(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    write(folder / "b.txt", "second file")
    write_jsonl(folder / "a.jsonl", ["first", "doc two"])
    write(folder / "notes.md", "ignored")
    assert load_texts(str(folder / "b.txt")) == ["second file"]
    assert load_texts(str(folder / "a.jsonl")) == ["first", "doc two"]
    assert load_texts(str(folder)) == ["first", "doc two", "second file"]


def test_load_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"content": "no text"}\n')
    with pytest.raises(StreamqError, match=r"bad\.jsonl:3: .*'text'"):
        load_texts(bad)
    broken = write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(StreamqError, match=r"broken\.jsonl:2: not valid JSON"):
        load_texts(broken)
    with pytest.raises(StreamqError, match="no such file"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(StreamqError, match="empty"):
        load_texts(write(tmp_path / "empty.txt", "  \n"))
    with pytest.raises(StreamqError, match=r"\.txt or \.jsonl"):
        load_texts(write(tmp_path / "x.csv", "a,b"))
    (tmp_path / "void").mkdir()
    with pytest.raises(StreamqError, match="no .txt or .jsonl"):
        load_texts(str(tmp_path / "void"))
    with pytest.raises(StreamqError, match="UTF-8"):
        (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
        load_texts(str(tmp_path / "latin.txt"))


# -- parse_calib_spec ---------------------------------------------------------------------------------

def test_parse_spec():
    assert parse_calib_spec("data.txt") == [CalibSource("data.txt", None, None)]
    assert parse_calib_spec("f.jsonl:num=64, other.txt:num=8:concat=True,x.jsonl:concat=false") == [
        CalibSource("f.jsonl", 64, None), CalibSource("other.txt", 8, True), CalibSource("x.jsonl", None, False)]
    assert CalibSource("a.jsonl").concatenated is False and CalibSource("a.txt").concatenated is True
    assert CalibSource("a.jsonl", concat=True).concatenated is True


@pytest.mark.parametrize("spec, word", [("a.txt:num=0", "num=0"), ("a.txt:num=x", "num=x"),
                                        ("a.txt:concat=yes", "concat=yes"), ("a.txt:size=3", "'size'"),
                                        ("a.txt:num", "'num'"), ("a.txt:num=1:num=2", "'num=2'"),
                                        ("a.txt,", "empty source")])
def test_parse_spec_errors_name_option(spec, word):
    with pytest.raises(StreamqError, match=word):
        parse_calib_spec(spec)


# -- calibration_windows ------------------------------------------------------------------------------

def test_windows_seeded_and_contiguous(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "t.txt", TEXT)
    w = calibration_windows(tiny_tokenizer, path, nsamples=6, seqlen=32, seed=1)
    assert w.shape == (6, 32) and w.dtype == torch.int64
    assert torch.equal(w, calibration_windows(tiny_tokenizer, path, 6, 32, seed=1))
    assert not torch.equal(w, calibration_windows(tiny_tokenizer, path, 6, 32, seed=2))
    stream = ids(tiny_tokenizer, TEXT)
    assert all(is_slice(row, stream) for row in w)


def test_spec_shares_honoured(tmp_path, tiny_tokenizer):
    # Two sources whose token sets do not overlap, so each window's origin is unambiguous.
    a = write(tmp_path / "a.txt", " ".join(["Emma"] * 200))
    b = write(tmp_path / "b.txt", " ".join(["sorrow"] * 200))
    ta, tb = set(ids(tiny_tokenizer, " Emma Emma")), set(ids(tiny_tokenizer, " sorrow sorrow"))
    assert not ta & tb

    def origins(w):
        return ["a" if set(r.tolist()) <= ta else "b" if set(r.tolist()) <= tb else "?" for r in w]

    assert origins(calibration_windows(tiny_tokenizer, f"{a}:num=3,{b}", 7, 16)) == list("aaabbbb")
    assert origins(calibration_windows(tiny_tokenizer, f"{a},{b}", 5, 16)) == list("aaabb")
    assert origins(calibration_windows(tiny_tokenizer, f"{a}:num=1,{b}:num=2", 3, 16)) == list("abb")
    with pytest.raises(StreamqError, match="add up to 5.*nsamples is 4"):
        calibration_windows(tiny_tokenizer, f"{a}:num=2,{b}:num=3", 4, 16)
    with pytest.raises(StreamqError, match="add up to 3.*nsamples is 4"):
        calibration_windows(tiny_tokenizer, f"{a}:num=1,{b}:num=2", 4, 16)


def test_jsonl_documents_not_concatenated(tmp_path, tiny_tokenizer):
    long_docs = [f"{p} {p}" for p in PARAGRAPHS]
    path = write_jsonl(tmp_path / "d.jsonl", ["tiny", *long_docs, "also short"])
    seqlen = 24
    assert all(len(ids(tiny_tokenizer, d)) >= seqlen for d in long_docs)
    w = calibration_windows(tiny_tokenizer, path, nsamples=4, seqlen=seqlen, seed=3)
    # Each window inside one document, and each from a different document.
    homes = [[k for k, d in enumerate(long_docs) if is_slice(row, ids(tiny_tokenizer, d))] for row in w]
    assert all(len(h) >= 1 for h in homes)
    assert len({h[0] for h in homes}) == 4
    with pytest.raises(StreamqError, match=r"found 4 documents of at least 24 tokens.*need 5"):
        calibration_windows(tiny_tokenizer, path, nsamples=5, seqlen=seqlen)


def test_jsonl_concat_joins_with_eos(tmp_path, tiny_tokenizer):
    docs = ["Emma Woodhouse", "the youngest of the two daughters", "Sorrow came"]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    eos = tiny_tokenizer.eos_token_id
    stream = ids(tiny_tokenizer, docs[0]) + [eos] + ids(tiny_tokenizer, docs[1]) + [eos] + ids(tiny_tokenizer, docs[2])
    w = calibration_windows(tiny_tokenizer, f"{path}:concat=True", nsamples=3, seqlen=len(stream))
    assert all(row.tolist() == stream for row in w)


def test_too_little_text_says_found_and_needed(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "short.txt", "Emma Woodhouse, handsome, clever")
    n = len(ids(tiny_tokenizer, "Emma Woodhouse, handsome, clever"))
    with pytest.raises(StreamqError, match=rf"short\.txt: found {n} tokens, need at least 100"):
        calibration_windows(tiny_tokenizer, path, nsamples=2, seqlen=100)
    with pytest.raises(StreamqError, match="must be positive"):
        calibration_windows(tiny_tokenizer, path, nsamples=0, seqlen=4)
    with pytest.raises(StreamqError, match="must be positive"):
        calibration_windows(tiny_tokenizer, path, nsamples=2, seqlen=0)
    assert calibration_windows(tiny_tokenizer, path, nsamples=2, seqlen=n).shape == (2, n)


# -- eval_windows -------------------------------------------------------------------------------------

def test_eval_windows_consecutive(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "t.txt", TEXT)
    stream = ids(tiny_tokenizer, TEXT)
    seqlen = 50
    w = eval_windows(tiny_tokenizer, path, seqlen, None)
    n = len(stream) // seqlen
    assert w.shape == (n, seqlen) and len(stream) % seqlen  # a tail was really dropped
    assert w.flatten().tolist() == stream[: n * seqlen]
    assert torch.equal(eval_windows(tiny_tokenizer, path, seqlen, 2), w[:2])
    with pytest.raises(StreamqError, match=rf"found {len(stream)} tokens, need at least {len(stream) + 1}"):
        eval_windows(tiny_tokenizer, path, len(stream) + 1, None)


def test_token_hash():
    t = torch.tensor([[1, 2], [3, 2**40]])
    assert token_hash(t) == hashlib.sha256(np.array([1, 2, 3, 2**40], dtype="<i8").tobytes()).hexdigest()
    assert token_hash(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)) == token_hash(torch.tensor([1, 2, 3, 4]))
    assert token_hash(t) != token_hash(t.flip(0))


# -- tokenizing large text ----------------------------------------------------------------------------

def test_chunked_tokenization_matches_whole_and_is_quiet(tmp_path, monkeypatch):
    text = AUSTEN.read_text(encoding="utf-8")[:120_000]
    path = write(tmp_path / "austen.txt", text)
    tok = build_tiny_tokenizer()  # fresh: transformers warns once per tokenizer instance
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        monkeypatch.setattr(data, "CHUNK_CHARS", 8_192)
        monkeypatch.setattr(data, "CHUNKS_PER_CALL", 4)
        assert len(data._chunks(text, data.CHUNK_CHARS)) > 10
        w = calibration_windows(tok, path, nsamples=8, seqlen=256, seed=0)
        assert not any("longer than the specified maximum" in r.getMessage() for r in records)
        whole = ids(tok, text)  # the one-shot call does warn: the check above is not vacuous
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
    assert data.tokenize(tok, [text])[0].tolist() == whole
    assert all(is_slice(row, whole) for row in w[:2])
    assert torch.equal(w, calibration_windows(tok, path, nsamples=8, seqlen=256, seed=0))


def test_token_windows_from_npy_and_jsonl(tmp_path, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    arr = np.random.default_rng(0).integers(0, vocab, size=(5, 12), dtype=np.int64)
    np.save(tmp_path / "w.npy", arr)
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(r.tolist()) for r in arr) + "\n")
    for name in ("w.npy", "w.jsonl"):
        got = calibration_windows(tiny_tokenizer, str(tmp_path / name), 4, 10)
        assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(arr[:4, :10]))


@pytest.mark.parametrize("content, match", [
    (np.array([[1, 2], [3, 4]], dtype=object), "not a plain .npy"),  # a pickle inside: refused, never loaded
    (np.zeros((4, 12), dtype=np.float32), "2-d integer"),
    (np.zeros(48, dtype=np.int64), "2-d integer"),
    (np.zeros((3, 12), dtype=np.int64), "holds 3 windows, need 4"),
    (np.zeros((4, 8), dtype=np.int64), "has 8 ids, need 10"),
    (np.full((4, 12), 10**6, dtype=np.int64), "ids must be in"),
])
def test_bad_token_windows_are_one_line_errors(tmp_path, tiny_tokenizer, content, match):
    np.save(tmp_path / "w.npy", content, allow_pickle=True)
    with pytest.raises(StreamqError, match=match):
        calibration_windows(tiny_tokenizer, str(tmp_path / "w.npy"), 4, 10)


def test_jsonl_token_lines_must_be_integer_lists(tmp_path, tiny_tokenizer):
    (tmp_path / "w.jsonl").write_text("[1, 2, 3]\n[1, 2.5, 3]\n")
    with pytest.raises(StreamqError, match="w.jsonl:2: expected a JSON list of integer token ids"):
        calibration_windows(tiny_tokenizer, str(tmp_path / "w.jsonl"), 2, 3)


def test_tokenize_through_the_backend_equals_the_tokenizer_call():
    """tokenize() encodes with the fast tokenizer's backend (no offsets: less memory); the ids are the tokenizer
    call's, and a backend that would truncate is not used that way."""
    from tests.conftest import make_tokenizer, sample_text

    tok, text = make_tokenizer(), sample_text() * 3
    want = tok([text], add_special_tokens=False, return_attention_mask=False)["input_ids"][0]
    assert len(want) > 64 and data.tokenize(tok, [text])[0].tolist() == want
    tok.backend_tokenizer.enable_truncation(max_length=16)
    assert data.tokenize(tok, [text])[0].tolist() == want
