"""Plug-ins that turn generated tokens into measurements, given as `module:attribute` import paths.

Each plug-in is a callable (a class named by the path is instantiated with no arguments):

- Vocoder:     vocoder(speech_ids: list[int], wav_path: Path) -> Path | None   writes a 16 kHz WAV
- Transcriber: transcriber(speech_ids: list[int]) -> str                      token-level, no audio
- ASR:         asr(wav_path: Path) -> str                                      waveform-level
- MOS:         mos(wav_path: Path) -> float                                    a MOS-like score
- Judge:       judge(question: str, answer: str, meta: dict) -> bool           is the answer right?

Built-ins by name: vocoder `refslm-espeak`; transcriber `refslm-lexicon`; ASR `pocketsphinx`;
MOS `dnsmos`; judges `contains` (any accepted answer appears as whole words) and `http` (an
OpenAI-compatible chat endpoint, `--judge-url`).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from ..errors import SparkeeError
from ..plugin import load_plugin

# ---------------------------------------------------------------------------------------------
# built-ins for the bundled reference SLM


class RefslmVocoder:
    """Speech units -> collapsed phonemes -> espeak-ng -> 16 kHz WAV."""

    def __init__(self) -> None:
        from ..refslm.audio import espeak_available, espeak_missing_message
        from ..refslm.vocab import load_vocab

        if not espeak_available():
            raise SparkeeError(espeak_missing_message())
        self.vocab = load_vocab()

    def __call__(self, speech_ids: list[int], wav_path: Path) -> Path | None:
        from ..refslm.audio import units_to_wav

        return units_to_wav(speech_ids, self.vocab, wav_path)


class RefslmLexicon:
    """Speech units -> words of the reference SLM's vocabulary (deterministic)."""

    def __init__(self) -> None:
        from ..refslm.lexicon import LexiconDecoder
        from ..refslm.vocab import load_vocab

        self.vocab = load_vocab()
        self.decoder = LexiconDecoder(self.vocab)

    def __call__(self, speech_ids: list[int]) -> str:
        return self.decoder.decode(speech_ids)


class Pocketsphinx:
    """pocketsphinx's bundled English model. It does poorly on espeak-ng voices (WER ~0.6-0.85)."""

    def __init__(self) -> None:
        from ..refslm.asr import pocketsphinx_available

        if not pocketsphinx_available():
            raise SparkeeError("pocketsphinx is not installed: pip install pocketsphinx==5.1.1")

    def __call__(self, wav_path: Path) -> str:
        from ..refslm.asr import transcribe_wav

        return transcribe_wav(wav_path)


class DNSMOS:
    """DNSMOS P.835 overall score from PyPI `speechmos` (its ONNX models ship in the package)."""

    def __init__(self) -> None:
        try:
            from speechmos import dnsmos  # noqa: F401
        except ImportError as e:
            raise SparkeeError(
                f"DNSMOS needs `pip install speechmos librosa onnxruntime` ({e.name} is missing)"
            ) from None

    def __call__(self, wav_path: Path) -> float:
        import numpy as np
        from speechmos import dnsmos

        from ..refslm.asr import _read_wav_16k

        x = _read_wav_16k(wav_path).astype(np.float32) / 32768.0
        if len(x) < 16000:  # DNSMOS scores 1 s windows or longer
            x = np.pad(x, (0, 16000 - len(x)))
        return float(dnsmos.run(x, 16000)["ovrl_mos"])


def contains_judge(question: str, answer: str, meta: dict) -> bool:
    """True when any of meta['accepted'] appears as whole words in the answer (case-insensitive)."""
    from ..refslm.data import contains_answer

    return contains_answer(answer, meta.get("accepted", []))


class HttpJudge:
    """LLM judge through any OpenAI-compatible `/chat/completions` endpoint; replies YES or NO."""

    PROMPT = (
        "You grade answers to questions. Question: {question}\nReference answers: {ref}\n"
        "Candidate answer: {answer}\nIs the candidate answer correct? Reply with YES or NO only."
    )

    def __init__(
        self, url: str, model: str = "judge", api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.url = url.rstrip("/") + (
            "" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions"
        )
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def __call__(self, question: str, answer: str, meta: dict) -> bool:
        ref = ", ".join(meta.get("accepted", [])) or meta.get("answer", "")
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": self.PROMPT.format(question=question, ref=ref, answer=answer)}
            ],
        }
        req = urllib.request.Request(
            self.url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            reply = json.loads(r.read())["choices"][0]["message"]["content"]
        return reply.strip().upper().startswith("YES")


BUILTIN = {
    "vocoder": {"refslm-espeak": RefslmVocoder},
    "transcriber": {"refslm-lexicon": RefslmLexicon},
    "asr": {"pocketsphinx": Pocketsphinx},
    "mos": {"dnsmos": DNSMOS},
    "judge": {"contains": lambda: contains_judge},
}


def resolve(kind: str, spec: str | None):
    """A built-in name, a module:attribute path, or None/'none' for no plug-in."""
    if spec is None or spec == "none":
        return None
    if spec in BUILTIN[kind]:
        return BUILTIN[kind][spec]()
    return load_plugin(spec, kind)
