"""Adapters for real checkpoints: SmolLM2 from a registry package, GLM-4-Voice and Step-Audio-2.

`preset(name, model_dir)` gives a model's decoding defaults with every token id read from the
model directory's tokenizer files and config; `PRESETS` are the same without a directory.
A preset dict has:

- `name`, `num_layers`, `interleave` (T, S), `format` ("auto"), `temperature`, `top_p`,
  `repetition_penalty`, `speech_policy` (the default SPAR-K setting), `policies` (the paper's
  speech-side settings), `paper_rows` (Table 2's rows in eval's `--policies` syntax, text-side
  rows written TEXT|SPEECH);
- ids, each None (or empty) when the files do not give it: `speech_ids` (A, B) half-open,
  `stop_ids`, `control_ids` (non-speech ids legal at speech steps), `text_end_id` (always None
  here), `text_end_ids` (Step's `<tts_pad>`), `speech_pad_ids` (Step's `<audio_6561>`: speech
  padding to drop before the vocoder);
- `special_ids` {token: id} found, `missing_ids` [token] not found, `public_ids` (the public
  tokenizer's speech and stop ids, used only to tell the user what to pass), `source`.

The ids contract: `preset` never refuses and never guesses; `check_ids(p, speech_ids, stop_ids)`
raises one sentence when the speech range or the stop ids are unknown and not given explicitly
(the CLI's `--speech-ids A:B` / `--stop-ids`), and `generation_config(p, **overrides)` calls it
with the overrides, so a config is never built on unknown ids (unless `require_ids=False`, for a
caller that applies overrides later and calls `check_ids` itself).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SparkeeError
from . import glm4_voice, step_audio2
from .dialogue import Dialogue, Turn, load_history, parse_dialogue, save_history

_MODULES = {glm4_voice.NAME: glm4_voice, step_audio2.NAME: step_audio2}
PRESETS: dict[str, dict] = {name: mod.preset(None) for name, mod in _MODULES.items()}


def _module(name: str):
    mod = _MODULES.get(name.strip().lower())
    if mod is None:
        raise SparkeeError(f"unknown preset '{name}': use one of {', '.join(sorted(_MODULES))}")
    return mod


def preset(name: str, model_dir: str | Path | None = None) -> dict:
    """The decoding preset of model `name`, with ids read from `model_dir` when given (see above)."""
    return _module(name).preset(model_dir)


def check_ids(p: dict, speech_ids=None, stop_ids=None) -> None:
    """Refuse, in one sentence saying what to pass, a preset whose speech or stop ids are unknown
    unless the caller gives them (`speech_ids` (A, B), `stop_ids` list: the CLI's overrides)."""
    mod = _MODULES.get(str(p.get("name", "")).lower())
    public = p.get("public_ids") or {}
    unknown, need, notes = [], [], []
    if p.get("speech_ids") is None and speech_ids is None:
        unknown.append(f"speech ids ({mod.SPEECH_TOKEN})" if mod else "speech ids")
        a, b = public.get("speech_ids") or ("A", "B")
        need.append(f"--speech-ids {a}:{b}")
        notes.append(mod.SPEECH_NOTE if mod else "A:B is the speech id range of your tokenizer")
    if not p.get("stop_ids") and stop_ids is None:
        unknown.append(f"stop ids ({mod.STOP_TOKENS})" if mod else "stop ids")
        stops = public.get("stop_ids")
        need.append(f"--stop-ids {','.join(map(str, stops))}" if stops else "--stop-ids ID")
        notes.append(mod.STOP_NOTE if mod else "the stop ids of your tokenizer")
    if not need:
        return
    model = mod.DISPLAY if mod else p.get("name", "the model")
    raise SparkeeError(
        f"{model}'s {' and '.join(unknown)} are unknown ({p.get('source', 'no model directory')}): "
        f"point --model at the checkpoint with its tokenizer files, or pass {' '.join(need)} "
        f"({'; '.join(dict.fromkeys(notes))})"
    )


def generation_config(p: dict, speech_policy: str | None = None, *, require_ids: bool = True, **overrides):
    """A `GenerationConfig` from a preset dict (speech policy defaults to the preset's own).

    `overrides` are `GenerationConfig` fields; `speech_ids` and `stop_ids` among them stand in
    for ids the preset lacks (see `check_ids`). `require_ids=False` builds the config even so
    (unknown speech ids None, no stop ids) for a caller that applies its overrides later and then
    calls `check_ids` itself."""
    from ..config import GenerationConfig
    from ..schedule import Interleave

    if require_ids:
        check_ids(p, overrides.get("speech_ids"), overrides.get("stop_ids"))
    il = p.get("interleave")
    interleave = None
    if il:
        interleave = Interleave(
            il[0], il[1], p.get("format", "padded"), p.get("text_end_id"), tuple(p.get("text_end_ids") or ())
        )
    kw = dict(
        interleave=interleave,
        speech_ids=tuple(p["speech_ids"]) if p.get("speech_ids") else None,
        stop_ids=list(p.get("stop_ids") or ()),
        control_ids=list(p["control_ids"]) if p.get("control_ids") is not None else None,
        temperature=float(p.get("temperature", 0.0)),
        top_p=float(p.get("top_p", 1.0)),
        repetition_penalty=float(p.get("repetition_penalty", 1.0)),
        speech_policy=speech_policy or p.get("speech_policy", "full"),
    )
    kw.update(overrides)
    if kw.get("speech_ids") is not None:
        kw["speech_ids"] = tuple(kw["speech_ids"])
    return GenerationConfig(**kw)


def build_dialogue(
    name: str, dialogue: Dialogue, tokenizer, model_dir: str | Path | None = None
) -> list[int]:
    """Prompt ids of `dialogue` (ending with a user turn) in model `name`'s chat format."""
    return _module(name).build_dialogue(dialogue, tokenizer, model_dir)


__all__ = [
    "PRESETS",
    "Dialogue",
    "Turn",
    "build_dialogue",
    "check_ids",
    "generation_config",
    "glm4_voice",
    "load_history",
    "parse_dialogue",
    "preset",
    "save_history",
    "step_audio2",
]
