"""How a model's tokens become text, speech ids, transcripts, audio and verdicts."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SparkeeError
from . import plugins


@dataclass
class Measures:
    """How tokens become text, speech transcripts, audio and verdicts for one model."""

    text_of: Callable[[list[int]], str]
    speech_of: Callable[[list[int]], list[int]]
    judge: Callable[[str, str, dict], bool]
    transcriber: Callable[[list[int]], str] | None = None
    vocoder: Callable | None = None
    asr: Callable | None = None
    mos: Callable | None = None


def refslm_measures(
    vocoder: str | None = "auto",
    transcriber: str | None = None,
    asr: str | None = None,
    mos: str | None = None,
    judge=None,
    model_dir: str | Path | None = None,
) -> Measures:
    """The reference SLM: words from text tokens, lexicon transcripts, espeak-ng audio."""
    from ..refslm.audio import espeak_available, espeak_missing_message
    from ..refslm.data import answer_text_from_tokens, speech_units_from_tokens
    from ..refslm.vocab import load_vocab

    vocab = load_vocab(Path(model_dir) / "vocab.json" if model_dir else None)
    if vocoder == "auto":
        if espeak_available():
            vocoder = "refslm-espeak"
        else:
            print(espeak_missing_message(), file=sys.stderr)
            vocoder = None
    return Measures(
        text_of=lambda toks: answer_text_from_tokens(toks, vocab),
        speech_of=lambda toks: speech_units_from_tokens(toks, vocab),
        judge=judge or plugins.contains_judge,
        transcriber=plugins.resolve("transcriber", transcriber or "refslm-lexicon"),
        vocoder=plugins.resolve("vocoder", vocoder),
        asr=plugins.resolve("asr", asr),
        mos=plugins.resolve("mos", mos),
    )


def generic_measures(
    model_dir: Path | None,
    speech_ids: tuple[int, int] | None,
    stop_ids,
    vocoder: str | None = None,
    transcriber: str | None = None,
    asr: str | None = None,
    mos: str | None = None,
    judge=None,
) -> Measures:
    """Any model: text = tokenizer-decoded non-speech tokens, speech = ids in the speech range."""
    from ..sources import load_tokenizer

    tok = load_tokenizer(model_dir)
    lo, hi = speech_ids if speech_ids else (0, 0)
    stops = {int(s) for s in stop_ids}

    def text_of(toks: list[int]) -> str:
        ids = [t for t in toks if not lo <= t < hi and t not in stops]
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else " ".join(map(str, ids))

    vc, tr, a = (
        plugins.resolve("vocoder", None if vocoder == "auto" else vocoder),
        plugins.resolve("transcriber", transcriber),
        plugins.resolve("asr", asr),
    )
    if speech_ids and tr is None and (a is None or vc is None):
        raise SparkeeError("speech needs a transcript: give --transcriber, or --vocoder and --asr")
    return Measures(
        text_of=text_of,
        speech_of=lambda toks: [t for t in toks if lo <= t < hi],
        judge=judge or plugins.contains_judge,
        transcriber=tr,
        vocoder=vc,
        asr=a,
        mos=plugins.resolve("mos", mos),
    )
