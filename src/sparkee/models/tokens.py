"""Special-token ids read from a model directory's tokenizer files (no tokenizer library needed).

The presets, prompt builders and converters read every id they need through these helpers and
never fall back to a built-in number: a missing id is reported as missing, and the caller
decides whether to refuse (one sentence naming what to pass) or to carry on without it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import SparkeeError

# files that can name special tokens; their presence means "this directory has a tokenizer"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "added_tokens.json")


def read_json(p: Path) -> dict | list | None:
    """The parsed JSON file, or None when it is absent or unreadable (callers treat both as 'not listed')."""
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def has_tokenizer_files(model_dir: str | Path | None) -> bool:
    return model_dir is not None and any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def find_token_ids(model_dir: str | Path, tokens: Iterable[str]) -> dict[str, int]:
    """Ids of `tokens` as listed by `tokenizer_config.json` ("added_tokens_decoder"),
    `tokenizer.json` ("added_tokens" and the model vocab) or `added_tokens.json`; absent ones are left out."""
    model_dir = Path(model_dir)
    want = set(tokens)
    found: dict[str, int] = {}
    tc = read_json(model_dir / "tokenizer_config.json")
    if isinstance(tc, dict) and isinstance(tc.get("added_tokens_decoder"), dict):
        for i, entry in tc["added_tokens_decoder"].items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content in want:
                found.setdefault(content, int(i))
    tj = read_json(model_dir / "tokenizer.json")
    if isinstance(tj, dict):
        for entry in tj.get("added_tokens") or []:
            if isinstance(entry, dict) and entry.get("content") in want:
                found.setdefault(entry["content"], int(entry["id"]))
        vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj.get("model"), dict) else None
        if isinstance(vocab, dict):
            for t in want - set(found):
                if t in vocab:
                    found[t] = int(vocab[t])
    at = read_json(model_dir / "added_tokens.json")
    if isinstance(at, dict):
        for t in want - set(found):
            if t in at:
                found[t] = int(at[t])
    return found


def tokenizer_id(tokenizer, token: str, default: int | None = None) -> int | None:
    """The tokenizer's id for a special token when it knows it, else `default`."""
    conv = getattr(tokenizer, "convert_tokens_to_ids", None)
    if conv is not None:
        try:
            i = conv(token)
        except (KeyError, ValueError, TypeError):
            i = None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(i, int) and i >= 0 and i != unk:
            return i
    return default


def special_id_resolver(model: str, tokenizer=None, model_dir: str | Path | None = None):
    """A function token -> id that asks `tokenizer`, then `model_dir`'s files, and otherwise
    raises one sentence naming the token (prompt builders need every special they write)."""
    file_ids: dict[str, int] = {}

    def sp(token: str) -> int:
        i = tokenizer_id(tokenizer, token) if tokenizer is not None else None
        if i is not None:
            return i
        if model_dir is not None and token not in file_ids:
            file_ids.update(find_token_ids(model_dir, [token]))
        if token in file_ids:
            return file_ids[token]
        files = f" and the tokenizer files in '{model_dir}' do not list it" if model_dir is not None else ""
        raise SparkeeError(
            f"the id of {model}'s special token {token} is unknown: the tokenizer does not know it{files}, "
            "so pass the model's own tokenizer or its directory"
        )

    return sp


__all__ = [
    "TOKENIZER_FILES",
    "find_token_ids",
    "has_tokenizer_files",
    "read_json",
    "special_id_resolver",
    "tokenizer_id",
]
