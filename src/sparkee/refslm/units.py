"""Speech units for the reference SLM: words -> phonemes -> frame-level units.

Each phoneme (espeak-ng ASCII phoneme names, stress marks removed) becomes one speech unit that
is repeated over frames at about 25 Hz; the number of frames is drawn per utterance from a
per-phoneme distribution (vowels 2-4 frames, long vowels and diphthongs 2-5, consonants 1-3) with a
seeded numpy RNG. Words are separated by a short silence unit (1-2 frames).

Pronunciations come from espeak-ng (``espeak-ng -q -x --sep=_ WORD``) **once**, at asset-build
time, over the closed word vocabulary; the word -> phonemes dict is saved as ``lexicon.json`` in
the assets, so text -> units needs no espeak-ng at run time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SIL = "_"  # the silence unit (between words)
_STRESS = str.maketrans("", "", "',%=")
_VOWEL_START = set("aAeEiIoOuUV03@")


def espeak_binary() -> str | None:
    """Path of the espeak-ng binary, or None when it is not installed."""
    return shutil.which("espeak-ng") or shutil.which("espeak")


def phonemize_word(word: str) -> list[str]:
    """Phonemes of one word from espeak-ng (build time only; needs espeak-ng)."""
    exe = espeak_binary()
    if exe is None:
        raise RuntimeError("espeak-ng is needed to phonemize new words (apt-get install espeak-ng)")
    out = subprocess.run(
        [exe, "-q", "-x", "--sep=_", "-v", "en-us", word], capture_output=True, text=True, check=True
    ).stdout
    phones = []
    for chunk in out.split():
        for ph in chunk.split("_"):
            ph = ph.translate(_STRESS).strip()
            if ph:
                phones.append(ph)
    return collapse(phones)


def build_lexicon(words: Iterable[str]) -> dict[str, list[str]]:
    """word -> phonemes for every word (calls espeak-ng once per word)."""
    return {w: phonemize_word(w) for w in sorted(set(words))}


def save_lexicon(lexicon: dict[str, list[str]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(lexicon, indent=0, sort_keys=True) + "\n")


def load_lexicon(path: str | Path | None = None) -> dict[str, list[str]]:
    """Load the word -> phonemes JSON (default: the bundled one)."""
    if path is None:
        path = Path(__file__).parent / "assets" / "lexicon.json"
    return {k: list(v) for k, v in json.loads(Path(path).read_text()).items()}


def is_vowel(ph: str) -> bool:
    return ph[:1] in _VOWEL_START


def duration_choices(ph: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The per-phoneme duration distribution (frames, probabilities)."""
    if ph == SIL:
        return (1, 2), (0.6, 0.4)
    if is_vowel(ph):
        if ":" in ph or len(ph) >= 2 and ph[1] in "aAeEiIoOuU@3#":
            return (2, 3, 4, 5), (0.2, 0.4, 0.3, 0.1)
        return (2, 3, 4), (0.45, 0.4, 0.15)
    return (1, 2, 3), (0.5, 0.4, 0.1)


def collapse(seq: Sequence) -> list:
    """Collapse runs of repeated items (units -> phonemes)."""
    out: list = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


def text_to_phonemes(text: str, lexicon: dict[str, list[str]]) -> list[str]:
    """Words -> phonemes with one SIL between consecutive words (no durations)."""
    phones: list[str] = []
    for i, w in enumerate(text.split()):
        if i:
            phones.append(SIL)
        try:
            phones.extend(lexicon[w])
        except KeyError as e:
            raise KeyError(f"word {w!r} is not in the reference lexicon") from e
    return phones


def phonemes_to_frames(phones: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Repeat each phoneme over a random number of frames (drawn from its distribution)."""
    frames: list[str] = []
    for ph in phones:
        vals, probs = duration_choices(ph)
        frames.extend([ph] * int(rng.choice(vals, p=probs)))
    return frames


def text_to_unit_names(
    text: str, lexicon: dict[str, list[str]], seed: int | np.random.Generator = 0
) -> list[str]:
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return phonemes_to_frames(text_to_phonemes(text, lexicon), rng)
