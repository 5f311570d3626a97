"""Audio path (espeak-ng + sox) and pocketsphinx; skipped when the tools are missing."""

from __future__ import annotations

import wave

import pytest

from sparkee.refslm.audio import (
    ESPEAK_MISSING_MESSAGE,
    espeak_available,
    text_to_wav,
    units_to_phoneme_string,
    units_to_wav,
)
from sparkee.refslm.units import load_lexicon
from sparkee.refslm.vocab import RefVocab


def test_phoneme_string_and_message():
    v = RefVocab.load()
    units = v.encode_units("a cow says moo", load_lexicon(), seed=0)
    s = units_to_phoneme_string(units, v)
    assert s.startswith("[[") and s.endswith("]]") and len(s[2:-2].split()) == 4
    assert "espeak-ng not found" in ESPEAK_MISSING_MESSAGE


@pytest.mark.skipif(not espeak_available(), reason=ESPEAK_MISSING_MESSAGE)
def test_units_to_wav_16k(tmp_path):
    v = RefVocab.load()
    units = v.encode_units("the capital of france is paris", load_lexicon(), seed=0)
    p = units_to_wav(units, v, tmp_path / "a.wav")
    assert p is not None and p.exists()
    with wave.open(str(p)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        assert 0.5 < w.getnframes() / 16000 < 5
    assert units_to_wav([], v, tmp_path / "b.wav") is None


@pytest.mark.skipif(not espeak_available(), reason=ESPEAK_MISSING_MESSAGE)
def test_pocketsphinx_transcribes(tmp_path):
    pytest.importorskip("pocketsphinx")
    from sparkee.refslm.asr import transcribe_wav

    sentence = "the opposite of closed is open"
    v = RefVocab.load()
    units = v.encode_units(sentence, load_lexicon(), seed=0)
    # espeak-ng voices are hard for pocketsphinx (it recognises 0-13% of answers whole), but the
    # pipeline (16 kHz mono, units -> phonemes -> audio) must carry enough for some of the words:
    # a wrong rate, channel count or phoneme string turns the transcript into unrelated words
    for p in (units_to_wav(units, v, tmp_path / "a.wav"), text_to_wav(sentence, tmp_path / "b.wav")):
        hyp = transcribe_wav(p)
        assert len(set(hyp.split()) & set(sentence.split())) >= 2, hyp
