"""What sparkee knows about a model family, in one place: the model profile.

A profile holds a model's decoding defaults (interleave ratio and format, speech ids, stop ids,
sampling), how text and data sources become prompts, its built-in measures (text and speech of a
token sequence, transcriber, vocoder, judge) and its default evaluation rows. Four families:

- the bundled reference SLM (a model directory with `sparkee_refslm.json`);
- GLM-4-Voice and Step-Audio-2-mini (`--preset`, wrapping `sparkee.models.preset`);
- any other transformers causal LM (stop ids from its EOS ids, everything else off).

`resolve_config(profile, overrides)` is the one place where these defaults meet the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .accept import AcceptRule
from .config import GenerationConfig, PoolSpec
from .errors import SparkeeError
from .heads import read_metadata, resolve_heads
from .schedule import Interleave, Policy
from .sources import PromptItem, load_tokenizer, read_prompt_file
from .store import file_digest

REFSLM_META = "sparkee_refslm.json"
REFSLM_SOURCE = "refslm:"
BUNDLED_HEADS = "tuned-lens-speech.safetensors"
BUNDLED_ADAPTER = "adapter-speech.safetensors"  # adapter heads (heads.py), the stronger draft
# the paper's confidence threshold for GLM-4-Voice, used by the default rows of models without any
CONFIDENCE_NATS = 0.5


@dataclass
class ModelProfile:
    """A plain transformers model: stop ids from its EOS ids; no interleave, no speech ids."""

    name: str
    model_dir: Path | None
    defaults: GenerationConfig = field(default_factory=GenerationConfig)
    policies: tuple[str, ...] = ()  # default speech-side rows of `eval` ("full" is always added)
    heads: Path | None = None  # exit heads shipped with the model, if any

    # ---- prompts ---------------------------------------------------------------------------
    @functools.cached_property
    def tokenizer(self):
        """The model directory's tokenizer, or None (loaded once, on first use)."""
        return load_tokenizer(self.model_dir)

    def encode_text(self, text: str, fmt: str | None = None) -> list[int]:
        """Token ids of a text prompt, as the model expects its prompts."""
        if not text.strip():
            raise SparkeeError("the prompt is empty: give some text")
        if self.tokenizer is None:
            raise SparkeeError(f"text prompts need a tokenizer in '{self.model_dir}'; give token ids instead")
        ids = list(self.tokenizer(text)["input_ids"])
        if not ids:
            raise SparkeeError(
                f"the prompt '{text}' encodes to no tokens with the tokenizer in '{self.model_dir}'"
            )
        return ids

    def prompts(self, source: str, fmt: str | None = None) -> list[PromptItem]:
        """Every prompt of a `--data` SOURCE (see sources.py); `fmt` is the interleave format."""
        if source.startswith(REFSLM_SOURCE):
            raise SparkeeError(
                f"'{source}' holds prompts of the bundled reference model, but '{self.model_dir}' is not one "
                f"(it has no {REFSLM_META})"
            )
        encode = (lambda text: self.encode_text(text, fmt)) if self._can_encode() else None
        return read_prompt_file(source, encode, self._dialogue_encoder())

    def _can_encode(self) -> bool:
        return self.tokenizer is not None

    @property
    def chat_template(self) -> bool:
        """Whether chat requests and dialogue histories go through the tokenizer's chat template
        (a plain instruct model, as transformers' and vLLM's chat paths use it)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _dialogue_encoder(self):
        return self.encode_dialogue if self.chat_template else None

    def encode_question(self, text: str, fmt: str | None = None) -> list[int]:
        """The prompt of one user message, as `sparkee serve` builds a one-message chat request:
        through the tokenizer's chat template where there is one (the assistant's turn opened),
        else `encode_text` (the reference SLM speaks it into units; presets build their chat prompt)."""
        if self.chat_template:
            return self.encode_dialogue({"turns": []}, text=text)
        return self.encode_text(text, fmt)

    def encode_dialogue(self, history, text: str | None = None, speech: list[int] | None = None) -> list[int]:
        """Prompt ids of a dialogue history (a file path, a parsed `Dialogue`, or its JSON form)
        followed by a new question (`text` and/or speech codes), in the model's chat format: here
        the tokenizer's chat template, rendered with the assistant's turn opened and tokenized
        without added special tokens (the template writes them), as vLLM's chat endpoint does."""
        if not self.chat_template:
            raise SparkeeError(
                f"dialogue histories need a model with a chat format: give --preset glm-4-voice or "
                f"step-audio-2-mini, or a model whose tokenizer has a chat template (this is {self.name} "
                f"in '{self.model_dir}', whose tokenizer has none)"
            )
        d = _dialogue(history, None)
        if text or speech:
            d = d.ask(speech=speech, text=text)
        if any(t.speech for t in d.turns):
            raise SparkeeError(f"a chat template takes text turns only: {self.name} has no speech input")
        messages = [{"role": "system", "content": d.system}] if d.system is not None else []
        decode = self.tokenizer.decode
        for t in d.turns:  # an assistant turn given as ids is the text they decode to
            content = t.text if t.text is not None else decode(list(t.ids), skip_special_tokens=True)
            messages.append({"role": t.role, "content": content})
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    # ---- measures --------------------------------------------------------------------------
    def measures(
        self,
        cfg: GenerationConfig,
        vocoder: str | None = "auto",
        transcriber: str | None = None,
        asr: str | None = None,
        mos: str | None = None,
        judge=None,
    ):
        """Text and speech of generated tokens, with the given plug-ins (eval/plugins.py)."""
        from .eval.measures import generic_measures

        return generic_measures(
            self.model_dir, cfg.speech_ids, cfg.stop_ids, vocoder, transcriber, asr, mos, judge
        )

    def describe(self, tokens: list[int], cfg: GenerationConfig) -> dict[str, str]:
        """Readable forms of generated tokens ({"text": ...} when the model has a tokenizer)."""
        if self.tokenizer is None:
            return {}
        lo, hi = cfg.speech_ids or (0, 0)
        text_ids = [t for t in tokens if not lo <= t < hi]
        return {"text": self.tokenizer.decode(text_ids, skip_special_tokens=True)}

    def check(self, overrides: Mapping[str, Any]) -> None:
        """Refuse overrides that leave the model's config unusable (nothing to check here)."""

    def report_measures(self, cfg: GenerationConfig):
        """Built-in measures for `layer-report`'s transcript columns; None: the model has none."""
        return None

    def default_policies(
        self, num_layers: int, layer: int | None = None, threshold: float = CONFIDENCE_NATS
    ) -> list[str]:
        """Default eval rows: the profile's own (a preset's paper settings), else the paper's
        comparison at `layer` (default 3/4 of the depth): full, fixed, confidence, SPAR-K
        even/odd/triple."""
        if self.policies and layer is None:
            return ["full", *self.policies]
        L = layer if layer is not None else max(1, round(0.75 * num_layers))
        return [
            "full",
            f"fixed:{L}",
            f"confidence:{L}:{threshold}",
            *(f"spar-k:{p}:{L}" for p in ("even", "odd", "triple")),
        ]


