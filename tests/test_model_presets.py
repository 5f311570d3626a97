"""Model presets (GLM-4-Voice, Step-Audio-2-mini): ids from tokenizer files, the ids contract, and
the chat prompts (single and multi-turn) against the official templates.

The tokenizers here are real `tokenizers` objects saved with transformers (so the preset reads the
same files a checkpoint has): one token per character plus the models' special tokens. With them,
encoding an official template string in one go must give exactly what the builders assemble.
"""

from __future__ import annotations

import json
import string

import pytest

from conftest import tiny_model
from sparkee import (
    GenerationConfig,
    Interleave,
    SparkeeError,
    expected_depth,
    generate,
    load_model,
    parse_policy,
)
from sparkee.models import (
    PRESETS,
    Dialogue,
    Turn,
    build_dialogue,
    check_ids,
    generation_config,
    glm4_voice,
    preset,
    step_audio2,
)

CHARS = sorted(set(string.printable))
GLM_SPECIALS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_audio|>",
    "<|end_of_audio|>",
]
STEP_SPECIALS = ["<|BOT|>", "<|EOT|>", "<tts_start>", "<tts_end>", "<tts_pad>"]


def make_tokenizer(specials: list[str]):
    """A character-level fast tokenizer whose special tokens get ids len(CHARS)+1.. in order."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def glm_tok(tmp_path_factory):
    """GLM-like: specials, then <|audio_0|>..<|audio_39|> contiguous; files saved in a model dir."""
    tok = make_tokenizer([*GLM_SPECIALS, *(f"<|audio_{i}|>" for i in range(40))])
    d = tmp_path_factory.mktemp("glm-tok")
    tok.save_pretrained(d)
    return tok, d


@pytest.fixture(scope="module")
def step_tok(tmp_path_factory):
    """Step-like: specials, then <audio_0>..<audio_6561> (6561 = the audio padding token)."""
    tok = make_tokenizer([*STEP_SPECIALS, *(f"<audio_{i}>" for i in range(6562))])
    d = tmp_path_factory.mktemp("step-tok")
    tok.save_pretrained(d)
    return tok, d


def enc(tok, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False)


def tid(tok, t: str) -> int:
    return tok.convert_tokens_to_ids(t)


# ---------------------------------------------------------------------------------------------
# presets and the ids contract


def test_presets_are_listed_and_unknown_names_fail():
    assert sorted(PRESETS) == ["glm-4-voice", "step-audio-2-mini"]
    with pytest.raises(
        SparkeeError, match="unknown preset 'qwen': use one of glm-4-voice, step-audio-2-mini"
    ):
        preset("qwen")
    assert preset("GLM-4-Voice") == PRESETS["glm-4-voice"]


def test_presets_hold_the_official_settings():
    g = preset("glm-4-voice")
    assert g["interleave"] == (13, 26) and g["format"] == "auto" and g["text_end_ids"] == []
    assert (g["temperature"], g["repetition_penalty"]) == (0.0, 1.0)
    assert {"spar-k:even:36", "spar-k:triple:37", "confidence:36:0.5"} <= set(g["policies"])
    s = preset("step-audio-2-mini")
    assert s["interleave"] == (1, 4) and s["format"] == "auto"
    assert (s["temperature"], s["top_p"], s["repetition_penalty"]) == (0.7, 0.9, 1.05)
    assert {"spar-k:even:22", "spar-k:odd:22", "spar-k:triple:22", "confidence:26:0.1", "fixed:25"} <= set(
        s["policies"]
    )


@pytest.mark.parametrize("name", ["glm-4-voice", "step-audio-2-mini"])
def test_without_tokenizer_files_no_id_is_guessed(name, tmp_path):
    for p in (preset(name), preset(name, tmp_path)):
        assert p["speech_ids"] is None and p["stop_ids"] is None and p["control_ids"] is None
        assert p["special_ids"] == {} and p["missing_ids"]


def test_unknown_ids_give_one_sentence_saying_what_to_pass(tmp_path):
    g = preset("glm-4-voice", tmp_path)
    with pytest.raises(SparkeeError) as e:
        generation_config(g)
    msg = str(e.value)
    assert (
        "GLM-4-Voice's speech ids (<|audio_0|>) and stop ids" in msg
        and f"no tokenizer files in {tmp_path}" in msg
    )
    assert "--speech-ids 151552:167936 --stop-ids 151329,151336,151338" in msg
    assert msg.count(". ") == 0 and "\n" not in msg
    s = preset("step-audio-2-mini")
    with pytest.raises(SparkeeError, match=r"--speech-ids 151696:158720 --stop-ids ID \(.*<\|EOT\|>"):
        check_ids(s)
    # only what is still unknown is asked for
    with pytest.raises(SparkeeError, match=r"stop ids \(<\|EOT\|>\) are unknown") as e:
        check_ids(s, speech_ids=(10, 20))
    assert "--speech-ids" not in str(e.value)


def test_explicit_ids_are_not_refused():
    """A caller passing --speech-ids and --stop-ids gets a config even without tokenizer files."""
    cfg = generation_config(preset("glm-4-voice"), speech_ids=(40, 72), stop_ids=[3])
    assert cfg.speech_ids == (40, 72) and list(cfg.stop_ids) == [3] and cfg.control_ids is None
    assert cfg.interleave.format == "auto" and (cfg.interleave.text, cfg.interleave.speech) == (13, 26)
    # a caller that applies its overrides later asks for the config without the check
    cfg = generation_config(preset("step-audio-2-mini"), require_ids=False)
    assert cfg.speech_ids is None and list(cfg.stop_ids) == [] and cfg.temperature == 0.7


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


def test_glm_preset_reads_ids_from_tokenizer_files(glm_tok, tmp_path):
    tok, d = glm_tok
    p = preset("glm-4-voice", d)
    a0 = tid(tok, "<|audio_0|>")
    eos = [tid(tok, t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert p["speech_ids"] == (a0, a0 + 16384) and p["stop_ids"] == eos == p["control_ids"]
    assert p["special_ids"]["<|begin_of_audio|>"] == tid(tok, "<|begin_of_audio|>") and p["missing_ids"] == []
    assert str(d) in p["source"] and "no tokenizer" not in p["source"]
    # the model's own EOS list (config.json) wins, with <|user|> (where the demo stops) added
    m = tmp_path / "m"
    m.mkdir()
    for f in d.iterdir():
        (m / f.name).write_bytes(f.read_bytes())
    (m / "config.json").write_text(json.dumps({"num_layers": 3, "eos_token_id": [1, 2]}))
    p = preset("glm-4-voice", m)
    assert p["stop_ids"] == [1, 2, tid(tok, "<|user|>")] and p["num_layers"] == 3
    # only some tokens listed: what is missing is named, nothing filled in
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"40": {"content": "<|audio_0|>"}}})
    )
    p = preset("glm-4-voice", tmp_path / "part")
    assert p["speech_ids"] == (40, 40 + 16384) and p["stop_ids"] is None and "<|user|>" in p["missing_ids"]
    with pytest.raises(SparkeeError, match="stop ids"):
        generation_config(p)


def test_step_preset_reads_ids_from_tokenizer_files(step_tok, tmp_path):
    tok, d = step_tok
    p = preset("step-audio-2-mini", d)
    a0, eot, pad = tid(tok, "<audio_0>"), tid(tok, "<|EOT|>"), tid(tok, "<tts_pad>")
    assert p["speech_ids"] == (a0, a0 + 6562)  # no config.json: up to <audio_6561> inclusive
    assert p["stop_ids"] == [eot] and p["text_end_ids"] == [pad]
    assert p["speech_pad_ids"] == [tid(tok, "<audio_6561>")] == [a0 + 6561]
    assert p["control_ids"] == sorted(
        tid(tok, t) for t in ("<tts_start>", "<tts_end>", "<tts_pad>", "<|EOT|>")
    )
    assert p["missing_ids"] == []
    # with a config, the speech range runs to the vocabulary's end and the layer count follows it
    (d / "config.json").write_text(
        json.dumps({"text_config": {"vocab_size": a0 + 7000, "num_hidden_layers": 2}})
    )
    try:
        p = preset("step-audio-2-mini", d)
    finally:
        (d / "config.json").unlink()
    assert p["speech_ids"] == (a0, a0 + 7000) and p["num_layers"] == 2
    cfg = generation_config(p)
    assert cfg.interleave.format == "auto" and cfg.interleave.text_end_ids == (pad,)
    assert cfg.stop_ids == [eot] and (cfg.temperature, cfg.top_p) == (0.7, 0.9)
    assert cfg.repetition_penalty == 1.05


def test_generation_config_from_a_preset_drives_generation(tmp_path):
    d = tmp_path / "m"
    tiny_model("qwen2", layers=3, vocab=72).save_pretrained(d)
    added = [
        {"id": 60, "content": "<audio_0>"},
        {"id": 7, "content": "<|EOT|>"},
        {"id": 8, "content": "<tts_pad>"},
    ]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    p = preset("step-audio-2-mini", d)
    cfg = generation_config(p, speech_policy="spar-k:even:2", max_new_tokens=11, seed=0, stop_ids=[])
    assert cfg.speech_ids == (60, 72) and cfg.temperature == 0.7 and cfg.interleave.speech == 4
    # greedy here, so that the comparison below pins the preset's ids and interleave, not sampling
    cfg = generation_config(
        p, speech_policy="spar-k:even:2", max_new_tokens=11, seed=0, stop_ids=[], temperature=0.0
    )
    assert (
        cfg.interleave == Interleave(1, 4, "auto", None, (8,))
        and cfg.stop_ids == []
        and cfg.control_ids == [7, 8]
    )
    bb = load_model(d)
    res = generate(bb, [5, 9, 11], cfg)
    by_hand = GenerationConfig(
        max_new_tokens=11,
        speech_policy="spar-k:even:2",
        interleave=Interleave(1, 4, "auto", None, (8,)),
        speech_ids=(60, 72),
        control_ids=[7, 8],
        temperature=0.0,
        top_p=0.9,
        seed=0,
        repetition_penalty=1.05,
    )
    ref = generate(bb, [5, 9, 11], by_hand)
    assert len(res.tokens) == 11 and (res.tokens, res.modalities, res.exit_layers) == (
        ref.tokens,
        ref.modalities,
        ref.exit_layers,
    )
    # text steps run the full depth (the preset's policy exits only on speech steps)
    assert all(
        layer == 3 for layer, mod in zip(res.exit_layers, res.modalities, strict=True) if mod == "text"
    )


# ---------------------------------------------------------------------------------------------
# GLM-4-Voice prompts against web_demo.py's template


def glm_demo_prompt(
    previous_input: str, previous_completion: str, user_input: str, system_prompt: str
) -> str:
    """GLM-4-Voice web_demo.py's `inference_fn` prompt assembly, copied in its logic."""
    inputs = previous_input + previous_completion
    inputs = inputs.strip()
    if "<|system|>" not in inputs:
        inputs += f"<|system|>\n{system_prompt}"
    inputs += f"<|user|>\n{user_input}<|assistant|>streaming_transcription\n"
    return inputs


