"""Text -> seeded token windows for calibration and evaluation; AutoRound-style dataset spec strings.

A spec is ``PATH[:num=N][:concat=True|False]``, comma-separated for several sources. PATH is a .txt file
(the whole file is one document), a .jsonl file (field ``text`` of each line is one document) or a
folder (its .txt/.jsonl files, sorted by name, not recursive).

Token windows instead of text (so other tools can be fed exactly the same data): a .npy file of int token ids
[n, seqlen] (read with allow_pickle=False), or a .jsonl file whose lines are JSON lists of token ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from streamq.errors import StreamqError

TEXT_SUFFIXES = (".txt", ".jsonl")
# Characters per tokenizer call: keeps the Rust tokenizer's memory and the Python id lists small on
# multi-MB files; module-level so tests can shrink it.
CHUNK_CHARS = 1 << 20
# Chunks tokenized per batch call. One: a batch is encoded in parallel, each thread's temporaries in its own
# heap arena, which raised a 3.3 MB text's peak RSS by 310 MB instead of 210 MB, for no gain on 2 cores.
CHUNKS_PER_CALL = 1


@dataclass(frozen=True)
class CalibSource:
    """One source of a spec string: a path, its window count (None = share of the remainder), and
    whether its documents are concatenated into one stream (None = by type: .jsonl False, else True)."""

    path: str
    num: int | None = None
    concat: bool | None = None

    @property
    def concatenated(self) -> bool:
        return self.concat if self.concat is not None else not self.path.endswith(".jsonl")


def load_texts(spec: str) -> list[str]:
    """Documents of a .txt file (one), a .jsonl file (one per line, field ``text``) or a folder of both."""
    if not os.path.exists(spec):
        raise StreamqError(f"calibration data {spec}: no such file or folder")
    if os.path.isdir(spec):
        names = sorted(n for n in os.listdir(spec) if n.endswith(TEXT_SUFFIXES))
        if not names:
            raise StreamqError(f"calibration folder {spec}: holds no .txt or .jsonl file")
        return [t for n in names for t in _load_file(os.path.join(spec, n))]
    return _load_file(spec)


def _load_file(path: str) -> list[str]:
    if not path.endswith(TEXT_SUFFIXES):
        raise StreamqError(f"calibration data {path}: expected a .txt or .jsonl file or a folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise StreamqError(f"calibration data {path}: cannot read as UTF-8 text ({e})") from None
    if not raw.strip():
        raise StreamqError(f"calibration data {path}: file is empty")
    if path.endswith(".txt"):
        return [raw]
    texts = []
    for lineno, record in jsonl_records(path, raw.splitlines()):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise StreamqError(f"{path}:{lineno}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return texts


def jsonl_records(path: str, lines) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON value) for each non-blank line; a line that is not JSON is a StreamqError."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise StreamqError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def parse_calib_spec(spec: str) -> list[CalibSource]:
    """Parse ``PATH[:num=N][:concat=True|False]`` sources joined by commas.

    A spec naming an existing file or folder is that one path, even when it contains ':' or ','.
    """
    if os.path.exists(spec):
        return [CalibSource(spec)]
    sources = []
    for part in spec.split(","):
        path, *options = [s.strip() for s in part.strip().split(":")]
        if not path:
            raise StreamqError(f"calibration spec {spec!r}: empty source")
        num, concat, seen = None, None, set()
        for opt in options:
            key, eq, value = opt.partition("=")
            if not eq or key in seen:
                raise StreamqError(f"calibration spec {spec!r}: bad option {opt!r} "
                                   f"(use num=N or concat=True|False, each once)")
            seen.add(key)
            if key == "num":
                if not (value.isascii() and value.isdigit()) or int(value) < 1:
                    raise StreamqError(f"calibration spec {spec!r}: num={value} must be a positive integer")
                num = int(value)
            elif key == "concat":
                if value.lower() not in ("true", "false"):
                    raise StreamqError(f"calibration spec {spec!r}: concat={value} must be True or False")
                concat = value.lower() == "true"
            else:
                raise StreamqError(f"calibration spec {spec!r}: unknown option {key!r} (known: num, concat)")
        sources.append(CalibSource(path, num, concat))
    return sources


def calibration_windows(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.LongTensor:
    """Random contiguous windows of ``seqlen`` tokens: [nsamples, seqlen] int64, in spec source order.

    Each source gives ``num`` windows; sources without num share the remainder evenly (earlier ones get
    the extra). concat sources: random start in the stream of all its documents (joined by EOS when the
    tokenizer has one); windows may overlap. Non-concat sources: one window per distinct document of
    at least seqlen tokens, at a random offset. Same (files, tokenizer, seed) -> same windows.
    """
    if nsamples < 1 or seqlen < 1:
        raise StreamqError(f"--nsamples {nsamples} / --seqlen {seqlen}: both must be positive")
    if is_token_file(spec):
        return token_windows(spec, nsamples, seqlen, len(tokenizer))
    sources = parse_calib_spec(spec)
    shares = _shares(spec, sources, nsamples)
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for src, n in zip(sources, shares):
        # Load even sources with a share of 0 so a typo in a path fails now, not in a later run.
        docs = tokenize(tokenizer, load_texts(src.path))
        if n == 0:
            continue
        if src.concatenated:
            stream = _join(docs, tokenizer)
            if len(stream) < seqlen:
                raise StreamqError(f"calibration data {src.path}: found {len(stream)} tokens, "
                                   f"need at least {seqlen} (--seqlen)")
            starts = torch.randint(0, len(stream) - seqlen + 1, (n,), generator=gen)
            windows += [stream[s:s + seqlen] for s in starts.tolist()]
        else:
            long_docs = [d for d in docs if len(d) >= seqlen]
            if len(long_docs) < n:
                longest = max(len(d) for d in docs)
                raise StreamqError(f"calibration data {src.path}: found {len(long_docs)} documents of at least "
                                   f"{seqlen} tokens (longest {longest} tokens), need {n}; use :concat=True "
                                   f"or a shorter --seqlen")
            for k in torch.randperm(len(long_docs), generator=gen)[:n].tolist():
                doc = long_docs[k]
                s = int(torch.randint(0, len(doc) - seqlen + 1, (1,), generator=gen))
                windows.append(doc[s:s + seqlen])
    return torch.stack(windows)


def is_token_file(spec: str) -> bool:
    """spec is one .npy file, or one .jsonl file whose first non-blank line is a JSON list (token ids)."""
    if spec.endswith(".npy"):
        return True
    if not spec.endswith(".jsonl") or not os.path.isfile(spec):
        return False
    with open(spec, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return first.lstrip().startswith("[")


def token_windows(path: str, nsamples: int, seqlen: int, vocab: int) -> torch.LongTensor:
    """The first nsamples windows of a token-id file, each cut to its first seqlen ids: [nsamples, seqlen] int64.
    Every id must be in [0, vocab); every window needs at least seqlen ids."""
    if not os.path.isfile(path):
        raise StreamqError(f"calibration tokens {path}: no such file")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise StreamqError(f"calibration tokens {path}: not a plain .npy array ({e})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise StreamqError(f"calibration tokens {path}: expected a 2-d integer array [n, seqlen], "
                               f"got {arr.dtype} of shape {list(arr.shape)}")
        rows = [arr[i] for i in range(arr.shape[0])]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, ids in jsonl_records(path, f):
                if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    raise StreamqError(f"{path}:{lineno}: expected a JSON list of integer token ids")
                rows.append(np.asarray(ids, dtype=np.int64))
    if len(rows) < nsamples:
        raise StreamqError(f"calibration tokens {path}: holds {len(rows)} windows, need {nsamples} (--nsamples)")
    short = min(len(r) for r in rows[:nsamples])
    if short < seqlen:
        raise StreamqError(f"calibration tokens {path}: a window has {short} ids, need {seqlen} (--seqlen)")
    out = torch.from_numpy(np.stack([np.asarray(r[:seqlen], dtype=np.int64) for r in rows[:nsamples]]))
    if out.min() < 0 or out.max() >= vocab:
        raise StreamqError(f"calibration tokens {path}: ids must be in [0, {vocab}) (the tokenizer's vocabulary), "
                           f"found {int(out.min())}..{int(out.max())}")
    return out


def _shares(spec: str, sources: list[CalibSource], nsamples: int) -> list[int]:
    """Windows per source: explicit num, the remainder split evenly over the others; sums to nsamples."""
    fixed = sum(s.num for s in sources if s.num is not None)
    free = [i for i, s in enumerate(sources) if s.num is None]
    rest = nsamples - fixed
    if rest < 0 or (rest > 0 and not free):
        raise StreamqError(f"calibration spec {spec!r}: num= values add up to {fixed}, "
                           f"but --nsamples is {nsamples}")
    shares = [s.num or 0 for s in sources]
    for j, i in enumerate(free):
        shares[i] = rest // len(free) + (j < rest % len(free))
    return shares


def eval_windows(tokenizer, path: str, seqlen: int, max_windows: int | None) -> torch.LongTensor:
    """Consecutive non-overlapping windows (stride seqlen) of the text's token stream: [n, seqlen] int64.

    The tail shorter than seqlen is dropped; ``max_windows`` keeps only the first ones.
    """
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise StreamqError(f"--seqlen {seqlen} / max windows {max_windows}: both must be positive")
    stream = _join(tokenize(tokenizer, load_texts(path)), tokenizer)
    n = len(stream) // seqlen
    if n == 0:
        raise StreamqError(f"evaluation data {path}: found {len(stream)} tokens, need at least {seqlen} (--seqlen)")
    if max_windows is not None:
        n = min(n, max_windows)
    return stream[: n * seqlen].view(n, seqlen).clone()


def token_hash(tokens: torch.Tensor) -> str:
    """sha256 hex digest of the tokens as int64 little-endian bytes (shape is not hashed)."""
    arr = tokens.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def tokenize(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Token ids of each document without special tokens: list of [len_k] int64.

    Long documents are cut into ~CHUNK_CHARS pieces at line starts, where common pre-tokenizers split
    anyway, so ids match whole-text tokenization except, rarely, at a cut (e.g. SentencePiece's prefix
    space).
    """
    pieces, owner = [], []
    for k, text in enumerate(texts):
        for piece in _chunks(text, CHUNK_CHARS):
            pieces.append(piece)
            owner.append(k)
    parts: list[list[torch.Tensor]] = [[] for _ in texts]
    # A fast tokenizer's own backend without offsets: the same ids as tokenizer(...) (which sets no truncation or
    # padding here), ~25% less peak memory per 1 MiB piece (SmolLM2's: +131 MB instead of +177 MB)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None \
        and backend.padding is None
    for b in range(0, len(pieces), CHUNKS_PER_CALL):
        batch = pieces[b:b + CHUNKS_PER_CALL]
        # verbose=False: the "longer than the specified maximum sequence length" warning does not
        # apply, windows are cut afterwards.
        if plain:
            ids = [e.ids for e in backend.encode_batch_fast(batch, add_special_tokens=False)]
        else:
            ids = tokenizer(batch, add_special_tokens=False, verbose=False,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for k, row in zip(owner[b:b + CHUNKS_PER_CALL], ids):
            parts[k].append(torch.from_numpy(np.array(row, dtype=np.int64)))  # ~2x faster than torch.tensor
    return [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64) for p in parts]


def _chunks(text: str, size: int) -> list[str]:
    """Split text into pieces of at most ~size characters, cutting after a newline that is followed by
    a non-space character (a pre-token boundary); a hard cut only when a piece has no newline."""
    out, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind("\n", start, end)
        while cut > start and text[cut + 1:cut + 2].isspace():
            cut = text.rfind("\n", start, cut)
        cut = cut + 1 if cut > start else end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _join(docs: list[torch.Tensor], tokenizer) -> torch.Tensor:
    """One stream of all documents, separated by EOS when the tokenizer has one: [total] int64."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or len(docs) == 1:
        return torch.cat(docs)
    sep = torch.tensor([eos], dtype=torch.int64)
    return torch.cat([t for d in docs for t in (d, sep)][:-1])
