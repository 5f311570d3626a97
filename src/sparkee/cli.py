"""Command line: one thin function per command. Parsing and messages here, logic elsewhere.

Defaults come from the model's profile (profiles.py) through `resolve_config`; the six decoding
options every model-running command shares are defined once (`DECODING_OPTIONS`). Every bad input
ends with one sentence on stderr and exit status 2, never a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import SparkeeError
from .schedule import FORMATS

if TYPE_CHECKING:  # the CLI imports its heavy modules inside the commands, so startup stays fast
    from .eval.harness import EvalRun
    from .pooling import PoolSpec
    from .profiles import ModelProfile
    from .sources import PromptItem

POLICY_SYNTAX = (
    "full, fixed:L, confidence:L:H (H: entropy in nats) or spar-k:P:L with P = even, odd, triple "
    "or any pattern of F and E"
)
# help text: rich cuts words longer than the help column (24 characters at 80 columns)
POOL_SYNTAX = (
    "in=T1,deep=T2@L (cosine thresholds T1 at the input and T2 after layer L), optionally "
    "followed by ,window-in=W ,window-deep=W ,pos=first or ,pos=mean"
)

DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]

# the decoding options shared by generate, train-heads, layer-report and eval (None: the model's own)
DECODING_OPTIONS = {
    "preset": Annotated[
        str | None,
        typer.Option(
            "--preset", help="glm-4-voice | step-audio-2-mini: that model's interleave, ids, stops, sampling."
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
        int | None, typer.Option("--text-end-id", help="Token that ends the text in the early-stop format.")
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

app = typer.Typer(
    help="sparkee: faster decoding for interleaved spoken language models (SPAR-K scheduled early exit).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly(fn: Callable) -> Callable:
    """Turn SparkeeError (and predictable OS errors) into one line and exit status 2; Ctrl-C is 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparkeeError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"file not found: {e.filename}")
        except OSError as e:  # a directory where a file was expected, no permission, disk full
            fail(f"cannot read or write '{e.filename}': {e.strerror}")
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


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


def decoding_options(fn: Callable) -> Callable:
    """Give a command the shared decoding options; it receives them as `decoding: DecodingArgs`."""
    sig = inspect.signature(fn, eval_str=True)
    kept = [p for p in sig.parameters.values() if p.name != "decoding"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ann)
        for name, ann in DECODING_OPTIONS.items()
    ]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        decoding = DecodingArgs(**{name: kwargs.pop(name, None) for name in DECODING_OPTIONS})
        return fn(*args, decoding=decoding, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=kept + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in kept + extra}
    return wrapper


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
    from .pooling import parse_pool

    if not text.strip():
        raise SparkeeError(f"--prefill-pool is empty: it must look like {POOL_SYNTAX}")
    spec = parse_pool(text)
    if not (math.isfinite(spec.tau_in) and math.isfinite(spec.tau_deep)):
        raise SparkeeError(f"--prefill-pool thresholds must be finite numbers, got '{text}'")
    if num_layers is not None:
        spec.check(num_layers)
    return spec


def check_at_least(value: int | None, least: int, option: str) -> None:
    if value is not None and value < least:
        raise SparkeeError(f"{option} must be at least {least}, got {value}")


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SparkeeError(f"--out '{out}' is a file; give a directory")


def load_data(
    profile: ModelProfile, source: str, fmt: str | None, limit: int | None
) -> tuple[list[PromptItem], str]:
    """(prompts, digest of every prompt of the source): `--limit` takes the first N."""
    from .sources import check_limit, prompts_digest

    check_limit(limit)
    items = profile.prompts(source, fmt)
    return items[:limit] if limit else items, prompts_digest(items)


# ---------------------------------------------------------------------------------------------
# commands