def glm_served(tok, prompt: str) -> list[int]:
    """model_server.py tokenizes the prompt with the GLM-4 tokenizer, which prepends [gMASK]<sop>."""
    return [tid(tok, "[gMASK]"), tid(tok, "<sop>"), *enc(tok, prompt)]


def test_glm_prompt_equals_the_demo_for_speech_and_text_input(glm_tok):
    tok, d = glm_tok
    audio = "<|begin_of_audio|><|audio_0|><|audio_5|><|audio_39|><|end_of_audio|>"
    want = glm_served(tok, glm_demo_prompt("", "", audio, glm4_voice.DEFAULT_SYSTEM))
    assert glm4_voice.build_prompt([0, 5, 39], tokenizer=tok) == want
    # the same ids from the model directory's files alone (the tokenizer here knows no specials)
    assert glm4_voice.build_prompt([0, 5, 39], tokenizer=CharsOnly(tok), model_dir=d) == want
    # text input: the demo's text system prompt
    want = glm_served(tok, glm_demo_prompt("", "", "What is 2+2?", glm4_voice.TEXT_SYSTEM))
    assert glm4_voice.build_prompt(None, "What is 2+2?", tokenizer=tok) == want
    # pinned by hand: the 100 printable characters come first, [UNK] is 100, the specials follow
    # in GLM_SPECIALS order ([gMASK] 102, <sop> 103, <|user|> 105, <|assistant|> 106,
    # <|begin_of_audio|> 108, <|end_of_audio|> 109) and <|audio_0|> is 110
    ids = glm4_voice.build_prompt([1], tokenizer=tok, system="")
    nl = CHARS.index("\n")
    assert ids[:8] == [102, 103, 105, nl, 108, 111, 109, 106]
    assert ids[8:] == [CHARS.index(c) for c in "streaming_transcription\n"]


