"""Speech units and the lexicon decoder: round trip and tolerance."""

from __future__ import annotations

import numpy as np
import pytest

from sparkee.refslm.data import build_answer, load_split, speech_units_from_tokens
from sparkee.refslm.lexicon import LexiconDecoder
from sparkee.refslm.units import SIL, collapse, load_lexicon, text_to_unit_names
from sparkee.refslm.vocab import RefVocab


@pytest.fixture(scope="module")
def vocab():
    return RefVocab.load()


@pytest.fixture(scope="module")
def decoder(vocab):
    return LexiconDecoder(vocab)


def test_units_contiguous_at_end(vocab):
    s, e = vocab.speech_range
    assert e == len(vocab)
    assert all(vocab.token(i).startswith("[") for i in range(s, e))
    assert vocab.silence_id == s and vocab.unit_name(s) == SIL
    assert not any(vocab.is_speech(vocab.id(w)) for w in vocab.words)


def test_lexicon_covers_vocab_without_homophones(vocab):
    lex = load_lexicon()
    assert set(vocab.words) <= set(lex)
    prons = [tuple(lex[w]) for w in vocab.words]
    assert len(set(prons)) == len(prons)


def test_durations_seeded_and_in_range():
    lex = load_lexicon()
    a = text_to_unit_names("the capital of france is paris", lex, 7)
    assert a == text_to_unit_names("the capital of france is paris", lex, 7)
    assert a != text_to_unit_names("the capital of france is paris", lex, 8)
    runs = []
    for x in a:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    assert all(1 <= n <= 5 for _, n in runs)


def test_round_trip_many_test_answers(vocab, decoder):
    exs = load_split("test")
    for i, ex in enumerate(exs):
        units = vocab.encode_units(ex.answer, load_lexicon(), seed=i)
        assert decoder.decode(units) == ex.answer
        ans, _ = build_answer(ex, vocab, "early-stop")
        assert decoder.decode(speech_units_from_tokens(ans, vocab)) == ex.answer


def test_lexicon_tolerates_flipped_units(vocab, decoder):
    rng = np.random.default_rng(0)
    s, e = vocab.speech_range
    exs = load_split("test")[:60]
    ok = 0
    for i, ex in enumerate(exs):
        units = vocab.encode_units(ex.answer, load_lexicon(), seed=i)
        # flip two non-silence frames to a random other phoneme
        idx = [k for k, u in enumerate(units) if u != vocab.silence_id]
        for k in rng.choice(idx, size=2, replace=False):
            units[k] = int(rng.integers(s + 1, e))
        ok += decoder.decode(units) == ex.answer
    assert ok / len(exs) >= 0.75


def test_lexicon_handles_missing_and_extra_silence(vocab, decoder):
    lex = load_lexicon()
    text = "the capital of france is paris"
    units = vocab.encode_units(text, lex, seed=3)
    no_sil = [u for u in units if u != vocab.silence_id]
    assert decoder.decode(no_sil) == text
    names = collapse([vocab.unit_name(u) for u in units])
    # a silence in the middle of "capital"
    k = names.index("p")
    names.insert(k, SIL)
    assert decoder.decode([vocab.unit_id(n) for n in names]) == text
    assert decoder.decode([]) == ""
