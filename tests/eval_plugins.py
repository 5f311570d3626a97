"""Plug-ins for the tiny test models, loaded by `module:attribute` like a user's would be.

The tiny random models have no real speech, so these stand in for a codec decoder and an ASR
model: they are real plug-ins with the documented call signatures, not mocks of sparkee code.
"""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path


def id_transcriber(speech_ids: list[int]) -> str:
    """Names each speech id; enough for alignment WER between runs of the same model."""
    return " ".join(f"s{t}" for t in speech_ids)


def tone_vocoder(speech_ids: list[int], wav_path: Path) -> Path:
    """One 40 ms tone per speech id (pitch from the id), 16 kHz mono PCM."""
    sr, frames = 16000, []
    for t in speech_ids:
        f = 200 + 20 * (t % 40)
        frames += [int(8000 * math.sin(2 * math.pi * f * n / sr)) for n in range(640)]
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(struct.pack(f"<{len(frames)}h", *frames))
    return wav_path
