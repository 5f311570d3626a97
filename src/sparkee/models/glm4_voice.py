"""GLM-4-Voice-9B: decoding preset, chat prompts (single and multi-turn) and checkpoint conversion.

Every special-token id is read from the model's own tokenizer (the tokenizer object, or the
tokenizer files of a model directory: `tokenizer_config.json` "added_tokens_decoder",
`tokenizer.json` "added_tokens", `added_tokens.json`) and from its config (`eos_token_id`).
Nothing falls back to a built-in number: public sources disagree on the id of `<|audio_0|>`
(151552 in the model's public configs, 152353 in another public wrapper). `PUBLIC_IDS` holds the
public GLM-4 tokenizer's ids (METHOD.md section 7) for messages and documentation only.

The chat format is the one of GLM-4-Voice's web demo (THUDM/GLM-4-Voice, web_demo.py, served by
model_server.py whose tokenizer prepends `[gMASK]<sop>`):
`<|system|>\\n{system}<|user|>\\n{input}<|assistant|>streaming_transcription\\n`; a follow-up turn
appends the previous prompt and completion (without its final `<|user|>`), writes the system
prompt only once, then `<|user|>\\n{input}<|assistant|>streaming_transcription\\n` again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SparkeeError
from .convert import convert_glm4_voice
from .dialogue import Dialogue, Turn, check_codes, question
from .tokens import find_token_ids, has_tokenizer_files, read_json, special_id_resolver

NAME = "glm-4-voice"
DISPLAY = "GLM-4-Voice"
NUM_LAYERS = 40
NUM_AUDIO_TOKENS = 16384
# the public GLM-4 / GLM-4-Voice tokenizer's ids: for error messages and docs, never used as a fallback
PUBLIC_IDS = {
    "<|endoftext|>": 151329,
    "[gMASK]": 151331,
    "<sop>": 151333,
    "<|system|>": 151335,
    "<|user|>": 151336,
    "<|assistant|>": 151337,
    "<|observation|>": 151338,
    "<|begin_of_audio|>": 151343,
    "<|end_of_audio|>": 151344,
    "<|audio_0|>": 151552,
}
EOS_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")  # the model's EOS list, in this order
TOKENS = tuple(PUBLIC_IDS)
# for check_ids' message: which tokens give the speech range and the stop ids
SPEECH_TOKEN = "<|audio_0|>"
STOP_TOKENS = "<|user|> and the EOS list"
SPEECH_NOTE = STOP_NOTE = (
    "the public GLM-4-Voice tokenizer's ids, but public sources disagree: check them against yours"
)

# GLM-4-Voice's own system prompts (web_demo.py), asking for 13 text : 26 speech
DEFAULT_SYSTEM = (
    "User will provide you with a speech instruction. Do it step by step. First, think about "
    "the instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM = (
    "User will provide you with a text instruction. Do it step by step. First, think about "
    "the instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_PREFIX = "streaming_transcription\n"

# Table 2's speech-side rows G2-G8 (text steps at full depth)
SPEECH_ROWS = [
    "fixed:38",
    "confidence:36:0.5",
    "spar-k:even:36",
    "spar-k:odd:36",
    "spar-k:triple:37",
    "spar-k:even:33",
    "spar-k:even:35",
]

PRESET = {
    "name": NAME,
    "num_layers": NUM_LAYERS,
    "interleave": (13, 26),  # asked for in the system prompt and learned, not enforced by code
    # GLM-4-Voice has no text-end marker: once its text ends it emits speech only, and its chunks
    # are not always exactly 13/26. "auto" plans by the ratio and lets the tokens actually produced
    # correct the plan (a speech token in a text slot ends the text).
    "format": "auto",
    "speech_ids": None,  # (id of <|audio_0|>, + 16384), from the tokenizer files
    "stop_ids": None,  # the EOS list from config.json, or <|endoftext|>, <|user|>, <|observation|>
    "control_ids": None,
    "text_end_id": None,
    "text_end_ids": [],  # no text-end token exists
    "speech_pad_ids": [],  # no speech padding token exists
    "temperature": 0.0,  # greedy, as in the paper (the demo samples with temperature 0.2, top_p 0.8)
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "speech_policy": "spar-k:even:36",
    # the paper's speech-side settings for GLM-4-Voice (Table 2, G2-G8)
    "policies": SPEECH_ROWS,
    # Table 2's rows G2-G10 in eval's `--policies` syntax (SPEECH, or TEXT|SPEECH); G1 is "full"
    "paper_rows": [*SPEECH_ROWS, "spar-k:even:36|full", "confidence:36:0.5|spar-k:even:36"],
    "special_ids": {},
    "missing_ids": list(TOKENS),
    "public_ids": {
        "speech_ids": (PUBLIC_IDS["<|audio_0|>"], PUBLIC_IDS["<|audio_0|>"] + NUM_AUDIO_TOKENS),
        "stop_ids": [PUBLIC_IDS[t] for t in EOS_TOKENS],
    },
    "source": "no model directory",
}


def _copy(p: dict) -> dict:
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in p.items()
    }


def _eos(value) -> list[int] | None:
    if value is None:
        return None
    return [int(e) for e in (value if isinstance(value, list) else [value])]


def preset(model_dir: str | Path | None = None) -> dict:
    """GLM-4-Voice's decoding preset with the ids read from `model_dir` (see `models.preset`)."""
    p = _copy(PRESET)
    if model_dir is None:
        return p
    d = Path(model_dir)
    found = find_token_ids(d, TOKENS)
    cfg = read_json(d / "config.json") or {}
    gen = read_json(d / "generation_config.json") or {}
    cfg = cfg if isinstance(cfg, dict) else {}
    gen = gen if isinstance(gen, dict) else {}
    p["special_ids"] = found
    p["missing_ids"] = [t for t in TOKENS if t not in found]
    if "<|audio_0|>" in found:
        a = found["<|audio_0|>"]
        p["speech_ids"] = (a, a + NUM_AUDIO_TOKENS)
    # the model's own EOS list (config.json, else generation_config.json), else the EOS tokens by name
    eos = _eos(cfg.get("eos_token_id")) or _eos(gen.get("eos_token_id"))
    if eos is None and all(t in found for t in EOS_TOKENS):
        eos = [found[t] for t in EOS_TOKENS]
    if eos is not None and "<|user|>" in found and found["<|user|>"] not in eos:
        eos.append(found["<|user|>"])  # the demo stops at <|user|>
    if eos is not None:
        p["stop_ids"] = eos
        p["control_ids"] = list(eos)
    layers = cfg.get("num_layers", cfg.get("num_hidden_layers"))
    if layers:
        p["num_layers"] = int(layers)
    p["source"] = f"tokenizer files in {d}" if has_tokenizer_files(d) else f"no tokenizer files in {d}"
    return p


