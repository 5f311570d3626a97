"""Command line: one thin function per command. Parsing and messages here, logic elsewhere.

Defaults come from the model's profile (profiles.py) through `resolve_config`. Options that several
commands share are declared once, in options.py (single options and option groups). Every bad
input ends with one sentence on stderr and exit status 2, never a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .errors import SparkeeError
from .options import (
    POOL_SYNTAX,
    CheckpointOpt,
    DataOpt,
    DecodingArgs,
    DeviceOpt,
    DtypeOpt,
    HeadsOpt,
    LimitOpt,
    MaxNewTokensOpt,
    MeasureArgs,
    PlainKernelsOpt,
    RepetitionOpt,
    RuntimeArgs,
    SamplingArgs,
    UnitDistanceOpt,
    check_at_least,
    check_out_dir,
    decoding_options,
    measure_options,
    parse_ids,
    pool_option,
    runtime_options,
    sampling_options,
)

if TYPE_CHECKING:  # the CLI imports its heavy modules inside the commands, so startup stays fast
    from .eval.harness import EvalRun
    from .profiles import ModelProfile
    from .sources import PromptItem

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


# ---------------------------------------------------------------------------------------------
# checks of single options


def load_configured(model: Path, decoding: DecodingArgs, runtime: RuntimeArgs, options: dict):
    """(backbone, profile, config): the model loaded as `runtime` says, its profile, and the
    profile's config with the command's options over it (option values are checked first, so a
    bad one fails before the model loads)."""
    from .profiles import resolve_config

    overrides = decoding.overrides() | runtime.overrides()
    bb = runtime.load(model)
    profile = decoding.profile(model, bb)
    return bb, profile, resolve_config(profile, overrides | options)


def calibrate_before_timing(bb, heads, cfg) -> None:
    """This machine's calibration, read or measured now, before anything is timed (when the config
    wants calibrated predictions): a measurement in the middle of an eval would skew its timings."""
    from .calibrate import load_or_calibrate
    from .config import calibration_wanted

    if calibration_wanted(cfg):
        load_or_calibrate(bb, heads)


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
@runtime_options
@decoding_options
@sampling_options
def generate(
    model: CheckpointOpt,
    heads: HeadsOpt = "logit-lens",
    prompt: str = typer.Option(
        None,
        "--prompt",
        help="Prompt text, made into the prompt the model expects (the reference model hears it spoken).",
    ),
    prompt_ids: str = typer.Option(
        None, "--prompt-ids", help="Prompt token ids, separated by commas or spaces."
    ),
    max_new_tokens: MaxNewTokensOpt = 64,
    seed: int = typer.Option(None, "--seed"),
    prefill_pool: str = typer.Option(
        None, "--prefill-pool", help=f"Affinity Pooling of the speech input: {POOL_SYNTAX}."
    ),
    prompts_file: Path = typer.Option(
        None,
        "--prompts-file",
        help="JSONL of prompts (as eval's --data), decoded --batch-size at a time; one result per prompt.",
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Prompts of --prompts-file decoded together."),
    history: Path = typer.Option(
        None,
        "--history",
        help="Dialogue history (JSON or JSONL; docs: real-models.md): --prompt becomes its next user turn (presets, or a model whose tokenizer has a chat template).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print one JSON object (a line per prompt): tokens, modalities, exit_layers, stats.",
    ),
    trace: bool = typer.Option(False, "--trace", help="With --json, add the per-step records."),
    *,
    decoding: DecodingArgs,
    sampling: SamplingArgs,
    runtime: RuntimeArgs,
) -> None:
    """Generate with scheduled early exit and print the tokens, the per-step trace and stats."""
    from .profiles import heads_of

    if trace and not as_json:
        raise SparkeeError("--trace adds the per-step records to the JSON output: give --json too")
    given = [x is not None for x in (prompt_ids, prompts_file)] + [prompt is not None and history is None]
    if history is not None and prompt_ids is not None:
        raise SparkeeError("--history takes the new question as --prompt TEXT, not --prompt-ids")
    if sum(given) + (history is not None) != 1:
        raise SparkeeError(
            "give exactly one of --prompt TEXT, --prompt-ids 1,2,3, --prompts-file FILE or --history FILE"
        )
    check_at_least(batch_size, 1, "--batch-size")
    if batch_size > 1 and prompts_file is None:
        raise SparkeeError("--batch-size decodes several prompts together: give them with --prompts-file")
    ids = parse_ids(prompt_ids, "--prompt-ids") if prompt_ids is not None else None
    pool = pool_option(prefill_pool) if prefill_pool is not None else None
    options = sampling.overrides() | {"max_new_tokens": max_new_tokens, "seed": seed, "prefill_pool": pool}
    bb, profile, cfg = load_configured(model, decoding, runtime, options)
    exit_heads = heads_of(heads, profile, bb)
    fmt = cfg.interleave.format if cfg.interleave else None
    if prompts_file is not None:
        _generate_many(bb, exit_heads, profile, cfg, str(prompts_file), fmt, batch_size, as_json, trace)
        return
    if history is not None:
        ids = profile.encode_dialogue(history, text=prompt)
    elif ids is None:
        ids = profile.encode_text(prompt, fmt)
    from .generate import Generation

    gen = Generation(bb, exit_heads, ids, cfg)
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


def _generate_many(
    bb, heads, profile, cfg, source: str, fmt, batch_size: int, as_json: bool, trace: bool
) -> None:
    """--prompts-file: every prompt, `batch_size` at a time; a JSON line (or a block of text) each."""
    from .config import group_by_config
    from .generate import generate_batch
    from .profiles import item_config
    from .trace import steps_as_dicts

    items = profile.prompts(source, fmt)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        results = [None] * len(chunk)
        # prompts that fix another format decode apart
        for c, members in group_by_config(chunk, lambda item: item_config(cfg, item)):
            for n, res in zip(
                members, generate_batch(bb, [chunk[n].ids for n in members], c, heads), strict=True
            ):
                results[n] = (res, c)
        for n, (res, c) in enumerate(results):
            meta = {k: v for k, v in chunk[n].meta.items() if isinstance(v, (str, int, float, bool))}
            if as_json:
                out = {"index": start + n, **meta, **res.as_json(), **profile.describe(res.tokens, c)}
                if trace:
                    out["steps"] = steps_as_dicts(res.steps)
                typer.echo(json.dumps(out))
            else:
                typer.echo(
                    f"[{start + n}] "
                    + " ".join(
                        f"{t}{'~' if m == 'speech' else ''}@{e}"
                        for t, m, e in zip(res.tokens, res.modalities, res.exit_layers, strict=True)
                    )
                )
                for name, text in profile.describe(res.tokens, c).items():
                    typer.echo(f"    {name.replace('_', ' ')}: {text}")
        if not as_json and results:
            st = results[0][0].stats
            if st.get("batch_size"):
                typer.echo(
                    f"    batch of {st['batch_size']}: {st['batch_new_tokens']} new tokens, "
                    f"{(st['batch_tokens_per_s'] or 0):.1f} tokens/s, predicted speed-up "
                    f"{(st['batch_predicted_speedup'] or 0):.2f}"
                )


@app.command()
@friendly
def calibrate(
    model: CheckpointOpt,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    force: bool = typer.Option(False, "--force", help="Measure again even when a calibration is cached."),
    plain_kernels: PlainKernelsOpt = False,
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
) -> None:
    """Measure this machine's decode costs for a model (layer passes by rows, heads, projections,
    step overheads) and cache them; speed-up predictions then use them. Run on a quiet machine."""
    from . import calibrate as calibration
    from . import store
    from .backbone import load_model

    if force:  # a new measurement of the kernel choice, then of the costs
        from . import kernels

        bb = load_model(model, dtype=dtype, device=device, fast=False)
        store.key_path("kernels", kernels.kernels_key(bb)).unlink(missing_ok=True)
    bb = load_model(model, dtype=dtype, device=device, fast=not plain_kernels)
    if force:
        store.key_path("calibration", calibration.calibration_key(bb)).unlink(missing_ok=True)
    cal = calibration.load_or_calibrate(bb)
    path = store.key_path("calibration", cal.key)
    if as_json:
        typer.echo(json.dumps(cal.to_json()))
        return
    print_calibration(bb, cal)
    if cal.drift > calibration.UNSTEADY:
        typer.echo("not cached: the machine's speed moved while measuring; rerun on a quiet machine")
    else:
        typer.echo(f"cached in {path}")


def print_calibration(bb, cal) -> None:
    from rich.console import Console
    from rich.table import Table

    from .calibrate import UNSTEADY, predict_schedules

    con = Console()
    t = Table("rows", "ms per layer pass (context 0)", "extra us per context position", title="layer passes")
    for r, a, c in zip(cal.rows, cal.layer_a, cal.layer_c, strict=True):
        t.add_row(str(r), f"{1e3 * a:.3f}", f"{1e6 * c:.3f}")
    con.print(t)
    m = Table(
        "weight elements",
        *[f"{r} rows (ms)" for r in cal.mat_rows],
        title="matrix products (heads, projections)",
    )
    for el, row in zip(cal.mat_sizes, cal.mat_s, strict=True):
        m.add_row(f"{el:,}", *[f"{1e3 * x:.3f}" for x in row])
    con.print(m)
    con.print("step overheads (ms): " + ", ".join(f"{k} {1e3 * v:.3f}" for k, v in cal.overhead.items()))
    steady = "steady" if cal.drift <= UNSTEADY else "UNSTEADY: measured twice, not cached"
    con.print(f"layer timings moved {100 * cal.drift:.1f}% between the halves of the rounds ({steady})")
    p = Table(
        "schedule (every step speech)",
        "predicted speed-up over full",
        title=f"kernels {bb.kernel_signature()}",
    )
    for name, x in predict_schedules(bb, cal).items():
        p.add_row(name, f"{x:.3f}")
    con.print(p)


@app.command("train-heads")
@friendly
@decoding_options
def train_heads(
    model: CheckpointOpt,
    data: DataOpt,
    layers: str = typer.Option("all", "--layers", help="'all', a list like 12,14,16, or a range like 4:12."),
    head: str = typer.Option(
        "tuned-lens",
        "--head",
        "--kind",
        help="tuned-lens | full | adapter (one decoder layer with its own KV cache: a stronger draft).",
    ),
    token_set: str = typer.Option(
        "all", "--token-set", help="all | speech (speech ids plus control tokens)."
    ),
    out: Path = typer.Option(..., "--out", help="Heads file to write (.safetensors); metrics go beside it."),
    steps: int = typer.Option(400, "--steps", help="Optimizer steps."),
    train_batch_size: int = typer.Option(
        256,
        "--train-batch-size",
        help="Rows (generated steps) per optimizer step; whole sequences for --head adapter.",
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Prompts decoded together while labelling (same labels as one by one)."
    ),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (cosine schedule with warm-up)."),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(
        0.1, "--val-fraction", help="Share of prompts held out for validation (between 0 and 1)."
    ),
    limit: LimitOpt = None,
    max_new_tokens: MaxNewTokensOpt = 200,
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
    from .engine import speech_token_set
    from .heads import HEAD_KINDS
    from .profiles import item_config, resolve_config
    from .sources import check_limit
    from .train_heads import check_training, parse_layers, run_training

    if head not in HEAD_KINDS or head == "logit-lens":
        raise SparkeeError(
            f"--head must be tuned-lens, full or adapter, got '{head}' (a logit lens needs no training)"
        )
    if token_set not in ("all", "speech"):
        raise SparkeeError(f"--token-set must be all or speech, got '{token_set}'")
    if out.suffix != ".safetensors" or out.is_dir():
        raise SparkeeError(f"--out must name a .safetensors file, got '{out}'")
    check_training(steps, train_batch_size, lr, val_fraction, stop_after)
    check_at_least(batch_size, 1, "--batch-size")
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
        batch_size=train_batch_size,
        label_batch_size=batch_size,
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
    model: CheckpointOpt,
    heads: HeadsOpt = "logit-lens",
    data: DataOpt = ...,
    out: Path = typer.Option(Path("layer-report"), "--out", help="Output directory (JSON, Markdown, PNG)."),
    limit: LimitOpt = None,
    max_new_tokens: MaxNewTokensOpt = 200,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    *,
    decoding: DecodingArgs,
) -> None:
    """Per-layer agreement with the last layer and KL, text and speech steps apart (the paper's Table 1)."""
    from .analysis import run_report
    from .backbone import load_model
    from .profiles import heads_of, item_config, resolve_config
    from .sources import check_limit

    check_limit(limit)
    check_out_dir(out)
    overrides = decoding.overrides()
    bb = load_model(model, dtype=dtype, device=device)
    profile = decoding.profile(model, bb)
    exit_heads = heads_of(heads, profile, bb)
    cfg = resolve_config(profile, overrides | {"max_new_tokens": max_new_tokens})
    prompts, _ = load_data(profile, data, decoding.fmt, limit)
    measures = profile.report_measures(cfg)
    run_report(bb, exit_heads, prompts, lambda item: item_config(cfg, item), out, measures)
    typer.echo((out / "layer_report.md").read_text())
    typer.echo(f"wrote {out}/layer_report.json, layer_report.md, layer_report.png")


@app.command("export-draft")
@friendly
def export_draft_cmd(
    model: CheckpointOpt,
    heads: str = typer.Option(..., "--heads", help="Heads file (full head) or 'logit-lens'."),
    layer: int = typer.Option(..., "--layer", help="Exit layer L: the draft runs layers 1..L and its head."),
    out: Path = typer.Option(..., "--out", help="New directory for the draft checkpoint."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's own)."
    ),
) -> None:
    """Write layers 1..L plus the exit head for L as a standard checkpoint of the same architecture:
    a draft model for transformers' assisted generation and vLLM's speculative decoding."""
    from .export import export_draft

    path = export_draft(model, heads, layer, out, dtype)
    info = json.loads((path / "sparkee_draft.json").read_text())
    typer.echo(
        f"wrote {path}: {info['head_type']} draft, layers 1..{layer} of {info['source_num_layers']} "
        f"({info['dtype']}); use it as a draft model, e.g. vLLM speculative_config="
        f'{{"method": "draft_model", "model": "{path}", "num_speculative_tokens": 3}}'
    )


def _measure_notes(model: Path, batch_size: int = 1) -> str:
    batched = (
        f" Examples were decoded {batch_size} at a time, so speed-ups are those of batched decoding."
        if batch_size > 1
        else ""
    )
    return (
        f"Model: {model}. Measured speed-ups are ratios of decode wall-clock time against the full row "
        "(the prefill, the same for every row, is reported as TTFT), measured in this run with examples "
        "round-robin over rows; predicted speed-ups come from this machine's calibrated cost model "
        f"(`sparkee calibrate`).{batched} Results on the bundled reference model say nothing about "
        "GLM-4-Voice or Step-Audio-2."
    )


@app.command("eval")
@friendly
@runtime_options
@decoding_options
@measure_options
def eval_cmd(
    model: CheckpointOpt,
    heads: HeadsOpt = "logit-lens",
    data: DataOpt = ...,
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
    verify: bool = typer.Option(
        False, "--verify", help="Verified mode (exact rule) for every row; a row may end in +verify=RULE."
    ),
    frontier: bool = typer.Option(
        False,
        "--frontier",
        help="Rows: verified SPAR-K over --frontier-layers x patterns FE, FEE, FEEE, FEEEEEEE, adaptive "
        "x rules exact, topk:2, typical:0.2, unit-distance:0.5 (instead of --policies).",
    ),
    frontier_layers: str = typer.Option(
        "4,8,12", "--frontier-layers", help="Exit layers of the --frontier grid, comma-separated."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Examples of a row decoded together (same tokens; speed measured batched)."
    ),
    unit_distance: UnitDistanceOpt = None,
    repetition_penalty: RepetitionOpt = None,
    prefill_pool: list[str] = typer.Option(
        None,
        "--prefill-pool",
        help=f"Repeat every row with this Affinity Pooling setting, {POOL_SYNTAX} (give several for a sweep).",
    ),
    out: Path = typer.Option(Path("sparkee-eval"), "--out", help="Output directory (resumed when rerun)."),
    limit: LimitOpt = None,
    audio_examples: int = typer.Option(
        3, "--audio-examples", help="Keep WAVs (and report players) for the first N examples."
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Replace results already in --out instead of resuming."
    ),
    max_new_tokens: MaxNewTokensOpt = 200,
    *,
    decoding: DecodingArgs,
    runtime: RuntimeArgs,
    measure: MeasureArgs,
) -> None:
    """Decode every example under every policy and write Table 2 (MD/CSV/JSON), plots and report.html."""
    from .eval.harness import EvalRun, parse_rows
    from .profiles import (
        config_json,
        heads_identity,
        heads_of,
        heads_path,
        item_config,
        load_row_heads,
    )
    from .sources import check_limit

    check_limit(limit)
    check_at_least(audio_examples, 0, "--audio-examples")
    check_at_least(batch_size, 1, "--batch-size")
    check_out_dir(out)
    if frontier and policies:
        raise SparkeeError("--frontier makes its own rows: leave out --policies")
    layers_grid = parse_ids(frontier_layers, "--frontier-layers") if frontier else []
    pools = list(prefill_pool or [])
    for p in pools:
        pool_option(p)
    options = {
        "max_new_tokens": max_new_tokens,
        "unit_distance": unit_distance,
        "repetition_penalty": repetition_penalty,
    }
    bb, profile, cfg = load_configured(model, decoding, runtime, options)
    if frontier:
        from .eval.harness import frontier_rows

        rows = frontier_rows(layers_grid, num_layers=bb.num_layers)
    else:
        policies = policies or ",".join(profile.default_policies(bb.num_layers))
        rows = parse_rows(policies, text_policy, sweep, bb.num_layers, pools or None)
    exit_heads = heads_of(heads, profile, bb)
    row_heads, row_identity = load_row_heads(rows, profile, bb)
    calibrate_before_timing(bb, exit_heads, cfg)
    prompts, digest = load_data(profile, data, decoding.fmt, limit)
    measures = measure.measures(profile, cfg)
    manifest = {
        "model": bb.fingerprint(),
        "heads": heads_identity(heads_path(heads, profile)),
        **({"row_heads": row_identity} if row_identity else {}),
        "data": {"source": data, "digest": digest},
        "decoding": config_json(cfg),
        "verify": verify,
        "batch_size": batch_size,  # the same tokens, but timings of another kind
        "measures": measure.manifest(),
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
        batch_size,
        row_heads=row_heads,
    )
    _run_and_report(run, manifest, fresh, f"sparkee eval: {model.name}", _measure_notes(model, batch_size))
    typer.echo(f"wrote {out}/table.md, table.csv, summary.json, results.jsonl, report.html and plots")


def _run_and_report(run: EvalRun, manifest: dict, fresh: bool, title: str, notes: str) -> None:
    """Run (or resume) an evaluation, write the report, print the table and any failures."""
    from .eval.harness import code_version, failures, prepare_out, run_eval, summarize, timing_warning
    from .eval.report import markdown_table, write_report

    prepare_out(run.out, manifest | {"code": code_version()}, fresh)
    records = run_eval(run)
    summary = summarize(records, run.rows, run.bb.num_layers)
    write_report(summary, records, run.out, run.bb.num_layers, title, notes)
    typer.echo(markdown_table(summary))
    warning = timing_warning(summary)  # also in table.md, report.html and summary.json (timing_suspect)
    if warning:
        typer.echo(warning, err=True)
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
    heads: HeadsOpt = "bundled",
    fmt: str = typer.Option("padded", "--format", help="padded | early-stop"),
    audio_examples: int = typer.Option(
        3, "--audio-examples", help="WAV files for the first N answers per policy."
    ),
    batch_size: int = typer.Option(
        1, "--batch-size", help="Questions of a row decoded together (same answers; speed measured batched)."
    ),
    verified_row: bool = typer.Option(
        True,
        "--verified-row/--paper-rows-only",
        help="Add the best lossless verified rows: spar-k:FEEE:4+verify with the bundled tuned-lens "
        "heads, and spar-k:FEEEEEE:1+verify with the bundled adapter heads.",
    ),
) -> None:
    """Answer the bundled reference SLM's test questions under each policy; print the paper's Table 2."""
    from .backbone import load_model
    from .eval.harness import EvalRun, Row
    from .profiles import (
        ReferenceProfile,
        heads_identity,
        heads_of,
        heads_path,
        item_config,
        load_profile,
        load_row_heads,
        resolve_config,
    )
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
    check_at_least(batch_size, 1, "--batch-size")
    check_out_dir(out)
    bb = load_model(model)
    profile = load_profile(model, bb=bb)
    if not isinstance(profile, ReferenceProfile):
        raise SparkeeError(f"'{model}' is not a reference-SLM directory (it has no sparkee_refslm.json)")
    exit_heads = heads_of(heads, profile, bb)
    specs = profile.default_policies(bb.num_layers, exit_layer, threshold)
    for spec in specs:
        parse_policy(spec, bb.num_layers)
    rows = [Row("full", s) for s in specs]
    if verified_row:  # the frontier's best lossless row (docs/results.md): verified SPAR-K, exact rule
        from .eval.harness import parse_row

        rows.append(parse_row(profile.verified_row(bb.num_layers), "full", bb.num_layers))
        if profile.adapter_row() is not None:
            rows.append(parse_row(profile.adapter_row(), "full", bb.num_layers))
    row_heads, row_identity = load_row_heads(rows, profile, bb)
    cfg = resolve_config(profile, {"format": fmt, "max_new_tokens": 200})
    prompts, digest = load_data(profile, "refslm:test", fmt, limit)
    typer.echo(
        f"reference SLM: {bb.num_layers} layers, heads: {exit_heads.kind}, {len(prompts)} test questions, format {fmt}"
    )
    calibrate_before_timing(bb, exit_heads, cfg)
    run = EvalRun(
        bb,
        exit_heads,
        prompts,
        lambda item: item_config(cfg, item),
        rows,
        profile.measures(cfg),
        out,
        audio_examples,
        batch_size=batch_size,
        row_heads=row_heads,
    )
    manifest = {
        "model": bb.fingerprint(),
        "heads": heads_identity(heads_path(heads, profile)),
        "data": digest,
        "row_heads": row_identity,
    }
    # a demo measures speed in one run: it always starts afresh
    _run_and_report(run, manifest, True, "sparkee demo: reference SLM", _measure_notes(model, batch_size))
    typer.echo(f"wrote {out}/summary.json, table.md, report.html and WAVs under {out}/audio")


