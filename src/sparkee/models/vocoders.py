"""Vocoder plug-ins for `sparkee eval --vocoder`: the models' own speech decoders, wrapped.

`sparkee eval` hands a vocoder the generated ids that fall in the preset's speech range and a
path for a 16 kHz WAV (see `sparkee.eval.plugins`). These classes turn the ids into the model's
speech codes (id of the first audio token subtracted, padding dropped), run the official decoder
from the model's own repository, resample to 16 kHz and write the WAV:

- `GlmVocoder`: GLM-4-Voice's flow + HiFT decoder at 22.05 kHz (THUDM/GLM-4-Voice,
  flow_inference.py `AudioDecoder(config_path, flow_ckpt_path, hift_ckpt_path, device)` with
  `offline_inference(codes)`; the decoder weights are the `glm-4-voice-decoder` download).
- `StepVocoder`: Step-Audio-2's `Token2wav(<model>/token2wav)(codes, prompt_wav)` at 24 kHz
  (stepfun-ai/Step-Audio2, token2wav.py); `<audio_6561>` (speech padding) is dropped first.

Plug-ins are built with no arguments, so they read their settings from the environment
(subclass them to hard-wire other values): `SPARKEE_MODEL` (the converted model directory,
whose tokenizer files give the id of the first audio token), `SPARKEE_GLM_REPO` /
`SPARKEE_STEP_REPO` (a clone of the model's repository, put on `sys.path`),
`SPARKEE_GLM_DECODER` (the glm-4-voice-decoder directory), `SPARKEE_STEP_TOKEN2WAV` (default:
`$SPARKEE_MODEL/token2wav`, which `sparkee convert` carries over), `SPARKEE_STEP_PROMPT_WAV`
(the speaker prompt, e.g. the repository's assets/default_female.wav) and `SPARKEE_DEVICE`.

Not run here: the decoders need their repositories' dependencies and weights and a GPU. The id
handling, resampling and WAV writing are tested with a stand-in decoder.
"""

from __future__ import annotations

import os
import sys
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SparkeeError
from .tokens import find_token_ids

TARGET_RATE = 16000


def speech_codes(ids: Sequence[int], audio0: int, num_codes: int, drop: Sequence[int] = ()) -> list[int]:
    """Codes of the speech tokens in `ids` (id - `audio0`), without padding ids and anything outside 0..num_codes-1."""
    skip = set(drop)
    return [t - audio0 for t in ids if t not in skip and 0 <= t - audio0 < num_codes]