@dataclass
class PresetProfile(ModelProfile):
    """GLM-4-Voice or Step-Audio-2-mini: `sparkee.models.preset` plus the model's chat prompt."""

    preset: dict = field(default_factory=dict)  # sparkee.models.preset(name, model_dir)
    module: Any = None  # sparkee.models.glm4_voice or step_audio2 (its build_prompt)

    def encode_text(self, text: str, fmt: str | None = None) -> list[int]:
        """A text prompt in the model's chat prompt (text input, the model's own system prompt)."""
        if not text.strip():
            raise SparkeeError("the prompt is empty: give some text")
        if self.tokenizer is None:
            raise SparkeeError(f"text prompts need a tokenizer in '{self.model_dir}'; give token ids instead")
        return self.module.build_prompt(None, text, tokenizer=self.tokenizer, model_dir=self.model_dir)

    def check(self, overrides: Mapping[str, Any]) -> None:
        """Refuse a config whose speech or stop ids neither the model's files nor the command give."""
        from . import models

        models.check_ids(self.preset, overrides.get("speech_ids"), overrides.get("stop_ids"))

    chat_template = False  # its prompts come from the model's own builders (models/), never a template

    def _dialogue_encoder(self):
        return self.encode_dialogue

    def encode_dialogue(self, history, text: str | None = None, speech: list[int] | None = None) -> list[int]:
        from . import models

        if self.tokenizer is None:
            raise SparkeeError(f"multi-turn prompts need the tokenizer in '{self.model_dir}'")
        d = _dialogue(history, self.name)
        if text or speech:
            d = d.ask(speech=speech, text=text)
        return models.build_dialogue(self.name, d, self.tokenizer, self.model_dir)


