"""Vocoder plug-ins for GLM-4-Voice and Step-Audio-2, with stand-ins for the official decoders."""

from __future__ import annotations

import io
import json
import struct
import wave

import numpy as np
import pytest
import torch

from sparkee import SparkeeError
from sparkee.models.vocoders import GlmVocoder, StepVocoder, read_wav_bytes, speech_codes

pytest.importorskip("scipy")  # resampling needs torchaudio or scipy


def float_wav(x: np.ndarray, rate: int) -> bytes:
    """What torchaudio.save writes for a float tensor: WAVE_FORMAT_IEEE_FLOAT, 32 bits."""
    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def frames(path) -> tuple[int, int]:
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), w.getnframes()


def test_speech_codes_drop_padding_and_foreign_ids():
    a0 = 1000
    ids = [a0 + 3, 5, a0 + 6561, a0, a0 + 6560, a0 + 9000]
    assert speech_codes(ids, a0, 6561) == [3, 0, 6560]
    assert speech_codes(ids, a0, 6561, drop=[a0]) == [3, 6560]


def test_step_vocoder_feeds_codes_and_writes_16k(tmp_path):
    seen = {}

    def token2wav(codes, prompt_wav):
        seen["codes"], seen["prompt"] = codes, prompt_wav
        t = np.arange(24000) / 24000
        return float_wav(0.5 * np.sin(2 * np.pi * 440 * t), 24000)

    voc = StepVocoder(token2wav=token2wav, audio0=100, prompt_wav="female.wav")
    out = voc([100 + 7, 100 + 6561, 100 + 2], tmp_path / "a.wav")
    assert seen == {"codes": [7, 2], "prompt": "female.wav"}
    assert frames(out) == (16000, 16000)
    assert voc([100 + 6561], tmp_path / "b.wav") is None  # padding only: no audio


def test_glm_vocoder_writes_16k(tmp_path):
    class Decoder:
        def offline_inference(self, token):
            self.token = token.tolist()
            return torch.zeros(1, 22050)

    dec = Decoder()
    out = GlmVocoder(decoder=dec, audio0=50)([50, 60, 49, 50 + 16384], tmp_path / "g.wav")
    assert dec.token == [[0, 10]] and frames(out) == (16000, 16000)


def test_plugins_say_which_setting_is_missing(tmp_path, monkeypatch):
    for k in ("SPARKEE_MODEL", "SPARKEE_GLM_REPO", "SPARKEE_STEP_PROMPT_WAV"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SparkeeError, match="set SPARKEE_MODEL"):
        GlmVocoder()
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": 9, "content": "<audio_0>"}]})
    )
    monkeypatch.setenv("SPARKEE_MODEL", str(tmp_path))
    with pytest.raises(SparkeeError, match="do not list <\\|audio_0\\|>"):
        GlmVocoder()
    with pytest.raises(SparkeeError, match="set SPARKEE_STEP_PROMPT_WAV"):
        StepVocoder()
    with pytest.raises(SparkeeError, match="set SPARKEE_STEP_REPO"):
        StepVocoder(prompt_wav="p.wav")


def test_read_wav_bytes_reads_pcm_and_refuses_other_data():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.array([16384, -16384, 0, 0], dtype="<i2").tobytes())
    x, rate = read_wav_bytes(buf.getvalue())
    assert rate == 8000 and np.allclose(x, [0.0, 0.0])
    with pytest.raises(SparkeeError, match="did not return WAV data"):
        read_wav_bytes(b"nope")