def test_glm_multi_turn_appends_previous_prompt_and_completion_with_one_system_prompt(glm_tok):
    tok, _ = glm_tok
    user = tid(tok, "<|user|>")
    audio1 = "<|begin_of_audio|><|audio_3|><|audio_7|><|end_of_audio|>"
    prompt1 = glm_demo_prompt("", "", audio1, glm4_voice.DEFAULT_SYSTEM)
    completion1 = "Hi there<|audio_5|><|audio_6|><|audio_9|>"  # the demo's decoded completion tokens
    prompt2 = glm_demo_prompt(prompt1, completion1, "And why?", glm4_voice.DEFAULT_SYSTEM)
    assert prompt2.count("<|system|>") == 1
    reply = [*enc(tok, completion1), user]  # as generated: the model stops at <|user|>
    history = [Turn("user", speech=(3, 7)), Turn("assistant", ids=tuple(reply))]
    assert glm4_voice.build_prompt(None, "And why?", tokenizer=tok, history=history) == glm_served(
        tok, prompt2
    )
    # a third turn, through the Dialogue API and the name-based dispatcher
    completion2 = "Because<|audio_1|>"
    prompt3 = glm_demo_prompt(prompt2, completion2, audio1, glm4_voice.DEFAULT_SYSTEM)
    d = Dialogue(tuple(history)).ask(text="And why?").answer(enc(tok, completion2)).ask(speech=[3, 7])
    assert build_dialogue("glm-4-voice", d, tok) == glm_served(tok, prompt3)