def _system_for(dialogue: Dialogue) -> str | None:
    if dialogue.system is not None:
        return dialogue.system or None
    first = next((t for t in dialogue.turns if t.role == "user"), None)
    # the demo picks the system prompt by the input mode of the conversation
    return DEFAULT_SYSTEM if first is not None and first.speech else TEXT_SYSTEM


def build_dialogue(dialogue: Dialogue, tokenizer=None, model_dir: str | Path | None = None) -> list[int]:
    """The whole conversation as GLM-4-Voice's prompt ids, ending so that the model answers.

    `[gMASK]<sop><|system|>\\n{system}` once, then per user turn `<|user|>\\n{input}<|assistant|>
    streaming_transcription\\n` and per assistant turn its raw output ids (a final `<|user|>`,
    the token the model stops at, is dropped because the next user turn writes it), exactly as
    GLM-4-Voice's web_demo.py concatenates previous prompt and completion. User speech is written
    `<|begin_of_audio|><|audio_N|>..<|end_of_audio|>` with N the codes of GLM-4-Voice's speech
    tokenizer (0..16383). The system prompt defaults to the demo's, picked by the first user
    turn's mode (speech or text). Differences from the demo: the demo decodes the completion to
    a string and re-encodes it; we replay the ids the model produced, which equal its own context.
    """
    if tokenizer is None:
        raise SparkeeError("building a GLM-4-Voice prompt needs its tokenizer to encode the text parts")
    turns = list(dialogue.turns)
    if not turns or turns[-1].role != "user":
        raise SparkeeError("a GLM-4-Voice prompt must end with a user turn for the model to answer")
    sp = special_id_resolver(DISPLAY, tokenizer, model_dir)

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    out = [sp("[gMASK]"), sp("<sop>")]
    system = _system_for(dialogue)
    if system:
        out += [sp("<|system|>"), *enc("\n" + system)]
    for turn in turns:
        if turn.role == "user":
            out.append(sp("<|user|>"))
            if turn.speech:
                check_codes(turn.speech, NUM_AUDIO_TOKENS, "GLM-4-Voice")
                audio0 = sp("<|audio_0|>")
                out += enc("\n")
                out += [sp("<|begin_of_audio|>"), *(audio0 + s for s in turn.speech), sp("<|end_of_audio|>")]
                if turn.text:
                    out += enc(turn.text)
            else:
                out += enc("\n" + (turn.text or ""))
            out += [sp("<|assistant|>"), *enc(ASSISTANT_PREFIX)]
        else:
            ids = list(turn.ids) if turn.ids else enc(turn.text or "")
            if ids and ids[-1] == sp("<|user|>"):
                ids = ids[:-1]
            out += ids
    return out


def build_prompt(
    speech_ids: Sequence[int] | None,
    text: str | None = None,
    tokenizer=None,
    system: str | None = None,
    model_dir: str | Path | None = None,
    history: Dialogue | Sequence[Turn] | None = None,
) -> list[int]:
    """GLM-4-Voice's chat prompt for one question (`speech_ids`: codes 0..16383, and/or `text`),
    after the turns of `history` when given.

    `system`: None picks the demo's system prompt by input mode (`DEFAULT_SYSTEM` for speech,
    `TEXT_SYSTEM` for text), "" leaves it out; a `Dialogue` history with its own system prompt
    wins. Plain text is encoded with `tokenizer` (anything with `encode(text,
    add_special_tokens=False)`); special tokens come from the tokenizer, else from `model_dir`'s
    tokenizer files; an id found in neither is an error naming the token (no built-in id is used).
    """
    return build_dialogue(question("GLM-4-Voice", speech_ids, text, history, system), tokenizer, model_dir)


__all__ = [
    "ASSISTANT_PREFIX",
    "DEFAULT_SYSTEM",
    "NAME",
    "PRESET",
    "PUBLIC_IDS",
    "TEXT_SYSTEM",
    "build_dialogue",
    "build_prompt",
    "convert_glm4_voice",
    "preset",
]
