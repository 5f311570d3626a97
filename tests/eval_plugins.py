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
        f = 200 + 50 * (t % 40)
        frames += [int(8000 * math.sin(2 * math.pi * f * n / sr)) for n in range(640)]
    wav_path = Path(wav_path)
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(wav_path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(struct.pack(f"<{len(frames)}h", *frames))
    return wav_path


def tone_asr(wav_path: Path) -> str:
    """Inverse of `tone_vocoder` for ids 40..79: the pitch of each 40 ms tone names its id."""
    import numpy as np

    with wave.open(str(wav_path), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    words = []
    for chunk in x.reshape(-1, 640):
        f = np.argmax(np.abs(np.fft.rfft(chunk))) * 16000 / 640  # 25 Hz bins
        words.append(f"s{40 + round((f - 200) / 50) % 40}")
    return " ".join(words)


def loudness_mos(wav_path: Path) -> float:
    """A stand-in quality score for tones: RMS level mapped to 1..5."""
    import numpy as np

    with wave.open(str(wav_path), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    return float(1 + 4 * min(1.0, np.sqrt(np.mean(x**2)) / 8000)) if len(x) else 1.0


def close_ids(a: int, b: int) -> float:
    """A toy unit-distance plug-in: ids within 2 of each other "sound alike"."""
    return abs(a - b) / 2
