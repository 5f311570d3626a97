"""Command line: one thin function per command. Parsing and messages here, logic elsewhere.

Every bad input ends with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import SparkeeError

# options shared by several commands
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="glm-4-voice | step-audio-2-mini: the model's interleave, ids, stops and decoding."
    ),
]

InterleaveOpt = Annotated[
    str | None,
    typer.Option(
        "--interleave",
        help="T:S text:speech ratio (default: the model's own, else all text; 0:1 = all speech).",
    ),
]

FormatOpt = Annotated[
    str | None,
    typer.Option("--format", help="padded | early-stop (ESI: every step after --text-end-id is speech)."),
]

TextEndOpt = Annotated[
    int | None, typer.Option("--text-end-id", help="Token that ends the text in the early-stop format.")
]

SpeechIdsOpt = Annotated[
    str | None, typer.Option("--speech-ids", help="Speech token ids as a half-open range START:END.")
]

StopIdsOpt = Annotated[
    str | None, typer.Option("--stop-ids", help="Comma-separated stop ids (default: the model's EOS ids).")
]

DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16")]

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]

app = typer.Typer(
    help="sparkee: faster decoding for interleaved spoken language models (SPAR-K scheduled early exit).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def friendly(fn):
    """Turn SparkeeError (and a few predictable OS errors) into one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SparkeeError as e:
            fail(str(e))
        except FileNotFoundError as e:
            fail(f"file not found: {e.filename}")
        except KeyboardInterrupt:
            fail("interrupted")

    return wrapper


def parse_ids(text: str | None, what: str) -> list[int]:
    if text is None:
        return []
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise SparkeeError(f"{what} must be comma-separated whole numbers, got '{text}'") from None


def encode_prompt(model_dir: Path, prompt: str | None, prompt_ids: str | None) -> list[int]:
    if (prompt is None) == (prompt_ids is None):
        raise SparkeeError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt_ids is not None:
        ids = parse_ids(prompt_ids, "--prompt-ids")
        if not ids:
            raise SparkeeError("the prompt is empty: give at least one token id")
        return ids
    if not prompt.strip():
        raise SparkeeError("the prompt is empty: give some text")
    from .sources import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise SparkeeError(f"--prompt needs a tokenizer in '{model_dir}'; pass --prompt-ids instead")
    ids = tok(prompt)["input_ids"]
    if not ids:
        raise SparkeeError(f"the prompt '{prompt}' encodes to no tokens with the tokenizer in '{model_dir}'")
    return ids


@app.command()
@friendly
def generate(
    model: Path = typer.Option(
        ..., "--model", help="Hugging Face checkpoint directory (Qwen2, Llama or Glm layout)."
    ),
    preset: PresetOpt = None,
    heads: str = typer.Option(
        "logit-lens", "--heads", help="Exit heads file (.safetensors) or 'logit-lens'."
    ),
    speech_policy: str = typer.Option(
        None,
        "--speech-policy",
        help="full | fixed:L | confidence:L:H | spar-k:even|odd|triple|PATTERN:L (default: full, or the preset's)",
    ),
    text_policy: str = typer.Option(
        "full", "--text-policy", help="Exit policy for text steps (same syntax)."
    ),
    interleave: InterleaveOpt = None,
    fmt: FormatOpt = None,
    text_end_id: TextEndOpt = None,
    speech_ids: SpeechIdsOpt = None,
    prompt: str = typer.Option(
        None, "--prompt", help="Prompt text (needs a tokenizer in the model directory)."
    ),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt token ids, comma-separated."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    stop_ids: StopIdsOpt = None,
    temperature: float = typer.Option(
        None, "--temperature", help="0 = greedy (default: 0, or the preset's)."
    ),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (default: 1, or the preset's)."),
    top_k: int = typer.Option(0, "--top-k", help="0 = off."),
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
        None,
        "--prefill-pool",
        help="Affinity Pooling of speech input: in=TAU_IN,deep=TAU_DEEP@LAYER[,window-in=1,window-deep=3,pos=first|mean]",
    ),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: tokens, modalities, exit_layers, stats."
    ),
    trace: bool = typer.Option(False, "--trace", help="With --json, add the per-step records."),
) -> None:
    """Generate with scheduled early exit and print the tokens, the per-step trace and stats."""
    from dataclasses import replace

    from .backbone import load_model
    from .generate import Generation
    from .heads import resolve_heads
    from .pooling import parse_pool
    from .schedule import parse_policy

    if speech_policy is not None:
        parse_policy(speech_policy)
    tp = parse_policy(text_policy)
    pool = parse_pool(prefill_pool) if prefill_pool else None
    ids = encode_prompt(model, prompt, prompt_ids)
    bb = load_model(model, dtype=dtype, device=device)
    cfg = decoding_config(
        model, interleave, fmt, text_end_id, speech_ids, stop_ids, max_new_tokens, bb=bb, preset=preset
    )
    sampling = {"temperature": temperature, "top_p": top_p}
    cfg = replace(
        cfg,
        speech_policy=parse_policy(speech_policy) if speech_policy else cfg.speech_policy,
        text_policy=tp,
        top_k=top_k,
        seed=seed,
        verify=verify,
        speech_vocab_only=speech_vocab_only,
        audit_vocab=vocab_audit,
        prefill_pool=pool,
        **{k: v for k, v in sampling.items() if v is not None},  # None: keep the preset's
    )
    exit_heads = resolve_heads(heads, bb)
    gen = Generation(bb, exit_heads, ids, cfg)
    if as_json:
        res = gen.result()
        out = res.as_json()
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
    print_stats(res.stats)