class CharsOnly:
    """A tokenizer that encodes text but knows no special token (so ids must come from files)."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens)


def test_glm_prompt_errors_are_one_sentence(glm_tok, tmp_path):
    tok, _ = glm_tok
    with pytest.raises(
        SparkeeError, match=r"special token \[gMASK\] is unknown.*pass the model's own tokenizer"
    ):
        glm4_voice.build_prompt([1], tokenizer=CharsOnly(tok), model_dir=tmp_path)
    with pytest.raises(SparkeeError, match="needs its tokenizer"):
        glm4_voice.build_prompt([1], None)
    with pytest.raises(SparkeeError, match="outside GLM-4-Voice's 0..16383"):
        glm4_voice.build_prompt([16384], tokenizer=tok)
    with pytest.raises(SparkeeError, match="needs input speech ids or text"):
        glm4_voice.build_prompt(None, None, tokenizer=tok)
    with pytest.raises(SparkeeError, match="must end with a user turn"):
        glm4_voice.build_dialogue(Dialogue((Turn("user", text="a"), Turn("assistant", ids=(1,)))), tok)


# ---------------------------------------------------------------------------------------------
# Step-Audio-2 prompts against stepaudio2.py's template


def step_official(messages: list[dict], tok) -> list[int]:
    """stepfun-ai/Step-Audio2 stepaudio2.py: `StepAudio2.apply_chat_template` then per-piece tokenizing,
    copied in its logic ("token" items are raw id lists; audio files are out of scope here)."""
    results = []
    for msg in messages:
        role, content = msg["role"], msg["content"]
        if role == "user":
            role = "human"
        if isinstance(content, str):
            results.append(f"<|BOT|>{role}\n{content}" + ("<|EOT|>" if msg.get("eot", True) else ""))
        elif isinstance(content, list):
            results.append(f"<|BOT|>{role}\n")
            for item in content:
                results.append(item["text"] if item["type"] == "text" else item["token"])
            if msg.get("eot", True):
                results.append("<|EOT|>")
        elif content is None:
            results.append(f"<|BOT|>{role}\n")
    ids: list[int] = []
    for r in results:
        ids += enc(tok, r) if isinstance(r, str) else list(r)
    return ids


def test_step_prompt_equals_the_official_template(step_tok):
    tok, d = step_tok
    a0 = tid(tok, "<audio_0>")
    codes = [0, 17, 6560]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "human", "content": [{"type": "token", "token": [a0 + c for c in codes]}]},
        {"role": "assistant", "content": "<tts_start>", "eot": False},
    ]
    want = step_official(messages, tok)
    assert step_audio2.build_prompt(codes, tokenizer=tok) == want
    assert step_audio2.build_prompt(codes, tokenizer=CharsOnly(tok), model_dir=d) == want
    # text input, the user role written "user" by the caller and "human" in the prompt
    messages[1] = {"role": "user", "content": "Give me a brief introduction to the Great Wall."}
    want = step_official(messages, tok)
    assert step_audio2.build_prompt(None, messages[1]["content"], tokenizer=tok) == want
    # pinned by hand: no system prompt, one code
    bot, eot, tts = tid(tok, "<|BOT|>"), tid(tok, "<|EOT|>"), tid(tok, "<tts_start>")
    h = [CHARS.index(c) for c in "human\n"]
    a = [CHARS.index(c) for c in "assistant\n"]
    assert step_audio2.build_prompt([2], tokenizer=tok, system=None) == [bot, *h, a0 + 2, eot, bot, *a, tts]


def test_step_multi_turn_replays_the_spoken_answer(step_tok):
    """stepaudio2.py's multi-turn example: the previous answer comes back as <tts_start> + its raw
    output ids (generated ids minus the final <|EOT|>) + <|EOT|>."""
    tok, _ = step_tok
    a0, eot, pad = tid(tok, "<audio_0>"), tid(tok, "<|EOT|>"), tid(tok, "<tts_pad>")
    raw = [*enc(tok, "Hi"), a0 + 4, a0 + 9, a0 + 1, a0 + 6561, pad, a0 + 2, tid(tok, "<tts_end>")]
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "human", "content": [{"type": "token", "token": [a0 + 12, a0 + 13]}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "<tts_start>"}, {"type": "token", "token": raw}],
        },
        {"role": "human", "content": "Now write a 4-line poem about it."},
        {"role": "assistant", "content": "<tts_start>", "eot": False},
    ]
    want = step_official(messages, tok)
    history = Dialogue((Turn("user", speech=(12, 13)), Turn("assistant", ids=(*raw, eot))))
    got = step_audio2.build_prompt(None, "Now write a 4-line poem about it.", tokenizer=tok, history=history)
    assert got == want and got.count(eot) == 4
    # a reply given as text is a plain assistant turn (no <tts_start>)
    d = Dialogue((Turn("user", text="hi"), Turn("assistant", text="hello"))).ask(text="bye")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "<tts_start>", "eot": False},
    ]
    assert build_dialogue("step-audio-2-mini", d.with_system("Be brief."), tok) == step_official(
        messages, tok
    )


def test_step_prompt_errors_are_one_sentence(step_tok, tmp_path):
    tok, _ = step_tok
    with pytest.raises(SparkeeError, match=r"special token <\|BOT\|> is unknown"):
        step_audio2.build_prompt([1], tokenizer=CharsOnly(tok), model_dir=tmp_path)
    with pytest.raises(SparkeeError, match="outside Step-Audio-2's 0..6560"):
        step_audio2.build_prompt([6561], tokenizer=tok)
    with pytest.raises(SparkeeError, match="needs its tokenizer"):
        step_audio2.build_prompt([1])
    with pytest.raises(SparkeeError, match="already ends with a user turn"):
        step_audio2.build_prompt([1], tokenizer=tok, history=[Turn("user", text="a")])
