"""The command line's options, declared once: single options as `...Opt` annotations, groups as
`option_group` decorators (each a panel of its own in --help, received by a command as one object),
and the checks of option values that parsers alone do not make. Help strings come from the
parsers' own syntax constants (syntax.py), so they cannot go stale.

The groups: the model's format (`DECODING_OPTIONS`, every model-running command), the sampling and
verification options of generate and serve (`SAMPLING_OPTIONS`), how a model is loaded and timed
(`RUNTIME_OPTIONS`: generate, serve, eval), and eval's measures (`MEASURE_OPTIONS`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import SparkeeError
from .schedule import FORMATS
from .syntax import ACCEPT_SYNTAX, POLICY_SYNTAX

if TYPE_CHECKING:
    from .config import PoolSpec
    from .profiles import ModelProfile

# help text: rich cuts words longer than the help column (24 characters at 80 columns)
POOL_SYNTAX = (
    "in=T1,deep=T2@L (cosine thresholds T1 at the input and T2 after layer L), optionally "
    "followed by ,window-in=W ,window-deep=W ,pos=first or ,pos=mean"
)

DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile each step kind once (CUDA: mode reduce-overhead, i.e. CUDA graphs).",
    ),
]
PlainKernelsOpt = Annotated[
    bool,
    typer.Option(
        "--plain-kernels",
        help="CPU: keep torch's default linear kernels instead of those measured fastest here.",
    ),
]
NoCalibrateOpt = Annotated[
    bool,
    typer.Option(
        "--no-calibrate",
        help="Predict speed-ups with the weight-read model, not this machine's measured costs.",
    ),
]
UnitDistanceOpt = Annotated[
    str | None,
    typer.Option(
        "--unit-distance",
        help="Plug-in of the unit-distance rule: refslm, refslm-phone-class or module:attr "
        "(default: the model's own).",
    ),
]
RepetitionOpt = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        help="transformers' repetition penalty on every step kind (default: 1, or the preset's).",
    ),
]

TopKOpt = Annotated[int | None, typer.Option("--top-k", help="0 = off (the default).")]
SpeechVocabOnlyOpt = Annotated[
    bool,
    typer.Option("--speech-vocab-only", help="At speech steps project onto speech and control ids only."),
]
VocabAuditOpt = Annotated[
    bool,
    typer.Option(
        "--vocab-audit/--no-vocab-audit",
        help="Count tokens --speech-vocab-only changed (costs a full projection).",
    ),
]
CheckpointOpt = Annotated[
    Path, typer.Option("--model", help="Hugging Face checkpoint directory (Qwen2, Llama or Glm layout).")
]
HeadsOpt = Annotated[
    str,
    typer.Option(
        "--heads",
        help="Exit heads: a heads file (.safetensors), 'logit-lens', or 'bundled' (the heads the model ships with: the reference SLM's).",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Prompts: a JSONL file (eval: with 'accepted' answers), a datasets directory, or refslm:train / refslm:test.",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Use the first N prompts only.")]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", help="Tokens to generate per prompt at most.")
]
# the sampling and verification options of generate and serve (a server's requests may override them)
SpeechPolicyOpt = Annotated[
    str | None,
    typer.Option(
        "--speech-policy",
        help=f"Exit policy of speech steps: {POLICY_SYNTAX} (default: full, or the preset's).",
    ),
]
TextPolicyOpt = Annotated[
    str | None, typer.Option("--text-policy", help="Exit policy of text steps, same syntax (default: full).")
]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", help="0 = greedy (default: 0, or the preset's).")
]
TopPOpt = Annotated[
    float | None, typer.Option("--top-p", help="Nucleus sampling mass (default: 1, or the preset's).")
]
VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify",
        help="Verified mode: check early tokens against the last layer, reject by --accept (exact: lossless).",
    ),
]
AcceptOpt = Annotated[
    str | None,
    typer.Option(
        "--accept",
        help=f"Acceptance rule of verified mode at speech steps: {ACCEPT_SYNTAX} (default: exact).",
    ),
]

# option groups: field name -> annotation (the defaults are the group dataclass's); a command
# given a group receives one object
# the decoding options shared by generate, train-heads, layer-report and eval (None: the model's own)
DECODING_OPTIONS = {
    "preset": Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="glm-4-voice | step-audio-2-mini: that model's interleave, ids, stops, sampling.",
        ),
    ],
    "interleave": Annotated[
        str | None,
        typer.Option(
            "--interleave",
            help="T:S text:speech ratio (default: the model's own, else all text; 0:1 = all speech).",
        ),
    ],
    "fmt": Annotated[
        str | None,
        typer.Option(
            "--format",
            help=f"{' | '.join(FORMATS)} (early-stop = ESI: every step after the text-end token is speech).",
        ),
    ],
    "text_end_id": Annotated[
        int | None,
        typer.Option("--text-end-id", help="Token that ends the text in the early-stop format."),
    ],
    "speech_ids": Annotated[
        str | None, typer.Option("--speech-ids", help="Speech token ids as a half-open range START:END.")
    ],
    "stop_ids": Annotated[
        str | None,
        typer.Option(
            "--stop-ids",
            help="Stop ids, separated by commas or spaces; '' for none (default: the model's EOS).",
        ),
    ],
}

# the sampling and verification options of generate and serve (a server's requests may override them)
SAMPLING_OPTIONS = {
    "speech_policy": SpeechPolicyOpt,
    "text_policy": TextPolicyOpt,
    "temperature": TemperatureOpt,
    "top_p": TopPOpt,
    "top_k": TopKOpt,
    "verify": VerifyOpt,
    "accept": AcceptOpt,
    "unit_distance": UnitDistanceOpt,
    "repetition_penalty": RepetitionOpt,
    "speech_vocab_only": SpeechVocabOnlyOpt,
    "vocab_audit": VocabAuditOpt,
}
# eval's measures of an answer
MEASURE_OPTIONS = {
    "vocoder": Annotated[
        str,
        typer.Option(
            "--vocoder", help="refslm-espeak | module:attr | none (auto: espeak for the reference SLM)."
        ),
    ],
    "transcriber": Annotated[
        str | None,
        typer.Option("--transcriber", help="Token-level transcriber: refslm-lexicon | module:attr."),
    ],
    "asr": Annotated[str | None, typer.Option("--asr", help="Waveform ASR: pocketsphinx | module:attr.")],
    "mos": Annotated[str | None, typer.Option("--mos", help="dnsmos | module:attr.")],
    "judge": Annotated[str, typer.Option("--judge", help="contains | module:attr (or give --judge-url).")],
    "judge_url": Annotated[
        str | None, typer.Option("--judge-url", help="OpenAI-compatible endpoint for an LLM judge.")
    ],
    "judge_model": Annotated[str, typer.Option("--judge-model")],
}
# how generate, serve and eval load and time the model
RUNTIME_OPTIONS = {
    "dtype": DtypeOpt,
    "device": DeviceOpt,
    "compile_steps": CompileOpt,
    "plain_kernels": PlainKernelsOpt,
    "no_calibrate": NoCalibrateOpt,
}


@dataclass
class DecodingArgs:
    """The shared decoding options as given on the command line (None: not given)."""

    preset: str | None = None
    interleave: str | None = None
    fmt: str | None = None
    text_end_id: int | None = None
    speech_ids: str | None = None
    stop_ids: str | None = None

    def profile(self, model: Path, bb=None) -> ModelProfile:
        from .profiles import load_profile

        return load_profile(model, self.preset, bb)

    def overrides(self) -> dict:
        """The options as `resolve_config` overrides."""
        from .schedule import parse_pair

        if self.fmt is not None and self.fmt not in FORMATS:
            raise SparkeeError(f"unknown format '{self.fmt}': use {', '.join(FORMATS)}")
        return {
            "interleave": parse_pair(self.interleave, "--interleave") if self.interleave else None,
            "format": self.fmt,
            "text_end_id": self.text_end_id,
            "speech_ids": parse_pair(self.speech_ids, "--speech-ids") if self.speech_ids else None,
            "stop_ids": parse_ids(self.stop_ids, "--stop-ids", allow_empty=True)
            if self.stop_ids is not None
            else None,
        }


@dataclass
class SamplingArgs:
    """The sampling and verification options of generate and serve (None: the model's own)."""

    speech_policy: str | None = None
    text_policy: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    verify: bool = False
    accept: str | None = None
    unit_distance: str | None = None
    repetition_penalty: float | None = None
    speech_vocab_only: bool = False
    vocab_audit: bool = True

    def overrides(self) -> dict:
        """The options as `resolve_config` overrides: policies and the rule parsed once (a bad one
        fails before the model loads); None keeps the profile's setting, so flags only switch on."""
        return parsed_specs(self.speech_policy, self.text_policy, self.accept) | {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "verify": self.verify or None,
            "unit_distance": self.unit_distance,
            "repetition_penalty": self.repetition_penalty,
            "speech_vocab_only": self.speech_vocab_only or None,
            "audit_vocab": None if self.vocab_audit else False,
        }


@dataclass
class RuntimeArgs:
    """How a command loads and times the model."""

    dtype: str = "float32"
    device: str = "cpu"
    compile_steps: bool = False
    plain_kernels: bool = False
    no_calibrate: bool = False

    def load(self, model: Path):
        from .backbone import load_model

        return load_model(
            model,
            dtype=self.dtype,
            device=self.device,
            fast=not self.plain_kernels,
            compile=self.compile_steps,
        )

    def overrides(self) -> dict:
        return {"calibrate": False if self.no_calibrate else None}


@dataclass
class MeasureArgs:
    """What eval measures an answer with (plug-ins by name or module:attr; eval/plugins.py)."""

    vocoder: str = "auto"
    transcriber: str | None = None
    asr: str | None = None
    mos: str | None = None
    judge: str = "contains"
    judge_url: str | None = None
    judge_model: str = "judge"

    def measures(self, profile: ModelProfile, cfg):
        from .eval import plugins

        if self.judge_url:
            judge = plugins.HttpJudge(self.judge_url, self.judge_model)
        else:
            judge = plugins.resolve("judge", self.judge)
        return profile.measures(cfg, self.vocoder, self.transcriber, self.asr, self.mos, judge)

    def manifest(self) -> dict:
        """What a work directory records of the measures (a resumed run must match it)."""
        return {
            "vocoder": self.vocoder,
            "transcriber": self.transcriber,
            "asr": self.asr,
            "mos": self.mos,
            "judge": f"{self.judge_url} {self.judge_model}" if self.judge_url else self.judge,
        }


def option_group(cls: type, options: dict, name: str, panel: str) -> Callable:
    """A decorator giving a command the options of `options` (field name -> annotation), declared
    once and shown together under `panel` in --help; the command receives them as one `cls`
    object in its parameter `name`, whose fields give the defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    if set(defaults) != set(options):
        raise AssertionError(
            f"{cls.__name__} fields and its option table differ: {set(defaults) ^ set(options)}"
        )

    def in_panel(ann):
        base, info = typing.get_args(ann)
        info = copy.copy(info)
        info.rich_help_panel = panel
        return Annotated[base, info]

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        kept = [p for p in sig.parameters.values() if p.name != name]
        extra = [
            inspect.Parameter(
                opt, inspect.Parameter.KEYWORD_ONLY, default=defaults[opt], annotation=in_panel(ann)
            )
            for opt, ann in options.items()
        ]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            group = cls(**{opt: kwargs.pop(opt, defaults[opt]) for opt in options})
            return fn(*args, **{name: group}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=kept + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + extra}
        return wrapper

    return decorate


decoding_options = option_group(DecodingArgs, DECODING_OPTIONS, "decoding", "Model format")
sampling_options = option_group(SamplingArgs, SAMPLING_OPTIONS, "sampling", "Sampling and verification")
runtime_options = option_group(RuntimeArgs, RUNTIME_OPTIONS, "runtime", "Runtime")
measure_options = option_group(MeasureArgs, MEASURE_OPTIONS, "measure", "Measures")


# ---------------------------------------------------------------------------------------------
# checks of single options


def parse_ids(text: str, what: str, allow_empty: bool = False) -> list[int]:
    """Token ids separated by commas and/or spaces ("1,2,3", "1 2 3", "1, 2, 3")."""
    parts = re.split(r"\s*,\s*|\s+", text.strip()) if text.strip() else []
    if any(not re.fullmatch(r"[0-9]+", p) for p in parts):
        raise SparkeeError(f"{what} must be whole numbers separated by commas or spaces, got '{text}'")
    if not parts and not allow_empty:
        raise SparkeeError(f"{what} is empty: give at least one token id")
    return [int(p) for p in parts]


def pool_option(text: str, num_layers: int | None = None) -> PoolSpec:
    """A --prefill-pool value, refusing what parse_pool lets through (empty, NaN or infinite)."""
    from .config import parse_pool

    if not text.strip():
        raise SparkeeError(f"--prefill-pool is empty: it must look like {POOL_SYNTAX}")
    spec = parse_pool(text)
    if not (math.isfinite(spec.tau_in) and math.isfinite(spec.tau_deep)):
        raise SparkeeError(f"--prefill-pool thresholds must be finite numbers, got '{text}'")
    if num_layers is not None:
        spec.check(num_layers)
    return spec


def parsed_specs(speech_policy: str | None, text_policy: str | None, accept: str | None) -> dict:
    """--speech-policy, --text-policy and --accept parsed once, as `resolve_config` overrides
    (None: the model's own); the engine takes the objects as they are."""
    from .accept import parse_accept
    from .schedule import parse_policy

    return {
        "speech_policy": None if speech_policy is None else parse_policy(speech_policy),
        "text_policy": None if text_policy is None else parse_policy(text_policy),
        "accept": None if accept is None else parse_accept(accept),
    }


def check_at_least(value: int | None, least: int, option: str) -> None:
    if value is not None and value < least:
        raise SparkeeError(f"{option} must be at least {least}, got {value}")


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SparkeeError(f"--out '{out}' is a file; give a directory")