def decoding_config(
    model: Path,
    interleave,
    fmt,
    text_end_id,
    speech_ids,
    stop_ids,
    max_new_tokens: int,
    bb=None,
    preset: str | None = None,
    **kw,
):
    """Defaults from `--preset` or the model's own file (sparkee_refslm.json), then the command line."""
    from dataclasses import replace

    from .presets import default_config
    from .schedule import parse_interleave, parse_pair

    if preset:
        from .models import generation_config
        from .models import preset as load_preset

        p = load_preset(preset, model)
        cfg = generation_config(p, max_new_tokens=max_new_tokens, **kw)
        if fmt:
            cfg = replace(cfg, interleave=replace(cfg.interleave, format=fmt) if cfg.interleave else None)
    else:
        cfg = default_config(model, fmt=fmt or "padded", max_new_tokens=max_new_tokens, **kw)
    if interleave:
        end = (
            text_end_id
            if text_end_id is not None
            else (cfg.interleave.text_end_id if cfg.interleave else None)
        )
        cfg = replace(cfg, interleave=parse_interleave(interleave, fmt or "padded", end))
    elif text_end_id is not None and cfg.interleave is not None:
        cfg = replace(cfg, interleave=replace(cfg.interleave, text_end_id=text_end_id))
    elif cfg.interleave is None and (fmt not in (None, "padded") or text_end_id is not None):
        raise SparkeeError("--format and --text-end-id need --interleave T:S")
    if speech_ids:
        cfg = replace(cfg, speech_ids=parse_pair(speech_ids, "--speech-ids"))
    if stop_ids is not None:
        cfg = replace(cfg, stop_ids=parse_ids(stop_ids, "--stop-ids"))
    elif not cfg.stop_ids and bb is not None:
        cfg = replace(cfg, stop_ids=default_stop_ids(bb))
    return cfg


