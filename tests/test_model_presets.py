"""Model presets (GLM-4-Voice, Step-Audio-2-mini) and their chat-prompt builders."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from sparkee import SparkeeError, expected_depth, generate, load_model, parse_policy
from sparkee.models import PRESETS, generation_config, glm4_voice, preset, step_audio2


class StubTokenizer:
    """Encodes each character as 1000 + its code point; knows only the specials it is given."""

    def __init__(self, specials: dict[str, int] | None = None) -> None:
        self.specials = specials or {}
        self.unk_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return [1000 + ord(c) for c in text]

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.specials.get(token, self.unk_token_id)


ENC = StubTokenizer().encode


def enc(s):
    return ENC(s, add_special_tokens=False)


def test_presets_are_listed_and_unknown_names_fail():
    assert sorted(PRESETS) == ["glm-4-voice", "step-audio-2-mini"]
    with pytest.raises(
        SparkeeError, match="unknown preset 'qwen': use one of glm-4-voice, step-audio-2-mini"
    ):
        preset("qwen")
    assert preset("GLM-4-Voice") == PRESETS["glm-4-voice"]


def test_default_presets_hold_the_public_ids_and_paper_settings():
    g = preset("glm-4-voice")
    assert g["interleave"] == (13, 26) and g["format"] == "padded"
    assert g["speech_ids"] == (151552, 151552 + 16384)
    assert g["stop_ids"] == [151329, 151336, 151338] and g["temperature"] == 0.0
    assert {"spar-k:even:36", "spar-k:triple:37", "confidence:36:0.5"} <= set(g["policies"])
    s = preset("step-audio-2-mini")
    assert s["speech_ids"] == (151696, 158720) and s["interleave"][1] == 4
    assert set(range(151688, 151696)) <= set(s["control_ids"])
    assert (s["temperature"], s["top_p"]) == (0.7, 0.9)
    assert {"spar-k:even:22", "spar-k:odd:22", "spar-k:triple:22", "confidence:26:0.1", "fixed:25"} <= set(
        s["policies"]
    )
    assert "defaults" in g["source"] and "defaults" in s["source"]


@pytest.mark.parametrize(
    "name, spec, chunk, depth",
    [
        ("glm-4-voice", "spar-k:even:36", 26, 38.0),
        ("glm-4-voice", "spar-k:odd:36", 26, 38.0),
        ("glm-4-voice", "spar-k:triple:37", 26, (9 * 40 + 17 * 37) / 26),
        ("glm-4-voice", "spar-k:even:33", 26, 36.5),
        ("step-audio-2-mini", "spar-k:even:22", 4, 25.0),
        ("step-audio-2-mini", "spar-k:odd:22", 4, 25.0),
        ("step-audio-2-mini", "spar-k:triple:22", 4, 25.0),
        ("step-audio-2-mini", "fixed:25", 4, 25.0),
    ],
)
def test_paper_policies_parse_and_give_the_paper_depths(name, spec, chunk, depth):
    p = preset(name)
    assert spec in p["policies"]
    assert expected_depth(parse_policy(spec, p["num_layers"]), p["num_layers"], chunk) == pytest.approx(depth)
    for s in p["policies"]:
        parse_policy(s, p["num_layers"])
    assert round((9 * 40 + 17 * 37) / 26, 2) == 38.04


def test_presets_read_ids_from_tokenizer_files(tmp_path):
    g = tmp_path / "glm"
    g.mkdir()
    (g / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"40": {"content": "<|audio_0|>"}}})
    )
    (g / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "eos_token_id": [1, 2]}))
    p = preset("glm-4-voice", g)
    assert p["speech_ids"] == (40, 40 + 16384) and p["stop_ids"] == [1, 2] and p["num_layers"] == 3
    assert str(g) in p["source"]

    s = tmp_path / "step"
    s.mkdir()
    added = [{"id": 60, "content": "<audio_0>"}, {"id": 7, "content": "<|EOT|>"}]
    (s / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"vocab": {}}}))
    (s / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 72, "num_hidden_layers": 2}}))
    p = preset("step-audio-2-mini", s)
    assert p["speech_ids"] == (60, 72) and p["stop_ids"] == [7]
    assert p["control_ids"] == [7, *range(52, 60)] and p["num_layers"] == 2

    empty = tmp_path / "empty"
    empty.mkdir()
    assert preset("step-audio-2-mini", empty)["speech_ids"] == (151696, 158720)
    assert preset("glm-4-voice", empty)["speech_ids"] == (151552, 151552 + 16384)


def test_generation_config_from_a_preset_drives_generation(tmp_path):
    d = tmp_path / "m"
    tiny_model("qwen2", layers=3, vocab=72).save_pretrained(d)
    added = [{"id": 60, "content": "<audio_0>"}, {"id": 7, "content": "<|EOT|>"}]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    p = preset("step-audio-2-mini", d)
    cfg = generation_config(p, speech_policy="spar-k:even:2", max_new_tokens=11, seed=0, stop_ids=[])
    assert cfg.speech_ids == (60, 72) and cfg.temperature == 0.7 and cfg.interleave.speech == 4
    res = generate(load_model(d), [5, 9, 11], cfg)
    assert res.modalities == (["text"] + ["speech"] * 4) * 2 + ["text"]
    assert res.exit_layers[1:5] == [3, 2, 3, 2]


def test_glm_prompt_structure():
    ids = glm4_voice.build_prompt([0, 5, 16383], None, tokenizer=StubTokenizer())
    expected = [151331, 151333, 151335, *enc("\n" + glm4_voice.DEFAULT_SYSTEM), 151336, *enc("\n")]
    expected += [151343, 151552, 151557, 151552 + 16383, 151344, 151337, *enc("streaming_transcription\n")]
    assert ids == expected
    # a tokenizer that knows the specials wins over the fixed ids; text follows the speech
    tok = StubTokenizer({"<|audio_0|>": 500, "<|user|>": 501})
    ids = glm4_voice.build_prompt([1], "hi", tokenizer=tok, system=None)
    assert ids == [
        151331,
        151333,
        501,
        *enc("\n"),
        151343,
        501,
        151344,
        *enc("hi"),
        151337,
        *enc("streaming_transcription\n"),
    ]
    with pytest.raises(SparkeeError, match="needs its tokenizer"):
        glm4_voice.build_prompt([1], None)
    with pytest.raises(SparkeeError, match="outside"):
        glm4_voice.build_prompt([16384], None, tokenizer=StubTokenizer())
    with pytest.raises(SparkeeError, match="needs input speech ids or text"):
        glm4_voice.build_prompt(None, None, tokenizer=StubTokenizer())


def test_step_audio2_prompt_structure(tmp_path):
    ids = step_audio2.build_prompt([0, 6560], None, tokenizer=StubTokenizer())
    bot, eot = step_audio2.STEP_IDS["<|BOT|>"], step_audio2.STEP_IDS["<|EOT|>"]
    expected = [bot, *enc("system\n" + step_audio2.DEFAULT_SYSTEM), eot, bot, *enc("human\n")]
    expected += [151696, 151696 + 6560, eot, bot, *enc("assistant\n"), 151693]
    assert ids == expected
    # ids from a model directory's tokenizer files
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": 3, "content": "<|BOT|>"}, {"id": 4, "content": "<|EOT|>"}]})
    )
    ids = step_audio2.build_prompt(None, "hello", tokenizer=StubTokenizer(), system=None, model_dir=tmp_path)
    assert ids == [3, *enc("human\n"), *enc("hello"), 4, 3, *enc("assistant\n"), 151693]
    with pytest.raises(SparkeeError, match="outside"):
        step_audio2.build_prompt([6561], None, tokenizer=StubTokenizer())
