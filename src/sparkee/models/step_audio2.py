"""Step-Audio-2-mini: decoding preset, chat prompt and checkpoint conversion.

Token ids (read from the tokenizer files of a model directory when they list them, else these
fixed defaults; `STEP_IDS` says which public source each default comes from):
- speech: `<audio_N>` = 151696 + N (6561 CosyVoice-2 codes at 25 Hz, plus `<audio_6561>` used
  as audio padding); the preset's speech range runs from 151696 to the vocabulary size (158720).
- audio control tokens 151688..151695 (`<audio_patch>` = 151690 per Step-Audio-2's vLLM code;
  `<tts_start>` 151693 and `<tts_end>` 151694 per the SGLang Step-Audio-2 parser tests).
- `<|EOT|>` ends a turn: 151665 is the id Step-Audio-2's vLLM text config always adds to the EOS
  list; `<|BOT|>` opens a turn: 151666 is an unverified default (the next added token). Pass the
  real tokenizer (or a model directory with its tokenizer files) to be sure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SparkeeError
from .convert import convert_step_audio2, find_token_ids, read_json, step_llm_config, tokenizer_id

NAME = "step-audio-2-mini"
NUM_LAYERS = 28
AUDIO_OFFSET = 151696
NUM_AUDIO_CODES = 6561  # <audio_6561> (= code 6561) is the audio padding token
VOCAB_SIZE = 158720
CONTROL_IDS = list(range(151688, 151696))
STEP_IDS = {
    "<|EOT|>": 151665,  # vLLM StepAudio2TextConfig EOS list
    "<|BOT|>": 151666,  # assumed, not verified
    "<audio_start>": 151688,  # assumed: first of the control block
    "<audio_end>": 151689,  # assumed
    "<audio_patch>": 151690,  # vLLM AUDIO_PATCH_TOKEN_ID
    "<tts_start>": 151693,  # SGLang parser tests
    "<tts_end>": 151694,  # SGLang parser tests
    "<audio_0>": AUDIO_OFFSET,  # Step-Audio-2 examples: audio = ids > 151695, minus 151696
}
DEFAULT_SYSTEM = "You are a helpful assistant."

PRESET = {
    "name": NAME,
    "num_layers": NUM_LAYERS,
    # 4 speech positions per cycle (paper); 1 text token per cycle is inferred from the name of
    # the public "tts_ta4" (text:audio 1:4) output parser. Text slots after the text ends are
    # filled with a pad token, so the ratio holds to the end: the "padded" format.
    "interleave": (1, 4),
    "format": "padded",
    "speech_ids": (AUDIO_OFFSET, VOCAB_SIZE),
    "stop_ids": [STEP_IDS["<|EOT|>"]],
    "control_ids": [*CONTROL_IDS, STEP_IDS["<|EOT|>"]],
    "text_end_id": None,
    "temperature": 0.7,  # the model's own examples: nucleus sampling
    "top_p": 0.9,
    "speech_policy": "spar-k:even:22",
    # the paper's speech-side settings for Step-Audio-2 (Table 2, S2-S6)
    "policies": ["fixed:25", "confidence:26:0.1", "spar-k:even:22", "spar-k:odd:22", "spar-k:triple:22"],
    "source": "defaults (public Step-Audio-2 ids)",
}


def special_ids(model_dir: str | Path | None = None) -> dict[str, int]:
    ids = dict(STEP_IDS)
    if model_dir is not None:
        ids.update(find_token_ids(Path(model_dir), list(STEP_IDS)))
    return ids


def preset(model_dir: str | Path | None = None) -> dict:
    """Step-Audio-2-mini's decoding preset; ids from `model_dir`'s files when present."""
    p = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET.items()}
    if model_dir is None:
        return p
    d = Path(model_dir)
    found = find_token_ids(d, list(STEP_IDS))
    cfg = read_json(d / "config.json") or {}
    llm = step_llm_config(cfg) if isinstance(cfg, dict) else {}
    vocab = int(llm.get("vocab_size") or VOCAB_SIZE)
    a = found.get("<audio_0>", AUDIO_OFFSET)
    p["speech_ids"] = (a, vocab)
    eot = found.get("<|EOT|>", STEP_IDS["<|EOT|>"])
    p["stop_ids"] = [eot]
    p["control_ids"] = sorted({*range(a - 8, a), eot})
    if found:
        p["source"] = f"tokenizer files in {d}"
    if llm.get("num_hidden_layers"):
        p["num_layers"] = int(llm["num_hidden_layers"])
    return p


def build_prompt(
    speech_ids: Sequence[int] | None,
    text: str | None = None,
    tokenizer=None,
    system: str | None = DEFAULT_SYSTEM,
    model_dir: str | Path | None = None,
) -> list[int]:
    """Step-Audio-2's turn format, ending so that the model starts a spoken answer.

    `<|BOT|>system\\n{system}<|EOT|><|BOT|>human\\n<audio_N>..{text}<|EOT|><|BOT|>assistant\\n<tts_start>`
    (the format of Step-Audio-2's `StepAudio2.apply_chat_template`; `<tts_start>` asks for speech).
    `speech_ids` are codes of Step-Audio-2's own speech tokenizer (CosyVoice-2, 0..6560), written
    as `<audio_N>` = 151696 + N. Caveat: the real model hears user speech through its audio
    encoder (mel features at `<audio_patch>` positions), which the converted LM-only checkpoint
    lacks; it reads `<audio_N>` tokens in earlier assistant turns, so discrete input speech is an
    approximation, fine for speed measurements. Plain text is encoded with `tokenizer` (anything
    with `encode(text, add_special_tokens=False)`); special-token ids come from the tokenizer,
    else `model_dir`'s files, else `STEP_IDS` (see the module docstring for their sources).
    """
    if not speech_ids and not text:
        raise SparkeeError("a Step-Audio-2 prompt needs input speech ids or text")
    if tokenizer is None:
        raise SparkeeError("building a Step-Audio-2 prompt needs its tokenizer to encode the text parts")
    ids = special_ids(model_dir)

    def sp(tok: str) -> int:
        return tokenizer_id(tokenizer, tok, ids[tok])

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    bot, eot = sp("<|BOT|>"), sp("<|EOT|>")
    out: list[int] = []
    if system:
        out += [bot, *enc("system\n" + system), eot]
    out += [bot, *enc("human\n")]
    if speech_ids:
        bad = [s for s in speech_ids if not 0 <= int(s) < NUM_AUDIO_CODES]
        if bad:
            raise SparkeeError(f"speech code {bad[0]} is outside Step-Audio-2's 0..{NUM_AUDIO_CODES - 1}")
        a0 = sp("<audio_0>")
        out += [a0 + int(s) for s in speech_ids]
    if text:
        out += enc(text)
    out += [eot, bot, *enc("assistant\n"), sp("<tts_start>")]
    return out


__all__ = [
    "DEFAULT_SYSTEM",
    "PRESET",
    "STEP_IDS",
    "build_prompt",
    "convert_step_audio2",
    "preset",
    "special_ids",
]