@app.command("train-heads")
@friendly
def train_heads(
    model: Path = typer.Option(..., "--model", help="Checkpoint directory of the frozen backbone."),
    preset: PresetOpt = None,
    data: str = typer.Option(..., "--data", help="JSONL of prompts, a datasets directory, or refslm:train."),
    layers: str = typer.Option("all", "--layers", help="'all', a list like 12,14,16, or a range like 4:12."),
    head: str = typer.Option("tuned-lens", "--head", help="tuned-lens | full"),
    token_set: str = typer.Option(
        "all", "--token-set", help="all | speech (speech ids plus control tokens)."
    ),
    out: Path = typer.Option(..., "--out", help="Heads file to write (.safetensors); metrics go beside it."),
    steps: int = typer.Option(400, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rows (generated steps) per batch."),
    lr: float = typer.Option(2e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of prompts held out for validation."
    ),
    limit: int = typer.Option(None, "--limit", help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(
        200, "--max-new-tokens", help="Length of each pseudo-label generation."
    ),
    interleave: InterleaveOpt = None,
    fmt: FormatOpt = None,
    text_end_id: TextEndOpt = None,
    speech_ids: SpeechIdsOpt = None,
    stop_ids: StopIdsOpt = None,
    work_dir: Path = typer.Option(None, "--work-dir", help="Resume files (default: OUT with .work)."),
    stop_after: int = typer.Option(
        None, "--stop-after", help="Train at most N steps now, checkpoint, exit; rerun to go on."
    ),
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Distil exit heads from the frozen model (resumable; runs under `accelerate launch` too)."""
    from .backbone import load_model
    from .generate import speech_token_set
    from .heads import HEAD_KINDS
    from .presets import for_item
    from .sources import load_prompts
    from .train_heads import parse_layers, run_training

    if head not in HEAD_KINDS or head == "logit-lens":
        raise SparkeeError(
            f"--head must be tuned-lens or full, got '{head}' (a logit lens needs no training)"
        )
    if token_set not in ("all", "speech"):
        raise SparkeeError(f"--token-set must be all or speech, got '{token_set}'")
    if out.suffix != ".safetensors":
        raise SparkeeError(f"--out must end in .safetensors, got '{out}'")
    bb = load_model(model, dtype=dtype, device=device)
    layer_list = parse_layers(layers, bb.num_layers)
    cfg = decoding_config(
        model, interleave, fmt, text_end_id, speech_ids, stop_ids, max_new_tokens, bb=bb, preset=preset
    )
    prompts = load_prompts(data, model, limit, fmt)
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
        cfg_for=lambda item: for_item(cfg, item),
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
def layer_report(
    model: Path = typer.Option(..., "--model"),
    preset: PresetOpt = None,
    heads: str = typer.Option("logit-lens", "--heads", help="Heads file or 'logit-lens'."),
    data: str = typer.Option(..., "--data", help="JSONL of prompts, a datasets directory, or refslm:test."),
    out: Path = typer.Option(Path("layer-report"), "--out", help="Output directory (JSON, Markdown, PNG)."),
    limit: int = typer.Option(None, "--limit", help="Use the first N prompts only."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    interleave: InterleaveOpt = None,
    fmt: FormatOpt = None,
    text_end_id: TextEndOpt = None,
    speech_ids: SpeechIdsOpt = None,
    stop_ids: StopIdsOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Per-layer agreement with the last layer and KL, text and speech steps apart (the paper's Table 1)."""
    from .analysis import run_report
    from .backbone import load_model
    from .heads import resolve_heads
    from .presets import for_item, model_defaults
    from .sources import load_prompts

    bb = load_model(model, dtype=dtype)
    exit_heads = resolve_heads(heads, bb)
    cfg = decoding_config(
        model, interleave, fmt, text_end_id, speech_ids, stop_ids, max_new_tokens, bb=bb, preset=preset
    )
    prompts = load_prompts(data, model, limit, fmt)
    is_ref = data.startswith("refslm:") and model_defaults(model) is not None
    run_report(bb, exit_heads, prompts, lambda item: for_item(cfg, item), out, is_refslm=is_ref)
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
def eval_cmd(
    model: Path = typer.Option(..., "--model"),
    preset: PresetOpt = None,
    heads: str = typer.Option("logit-lens", "--heads", help="Heads file or 'logit-lens'."),
    data: str = typer.Option(
        ..., "--data", help="JSONL of prompts (with 'accepted' answers), a datasets dir, or refslm:test."
    ),
    policies: str = typer.Option(
        None,
        "--policies",
        help="Comma-separated rows, each SPEECH or TEXT|SPEECH; 'full' is always added. "
        "Default: full, fixed, confidence (0.5 nats), spar-k even/odd/triple at 3/4 of the depth.",
    ),
    text_policy: str = typer.Option(
        "full", "--text-policy", help="Text policy for rows that give only SPEECH."
    ),
    sweep: str = typer.Option(
        None, "--sweep-exit-layers", help="A:B: repeat every layer-taking policy at layers A..B-1."
    ),
    verify: bool = typer.Option(False, "--verify", help="Verified (lossless) mode for every row."),
    prefill_pool: list[str] = typer.Option(
        None,
        "--prefill-pool",
        help="Repeat every row with this Affinity Pooling setting (give several for a sweep): in=0.8,deep=0.7@12",
    ),
    out: Path = typer.Option(Path("sparkee-eval"), "--out"),
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
    fresh: bool = typer.Option(False, "--fresh", help="Ignore results already in --out instead of resuming."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
    interleave: InterleaveOpt = None,
    fmt: FormatOpt = None,
    text_end_id: TextEndOpt = None,
    speech_ids: SpeechIdsOpt = None,
    stop_ids: StopIdsOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Decode every example under every policy and write Table 2 (MD/CSV/JSON), plots and report.html."""
    from .backbone import load_model
    from .eval import plugins
    from .eval.harness import EvalRun, parse_rows, run_eval, summarize
    from .eval.measures import generic_measures, refslm_measures
    from .eval.report import markdown_table, write_report
    from .heads import resolve_heads
    from .presets import for_item, model_defaults
    from .sources import load_prompts

    bb = load_model(model, dtype=dtype, device=device)
    if policies is None and preset:
        from .models import preset as load_preset

        policies = ",".join(["full", *load_preset(preset, model)["policies"]])
    if policies is None:
        L = max(1, round(0.75 * bb.num_layers))
        policies = f"full,fixed:{L},confidence:{L}:0.5,spar-k:even:{L},spar-k:odd:{L},spar-k:triple:{L}"
    rows = parse_rows(policies, text_policy, sweep, bb.num_layers, prefill_pool or None)
    exit_heads = resolve_heads(heads, bb)
    cfg = decoding_config(
        model, interleave, fmt, text_end_id, speech_ids, stop_ids, max_new_tokens, bb=bb, preset=preset
    )
    prompts = load_prompts(data, model, limit, fmt)
    the_judge = plugins.HttpJudge(judge_url, judge_model) if judge_url else plugins.resolve("judge", judge)
    if model_defaults(model) is not None:
        measures = refslm_measures(vocoder=vocoder, asr=asr, mos=mos, judge=the_judge)
    else:
        measures = generic_measures(
            model,
            cfg.speech_ids,
            cfg.stop_ids,
            None if vocoder == "auto" else vocoder,
            transcriber,
            asr,
            mos,
            the_judge,
        )
    if fresh and (out / "results.jsonl").exists():
        (out / "results.jsonl").unlink()
    run = EvalRun(
        bb, exit_heads, prompts, lambda item: for_item(cfg, item), rows, measures, out, audio_examples, verify
    )
    records = run_eval(run)
    summary = summarize(records, rows, bb.num_layers)
    write_report(summary, records, out, bb.num_layers, f"sparkee eval: {model.name}", _measure_notes(model))
    typer.echo(markdown_table(summary))
    typer.echo(f"wrote {out}/table.md, table.csv, summary.json, results.jsonl, report.html and plots")


@app.command()
@friendly
def demo(
    limit: int = typer.Option(40, "--limit", help="Number of test questions."),
    out: Path = typer.Option(Path("sparkee-demo"), "--out"),
    model: Path = typer.Option(
        None, "--model", help="A reference-SLM checkpoint directory (default: the bundled one)."
    ),
    exit_layer: int = typer.Option(
        None, "--exit-layer", help="Exit layer L for every early-exit policy (default: the bundled choice)."
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
    from .eval.harness import EvalRun, Row, run_eval, summarize
    from .eval.measures import refslm_measures
    from .eval.report import markdown_table, write_report
    from .heads import resolve_heads
    from .presets import bundled_heads, default_config, for_item, refslm_prompts
    from .refslm import bundled_model_dir

    model = model or bundled_model_dir()
    if not (model / "config.json").is_file():
        raise SparkeeError(
            f"the bundled reference model is missing from {model}; train it with `sparkee refslm train --install`"
        )
    if fmt not in ("padded", "early-stop"):
        raise SparkeeError(f"unknown format '{fmt}': use padded or early-stop")
    bb = load_model(model)
    if heads == "bundled":
        path = bundled_heads() if model == bundled_model_dir() else None
        exit_heads = resolve_heads(str(path) if path else "logit-lens", bb)
    else:
        exit_heads = resolve_heads(heads, bb)
    L = exit_layer or DEMO_EXIT_LAYER
    rows = [Row("full", s) for s in ("full", f"fixed:{L}", f"confidence:{L}:{threshold}")]
    rows += [Row("full", f"spar-k:{p}:{L}") for p in ("even", "odd", "triple")]
    for r in rows:
        parse_policy_checked(r.speech, bb.num_layers)
    cfg = default_config(model, fmt=fmt, max_new_tokens=200)
    prompts = refslm_prompts("test", formats=(fmt,))[:limit]
    if not prompts:
        raise SparkeeError("--limit must be at least 1")
    if (out / "results.jsonl").exists():  # a demo measures speed in one run: start afresh
        (out / "results.jsonl").unlink()
    typer.echo(
        f"reference SLM: {bb.num_layers} layers, heads: {exit_heads.kind}, {len(prompts)} test questions, format {fmt}"
    )
    run = EvalRun(
        bb,
        exit_heads,
        prompts,
        lambda item: for_item(cfg, item),
        rows,
        refslm_measures(),
        out,
        audio_examples,
    )
    records = run_eval(run)
    summary = summarize(records, rows, bb.num_layers)
    write_report(
        summary, records, out, bb.num_layers, "sparkee demo: bundled reference SLM", _measure_notes(model)
    )
    typer.echo(markdown_table(summary))
    typer.echo(f"wrote {out}/summary.json, table.md, report.html and WAVs under {out}/audio")


DEMO_EXIT_LAYER = 12


def parse_policy_checked(spec: str, num_layers: int) -> None:
    from .schedule import parse_policy

    parse_policy(spec, num_layers)


def default_stop_ids(bb) -> list[int]:
    eos = getattr(getattr(bb.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(bb.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if 0 <= int(e) < bb.vocab_size]


def print_stats(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stat", "value", title="run statistics (tokens: id~@layers, ~ = speech)")
    for k, v in stats.items():
        table.add_row(k, "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    Console().print(table)


def _mount_optional() -> None:
    from .models.cli import app as convert_app

    app.add_typer(convert_app, name="convert")
    try:
        from .refslm.cli import app as refslm_app
    except ImportError:  # the reference model's extras are optional
        return
    app.add_typer(refslm_app, name="refslm")


_mount_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