@app.command()
@friendly
@decoding_options
def generate(
    model: Path = typer.Option(
        ..., "--model", help="Hugging Face checkpoint directory (Qwen2, Llama or Glm layout)."
    ),
    heads: str = typer.Option(
        "logit-lens", "--heads", help="Exit heads file (.safetensors) or 'logit-lens'."
    ),
    speech_policy: str = typer.Option(
        None, "--speech-policy", help=f"{POLICY_SYNTAX} (default: full, or the preset's)."
    ),
    text_policy: str = typer.Option(
        None, "--text-policy", help="Exit policy for text steps, same syntax (default: full)."
    ),
    prompt: str = typer.Option(
        None,
        "--prompt",
        help="Prompt text, made into the prompt the model expects (the reference model hears it spoken).",
    ),
    prompt_ids: str = typer.Option(
        None, "--prompt-ids", help="Prompt token ids, separated by commas or spaces."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    temperature: float = typer.Option(
        None, "--temperature", help="0 = greedy (default: 0, or the preset's)."
    ),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (default: 1, or the preset's)."),
    top_k: int = typer.Option(None, "--top-k", help="0 = off (the default)."),
    seed: int = typer.Option(None, "--seed"),
    verify: bool = typer.Option(
        False, "--verify", help="Reject early tokens the last layer disagrees with (lossless)."
    ),
    speech_vocab_only: bool = typer.Option(
        False, "--speech-vocab-only", help="At speech steps project onto speech and control ids only."
    ),
    vocab_audit: bool = typer.Option(
        True,
        "--vocab-audit/--no-vocab-audit",
        help="Count tokens --speech-vocab-only changed (costs a full projection).",
    ),
    prefill_pool: str = typer.Option(
        None, "--prefill-pool", help=f"Affinity Pooling of the speech input: {POOL_SYNTAX}."
    ),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: tokens, modalities, exit_layers, stats."
    ),
    trace: bool = typer.Option(False, "--trace", help="With --json, add the per-step records."),
    *,
    decoding: DecodingArgs,
) -> None:
    """Generate with scheduled early exit and print the tokens, the per-step trace and stats."""
    from .backbone import load_model
    from .generate import Generation
    from .heads import resolve_heads
    from .profiles import resolve_config
    from .schedule import parse_policy

    if trace and not as_json:
        raise SparkeeError("--trace adds the per-step records to the JSON output: give --json too")
    if (prompt is None) == (prompt_ids is None):
        raise SparkeeError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    for spec in (speech_policy, text_policy):
        if spec is not None:
            parse_policy(spec)
    ids = parse_ids(prompt_ids, "--prompt-ids") if prompt_ids is not None else None
    pool = pool_option(prefill_pool) if prefill_pool is not None else None
    overrides = decoding.overrides()  # bad option values fail before the model loads
    bb = load_model(model, dtype=dtype, device=device)
    profile = decoding.profile(model, bb)
    cfg = resolve_config(
        profile,
        overrides
        | {
            "max_new_tokens": max_new_tokens,
            "speech_policy": speech_policy,
            "text_policy": text_policy,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "verify": verify or None,  # flags only switch on: None keeps the profile's setting
            "speech_vocab_only": speech_vocab_only or None,
            "audit_vocab": None if vocab_audit else False,
            "prefill_pool": pool,
        },
    )
    if ids is None:
        ids = profile.encode_text(prompt, cfg.interleave.format if cfg.interleave else None)
    gen = Generation(bb, resolve_heads(heads, bb), ids, cfg)
    if as_json:
        res = gen.result()
        out = res.as_json() | profile.describe(res.tokens, cfg)
        if trace:
            from .trace import steps_as_dicts

            out["steps"] = steps_as_dicts(res.steps)
        typer.echo(json.dumps(out))
        return
    for ev in gen:  # stream as tokens come
        sys.stdout.write(f"{ev.token}{'~' if ev.modality == 'speech' else ''}@{ev.exit_layer} ")
        sys.stdout.flush()
    sys.stdout.write("\n")
    res = gen.result()
    for name, text in profile.describe(res.tokens, cfg).items():
        typer.echo(f"{name.replace('_', ' ')}: {text}")
    print_stats(res.stats)


@app.command("train-heads")
@friendly
@decoding_options
def train_heads(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory of the frozen backbone."),
    data: str = typer.Option(..., "--data", help="JSONL of prompts, a datasets directory, or refslm:train."),
    layers: str = typer.Option("all", "--layers", help="'all', a list like 12,14,16, or a range like 4:12."),
    head: str = typer.Option("tuned-lens", "--head", help="tuned-lens | full"),
    token_set: str = typer.Option(
        "all", "--token-set", help="all | speech (speech ids plus control tokens)."
    ),
    out: Path = typer.Option(..., "--out", help="Heads file to write (.safetensors); metrics go beside it."),
    steps: int = typer.Option(400, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rows (generated steps) per batch."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (cosine schedule with warm-up)."),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of prompts held out for validation (between 0 and 1)."
    ),
    limit: int = typer.Option(None, "--limit", help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(
        200, "--max-new-tokens", help="Length of each pseudo-label generation."
    ),
    work_dir: Path = typer.Option(None, "--work-dir", help="Resume files (default: OUT with .work)."),
    stop_after: int = typer.Option(
        None, "--stop-after", help="Train at most N steps now, checkpoint, exit; rerun to go on."
    ),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    *,
    decoding: DecodingArgs,
) -> None:
    """Distil exit heads from the frozen model (resumable; runs under `accelerate launch` too)."""
    from .backbone import load_model
    from .generate import speech_token_set
    from .heads import HEAD_KINDS
    from .profiles import item_config, resolve_config
    from .sources import check_limit
    from .train_heads import check_training, parse_layers, run_training

    if head not in HEAD_KINDS or head == "logit-lens":
        raise SparkeeError(
            f"--head must be tuned-lens or full, got '{head}' (a logit lens needs no training)"
        )
    if token_set not in ("all", "speech"):
        raise SparkeeError(f"--token-set must be all or speech, got '{token_set}'")
    if out.suffix != ".safetensors" or out.is_dir():
        raise SparkeeError(f"--out must name a .safetensors file, got '{out}'")
    check_training(steps, batch_size, lr, val_fraction, stop_after)
    check_limit(limit)
    overrides = decoding.overrides()
    bb = load_model(model, dtype=dtype, device=device)
    layer_list = parse_layers(layers, bb.num_layers)
    profile = decoding.profile(model, bb)
    cfg = resolve_config(profile, overrides | {"max_new_tokens": max_new_tokens})
    prompts, _ = load_data(profile, data, decoding.fmt, limit)
    ids = speech_token_set(cfg, bb.vocab_size) if token_set == "speech" else None
    metrics = run_training(
        bb,
        prompts,
        cfg,
        layer_list,
        head,
        ids,
        out,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        val_fraction=val_fraction,
        work_dir=work_dir,
        source_name=data,
        cfg_for=lambda item: item_config(cfg, item),
        stop_after=stop_after,
    )
    if not metrics:
        typer.echo(f"stopped after --stop-after {stop_after} steps; rerun the same command to continue")
    else:
        print_head_metrics(metrics)
        typer.echo(f"wrote {out} and {out.with_name(out.stem + '.metrics.json')}")


def print_head_metrics(metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        "layer",
        "heads KL",
        "heads agree %",
        "logit-lens KL",
        "logit-lens agree %",
        title=f"validation ({metrics['val_rows']} rows)",
    )
    for k, h in metrics["heads"].items():
        ll = metrics["logit_lens"][k]
        f = lambda x, pct=False: "-" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.3f}")  # noqa: E731
        t.add_row(k, f(h["kl_all"]), f(h["agree_all"], True), f(ll["kl_all"]), f(ll["agree_all"], True))
    Console().print(t)


