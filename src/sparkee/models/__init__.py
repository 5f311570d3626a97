"""Adapters for real checkpoints: SmolLM2 from a registry package, GLM-4-Voice and Step-Audio-2.

`PRESETS` holds each interleaved SLM's decoding defaults (built-in ids, used when no tokenizer
files are at hand); `preset(name, model_dir)` refines them from a model directory's tokenizer
files and config. A preset dict has: `interleave` (T, S) or None, `format`, `speech_ids` (A, B)
half-open, `stop_ids`, `control_ids`, `text_end_id`, `temperature`, `top_p`, `num_layers`,
`speech_policy` (the default SPAR-K setting) and `policies` (the paper's speech-side settings).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SparkeeError
from . import glm4_voice, step_audio2

_MODULES = {glm4_voice.NAME: glm4_voice, step_audio2.NAME: step_audio2}
PRESETS: dict[str, dict] = {name: mod.preset(None) for name, mod in _MODULES.items()}


def preset(name: str, model_dir: str | Path | None = None) -> dict:
    """The decoding preset of model `name`, with ids read from `model_dir` when given."""
    mod = _MODULES.get(name.strip().lower())
    if mod is None:
        raise SparkeeError(f"unknown preset '{name}': use one of {', '.join(sorted(_MODULES))}")
    return mod.preset(model_dir)


def generation_config(p: dict, speech_policy: str | None = None, **overrides):
    """A `GenerationConfig` from a preset dict (speech policy defaults to the preset's own)."""
    from ..generate import GenerationConfig
    from ..schedule import Interleave

    il = p.get("interleave")
    kw = dict(
        interleave=Interleave(il[0], il[1], p.get("format", "padded"), p.get("text_end_id")) if il else None,
        speech_ids=tuple(p["speech_ids"]) if p.get("speech_ids") else None,
        stop_ids=list(p.get("stop_ids", ())),
        control_ids=list(p["control_ids"]) if p.get("control_ids") is not None else None,
        temperature=float(p.get("temperature", 0.0)),
        top_p=float(p.get("top_p", 1.0)),
        speech_policy=speech_policy or p.get("speech_policy", "full"),
    )
    kw.update(overrides)
    return GenerationConfig(**kw)


__all__ = ["PRESETS", "generation_config", "glm4_voice", "preset", "step_audio2"]
