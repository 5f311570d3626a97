"""The bundled reference checkpoint loads with from_pretrained and answers a test question."""

from __future__ import annotations

import json

import pytest
import torch

from sparkee.refslm import bundled_model_dir
from sparkee.refslm.data import (
    answer_text_from_tokens,
    build_prompt,
    contains_answer,
    load_split,
    speech_units_from_tokens,
)
from sparkee.refslm.lexicon import LexiconDecoder
from sparkee.refslm.vocab import RefVocab

MODEL_DIR = bundled_model_dir()
KNOWN_TEST_ID = "test-00002"  # "name the capital of france" -> "the capital of france is paris"


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(2)
    m = Qwen2ForCausalLM.from_pretrained(MODEL_DIR).eval()  # fp16 on disk, fp32 by config
    return m


def test_bundle_files_and_meta():
    meta = json.loads((MODEL_DIR / "sparkee_refslm.json").read_text())
    vocab = RefVocab.load(MODEL_DIR / "vocab.json")
    assert meta["speech_range"] == list(vocab.speech_range)
    assert (
        meta["stop_id"] == vocab.eos_id
        and meta["text_end_id"] == vocab.eot_id
        and meta["pad_id"] == vocab.pad_id
    )
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["num_hidden_layers"] >= 16 and cfg["vocab_size"] == len(vocab)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok.eos_token_id == vocab.eos_id


@pytest.mark.parametrize("fmt", ["early-stop", "padded"])
def test_answers_known_test_question(model, fmt):
    assert model.dtype == torch.float32
    vocab = RefVocab.load(MODEL_DIR / "vocab.json")
    ex = next(e for e in load_split("test") if e.id == KNOWN_TEST_ID)
    prompt = torch.tensor([build_prompt(ex, vocab, fmt)])
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=160, do_sample=False, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id
        )
    ans = out[0, prompt.shape[1] :].tolist()
    assert ans[-1] == vocab.eos_id
    text = answer_text_from_tokens(ans, vocab)
    speech = LexiconDecoder(vocab).decode(speech_units_from_tokens(ans, vocab))
    assert contains_answer(text, ex.accepted), text
    assert contains_answer(speech, ex.accepted), speech
    if fmt == "early-stop":
        assert vocab.eot_id in ans and vocab.pad_id not in ans
    else:
        assert vocab.eot_id not in ans