@app.command("layer-report")
@friendly
@decoding_options
def layer_report(
    model: Path = typer.Option(..., "--model"),
    heads: str = typer.Option("logit-lens", "--heads", help="Heads file or 'logit-lens'."),
    data: str = typer.Option(..., "--data", help="JSONL of prompts, a datasets directory, or refslm:test."),
    out: Path = typer.Option(Path("layer-report"), "--out", help="Output directory (JSON, Markdown, PNG)."),
    limit: int = typer.Option(None, "--limit", help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    *,
    decoding: DecodingArgs,
) -> None:
    """Per-layer agreement with the last layer and KL, text and speech steps apart (the paper's Table 1)."""
    from .analysis import run_report
    from .backbone import load_model
    from .heads import resolve_heads
    from .profiles import item_config, resolve_config
    from .sources import check_limit

    check_limit(limit)
    check_out_dir(out)
    overrides = decoding.overrides()
    bb = load_model(model, dtype=dtype, device=device)
    exit_heads = resolve_heads(heads, bb)
    profile = decoding.profile(model, bb)
    cfg = resolve_config(profile, overrides | {"max_new_tokens": max_new_tokens})
    prompts, _ = load_data(profile, data, decoding.fmt, limit)
    measures = profile.report_measures(cfg)
    run_report(bb, exit_heads, prompts, lambda item: item_config(cfg, item), out, measures)
    typer.echo((out / "layer_report.md").read_text())
    typer.echo(f"wrote {out}/layer_report.json, layer_report.md, layer_report.png")


def _measure_notes(model: Path) -> str:
    return (
        f"Model: {model}. Speed-ups are wall-clock ratios against the full row, measured in this run "
        "(examples round-robin over rows). Results on the bundled reference model say nothing about GLM-4-Voice "
        "or Step-Audio-2."
    )


@app.command("eval")
@friendly
@decoding_options
def eval_cmd(
    model: Path = typer.Option(..., "--model"),
    heads: str = typer.Option("logit-lens", "--heads", help="Heads file or 'logit-lens'."),
    data: str = typer.Option(
        ..., "--data", help="JSONL of prompts (with 'accepted' answers), a datasets dir, or refslm:test."
    ),
    policies: str = typer.Option(
        None,
        "--policies",
        help="Comma-separated rows, each SPEECH or TEXT|SPEECH; 'full' is always added. "
        "Default: the preset's rows, else full, fixed, confidence (0.5 nats) and spar-k "
        "even/odd/triple at 3/4 of the depth.",
    ),
    text_policy: str = typer.Option(
        "full", "--text-policy", help="Text policy for rows that give only SPEECH."
    ),
    sweep: str = typer.Option(
        None,
        "--sweep-exit-layers",
        help="A:B (A < B) repeats every layer-taking policy at exit layers A to B-1.",
    ),
    verify: bool = typer.Option(False, "--verify", help="Verified (lossless) mode for every row."),
    prefill_pool: list[str] = typer.Option(
        None,
        "--prefill-pool",
        help=f"Repeat every row with this Affinity Pooling setting, {POOL_SYNTAX} (give several for a sweep).",
    ),
    out: Path = typer.Option(Path("sparkee-eval"), "--out", help="Output directory (resumed when rerun)."),
    limit: int = typer.Option(None, "--limit", help="First N examples only."),
    vocoder: str = typer.Option(
        "auto", "--vocoder", help="refslm-espeak | module:attr | none (auto: espeak for the reference SLM)."
    ),
    transcriber: str = typer.Option(
        None, "--transcriber", help="Token-level transcriber: refslm-lexicon | module:attr."
    ),
    asr: str = typer.Option(None, "--asr", help="Waveform ASR: pocketsphinx | module:attr."),
    mos: str = typer.Option(None, "--mos", help="dnsmos | module:attr."),
    judge: str = typer.Option("contains", "--judge", help="contains | module:attr (or give --judge-url)."),
    judge_url: str = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint for an LLM judge."),
    judge_model: str = typer.Option("judge", "--judge-model"),
    audio_examples: int = typer.Option(
        3, "--audio-examples", help="Keep WAVs (and report players) for the first N examples."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Replace results already in --out instead of resuming."
    ),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    *,
    decoding: DecodingArgs,
) -> None:
    """Decode every example under every policy and write Table 2 (MD/CSV/JSON), plots and report.html."""
    from .backbone import load_model
    from .eval import plugins
    from .eval.harness import EvalRun, parse_rows
    from .heads import resolve_heads
    from .profiles import config_json, item_config, resolve_config
    from .sources import check_limit

    check_limit(limit)
    check_at_least(audio_examples, 0, "--audio-examples")
    check_out_dir(out)
    pools = list(prefill_pool or [])
    for p in pools:
        pool_option(p)
    overrides = decoding.overrides()
    bb = load_model(model, dtype=dtype, device=device)
    profile = decoding.profile(model, bb)
    policies = policies or ",".join(profile.default_policies(bb.num_layers))
    rows = parse_rows(policies, text_policy, sweep, bb.num_layers, pools or None)
    exit_heads = resolve_heads(heads, bb)
    cfg = resolve_config(profile, overrides | {"max_new_tokens": max_new_tokens})
    prompts, digest = load_data(profile, data, decoding.fmt, limit)
    the_judge = plugins.HttpJudge(judge_url, judge_model) if judge_url else plugins.resolve("judge", judge)
    measures = profile.measures(cfg, vocoder, transcriber, asr, mos, the_judge)
    manifest = {
        "model": bb.fingerprint(),
        "heads": heads_identity(heads),
        "data": {"source": data, "digest": digest},
        "decoding": config_json(cfg),
        "verify": verify,
        "measures": {
            "vocoder": vocoder,
            "transcriber": transcriber,
            "asr": asr,
            "mos": mos,
            "judge": f"{judge_url} {judge_model}" if judge_url else judge,
        },
    }
    run = EvalRun(
        bb,
        exit_heads,
        prompts,
        lambda item: item_config(cfg, item),
        rows,
        measures,
        out,
        audio_examples,
        verify,
    )
    _run_and_report(run, manifest, fresh, f"sparkee eval: {model.name}", _measure_notes(model))
    typer.echo(f"wrote {out}/table.md, table.csv, summary.json, results.jsonl, report.html and plots")


def heads_identity(spec: str) -> str:
    """What the manifest records for `--heads`: 'logit-lens', or the file's kind and content hash."""
    from .eval.harness import file_digest
    from .heads import read_metadata

    if spec == "logit-lens":
        return spec
    return f"{read_metadata(spec)['head_type']}:{file_digest(spec)}"


def _run_and_report(run: EvalRun, manifest: dict, fresh: bool, title: str, notes: str) -> None:
    """Run (or resume) an evaluation, write the report, print the table and any failures."""
    from .eval.harness import code_version, failures, prepare_out, run_eval, summarize
    from .eval.report import markdown_table, write_report

    prepare_out(run.out, manifest | {"code": code_version()}, fresh)
    records = run_eval(run)
    summary = summarize(records, run.rows, run.bb.num_layers)
    write_report(summary, records, run.out, run.bb.num_layers, title, notes)
    typer.echo(markdown_table(summary))
    failed, dead = failures(records, run.rows)
    if failed:
        first = failed[0]
        typer.echo(
            f"{len(failed)} of {len(records)} runs failed (they are retried when you rerun); first: row "
            f"'{first['row']}', example {first['example']}: {first['error']}",
            err=True,
        )
    if dead:
        fail(f"every example failed in row {', '.join(repr(d) for d in dead)}", 1)


@app.command()
@friendly
def demo(
    limit: int = typer.Option(40, "--limit", help="Number of test questions."),
    out: Path = typer.Option(Path("sparkee-demo"), "--out", help="Output directory (replaced on each run)."),
    model: Path = typer.Option(
        None, "--model", help="A reference-SLM checkpoint directory (default: the bundled one)."
    ),
    exit_layer: int = typer.Option(
        None, "--exit-layer", help="Exit layer L of every early-exit policy (default: 3/4 of the depth)."
    ),
    threshold: float = typer.Option(0.5, "--threshold", help="Entropy threshold (nats) of confidence exit."),
    heads: str = typer.Option("bundled", "--heads", help="bundled | logit-lens | a heads file."),
    fmt: str = typer.Option("padded", "--format", help="padded | early-stop"),
    audio_examples: int = typer.Option(
        3, "--audio-examples", help="WAV files for the first N answers per policy."
    ),
) -> None:
    """Answer the bundled reference SLM's test questions under each policy; print the paper's Table 2."""
    from .backbone import load_model
    from .eval.harness import EvalRun, Row
    from .heads import resolve_heads
    from .profiles import ReferenceProfile, item_config, load_profile, resolve_config
    from .refslm import bundled_model_dir
    from .refslm.data import FORMATS as REFSLM_FORMATS
    from .schedule import parse_policy
    from .sources import check_limit

    model = model or bundled_model_dir()
    if not (model / "config.json").is_file():
        raise SparkeeError(
            f"the reference model is missing from {model}; train it with `sparkee refslm train --install`"
        )
    if fmt not in REFSLM_FORMATS:
        raise SparkeeError(f"unknown format '{fmt}': use {' or '.join(REFSLM_FORMATS)}")
    check_limit(limit)
    check_at_least(audio_examples, 0, "--audio-examples")
    check_out_dir(out)
    bb = load_model(model)
    profile = load_profile(model, bb=bb)
    if not isinstance(profile, ReferenceProfile):
        raise SparkeeError(f"'{model}' is not a reference-SLM directory (it has no sparkee_refslm.json)")
    if heads == "bundled":
        heads = str(profile.heads) if profile.heads else "logit-lens"
    exit_heads = resolve_heads(heads, bb)
    specs = profile.default_policies(bb.num_layers, exit_layer, threshold)
    for spec in specs:
        parse_policy(spec, bb.num_layers)
    rows = [Row("full", s) for s in specs]
    cfg = resolve_config(profile, {"format": fmt, "max_new_tokens": 200})
    prompts, digest = load_data(profile, "refslm:test", fmt, limit)
    typer.echo(
        f"reference SLM: {bb.num_layers} layers, heads: {exit_heads.kind}, {len(prompts)} test questions, format {fmt}"
    )
    run = EvalRun(
        bb,
        exit_heads,
        prompts,
        lambda item: item_config(cfg, item),
        rows,
        profile.measures(cfg),
        out,
        audio_examples,
    )
    manifest = {"model": bb.fingerprint(), "heads": heads_identity(heads), "data": digest}
    # a demo measures speed in one run: it always starts afresh
    _run_and_report(run, manifest, True, "sparkee demo: reference SLM", _measure_notes(model))
    typer.echo(f"wrote {out}/summary.json, table.md, report.html and WAVs under {out}/audio")


def print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stat", "value", title="run statistics (tokens: id~@layers, ~ = speech)")
    for k, v in stats.items():
        table.add_row(k, "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def _mount(sub: typer.Typer, name: str) -> None:
    """Add a command group, its commands wrapped like ours (one sentence, status 2; Ctrl-C 130)."""
    for command in sub.registered_commands:
        command.callback = friendly(command.callback)
    app.add_typer(sub, name=name)


def _mount_optional() -> None:
    from .models.cli import app as convert_app

    _mount(convert_app, "convert")
    try:
        from .refslm.cli import app as refslm_app
    except ImportError:  # the reference model's extras are optional
        return
    _mount(refslm_app, "refslm")


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
