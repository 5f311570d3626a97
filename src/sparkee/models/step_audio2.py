"""Step-Audio-2-mini: decoding preset, chat prompts (single and multi-turn) and checkpoint conversion.

Every special-token id is read from the model's own tokenizer (object or files); none is built
in. The names and their roles, from public code:
- `<audio_N>`: speech token N (CosyVoice-2 codes 0..6560 at 25 Hz); `<audio_6561>` pads spare
  audio slots and `<tts_pad>` pads text slots once the text has ended, so the 1 text : 4 speech
  ratio holds to the end; both are dropped before the vocoder (vllm-project/vllm,
  vllm/audio_parser/step_audio_2_tts_ta4_parser.py, which names `<tts_start>`, `<tts_end>`,
  `<audio_0>`, `<tts_pad>` and `<audio_6561>`).
- `<|BOT|>{role}\\n...<|EOT|>` is a turn, the user role is written `human`, a spoken answer is
  asked for by opening the assistant turn with `<tts_start>`, a previous spoken answer is
  replayed as `<tts_start>` + its raw output ids + `<|EOT|>`, and `<|EOT|>` is the EOS; the
  official sampling is temperature 0.7, top_p 0.9, repetition_penalty 1.05 (stepfun-ai/Step-Audio2,
  stepaudio2.py: `StepAudio2.apply_chat_template` and its `__main__` examples).
- audio id = token - 151696 (stepaudio2.py) is the public tokenizer's layout: `PUBLIC_IDS` holds
  it for messages only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SparkeeError
from .convert import convert_step_audio2, step_llm_config
from .dialogue import Dialogue, Turn, check_codes, question
from .tokens import find_token_ids, has_tokenizer_files, read_json, special_id_resolver

NAME = "step-audio-2-mini"
DISPLAY = "Step-Audio-2"
NUM_LAYERS = 28
NUM_AUDIO_CODES = 6561  # codes 0..6560; <audio_6561> is the audio padding token
# public layout, for error messages and docs only (stepaudio2.py: audio = ids > 151695, minus 151696;
# METHOD.md section 7: vocabulary 158720, <tts_start> 151693, <tts_end> 151694)
PUBLIC_IDS = {"<audio_0>": 151696, "<tts_start>": 151693, "<tts_end>": 151694}
PUBLIC_VOCAB = 158720
CONTROL_TOKENS = ("<tts_start>", "<tts_end>", "<tts_pad>", "<|EOT|>")
TOKENS = ("<|BOT|>", "<|EOT|>", "<tts_start>", "<tts_end>", "<tts_pad>", "<audio_0>", "<audio_6561>")
DEFAULT_SYSTEM = "You are a helpful assistant."
# for check_ids' message: which tokens give the speech range and the stop ids
SPEECH_TOKEN = "<audio_0>"
STOP_TOKENS = "<|EOT|>"
SPEECH_NOTE = "151696:158720 is the public tokenizer's speech range: check it against yours"
STOP_NOTE = "ID is the id of <|EOT|> in your tokenizer"

# Table 2's speech-side rows S2-S6 (text steps at full depth)
SPEECH_ROWS = ["fixed:25", "confidence:26:0.1", "spar-k:even:22", "spar-k:odd:22", "spar-k:triple:22"]

PRESET = {
    "name": NAME,
    "num_layers": NUM_LAYERS,
    # 4 speech positions per cycle (paper) and 1 text token (the public "tts_ta4" parser's name:
    # text:audio 1:4). "auto" follows the tokens produced; <tts_pad> marks the text's end while
    # the model keeps the ratio by padding text slots.
    "interleave": (1, 4),
    "format": "auto",
    "speech_ids": None,  # (id of <audio_0>, vocabulary size)
    "stop_ids": None,  # [<|EOT|>]
    "control_ids": None,  # <tts_start>, <tts_end>, <tts_pad>, <|EOT|> as found
    "text_end_id": None,
    "text_end_ids": [],  # [<tts_pad>]
    "speech_pad_ids": [],  # [<audio_6561>]: inside the speech range, to drop before the vocoder
    "temperature": 0.7,  # the official sampling (stepaudio2.py examples)
    "top_p": 0.9,
    "repetition_penalty": 1.05,
    "speech_policy": "spar-k:even:22",
    # the paper's speech-side settings for Step-Audio-2 (Table 2, S2-S6)
    "policies": SPEECH_ROWS,
    # Table 2's rows S2-S6 in eval's `--policies` syntax (no text-side rows); S1 is "full"
    "paper_rows": list(SPEECH_ROWS),
    "special_ids": {},
    "missing_ids": list(TOKENS),
    "public_ids": {"speech_ids": (PUBLIC_IDS["<audio_0>"], PUBLIC_VOCAB), "stop_ids": None},
    "source": "no model directory",
}


def _copy(p: dict) -> dict:
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in p.items()
    }


def preset(model_dir: str | Path | None = None) -> dict:
    """Step-Audio-2-mini's decoding preset with the ids read from `model_dir` (see `models.preset`)."""
    p = _copy(PRESET)
    if model_dir is None:
        return p
    d = Path(model_dir)
    found = find_token_ids(d, TOKENS)
    cfg = read_json(d / "config.json")
    llm = step_llm_config(cfg) if isinstance(cfg, dict) else {}
    p["special_ids"] = found
    p["missing_ids"] = [t for t in TOKENS if t not in found]
    if "<audio_0>" in found:
        a = found["<audio_0>"]
        if llm.get("vocab_size"):
            end = int(llm["vocab_size"])
        elif "<audio_6561>" in found:
            end = found["<audio_6561>"] + 1
        else:
            end = a + NUM_AUDIO_CODES + 1
        p["speech_ids"] = (a, end)
    if "<|EOT|>" in found:
        p["stop_ids"] = [found["<|EOT|>"]]
    controls = sorted({found[t] for t in CONTROL_TOKENS if t in found})
    p["control_ids"] = controls or None
    if "<tts_pad>" in found:
        p["text_end_ids"] = [found["<tts_pad>"]]
    if "<audio_6561>" in found:
        p["speech_pad_ids"] = [found["<audio_6561>"]]
    if llm.get("num_hidden_layers"):
        p["num_layers"] = int(llm["num_hidden_layers"])
    p["source"] = f"tokenizer files in {d}" if has_tokenizer_files(d) else f"no tokenizer files in {d}"
    return p


