"""Closed word-level vocabulary of the reference SLM.

Layout (ids in this order): specials, words, then the speech units in ONE contiguous range at
the end (``speech_range`` is half-open). Unit tokens are written ``[ph]`` (``[_]`` is silence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .units import SIL, text_to_unit_names

PAD, BOS, EOS, USER, ASSISTANT, EOT = "<pad>", "<bos>", "<eos>", "<user>", "<assistant>", "<eot>"
FMT_PADDED, FMT_ESI = "<fmt_padded>", "<fmt_esi>"
SPECIALS = [PAD, BOS, EOS, USER, ASSISTANT, EOT, FMT_PADDED, FMT_ESI]
FORMAT_TAGS = {"padded": FMT_PADDED, "early-stop": FMT_ESI}


def unit_token(ph: str) -> str:
    return f"[{ph}]"


@dataclass
class RefVocab:
    words: list[str]
    phonemes: list[str]  # unit inventory without SIL (SIL is always the first unit)
    specials: list[str] = field(default_factory=lambda: list(SPECIALS))

    def __post_init__(self) -> None:
        self.units = [SIL] + [p for p in self.phonemes if p != SIL]
        self.tokens = list(self.specials) + list(self.words) + [unit_token(u) for u in self.units]
        self._index = {t: i for i, t in enumerate(self.tokens)}
        if len(self._index) != len(self.tokens):
            raise ValueError("duplicate tokens in vocabulary")
        self._unit_start = len(self.specials) + len(self.words)

    # ---- sizes and ranges -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def speech_range(self) -> tuple[int, int]:
        """Half-open id range of the speech units."""
        return self._unit_start, len(self.tokens)

    @property
    def word_range(self) -> tuple[int, int]:
        return len(self.specials), self._unit_start

    @property
    def silence_id(self) -> int:
        return self._unit_start

    @property
    def pad_id(self) -> int:
        return self.id(PAD)

    @property
    def bos_id(self) -> int:
        return self.id(BOS)

    @property
    def eos_id(self) -> int:
        return self.id(EOS)

    @property
    def eot_id(self) -> int:
        return self.id(EOT)

    def format_tag_id(self, fmt: str) -> int:
        return self.id(FORMAT_TAGS[fmt])

    # ---- conversions ------------------------------------------------------------------------
    def id(self, token: str) -> int:
        return self._index[token]

    def token(self, idx: int) -> str:
        return self.tokens[idx]

    def is_speech(self, idx: int) -> bool:
        s, e = self.speech_range
        return s <= idx < e

    def is_word(self, idx: int) -> bool:
        s, e = self.word_range
        return s <= idx < e

    def unit_id(self, ph: str) -> int:
        return self._index[unit_token(ph)]

    def unit_name(self, idx: int) -> str:
        return self.units[idx - self._unit_start]

    def encode_words(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self._index or not self.is_word(self._index[w]):
                raise KeyError(f"word {w!r} is not in the reference vocabulary")
            out.append(self._index[w])
        return out

    def encode_units(self, text: str, lexicon: dict[str, list[str]], seed=0) -> list[int]:
        """Text -> frame-level speech unit ids (random per-phoneme durations from ``seed``)."""
        return [self.unit_id(p) for p in text_to_unit_names(text, lexicon, seed)]

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in ids)

    # ---- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "specials": self.specials,
            "words": self.words,
            "units": self.units,
            "speech_range": list(self.speech_range),
            "tokens": self.tokens,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path | None = None) -> RefVocab:
        if path is None:
            path = Path(__file__).parent / "assets" / "vocab.json"
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        d = json.loads(path.read_text())
        return cls(words=d["words"], phonemes=[u for u in d["units"] if u != SIL], specials=d["specials"])

    def save_hf_tokenizer(self, model_dir: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (WordLevel) so AutoTokenizer works."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from tokenizers.processors import TemplateProcessing

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer(models.WordLevel(vocab=dict(self._index), unk_token=PAD))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(list(self.specials))
        tok.post_processor = TemplateProcessing(single="$A", pair="$A $B")
        tok.save(str(model_dir / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": PAD,
            "additional_special_tokens": [USER, ASSISTANT, EOT, FMT_PADDED, FMT_ESI],
            "model_max_length": 2048,
            "clean_up_tokenization_spaces": False,
        }
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
        (model_dir / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD}, indent=1)
            + "\n"
        )


def load_vocab(path: str | Path | None = None) -> RefVocab:
    return RefVocab.load(path)