def _dialogue(history, model: str | None):
    """A `Dialogue` from a history file path, a parsed `Dialogue` or its JSON form; `model` (a
    preset's name) refuses a history written for another model."""
    from . import models

    if isinstance(history, (str, Path)):
        return models.load_history(history, model)
    if isinstance(history, models.Dialogue):
        return history
    return models.parse_dialogue(history, model)


@dataclass
class ReferenceProfile(ModelProfile):
    """The bundled reference SLM: it hears its questions as speech units and answers greedily."""

    vocab: Any = None  # sparkee.refslm.vocab.RefVocab of the model directory
    adapter: Path | None = None  # the bundled adapter heads, if any
    chat_template = False  # it hears its questions spoken as units (encode_text), never a template

    def encode_text(self, text: str, fmt: str | None = None) -> list[int]:
        """The words spoken as speech units, in the prompt the model was trained on.

        `<bos> <user> [units] <assistant> <fmt_tag>`: words -> phonemes (the bundled lexicon) ->
        units with seeded durations, as the data builder makes them. The seed is the one the data
        builder gives that question when it is one of the bundled questions (so a test question
        encodes to exactly the prompt `refslm:test` holds), else one derived from the text.
        """
        from .refslm.data import QAExample, build_prompt, example_seed, load_split

        words = " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())
        if not words:
            raise SparkeeError("the prompt is empty: give some words")
        known = set(self.vocab.words)
        unknown = [w for w in words.split() if w not in known]
        if unknown:
            raise SparkeeError(
                f"the reference model does not know the word '{unknown[0]}' "
                f"(it speaks the {len(self.vocab.words)} words of its training data)"
            )
        ex = next(
            (e for split in ("test", "dev", "train") for e in load_split(split) if e.question == words),
            QAExample(id="prompt", question=words, answer="", accepted=[]),
        )
        return build_prompt(ex, self.vocab, self._format(fmt), example_seed(ex, "q"))

    def _format(self, fmt: str | None) -> str:
        from .refslm.data import FORMATS

        fmt = fmt or (self.defaults.interleave.format if self.defaults.interleave else "padded")
        if fmt not in FORMATS:
            raise SparkeeError(f"the reference model answers in format {' or '.join(FORMATS)}, not '{fmt}'")
        return fmt

    def _can_encode(self) -> bool:
        return True

    def verified_row(self, num_layers: int) -> str:
        """The demo's verified row: the fastest lossless row of the frontier on the bundled model
        (docs/results.md, "The speed-quality frontier"): FEEE at a quarter of the depth, exact rule."""
        return f"spar-k:FEEE:{max(1, num_layers // 4)}+verify"

    def adapter_row(self) -> str | None:
        """The demo's row with the bundled adapter heads: the fastest lossless row measured with
        them (docs/heads.md, "Adapter heads"): seven-step cycles exiting after one layer, exact rule."""
        return None if self.adapter is None else f"spar-k:FEEEEEE:1+verify@{self.adapter}"

    def prompts(self, source: str, fmt: str | None = None) -> list[PromptItem]:
        if not source.startswith(REFSLM_SOURCE):
            return super().prompts(source, fmt)
        from .refslm.data import FORMATS

        split = source[len(REFSLM_SOURCE) :]
        return refslm_prompts(split, self.vocab, FORMATS if fmt is None else (self._format(fmt),))

    def measures(
        self,
        cfg: GenerationConfig,
        vocoder: str | None = "auto",
        transcriber: str | None = None,
        asr: str | None = None,
        mos: str | None = None,
        judge=None,
    ):
        from .eval.measures import refslm_measures

        return refslm_measures(vocoder, transcriber, asr, mos, judge, model_dir=self.model_dir)

    def report_measures(self, cfg: GenerationConfig):
        return self.measures(cfg, vocoder=None)

    def describe(self, tokens: list[int], cfg: GenerationConfig) -> dict[str, str]:
        """The answer's words and the words its speech units say (lexicon decoder)."""
        from .refslm.data import answer_text_from_tokens, speech_units_from_tokens
        from .refslm.lexicon import decode_units

        return {
            "text": answer_text_from_tokens(tokens, self.vocab),
            "speech_transcript": decode_units(speech_units_from_tokens(tokens, self.vocab), self.vocab),
        }