def build_dialogue(dialogue: Dialogue, tokenizer=None, model_dir: str | Path | None = None) -> list[int]:
    """The whole conversation in Step-Audio-2's turn format, ending so that the model answers in speech.

    `<|BOT|>system\\n{system}<|EOT|>`, then `<|BOT|>human\\n{input}<|EOT|>` per user turn and
    `<|BOT|>assistant\\n<tts_start>{raw output ids}<|EOT|>` per spoken assistant turn (a trailing
    `<|EOT|>` in the ids, the stop token, is not doubled; a reply given as text is written
    `<|BOT|>assistant\\n{text}<|EOT|>`), and finally `<|BOT|>assistant\\n<tts_start>`, as in
    stepaudio2.py. User speech is written as `<audio_N>` tokens (N: CosyVoice-2 codes 0..6560).
    Caveat: the real model hears user speech through its audio encoder (mel features at
    `<audio_patch>` positions), which the converted LM-only checkpoint lacks; it reads
    `<audio_N>` tokens in its own earlier answers, so discrete input speech is an approximation,
    fine for speed measurements. The system prompt defaults to "You are a helpful assistant."
    """
    if tokenizer is None:
        raise SparkeeError("building a Step-Audio-2 prompt needs its tokenizer to encode the text parts")
    turns = list(dialogue.turns)
    if not turns or turns[-1].role != "user":
        raise SparkeeError("a Step-Audio-2 prompt must end with a user turn for the model to answer")
    sp = special_id_resolver(DISPLAY, tokenizer, model_dir)

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    bot, eot = sp("<|BOT|>"), sp("<|EOT|>")
    system = DEFAULT_SYSTEM if dialogue.system is None else dialogue.system
    out: list[int] = []
    if system:
        out += [bot, *enc("system\n" + system), eot]
    for turn in turns:
        if turn.role == "user":
            if turn.speech:
                check_codes(turn.speech, NUM_AUDIO_CODES, "Step-Audio-2")
                a0 = sp("<audio_0>")
                out += [bot, *enc("human\n"), *(a0 + s for s in turn.speech)]
                if turn.text:
                    out += enc(turn.text)
            else:
                out += [bot, *enc("human\n" + (turn.text or ""))]
            out.append(eot)
        elif turn.ids:
            ids = list(turn.ids)
            if ids and ids[-1] == eot:
                ids = ids[:-1]
            out += [bot, *enc("assistant\n"), sp("<tts_start>"), *ids, eot]
        else:
            out += [bot, *enc("assistant\n" + (turn.text or "")), eot]
    out += [bot, *enc("assistant\n"), sp("<tts_start>")]
    return out


def build_prompt(
    speech_ids: Sequence[int] | None,
    text: str | None = None,
    tokenizer=None,
    system: str | None = DEFAULT_SYSTEM,
    model_dir: str | Path | None = None,
    history: Dialogue | Sequence[Turn] | None = None,
) -> list[int]:
    """Step-Audio-2's prompt for one question (`speech_ids`: codes 0..6560, and/or `text`), after
    the turns of `history` when given (a `Dialogue` with its own system prompt wins over `system`;
    `system` None or "" leaves it out).

    Plain text is encoded with `tokenizer` (anything with `encode(text, add_special_tokens=False)`);
    special-token ids come from the tokenizer, else from `model_dir`'s tokenizer files; an id
    found in neither is an error naming the token (no built-in id is used).
    """
    return build_dialogue(
        question("Step-Audio-2", speech_ids, text, history, system or ""), tokenizer, model_dir
    )


__all__ = [
    "DEFAULT_SYSTEM",
    "NAME",
    "PRESET",
    "PUBLIC_IDS",
    "build_dialogue",
    "build_prompt",
    "convert_step_audio2",
    "preset",
]
