"""Prompt sources for head training, layer reports and evaluation (`--data SOURCE`).

SOURCE is one of:
- a JSONL file, one prompt per line: {"prompt_ids": [1, 2, 3]} or {"prompt": "text"} (needs a
  tokenizer in the model directory); other keys ride along as metadata;
- a directory saved by the `datasets` library (`Dataset.save_to_disk`) with a `prompt_ids`,
  `input_ids`, `prompt` or `text` column;
- `refslm:train`, `refslm:dev` or `refslm:test`: the reference model's spoken-QA splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SparkeeError

ID_KEYS = ("prompt_ids", "input_ids")
TEXT_KEYS = ("prompt", "text")


@dataclass
class PromptItem:
    ids: list[int]
    meta: dict = field(default_factory=dict)  # e.g. the QA example a prompt came from


def _from_record(rec: dict, where: str, tokenizer) -> PromptItem:
    if not isinstance(rec, dict):
        raise SparkeeError(f"{where} is not a JSON object with a 'prompt_ids' or 'prompt' key")
    for k in ID_KEYS:
        if k in rec:
            ids = rec[k]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise SparkeeError(f"{where}: '{k}' must be a non-empty list of token ids")
            return PromptItem(ids, {m: v for m, v in rec.items() if m != k})
    for k in TEXT_KEYS:
        if k in rec:
            if tokenizer is None:
                raise SparkeeError(
                    f"{where} has text prompts but the model directory has no tokenizer; use prompt_ids"
                )
            ids = tokenizer(str(rec[k]))["input_ids"]
            if not ids:
                raise SparkeeError(f"{where}: the prompt text encodes to no tokens")
            return PromptItem(ids, {m: v for m, v in rec.items() if m != k} | {"text": rec[k]})
    raise SparkeeError(f"{where} has none of the keys {', '.join(ID_KEYS + TEXT_KEYS)}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_dir: str | Path | None):
    """The model directory's tokenizer, or None when it has none usable."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    # transformers 5 builds an empty tokenizer when the files are missing, so look for them first
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(d)
    except Exception:  # noqa: BLE001 - no usable tokenizer: text prompts will be refused
        return None


def load_prompts(
    source: str, model_dir: str | Path | None = None, limit: int | None = None, fmt: str | None = None
) -> list[PromptItem]:
    """Read prompts from SOURCE (see the module docstring); an empty or malformed source is refused.

    `fmt` picks one interleave format for sources that hold each prompt in both (refslm:*)."""
    if source.startswith("refslm:"):
        from .presets import refslm_prompts

        split = source.split(":", 1)[1]
        items = refslm_prompts(split, formats=(fmt,) if fmt else ("padded", "early-stop"))
    else:
        p = Path(source)
        tokenizer = None
        if p.is_dir():
            items = _from_datasets_dir(p, model_dir)
        elif p.is_file():
            items = []
            for n, line in enumerate(p.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise SparkeeError(f"line {n} of '{source}' is not valid JSON") from None
                if tokenizer is None and any(k in rec for k in TEXT_KEYS) and isinstance(rec, dict):
                    tokenizer = load_tokenizer(model_dir)
                items.append(_from_record(rec, f"line {n} of '{source}'", tokenizer))
        else:
            raise SparkeeError(f"data source '{source}' is neither a file, a directory nor refslm:SPLIT")
    if not items:
        raise SparkeeError(f"data source '{source}' holds no prompts")
    return items[:limit] if limit else items


def _from_datasets_dir(p: Path, model_dir) -> list[PromptItem]:
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
    tokenizer = load_tokenizer(model_dir) if any(k in ds.column_names for k in TEXT_KEYS) else None
    return [_from_record(dict(r), f"row {i} of '{p}'", tokenizer) for i, r in enumerate(ds)]
