"""Decoding defaults that belong to a model: interleave ratio, speech ids, stop and text-end ids.

A model directory may carry them in `sparkee_refslm.json` (the bundled reference SLM writes one);
`generate`, `train-heads`, `layer-report` and `demo` use them unless the command line overrides.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .generate import GenerationConfig
from .schedule import Interleave
from .sources import PromptItem

REFSLM_META = "sparkee_refslm.json"


def model_defaults(model_dir: str | Path) -> dict | None:
    """{'ratio': (T, S), 'speech_ids': (A, B), 'stop_ids': [...], 'text_end_id': N} or None."""
    p = Path(model_dir) / REFSLM_META
    if not p.is_file():
        return None
    m = json.loads(p.read_text())
    r = m["interleave_ratio"]
    return {
        "ratio": (int(r["text"]), int(r["speech"])),
        "speech_ids": tuple(m["speech_range"]),
        "stop_ids": [int(m["stop_id"])],
        "text_end_id": int(m["text_end_id"]),
    }


def default_config(
    model_dir: str | Path, fmt: str = "padded", max_new_tokens: int = 200, **kw
) -> GenerationConfig:
    """The model's own decoding (greedy for the reference SLM) in interleave format `fmt`."""
    d = model_defaults(model_dir)
    if d is None:
        return GenerationConfig(max_new_tokens=max_new_tokens, **kw)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        interleave=Interleave(*d["ratio"], format=fmt, text_end_id=d["text_end_id"]),
        speech_ids=d["speech_ids"],
        stop_ids=d["stop_ids"],
        **kw,
    )


def for_item(cfg: GenerationConfig, item: PromptItem) -> GenerationConfig:
    """A prompt that fixes its own interleave format (the reference SLM's format tag) gets it."""
    fmt = item.meta.get("format")
    if fmt and cfg.interleave is not None and cfg.interleave.format != fmt:
        return replace(cfg, interleave=replace(cfg.interleave, format=fmt))
    return cfg


def refslm_prompts(split: str, formats: tuple[str, ...] = ("padded", "early-stop")) -> list[PromptItem]:
    """The reference SLM's spoken questions (as speech units), once per interleave format.

    The split files are grouped by category; prompts come in one fixed shuffled order instead, so
    that `--limit N` takes a mix of categories.
    """
    import random

    from .errors import SparkeeError
    from .refslm.data import build_prompt, load_split
    from .refslm.vocab import load_vocab

    if split not in ("train", "dev", "test"):
        raise SparkeeError(f"unknown reference split '{split}': use refslm:train, refslm:dev or refslm:test")
    vocab = load_vocab()
    items = []
    examples = load_split(split)
    random.Random(0).shuffle(examples)
    for ex in examples:
        for fmt in formats:
            meta = {
                "id": ex.id,
                "question": ex.question,
                "answer": ex.answer,
                "accepted": ex.accepted,
                "format": fmt,
            }
            items.append(PromptItem(build_prompt(ex, vocab, fmt), meta))
    return items


BUNDLED_HEADS = "tuned-lens-speech.safetensors"


def bundled_heads() -> Path | None:
    """The exit heads shipped with the reference SLM (made by `sparkee train-heads`), if present."""
    from .refslm import ASSET_DIR

    p = ASSET_DIR / "heads" / BUNDLED_HEADS
    return p if p.is_file() else None