@app.command()
@friendly
@runtime_options
@decoding_options
@sampling_options
def serve(
    model: CheckpointOpt,
    heads: HeadsOpt = "logit-lens",
    max_new_tokens: int = typer.Option(
        None,
        "--max-new-tokens",
        help="Answer length when a request gives no max_tokens (default: the model's).",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (loopback by default; others are your choice)."
    ),
    port: int = typer.Option(8000, "--port"),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Requests decoded together at most."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting at most (beyond: HTTP 429)."),
    max_len: int = typer.Option(
        None, "--max-len", help="Positions per row, prompt + answer (default: the model's, at most 2048)."
    ),
    served_model_name: str = typer.Option(
        None,
        "--served-model-name",
        help="The model's name in the API (default: the preset's or the directory's).",
    ),
    api_key: str = typer.Option(None, "--api-key", help="Require Authorization: Bearer KEY on /v1/."),
    vocoder: str = typer.Option(
        "auto", "--vocoder", help="refslm-espeak | module:attr | none (auto: espeak for the reference SLM)."
    ),
    request_timeout: float = typer.Option(
        600.0, "--request-timeout", help="Seconds before a request is dropped."
    ),
    threads: int = typer.Option(
        None,
        "--threads",
        help="torch CPU threads (default: every core but one, which the HTTP side and vocoder need).",
    ),
    prefill_threads: int = typer.Option(
        None,
        "--prefill-threads",
        help="torch CPU threads while a prompt is prefilled, a compute-bound pass (default: every core).",
    ),
    prefill_batch: int = typer.Option(
        8,
        "--prefill-batch",
        help="Requests admitted together are prefilled in one padded pass, this many per pass "
        "(1: each prompt alone, bitwise as `generate`; a shared pass rounds K/V ~1e-6 apart).",
    ),
    *,
    decoding: DecodingArgs,
    sampling: SamplingArgs,
    runtime: RuntimeArgs,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat completions with streamed text and
    audio, completions, metrics, a browser page) with continuous batching."""
    from .profiles import heads_of

    options = sampling.overrides() | {"max_new_tokens": max_new_tokens}  # bad specs fail before loading
    check_at_least(max_batch_size, 1, "--max-batch-size")
    check_at_least(max_queue, 0, "--max-queue")
    check_at_least(max_len, 2, "--max-len")
    check_at_least(max_new_tokens, 1, "--max-new-tokens")
    if not 0 <= port <= 65535:
        raise SparkeeError(f"--port must be between 0 and 65535, got {port}")
    if not (math.isfinite(request_timeout) and request_timeout > 0):
        raise SparkeeError(f"--request-timeout must be a positive number of seconds, got {request_timeout}")
    if served_model_name is not None and not served_model_name.strip():
        raise SparkeeError("--served-model-name is empty: give a name or leave the option out")
    from . import serve as serving

    serving._imports()  # the serve extra, before the model loads
    check_at_least(threads, 1, "--threads")
    check_at_least(prefill_threads, 1, "--prefill-threads")
    check_at_least(prefill_batch, 1, "--prefill-batch")
    import os

    import torch

    # an OpenMP pool on every core spins while the engine thread waits, starving the event loop
    # and the vocoder: on 2 cores one torch thread served 2.6x the tokens/s of two (bench/serve_load.py);
    # a prefill is one large pass that every core speeds up (2 cores: 1.5x), so it gets them all
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    prefill_threads = prefill_threads or os.cpu_count() or 1
    bb, profile, cfg = load_configured(model, decoding, runtime, options)
    exit_heads = heads_of(heads, profile, bb)
    server = serving.build_server(
        bb,
        exit_heads,
        profile,
        cfg,
        served_model_name,
        max_batch_size,
        max_queue,
        max_len,
        vocoder,
        api_key,
        request_timeout,
        calibrate=not runtime.no_calibrate,
        prefill_threads=prefill_threads,
        prefill_batch=prefill_batch,
    )
    if host not in serving.LOOPBACK:
        typer.echo(
            f"warning: listening on {host}, reachable from other machines"
            + ("" if api_key else " without an API key (--api-key)"),
            err=True,
        )
    typer.echo(
        f"sparkee serve: {server.model_name} ({bb.num_layers} layers) on http://{host}:{port} "
        f"(batch {max_batch_size}, queue {max_queue}, audio {'on' if server.audio else 'off'})",
        err=True,
    )
    serving.run(server, host, port)


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