def refslm_prompts(split: str, vocab, formats: tuple[str, ...]) -> list[PromptItem]:
    """The reference SLM's spoken questions (as speech units), once per interleave format.

    The split files are grouped by category; prompts come in one fixed shuffled order instead, so
    that `--limit N` takes a mix of categories.
    """
    import random

    from .refslm.data import build_prompt, load_split

    if split not in ("train", "dev", "test"):
        raise SparkeeError(f"unknown reference split '{split}': use refslm:train, refslm:dev or refslm:test")
    items = []
    examples = load_split(split)
    random.Random(0).shuffle(examples)
    for ex in examples:
        for fmt in formats:
            meta = {"id": ex.id, "question": ex.question, "answer": ex.answer, "accepted": ex.accepted}
            items.append(PromptItem(build_prompt(ex, vocab, fmt), meta | {"format": fmt}))
    return items


# ---------------------------------------------------------------------------------------------
# finding a model's profile


def load_profile(model_dir: str | Path | None, preset: str | None = None, bb=None) -> ModelProfile:
    """The profile of `--preset NAME`, else of the reference SLM when the directory is one, else a
    plain transformers model (its EOS ids from `bb` when given, else from its config files)."""
    d = Path(model_dir) if model_dir is not None else None
    if preset:
        return _preset_profile(preset, d)
    if d is not None and (d / REFSLM_META).is_file():
        return _reference_profile(d)
    return ModelProfile("transformers", d, GenerationConfig(stop_ids=_eos_ids(d, bb)))


def _preset_profile(name: str, d: Path | None) -> PresetProfile:
    from . import models
    from .models import glm4_voice, step_audio2

    p = models.preset(name, d)
    module = {glm4_voice.NAME: glm4_voice, step_audio2.NAME: step_audio2}[p["name"]]
    # ids the files lack may come from the command line: resolve_config checks them (check_ids)
    cfg = models.generation_config(p, require_ids=False)
    return PresetProfile(p["name"], d, cfg, tuple(p.get("policies", ())), preset=p, module=module)


def _reference_profile(d: Path) -> ReferenceProfile:
    from .refslm import ASSET_DIR, bundled_model_dir
    from .refslm.vocab import load_vocab

    try:
        m = json.loads((d / REFSLM_META).read_text())
        r = m["interleave_ratio"]
        cfg = GenerationConfig(
            max_new_tokens=200,
            interleave=Interleave(int(r["text"]), int(r["speech"]), "padded", int(m["text_end_id"])),
            speech_ids=(int(m["speech_range"][0]), int(m["speech_range"][1])),
            stop_ids=[int(m["stop_id"])],
            # unit-distance acceptance: units of one broad phonetic class count as alike (accept.py)
            unit_distance="refslm-phone-class",
        )
    except (ValueError, KeyError, TypeError):
        raise SparkeeError(f"'{d / REFSLM_META}' is not a valid reference-model description") from None
    vocab = load_vocab(d / "vocab.json" if (d / "vocab.json").is_file() else None)
    heads, adapter = ASSET_DIR / "heads" / BUNDLED_HEADS, ASSET_DIR / "heads" / BUNDLED_ADAPTER
    bundled = d.resolve() == bundled_model_dir().resolve() and heads.is_file()
    # the reference SLM was trained on one set of answers per question: greedy, its own speech
    # policy stays "full" and the paper's rows at 3/4 of its depth are the default comparison
    return ReferenceProfile(
        "refslm",
        d,
        cfg,
        heads=heads if bundled else None,
        vocab=vocab,
        adapter=adapter if bundled and adapter.is_file() else None,
    )


