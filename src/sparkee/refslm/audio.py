"""Speech units -> audio with espeak-ng (phoneme input) at 16 kHz.

units -> collapse repeats -> phonemes (silence units become word breaks) -> ``[[...]]`` phoneme
input for espeak-ng -> WAV (``espeak-ng -w``) -> 16 kHz mono with sox. Only this module and
:mod:`sparkee.refslm.asr` need external tools; everything else runs without them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .units import SIL, collapse, espeak_binary
from .vocab import RefVocab

ESPEAK_MISSING_MESSAGE = (
    "espeak-ng not found: audio steps skipped (install with `apt-get install espeak-ng sox`)"
)
SAMPLE_RATE = 16000


def espeak_available() -> bool:
    """True when espeak-ng (and sox, for resampling) can be run."""
    return espeak_binary() is not None and shutil.which("sox") is not None


def espeak_missing_message() -> str:
    return ESPEAK_MISSING_MESSAGE


def units_to_phoneme_string(unit_ids: Sequence[int], vocab: RefVocab) -> str:
    """espeak-ng phoneme input (``[[...]]``) for a unit sequence; silences become word breaks."""
    s, e = vocab.speech_range
    names = collapse([vocab.unit_name(int(u)) for u in unit_ids if s <= int(u) < e])
    words, cur = [], []
    for p in names:
        if p == SIL:
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(p)
    if cur:
        words.append("".join(cur))
    return "[[" + " ".join(words) + "]]"


def units_to_wav(
    unit_ids: Sequence[int], vocab: RefVocab, path: str | Path, speed: int = 150, voice: str = "en-us"
) -> Path | None:
    """Synthesize speech units to a 16 kHz mono WAV at ``path``; None if espeak-ng/sox are missing
    or there is nothing to say."""
    if not espeak_available():
        return None
    phon = units_to_phoneme_string(unit_ids, vocab)
    if phon == "[[]]":
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "raw.wav"
        subprocess.run(
            [espeak_binary(), "-v", voice, "-s", str(speed), "-w", str(raw), phon],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def text_to_wav(text: str, path: str | Path, voice: str = "en-us") -> Path | None:
    """Reference audio straight from text (for comparisons); None without espeak-ng/sox."""
    if not espeak_available():
        return None
    path = Path(path)
    with tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "raw.wav"
        subprocess.run([espeak_binary(), "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
        subprocess.run(
            ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(path)], check=True
        )
    return path
