"""Data splits and the interleaved sequence builders (the contract with the decoding engine)."""

from __future__ import annotations

import pytest

from sparkee.refslm.data import (
    DEFAULT_RATIO,
    answer_text_from_tokens,
    build_answer,
    build_prompt,
    contains_answer,
    interleave,
    load_split,
    speech_units_from_tokens,
)
from sparkee.refslm.vocab import RefVocab


@pytest.fixture(scope="module")
def vocab():
    return RefVocab.load()


@pytest.fixture(scope="module")
def splits():
    return {k: load_split(k) for k in ("train", "dev", "test")}


def test_splits_sizes_and_disjoint(splits):
    assert 100 <= len(splits["test"]) <= 200
    train_q = {ex.question for ex in splits["train"]}
    for name in ("dev", "test"):
        assert not train_q & {ex.question for ex in splits[name]}
    # held-out plus pairs: the answer sentence itself never appears in training
    train_a = {ex.answer for ex in splits["train"]}
    plus = [ex for ex in splits["test"] if ex.category == "plus"]
    assert plus and all(ex.answer not in train_a for ex in plus)
    for ex in splits["test"]:
        assert 3 <= len(ex.answer.split()) <= 12
        assert contains_answer(ex.answer, ex.accepted)


def test_prompt_layout(vocab, splits):
    ex = splits["test"][0]
    for fmt in ("padded", "early-stop"):
        p = build_prompt(ex, vocab, fmt)
        assert p[:2] == [vocab.bos_id, vocab.id("<user>")]
        assert p[-2:] == [vocab.id("<assistant>"), vocab.format_tag_id(fmt)]
        assert all(vocab.is_speech(t) for t in p[2:-2])
    assert build_prompt(ex, vocab, "esi") == build_prompt(ex, vocab, "early-stop")


def _runs(modal):
    runs = []
    for m in modal:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return runs


@pytest.mark.parametrize("ratio", [DEFAULT_RATIO, (3, 10), (1, 8)])
def test_padded_keeps_ratio(vocab, splits, ratio):
    T, S = ratio
    for ex in splits["test"][:40]:
        ids, modal = build_answer(ex, vocab, "padded", ratio)
        assert ids[-1] == vocab.eos_id and ids.count(vocab.eos_id) == 1
        assert len(ids) == len(modal)
        for step, (t, m) in enumerate(zip(ids[:-1], modal[:-1], strict=True)):
            if step % (T + S) < T:
                assert m == "text" and (vocab.is_word(t) or t == vocab.pad_id)
            else:
                assert m == "speech" and vocab.is_speech(t)
        assert vocab.eot_id not in ids
        # every full speech chunk is S long
        speech_runs = [n for m, n in _runs(modal[:-1]) if m == "speech"]
        assert all(n == S for n in speech_runs[:-1]) and speech_runs[-1] <= S
        assert answer_text_from_tokens(ids, vocab) == ex.answer


@pytest.mark.parametrize("ratio", [DEFAULT_RATIO, (3, 10)])
def test_early_stop_format(vocab, splits, ratio):
    T, S = ratio
    for ex in splits["test"][:40]:
        ids, modal = build_answer(ex, vocab, "early-stop", ratio)
        assert ids[-1] == vocab.eos_id
        assert ids.count(vocab.eot_id) == 1 and vocab.pad_id not in ids
        k = ids.index(vocab.eot_id)
        assert k % (T + S) < T  # <eot> sits in a text slot
        assert all(vocab.is_speech(t) for t in ids[k + 1 : -1])  # no text after <eot>
        for step in range(k):
            assert (modal[step] == "text") == (step % (T + S) < T)
        speech_runs = [n for m, n in _runs(modal[:k]) if m == "speech"]
        assert all(n == S for n in speech_runs)
        assert answer_text_from_tokens(ids, vocab) == ex.answer
        # same speech as the padded format (same seed) up to silence filling before <eot>
        pids, _ = build_answer(ex, vocab, "padded", ratio)
        sp, psp = speech_units_from_tokens(ids, vocab), speech_units_from_tokens(pids, vocab)
        assert sp[: len(psp)] == psp and set(sp[len(psp) :]) <= {vocab.silence_id}


def test_silence_fill_when_speech_runs_out(vocab):
    words = vocab.encode_words("one two three four five six")
    sp = [vocab.silence_id + 5]
    for fmt in ("padded", "early-stop"):
        ids, modal = interleave(words, sp, vocab, fmt, (2, 3))
        assert ids[:2] == words[:2] and ids[2] == sp[0]
        assert ids[3:5] == [vocab.silence_id] * 2
        assert ids[-1] == vocab.eos_id
        assert answer_text_from_tokens(ids, vocab) == "one two three four five six"


def test_vocab_roundtrip_and_hf_tokenizer(vocab, tmp_path):
    vocab.save(tmp_path / "vocab.json")
    v2 = RefVocab.load(tmp_path / "vocab.json")
    assert v2.tokens == vocab.tokens and v2.speech_range == vocab.speech_range
    vocab.save_hf_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("what is the capital of france", add_special_tokens=False)["input_ids"]
    assert ids == vocab.encode_words("what is the capital of france")
    assert tok.convert_ids_to_tokens([vocab.eos_id])[0] == "<eos>"
    assert tok.eos_token_id == vocab.eos_id and tok.pad_token_id == vocab.pad_id
    assert vocab.decode(vocab.encode_words("a cow says moo")) == "a cow says moo"
