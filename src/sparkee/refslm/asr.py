"""ASR of synthesized speech with pocketsphinx (secondary metric).

The primary transcript of the model's speech is the lexicon decoder
(:mod:`sparkee.refslm.lexicon`), which reads the units directly. This module runs real ASR on the
audio from :func:`sparkee.refslm.audio.units_to_wav`: pocketsphinx 5.1.1 (PyPI; ships its English
acoustic model, language model and dictionary, so nothing is downloaded). Audio is fed as 16 kHz
mono 16-bit with 0.3 s of silence padding on both ends.

Caveat: pocketsphinx does poorly on espeak-ng voices -- WER about 0.64-0.85 against the text
(versus about 0.06-0.12 on flite voices), so its numbers measure robustness of the audio path
rather than answer quality. It decodes with pocketsphinx's default English language model (not
restricted to the closed vocabulary).
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

PAD_SECONDS = 0.3
_DECODER = None


def pocketsphinx_available() -> bool:
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        return False
    return True


def _read_wav_16k(path: str | Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        sr, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        data = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM")
    x = np.frombuffer(data, dtype=np.int16)
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1).astype(np.int16)
    if sr != 16000:
        # linear resampling fallback (units_to_wav already writes 16 kHz)
        t = np.arange(0, len(x) * 16000 / sr) * sr / 16000
        x = np.interp(t, np.arange(len(x)), x.astype(np.float64)).astype(np.int16)
    return x


def _decoder():
    global _DECODER
    if _DECODER is None:
        from pocketsphinx import Decoder

        _DECODER = Decoder(samprate=16000, loglevel="FATAL")
    return _DECODER


def transcribe_wav(path: str | Path) -> str:
    """Transcribe a WAV file with pocketsphinx (lower-case words; '' when nothing recognised).

    pocketsphinx does poorly on espeak-ng voices (WER ~0.64-0.85); see the module docstring.
    """
    x = _read_wav_16k(path)
    pad = np.zeros(int(PAD_SECONDS * 16000), dtype=np.int16)
    audio = np.concatenate([pad, x, pad]).tobytes()
    dec = _decoder()
    dec.start_utt()
    dec.process_raw(audio, full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    if hyp is None:
        return ""
    words = [w for w in hyp.hypstr.lower().split() if not w.startswith("<") and not w.startswith("[")]
    return " ".join(w.split("(")[0] for w in words)