def resample(wav: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    """Band-limited resampling (torchaudio where the official decoders run, else scipy)."""
    if rate == target:
        return wav
    try:
        import torch
        import torchaudio.functional as AF

        return AF.resample(torch.as_tensor(wav, dtype=torch.float32), rate, target).numpy()
    except ImportError:
        pass
    try:
        from math import gcd

        from scipy.signal import resample_poly
    except ImportError:
        raise SparkeeError(
            "resampling the vocoder output needs torchaudio or scipy: pip install scipy"
        ) from None
    g = gcd(rate, target)
    return resample_poly(wav, target // g, rate // g).astype(np.float32)


def write_wav(wav, rate: int, path: str | Path) -> Path:
    """A mono 16-bit WAV at 16 kHz from a float waveform in [-1, 1] at `rate`."""
    x = np.asarray(wav, dtype=np.float32).reshape(-1)
    x = resample(x, rate)
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(TARGET_RATE)
        w.writeframes(pcm.tobytes())
    return p


def _env(name: str, what: str, default: str | None = None) -> str:
    v = os.environ.get(name) or default
    if not v:
        raise SparkeeError(f"the vocoder plug-in needs {what}: set {name}")
    return v


def _audio0(model_dir: str, token: str) -> int:
    found = find_token_ids(model_dir, [token])
    if token not in found:
        raise SparkeeError(
            f"the tokenizer files in '{model_dir}' do not list {token}: set SPARKEE_MODEL to the model"
        )
    return found[token]


def _on_path(repo: str) -> None:
    for p in (repo, os.path.join(repo, "cosyvoice"), os.path.join(repo, "third_party", "Matcha-TTS")):
        if os.path.isdir(p) and p not in sys.path:
            sys.path.insert(0, p)


class GlmVocoder:
    """GLM-4-Voice's speech decoder as a sparkee vocoder plug-in (see the module docstring)."""

    rate = 22050
    num_codes = 16384

    def __init__(self, decoder=None, audio0: int | None = None) -> None:
        self.audio0 = (
            audio0
            if audio0 is not None
            else _audio0(_env("SPARKEE_MODEL", "the model directory"), "<|audio_0|>")
        )
        self.decoder = decoder if decoder is not None else self._load()

    @staticmethod
    def _load():
        _on_path(_env("SPARKEE_GLM_REPO", "a clone of THUDM/GLM-4-Voice"))
        d = Path(_env("SPARKEE_GLM_DECODER", "the glm-4-voice-decoder directory"))
        try:
            from flow_inference import AudioDecoder
        except ImportError as e:
            raise SparkeeError(
                f"cannot import GLM-4-Voice's flow_inference ({e}): check SPARKEE_GLM_REPO"
            ) from None
        return AudioDecoder(
            config_path=str(d / "config.yaml"),
            flow_ckpt_path=str(d / "flow.pt"),
            hift_ckpt_path=str(d / "hift.pt"),
            device=os.environ.get("SPARKEE_DEVICE", "cuda"),
        )

    def __call__(self, speech_ids: list[int], wav_path: Path) -> Path | None:
        import torch

        codes = speech_codes(speech_ids, self.audio0, self.num_codes)
        if not codes:
            return None
        speech = self.decoder.offline_inference(torch.tensor([codes]))  # [1, T] at 22.05 kHz
        return write_wav(speech.float().cpu().numpy(), self.rate, wav_path)


class StepVocoder:
    """Step-Audio-2's token2wav as a sparkee vocoder plug-in (see the module docstring)."""

    rate = 24000
    num_codes = 6561  # <audio_6561> is padding

    def __init__(self, token2wav=None, audio0: int | None = None, prompt_wav: str | None = None) -> None:
        model = os.environ.get("SPARKEE_MODEL")
        if audio0 is None:
            audio0 = _audio0(_env("SPARKEE_MODEL", "the model directory"), "<audio_0>")
        self.audio0 = audio0
        self.prompt_wav = prompt_wav or _env("SPARKEE_STEP_PROMPT_WAV", "a speaker prompt WAV")
        if token2wav is None:
            _on_path(_env("SPARKEE_STEP_REPO", "a clone of stepfun-ai/Step-Audio2"))
            path = _env(
                "SPARKEE_STEP_TOKEN2WAV",
                "the token2wav directory",
                os.path.join(model, "token2wav") if model else None,
            )
            try:
                from token2wav import Token2wav
            except ImportError as e:
                raise SparkeeError(
                    f"cannot import Step-Audio2's token2wav ({e}): check SPARKEE_STEP_REPO"
                ) from None
            token2wav = Token2wav(path)
        self.token2wav = token2wav

    def __call__(self, speech_ids: list[int], wav_path: Path) -> Path | None:
        codes = speech_codes(speech_ids, self.audio0, self.num_codes)
        if not codes:
            return None
        x, rate = read_wav_bytes(self.token2wav(codes, self.prompt_wav))  # WAV bytes at 24 kHz
        return write_wav(x, rate, wav_path)


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """A mono float waveform and its rate from WAV bytes: 16/32-bit PCM or 32-bit float, which is
    what torchaudio.save writes for a float tensor (the stdlib `wave` module reads PCM only)."""
    import struct

    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SparkeeError("the decoder did not return WAV data")
    pos, fmt, rate, channels, bits, pcm = 12, None, 0, 1, 16, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if fmt == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real format is in the GUID
                fmt = struct.unpack("<H", body[24:26])[0]
        elif cid == b"data":
            pcm = body
        pos += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise SparkeeError("the decoder's WAV data has no fmt or data chunk")
    if fmt == 3 and bits == 32:
        x = np.frombuffer(pcm, dtype="<f4").astype(np.float32)
    elif fmt == 1 and bits in (16, 32):
        x = np.frombuffer(pcm, dtype=f"<i{bits // 8}").astype(np.float32) / float(2 ** (bits - 1))
    else:
        raise SparkeeError(
            f"the decoder returned WAV format {fmt} with {bits}-bit samples, which this plug-in does not read"
        )
    return x.reshape(-1, channels).mean(axis=1), rate


__all__ = ["GlmVocoder", "StepVocoder", "read_wav_bytes", "resample", "speech_codes", "write_wav"]
