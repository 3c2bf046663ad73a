"""Tokenizers from an HF checkpoint directory (`tokenizer.json`), optional: without one, prompts are token ids."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from msjax.errors import CheckpointError


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer | None:
    """The directory's tokenizer.json, or None when it has none."""
    if path is None:
        return None
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises a bare Exception for malformed files
        raise CheckpointError(f"{file}: cannot load tokenizer ({err})") from None