def _eos_ids(d: Path | None, bb) -> list[int]:
    eos = None
    if bb is not None:
        eos = getattr(getattr(bb.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(bb.config, "eos_token_id", None)
    elif d is not None:
        for name in ("generation_config.json", "config.json"):
            f = d / name
            if f.is_file():
                try:
                    eos = json.loads(f.read_text()).get("eos_token_id")
                except (ValueError, AttributeError):
                    eos = None
                if eos is not None:
                    break
    if eos is None:
        return []
    vocab = bb.vocab_size if bb is not None else None
    ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]
    return [e for e in ids if e >= 0 and (vocab is None or e < vocab)]


# ---------------------------------------------------------------------------------------------
# defaults meet the command line

# keys of `resolve_config` overrides besides GenerationConfig's own fields
INTERLEAVE_KEYS = ("interleave", "format", "text_end_id")


def resolve_config(profile: ModelProfile, overrides: Mapping[str, Any] | None = None) -> GenerationConfig:
    """The profile's decoding defaults with `overrides` applied (None values keep the default).

    Keys: any `GenerationConfig` field, where `interleave` may be a (T, S) pair, plus `format`
    and `text_end_id`, which change the interleave format and text-end id. Every other field of
    the profile's config (e.g. a preset's repetition penalty) passes through unchanged.
    """
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    profile.check(o)
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = set(o) - fields - set(INTERLEAVE_KEYS)
    if unknown:
        raise TypeError(f"resolve_config got unknown keys {sorted(unknown)}")
    cfg = profile.defaults
    il = cfg.interleave
    ratio, fmt, end = o.pop("interleave", None), o.pop("format", None), o.pop("text_end_id", None)
    if ratio is not None:
        t, s = (ratio.text, ratio.speech) if isinstance(ratio, Interleave) else ratio
        il = Interleave(
            int(t),
            int(s),
            fmt or (il.format if il else "padded"),
            end if end is not None else (il.text_end_id if il else None),
        )
    elif il is not None:
        if fmt is not None or end is not None:
            il = replace(il, format=fmt or il.format, text_end_id=end if end is not None else il.text_end_id)
    elif fmt not in (None, "padded") or end is not None:
        raise SparkeeError("--format and --text-end-id need --interleave T:S")
    if "stop_ids" in o:
        o["stop_ids"] = [int(t) for t in o["stop_ids"]]
    if "speech_ids" in o:
        o["speech_ids"] = tuple(int(t) for t in o["speech_ids"])
    return replace(cfg, interleave=il, **o)


def item_config(cfg: GenerationConfig, item: PromptItem) -> GenerationConfig:
    """A prompt that fixes its own interleave format (the reference SLM's format tag) gets it."""
    fmt = item.meta.get("format")
    if fmt and cfg.interleave is not None and cfg.interleave.format != fmt:
        return replace(cfg, interleave=replace(cfg.interleave, format=fmt))
    return cfg


def config_json(cfg: GenerationConfig) -> dict:
    """A JSON-able view of a config (for manifests and work-directory keys). Policies and rules
    show as their spec strings, so a config holding parsed specs and one holding the strings they
    came from give the same view."""

    def plain(v):
        if isinstance(v, (Policy, AcceptRule)):
            return v.name
        if isinstance(v, PoolSpec):
            return {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.compare}
        return v

    view = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return json.loads(
        json.dumps(view, default=lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else str(v))
    )


# ---------------------------------------------------------------------------------------------
# heads by name: --heads FILE | logit-lens | bundled, and a row's @HEADS


def load_row_heads(rows, profile: ModelProfile, bb) -> tuple[dict, dict[str, str]]:
    """The heads eval rows name with @HEADS ('bundled': the model profile's), loaded once each,
    and what the manifest records for them."""
    loaded, identity = {}, {}
    for spec in sorted({r.heads for r in rows if r.heads is not None}):
        loaded[spec] = heads_of(spec, profile, bb)
        identity[spec] = heads_identity(heads_path(spec, profile))
    return loaded, identity


def heads_path(spec: str, profile: ModelProfile) -> str:
    """A --heads value with 'bundled' replaced by the file of heads the model ships with."""
    if spec != "bundled":
        return spec
    if not getattr(profile, "heads", None):
        raise SparkeeError("--heads bundled: this model comes with no heads; give a heads file or logit-lens")
    return str(profile.heads)


def heads_of(spec: str, profile: ModelProfile, bb):
    """The exit heads a --heads value (or a row's @HEADS) names."""
    return resolve_heads(heads_path(spec, profile), bb)


def heads_identity(spec: str) -> str:
    """What the manifest records for `--heads`: 'logit-lens', or the file's kind and content hash."""
    if spec == "logit-lens":
        return spec
    return f"{read_metadata(spec)['head_type']}:{file_digest(spec)}"
