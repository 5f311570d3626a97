"""Chunked vocoding: confirmed speech tokens -> the profile's vocoder -> 16 kHz PCM chunks.

The vocoder is the eval plug-in of the model (`vocoder(speech_ids, wav_path) -> Path | None`,
see sparkee.eval.plugins): espeak-ng for the reference SLM, GLM-4-Voice's and Step-Audio-2's own
decoders through sparkee.models.vocoders. A `Chunker` per request cuts the stream of speech ids
into pieces the vocoder can say on their own: the reference SLM's at a silence unit (a word
break) once a piece is long enough, other models every `size` codes. Pieces are vocoded off the
decode thread (serve/worker.py hands them to a thread pool), so the first audio goes out while the
model is still answering.
"""

from __future__ import annotations

import io
import tempfile
import wave
from pathlib import Path

from ..errors import SparkeeError

RATE = 16000


class Chunker:
    """Collect one request's speech ids; `push` returns the pieces ready to vocode."""

    def __init__(self, speech_ids: tuple[int, int], boundary: int | None, size: int, longest: int) -> None:
        self.lo, self.hi = speech_ids
        self.boundary, self.size, self.longest = boundary, size, longest
        self.buf: list[int] = []

    def push(self, token: int) -> list[int] | None:
        if not self.lo <= token < self.hi:
            return None
        self.buf.append(token)
        n = len(self.buf)
        cut = n >= self.longest
        if self.boundary is None:
            cut = cut or n >= self.size
        elif token == self.boundary and n >= self.size:
            cut = True
        if cut:
            out, self.buf = self.buf, []
            return out
        return None

    def flush(self) -> list[int] | None:
        out, self.buf = self.buf, []
        return out or None


class Audio:
    """A model's vocoder with its chunking rule."""

    def __init__(self, vocoder, speech_ids: tuple[int, int], boundary: int | None, size: int, longest: int):
        self.vocoder, self.speech_ids = vocoder, speech_ids
        self.boundary, self.size, self.longest = boundary, size, longest

    def chunker(self) -> Chunker:
        return Chunker(self.speech_ids, self.boundary, self.size, self.longest)

    def pcm(self, ids: list[int]) -> bytes:
        """16-bit mono PCM at 16 kHz of a piece (b"" when the vocoder has nothing to say)."""
        with tempfile.TemporaryDirectory() as td:
            path = self.vocoder(ids, Path(td) / "chunk.wav")
            if path is None or not Path(path).is_file():
                return b""
            with wave.open(str(path), "rb") as w:
                if w.getframerate() != RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
                    raise SparkeeError("the vocoder must write 16 kHz mono 16-bit WAV files")
                return w.readframes(w.getnframes())


def wav_bytes(pcm: bytes, rate: int = RATE) -> bytes:
    """A WAV file holding 16-bit mono PCM."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def resolve_audio(profile, cfg, spec: str | None = "auto") -> Audio | None:
    """The server's audio path for a model profile: `auto` = the reference SLM's espeak vocoder
    (when espeak-ng and sox are installed), `none`, or a vocoder plug-in `module:attr` (e.g.
    sparkee.models.vocoders:GlmVocoder). None: no audio (requests for audio are refused)."""
    from ..eval import plugins
    from ..profiles import ReferenceProfile

    if spec in (None, "none") or cfg.speech_ids is None:
        return None
    if isinstance(profile, ReferenceProfile):
        from ..refslm.audio import espeak_available

        if spec == "auto":
            if not espeak_available():
                return None
            spec = "refslm-espeak"
        silence = profile.vocab.silence_id
        return Audio(plugins.resolve("vocoder", spec), cfg.speech_ids, silence, 12, 48)
    if spec == "auto":
        return None
    # GLM-4-Voice and Step-Audio-2: fixed pieces (their demos stream 25-50 codes at a time)
    return Audio(plugins.resolve("vocoder", spec), cfg.speech_ids, None, 50, 50)
