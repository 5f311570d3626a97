"""GLM-4-Voice-9B: decoding preset, chat prompt and checkpoint conversion.

Special-token ids: read from the tokenizer files of a model directory when they list them
(`tokenizer_config.json` "added_tokens_decoder", `tokenizer.json` "added_tokens",
`added_tokens.json`); otherwise the fixed ids of the public GLM-4 / GLM-4-Voice tokenizer
are used (`GLM_IDS` below: the GLM-4 special tokens from its `tokenization_chatglm.py`, and
`<|audio_0|>` = 151552 from GLM-4-Voice's tokenizer, 16384 audio tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SparkeeError
from .convert import convert_glm4_voice, find_token_ids, read_json, tokenizer_id

NAME = "glm-4-voice"
NUM_LAYERS = 40
NUM_AUDIO_TOKENS = 16384
# fixed ids of the public GLM-4 tokenizer (used when no tokenizer file says otherwise)
GLM_IDS = {
    "<|endoftext|>": 151329,
    "[MASK]": 151330,
    "[gMASK]": 151331,
    "[sMASK]": 151332,
    "<sop>": 151333,
    "<eop>": 151334,
    "<|system|>": 151335,
    "<|user|>": 151336,
    "<|assistant|>": 151337,
    "<|observation|>": 151338,
    "<|begin_of_audio|>": 151343,
    "<|end_of_audio|>": 151344,
    "<|audio_0|>": 151552,
}
EOS_IDS = [151329, 151336, 151338]  # <|endoftext|>, <|user|>, <|observation|>

# GLM-4-Voice's own system prompts (web demo / model server), asking for 13 text : 26 speech
DEFAULT_SYSTEM = (
    "User will provide you with a speech instruction. Do it step by step. First, think about "
    "the instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM = (
    "User will provide you with a text instruction. Do it step by step. First, think about "
    "the instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_PREFIX = "streaming_transcription\n"

PRESET = {
    "name": NAME,
    "num_layers": NUM_LAYERS,
    "interleave": (13, 26),  # asked for in the system prompt and learned, not enforced by code
    # GLM-4-Voice has no text-end marker: after its text it emits speech only, which a padded
    # tracker still labels text for 13 of every 39 steps (those steps run full depth: safe)
    "format": "padded",
    "speech_ids": (151552, 151552 + NUM_AUDIO_TOKENS),
    "stop_ids": list(EOS_IDS),
    "control_ids": list(EOS_IDS),
    "text_end_id": None,
    "temperature": 0.0,  # greedy, as in the paper (the demo samples with temperature 0.2, top_p 0.8)
    "top_p": 1.0,
    "speech_policy": "spar-k:even:36",
    # the paper's speech-side settings for GLM-4-Voice (Table 2, G2-G8)
    "policies": [
        "fixed:38",
        "confidence:36:0.5",
        "spar-k:even:36",
        "spar-k:odd:36",
        "spar-k:triple:37",
        "spar-k:even:33",
        "spar-k:even:35",
    ],
    "source": "defaults (public GLM-4-Voice ids)",
}


def special_ids(model_dir: str | Path | None = None) -> dict[str, int]:
    """GLM_IDS, overridden by whatever the tokenizer files in `model_dir` list."""
    ids = dict(GLM_IDS)
    if model_dir is not None:
        ids.update(find_token_ids(Path(model_dir), list(GLM_IDS)))
    return ids


def preset(model_dir: str | Path | None = None) -> dict:
    """GLM-4-Voice's decoding preset; speech and stop ids from `model_dir`'s files when present."""
    p = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET.items()}
    if model_dir is None:
        return p
    d = Path(model_dir)
    found = find_token_ids(d, ["<|audio_0|>", "<|user|>"])
    cfg = read_json(d / "config.json") or {}
    if "<|audio_0|>" in found:
        a = found["<|audio_0|>"]
        p["speech_ids"] = (a, a + NUM_AUDIO_TOKENS)
        p["source"] = f"tokenizer files in {d}"
    eos = cfg.get("eos_token_id")
    if eos is not None:
        p["stop_ids"] = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    elif "<|user|>" in found:
        p["stop_ids"] = sorted({*p["stop_ids"], found["<|user|>"]})
    p["control_ids"] = list(p["stop_ids"])
    layers = cfg.get("num_layers", cfg.get("num_hidden_layers"))
    if layers:
        p["num_layers"] = int(layers)
    return p


def build_prompt(
    speech_ids: Sequence[int] | None,
    text: str | None = None,
    tokenizer=None,
    system: str | None = DEFAULT_SYSTEM,
    model_dir: str | Path | None = None,
) -> list[int]:
    """GLM-4-Voice's chat prompt as token ids.

    `[gMASK]<sop><|system|>\\n{system}<|user|>\\n<|begin_of_audio|><|audio_N|>..<|end_of_audio|>{text}
    <|assistant|>streaming_transcription\\n` - the format of GLM-4-Voice's web demo, where the
    tokenizer's default prefix `[gMASK]<sop>` comes first. `speech_ids` are codes of GLM-4-Voice's
    own speech tokenizer (0..16383), written as `<|audio_N|>` = id of `<|audio_0|>` + N.
    Plain text (system prompt, `text`, "streaming_transcription") is encoded with `tokenizer`
    (anything with `encode(text, add_special_tokens=False)`); special tokens come from the
    tokenizer when it knows them, else from `model_dir`'s files, else from the fixed public ids
    in `GLM_IDS`. Without a tokenizer there is no way to encode text, so that is an error.
    """
    if not speech_ids and not text:
        raise SparkeeError("a GLM-4-Voice prompt needs input speech ids or text")
    if tokenizer is None:
        raise SparkeeError("building a GLM-4-Voice prompt needs its tokenizer to encode the text parts")
    ids = special_ids(model_dir)

    def sp(tok: str) -> int:
        return tokenizer_id(tokenizer, tok, ids[tok])

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    audio0 = sp("<|audio_0|>")
    out = [sp("[gMASK]"), sp("<sop>")]
    if system:
        out += [sp("<|system|>"), *enc("\n" + system)]
    out += [sp("<|user|>"), *enc("\n")]
    if speech_ids:
        bad = [s for s in speech_ids if not 0 <= int(s) < NUM_AUDIO_TOKENS]
        if bad:
            raise SparkeeError(f"speech code {bad[0]} is outside GLM-4-Voice's 0..{NUM_AUDIO_TOKENS - 1}")
        out += [sp("<|begin_of_audio|>"), *(audio0 + int(s) for s in speech_ids), sp("<|end_of_audio|>")]
    if text:
        out += enc(text)
    out += [sp("<|assistant|>"), *enc(ASSISTANT_PREFIX)]
    return out


__all__ = [
    "ASSISTANT_PREFIX",
    "DEFAULT_SYSTEM",
    "GLM_IDS",
    "PRESET",
    "TEXT_SYSTEM",
    "build_prompt",
    "convert_glm4_voice",
    "preset",
    "special_ids",
]
