"""The source model's tokenizer, loaded without remote code."""
from __future__ import annotations

from pathlib import Path

from streamq.errors import StreamqError


def load_tokenizer(folder: Path):
    """transformers' AutoTokenizer of folder; StreamqError (one line) when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise StreamqError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
