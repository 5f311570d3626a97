"""The project's own tiny reference interleaved spoken language model (SLM).

A 16-layer Qwen2 trained from scratch on synthetic spoken QA (question as speech units, answer
as interleaved text + speech units), shipped in ``assets/model`` so early-exit decoding, head
training, evaluation and audio run end to end offline on a CPU.
"""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).parent / "assets"


def bundled_model_dir() -> Path:
    """Directory of the shipped reference checkpoint (``Qwen2ForCausalLM.from_pretrained`` it)."""
    return ASSET_DIR / "model"


__all__ = ["ASSET_DIR", "bundled_model_dir"]
