"""Model profiles: each family's defaults, prompt sources and measures, and `resolve_config`."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from sparkee.config import GenerationConfig
from sparkee.errors import SparkeeError
from sparkee.profiles import (
    ModelProfile,
    PresetProfile,
    ReferenceProfile,
    item_config,
    load_profile,
    resolve_config,
)
from sparkee.refslm import bundled_model_dir
from sparkee.schedule import Interleave
from sparkee.sources import PromptItem


@pytest.fixture(scope="module")
def ref() -> ReferenceProfile:
    return load_profile(bundled_model_dir())


def test_reference_profile_reads_its_model_file(ref):
    assert isinstance(ref, ReferenceProfile)
    cfg = ref.defaults
    assert cfg.interleave == Interleave(2, 12, "padded", 5) and cfg.speech_ids == (279, 342)
    assert cfg.stop_ids == [2] and cfg.temperature == 0 and cfg.speech_policy == "full"
    assert ref.heads is not None and ref.heads.name == "tuned-lens-speech.safetensors"
    assert ref.default_policies(16) == [
        "full", "fixed:12", "confidence:12:0.5", "spar-k:even:12", "spar-k:odd:12", "spar-k:triple:12",
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["padded", "early-stop"])
def test_a_test_question_encodes_to_its_stored_prompt(ref, fmt):
    items = ref.prompts("refslm:test", fmt)[:12]
    assert {it.meta["format"] for it in items} == {fmt}
    for it in items:
        assert ref.encode_text(it.meta["question"], fmt) == it.ids, it.meta["question"]
    # case and punctuation do not matter; the words are spoken as units, not one token each
    q = items[0].meta["question"]
    assert ref.encode_text(q.upper() + "?", fmt) == items[0].ids
    assert len(items[0].ids) > 4 + len(q.split())


def test_reference_text_prompts_refuse_unknown_words_and_formats(ref):
    with pytest.raises(SparkeeError, match="does not know the word 'quokka'"):
        ref.encode_text("what does a quokka say")
    with pytest.raises(SparkeeError, match="prompt is empty"):
        ref.encode_text(" ?! ")
    with pytest.raises(SparkeeError, match="padded or early-stop"):
        ref.encode_text("tell me one plus two", "auto")
    # a question that is not in the bundled data still gets the model's prompt layout
    ids = ref.encode_text("what is two plus two", "early-stop")
    assert ids[:2] == [1, 3] and ids[-2:] == [4, 7] and all(279 <= t < 342 for t in ids[2:-2])


def test_jsonl_text_prompts_of_the_reference_model_are_spoken(ref, tmp_path):
    import json

    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "tell me one plus two", "accepted": ["three"]}) + "\n")
    (item,) = ref.prompts(str(f), "padded")
    assert item.ids == ref.encode_text("tell me one plus two", "padded")
    assert item.meta["accepted"] == ["three"]


def test_describe_decodes_the_reference_models_answer(ref):
    from sparkee.refslm.data import build_answer, load_split

    ex = next(e for e in load_split("test") if e.id == "test-00002")
    tokens, _ = build_answer(ex, ref.vocab, "padded")
    assert ref.describe(tokens, ref.defaults) == {"text": ex.answer, "speech_transcript": ex.answer}


def test_plain_transformers_profile_takes_stop_ids_from_eos(tmp_path):
    tiny_model("glm").save_pretrained(tmp_path / "glm")  # eos_token_id [1]
    p = load_profile(tmp_path / "glm")
    assert type(p) is ModelProfile and p.name == "transformers"
    assert p.defaults.stop_ids == [1] and p.defaults.interleave is None and p.defaults.speech_ids is None
    assert p.default_policies(8)[1:3] == ["fixed:6", "confidence:6:0.5"]
    with pytest.raises(SparkeeError, match="prompts of the bundled reference model"):
        p.prompts("refslm:test")
    with pytest.raises(SparkeeError, match="need a tokenizer"):
        p.encode_text("hello")


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def instruct_dir(tmp_path, template: str | None = CHATML):
    """A tiny llama with a character-level tokenizer, with or without a ChatML chat template."""
    from test_model_presets import make_tokenizer

    d = tmp_path / ("instruct" if template else "base")
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"])
    if template:
        tok.chat_template = template
    tok.save_pretrained(d)
    tiny_model("llama", layers=2, vocab=len(tok)).save_pretrained(d)
    return d, tok


def test_a_plain_instruct_model_builds_dialogues_with_its_chat_template(tmp_path):
    d, tok = instruct_dir(tmp_path)
    p = load_profile(d)
    assert type(p) is ModelProfile and p.chat_template
    history = {
        "system": "Be brief.",
        "turns": [
            {"role": "user", "text": "hi"},
            {"role": "assistant", "text": "hello"},
        ],
    }
    ids = p.encode_dialogue(history, text="and now?")
    want = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nand now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    # a reply given as the ids the model generated is the text they decode to
    reply = tok.encode("hello", add_special_tokens=False)
    as_ids = {**history, "turns": [history["turns"][0], {"role": "assistant", "ids": reply}]}
    as_text = {**history, "turns": [history["turns"][0], {"role": "assistant", "text": tok.decode(reply)}]}
    assert p.encode_dialogue(as_ids, text="and now?") == p.encode_dialogue(as_text, text="and now?")
    # no system message: the template's own default (none in this one) is left to the template
    bare = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert p.encode_dialogue({"turns": []}, text="hi") == bare["input_ids"]
    assert p.encode_question("hi") == bare["input_ids"]  # one chat message, as the server builds it
    spoken = {"turns": [{"role": "user", "speech": [1, 2]}, {"role": "assistant", "text": "x"}]}
    with pytest.raises(SparkeeError, match="text turns only"):
        p.encode_dialogue(spoken, text="y")
    data = tmp_path / "dialogues.jsonl"  # a prompt file's history records go through it too
    data.write_text(json.dumps({"history": history, "prompt": "and now?"}) + "\n")
    assert p.prompts(str(data))[0].ids == ids


def test_a_plain_model_without_a_chat_template_refuses_dialogues(tmp_path):
    d, _ = instruct_dir(tmp_path, template=None)
    p = load_profile(d)
    assert not p.chat_template and p.encode_text("hi")  # a text prompt is still taken as it is
    assert p.encode_question("hi") == p.encode_text("hi")  # one chat message: its bare text
    with pytest.raises(SparkeeError, match="chat format.*has none"):
        p.encode_dialogue({"turns": []}, text="hi")
    assert not load_profile(bundled_model_dir()).chat_template  # the reference SLM hears units


def test_preset_profiles_wrap_the_models_presets(tmp_path):
    p = load_profile(tmp_path, preset="glm-4-voice")
    assert isinstance(p, PresetProfile) and p.name == "glm-4-voice"
    assert p.default_policies(40)[:3] == ["full", "fixed:38", "confidence:36:0.5"]
    # no tokenizer files: the speech and stop ids must come from the command line
    with pytest.raises(SparkeeError, match="--speech-ids"):
        resolve_config(p, {})
    cfg = resolve_config(p, {"speech_ids": (151552, 167936), "stop_ids": [151336]})
    assert cfg.speech_ids == (151552, 167936) and cfg.stop_ids == [151336]
    assert cfg.interleave.text == 13 and cfg.interleave.speech == 26 and cfg.speech_policy == "spar-k:even:36"
    with pytest.raises(SparkeeError, match="unknown preset"):
        load_profile(tmp_path, preset="nope")


def test_resolve_config_applies_overrides_and_keeps_the_rest():
    base = GenerationConfig(
        interleave=Interleave(2, 12, "padded", 5), speech_ids=(10, 20), stop_ids=[2], temperature=0.7, seed=3
    )
    p = ModelProfile("x", None, base)
    assert resolve_config(p) == base
    assert resolve_config(p, {"temperature": None, "top_p": None}) == base  # None keeps the default
    cfg = resolve_config(p, {"max_new_tokens": 5, "format": "early-stop"})
    assert cfg.interleave == Interleave(2, 12, "early-stop", 5) and cfg.temperature == 0.7 and cfg.seed == 3
    assert cfg.max_new_tokens == 5
    cfg = resolve_config(p, {"interleave": (1, 3)})  # a new ratio keeps the format and text-end id
    assert cfg.interleave == Interleave(1, 3, "padded", 5)
    assert resolve_config(p, {"stop_ids": []}).stop_ids == []  # explicitly none
    assert resolve_config(p, {"text_end_id": 7}).interleave.text_end_id == 7
    with pytest.raises(TypeError, match="unknown keys"):
        resolve_config(p, {"temprature": 1.0})
    plain = ModelProfile("plain", None)
    with pytest.raises(SparkeeError, match="need --interleave"):
        resolve_config(plain, {"format": "early-stop"})
    with pytest.raises(SparkeeError, match="text-end token id"):
        resolve_config(plain, {"interleave": (1, 2), "format": "early-stop"})
    assert resolve_config(plain, {"interleave": (0, 1)}).interleave == Interleave(0, 1)


def test_item_config_follows_the_prompts_format():
    cfg = GenerationConfig(interleave=Interleave(2, 12, "padded", 5))
    item = PromptItem([1, 2], {"format": "early-stop"})
    assert item_config(cfg, item).interleave.format == "early-stop"
    assert item_config(cfg, PromptItem([1, 2])) is cfg


def test_a_config_of_parsed_specs_keys_manifests_like_the_strings_it_came_from():
    from sparkee import parse_accept, parse_policy
    from sparkee.config import parse_pool
    from sparkee.profiles import config_json

    strings = GenerationConfig(speech_policy="spar-k:even:3", text_policy="fixed:2", accept="typical:0.2")
    parsed = GenerationConfig(
        speech_policy=parse_policy("spar-k:even:3"),
        text_policy=parse_policy("fixed:2"),
        accept=parse_accept("typical:0.2"),
    )
    assert config_json(parsed) == config_json(strings)
    assert (
        config_json(parsed)["speech_policy"] == "spar-k:even:3"
        and config_json(parsed)["accept"] == "typical:0.2"
    )
    # a pooling setting keys by its values, not by how its text was spelled
    a = config_json(GenerationConfig(prefill_pool=parse_pool("in=0.8,deep=0.7@2")))
    assert a == config_json(GenerationConfig(prefill_pool=parse_pool("in=0.80, deep=0.7@2")))
    assert a != config_json(GenerationConfig(prefill_pool=parse_pool("in=0.9,deep=0.7@2")))
    assert str(parse_policy("spar-k:even:3")) == "spar-k:even:3" and str(parse_accept("topk:2")) == "topk:2"
