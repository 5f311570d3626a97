"""How far apart two of the reference SLM's speech units sound: the built-in distances of the
`unit-distance:D` acceptance rule (accept.py names them by import path: `refslm`,
`refslm-phone-class`).

The reference SLM's speech tokens are espeak-ng phoneme units, so a distance can follow phonetics:
the same unit is 0 apart; `phone_class_distance` puts units of one broad class (vowels; stops;
fricatives and affricates; nasals; liquids and glides; silence) 0.5 apart and others 1.
"""

from __future__ import annotations

from .vocab import load_vocab


def unit_distance(a: int, b: int) -> float:
    """0 for the same unit, 1 otherwise."""
    return 0.0 if a == b else 1.0


class PhoneClassDistance:
    """0 same unit, 0.5 same broad phonetic class, 1 otherwise (the vocabulary is read once)."""

    def __init__(self) -> None:
        vocab = load_vocab()
        self.classes = {uid: phone_class(vocab.unit_name(uid)) for uid in range(*vocab.speech_range)}

    def __call__(self, a: int, b: int) -> float:
        if a == b:
            return 0.0
        ca, cb = self.classes.get(a), self.classes.get(b)
        return 0.5 if ca is not None and ca == cb else 1.0


phone_class_distance = PhoneClassDistance  # the name accept.BUILTIN_DISTANCES gives it

_VOWELS = set("aAeEiIoOuUV03@")
_STOPS = {"p", "b", "t", "d", "k", "g", "?", "t#", "d#"}
_FRICATIVES = {"f", "v", "T", "D", "s", "z", "S", "Z", "h", "x", "tS", "dZ"}
_NASALS = {"m", "n", "N", "n-", "m-"}
_APPROX = {"l", "r", "w", "j", "l-", "r-", "R"}


def phone_class(name: str) -> str:
    """Broad class of an espeak-ng phoneme name (as the reference SLM's units are named)."""
    if name in ("_", "sil", ""):
        return "silence"
    if name in _STOPS:
        return "stop"
    if name in _FRICATIVES:
        return "fricative"
    if name in _NASALS:
        return "nasal"
    if name in _APPROX:
        return "approximant"
    if name[0] in _VOWELS:
        return "vowel"
    return "other:" + name
