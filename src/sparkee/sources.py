"""Prompt files for head training, layer reports and evaluation (`--data SOURCE`).

This module reads files only; what a text prompt becomes is the model's business, so callers pass
the model profile's `encode_text` (see profiles.py, which also serves `refslm:SPLIT`). SOURCE is:
- a JSONL file, one JSON object per line: {"prompt_ids": [1, 2, 3]} or {"prompt": "text"}; other
  keys ride along as metadata (e.g. "question" and "accepted" answers for evaluation);
- a directory saved by the `datasets` library (`Dataset.save_to_disk`) with a `prompt_ids`,
  `input_ids`, `prompt` or `text` column.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SparkeeError

ID_KEYS = ("prompt_ids", "input_ids")
TEXT_KEYS = ("prompt", "text")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

EncodeText = Callable[[str], list[int]]
# a line with a dialogue history: (history as in the line, the new question's text, its speech codes)
EncodeDialogue = Callable[[object, str | None, list[int] | None], list[int]]
HISTORY_KEY = "history"


@dataclass
class PromptItem:
    ids: list[int]
    meta: dict = field(default_factory=dict)  # e.g. the QA example a prompt came from


def prompts_digest(items: list[PromptItem]) -> str:
    """A short hash of prompts and their metadata: resumable runs use it to tell data apart."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.ids, it.meta], sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise SparkeeError(f"--limit must be at least 1, got {limit} (leave it out to use every prompt)")


def _from_record(
    rec: object, where: str, encode_text: EncodeText | None, encode_dialogue: EncodeDialogue | None = None
) -> PromptItem:
    if not isinstance(rec, dict):
        raise SparkeeError(f"{where} is not a JSON object with a 'prompt_ids' or 'prompt' key")
    if HISTORY_KEY in rec:  # a multi-turn prompt: the history, then this line's question
        if encode_dialogue is None:
            raise SparkeeError(
                f"{where} has a dialogue history, which needs a model with a chat format "
                "(--preset glm-4-voice or step-audio-2-mini)"
            )
        text = next((str(rec[k]) for k in TEXT_KEYS if k in rec), None)
        speech = rec.get("speech")
        ids = encode_dialogue(rec[HISTORY_KEY], text, speech)
        skip = {HISTORY_KEY, "speech", *TEXT_KEYS}
        return PromptItem(
            ids, {m: v for m, v in rec.items() if m not in skip} | ({"text": text} if text else {})
        )
    for k in ID_KEYS:
        if k in rec:
            ids = rec[k]
            ok = isinstance(ids, list) and ids and all(type(t) is int and t >= 0 for t in ids)
            if not ok:
                raise SparkeeError(f"{where}: '{k}' must be a non-empty list of token ids")
            return PromptItem(ids, {m: v for m, v in rec.items() if m != k})
    for k in TEXT_KEYS:
        if k in rec:
            if encode_text is None:
                raise SparkeeError(
                    f"{where} has a text prompt but the model has no tokenizer; give prompt_ids instead"
                )
            ids = encode_text(str(rec[k]))
            return PromptItem(ids, {m: v for m, v in rec.items() if m != k} | {"text": rec[k]})
    raise SparkeeError(f"{where} has none of the keys {', '.join(ID_KEYS + TEXT_KEYS)}")


def load_tokenizer(model_dir: str | Path | None):
    """The model directory's tokenizer, or None when it has none usable."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    # transformers 5 builds an empty tokenizer when the files are missing, so look for them first
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # AutoTokenizer picks the class from the model type (a Qwen2 config gives a BPE tokenizer
        # built from vocab.json), so a plain tokenizer.json that the config names is loaded as is
        cfg = (
            json.loads((d / "tokenizer_config.json").read_text())
            if (d / "tokenizer_config.json").is_file()
            else {}
        )
        if cfg.get("tokenizer_class") == "PreTrainedTokenizerFast" and (d / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(d)
        return AutoTokenizer.from_pretrained(d)
    except Exception:  # noqa: BLE001 - no usable tokenizer: text prompts will be refused
        return None


def read_prompt_file(
    source: str, encode_text: EncodeText | None, encode_dialogue: EncodeDialogue | None = None
) -> list[PromptItem]:
    """Every prompt of a JSONL file or a saved `datasets` directory; empty or malformed is refused.

    A line may carry a dialogue `history` (see sparkee.models.dialogue) with the new question as
    `prompt` text and/or `speech` codes; `encode_dialogue` (the model profile's) builds its ids."""
    p = Path(source)
    if p.is_dir():
        items = _from_datasets_dir(p, encode_text)
    elif p.is_file():
        items = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SparkeeError(f"line {n} of '{source}' is not valid JSON") from None
            items.append(_from_record(rec, f"line {n} of '{source}'", encode_text, encode_dialogue))
    else:
        raise SparkeeError(f"data source '{source}' is neither a file, a directory nor refslm:SPLIT")
    if not items:
        raise SparkeeError(f"data source '{source}' holds no prompts")
    return items


def _from_datasets_dir(p: Path, encode_text: EncodeText | None) -> list[PromptItem]:
    try:
        import datasets
    except ImportError:
        raise SparkeeError(
            "reading a saved dataset directory needs the `datasets` package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception:  # noqa: BLE001
        raise SparkeeError(f"'{p}' is a directory but not one saved by datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return [_from_record(dict(r), f"row {i} of '{p}'", encode_text) for i, r in enumerate(ds)]
