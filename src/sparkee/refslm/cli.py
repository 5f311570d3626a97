"""``sparkee refslm ...`` commands (mounted by the main CLI, which turns SparkeeError into one
sentence and exit status 2)."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from ..errors import SparkeeError

app = typer.Typer(
    help="The bundled reference interleaved SLM: train it, build its assets.", no_args_is_help=True
)


@app.command()
def train(
    out: Path = typer.Option(
        Path("runs/refslm"), "--out", help="Output dir (checkpoint/ and model/ inside)."
    ),
    steps: int = typer.Option(100000, "--steps", help="Maximum optimizer steps."),
    max_minutes: float = typer.Option(
        None, "--max-minutes", help="Training time budget (plans the LR schedule)."
    ),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(2.5e-3, "--lr", help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(100, "--warmup"),
    seed: int = typer.Option(0, "--seed"),
    layers: int = typer.Option(16, "--layers"),
    hidden: int = typer.Option(192, "--hidden"),
    text_per_cycle: int = typer.Option(2, "--text-per-cycle", help="T of the interleave ratio."),
    speech_per_cycle: int = typer.Option(12, "--speech-per-cycle", help="S of the interleave ratio."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every"),
    eval_limit: int = typer.Option(None, "--eval-limit", help="Evaluate on the first N dev/test items only."),
    no_test: bool = typer.Option(False, "--no-test", help="Skip the report-only test-split evaluation."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint instead of resuming."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny config and a few steps (for tests)."),
    threads: int = typer.Option(2, "--threads"),
    install: bool = typer.Option(False, "--install", help="Copy the final model into the package assets."),
) -> None:
    """Train the reference SLM from scratch on both interleave formats; evaluate on dev (and test)."""
    from .train import train as run_train

    for name, value, least in (
        ("--steps", steps, 1),
        ("--batch-size", batch_size, 1),
        ("--warmup", warmup, 0),
        ("--layers", layers, 1),
        ("--hidden", hidden, 4),
        ("--text-per-cycle", text_per_cycle, 0),
        ("--speech-per-cycle", speech_per_cycle, 1),
        ("--checkpoint-every", checkpoint_every, 1),
        ("--eval-limit", eval_limit, 1),
        ("--threads", threads, 1),
    ):
        if value is not None and value < least:
            raise SparkeeError(f"{name} must be at least {least}, got {value}")
    if hidden % 4:
        raise SparkeeError(
            f"--hidden must be a multiple of 4 (the model has 4 attention heads), got {hidden}"
        )
    if not (math.isfinite(lr) and lr > 0):
        raise SparkeeError(f"--lr must be a positive number, got {lr}")
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise SparkeeError(f"--max-minutes must be a positive number, got {max_minutes}")
    if tiny and steps == 100000:
        steps = 3
    run_train(
        out,
        steps=steps,
        max_minutes=max_minutes,
        batch_size=4 if tiny and batch_size == 32 else batch_size,
        lr=lr,
        warmup=warmup,
        seed=seed,
        tiny=tiny,
        layers=layers,
        hidden=hidden,
        ratio=(text_per_cycle, speech_per_cycle),
        checkpoint_every=checkpoint_every,
        eval_limit=eval_limit,
        eval_test=not no_test,
        resume=not fresh,
        threads=threads,
    )
    if install:
        import shutil

        from . import bundled_model_dir

        dst = bundled_model_dir()
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(out / "model", dst)
        typer.echo(f"installed model into {dst}")


@app.command()
def evaluate(
    model_dir: Path = typer.Option(None, "--model-dir", help="Model dir (default: the bundled model)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="A training checkpoint dir instead."),
    split: str = typer.Option("dev", "--split", help="dev | test | train"),
    limit: int = typer.Option(None, "--limit", help="First N items only."),
    formats: str = typer.Option("padded,early-stop", "--formats"),
    threads: int = typer.Option(2, "--threads"),
) -> None:
    """Full-depth greedy HF generation on a split: text / speech-transcript accuracy, alignment WER."""
    import json

    import torch

    from .data import FORMATS, load_split
    from .train import evaluate as run_eval
    from .train import load_model

    if split not in ("train", "dev", "test"):
        raise SparkeeError(f"unknown split '{split}': use dev, test or train")
    if limit is not None and limit < 1:
        raise SparkeeError(f"--limit must be at least 1, got {limit}")
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    if not fmts or any(f not in FORMATS for f in fmts):
        raise SparkeeError(f"--formats must list {' and/or '.join(FORMATS)}, got '{formats}'")
    if threads < 1:
        raise SparkeeError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    model, vocab = load_model(model_dir=model_dir, checkpoint=checkpoint)
    exs = load_split(split)
    exs = exs[:limit] if limit else exs
    res = run_eval(model, vocab, exs, formats=fmts)
    for fmt, r in res.items():
        r.pop("errors", None)
        typer.echo(f"{split} {fmt}: " + json.dumps(r))


@app.command("build-assets")
def build_assets_cmd(seed: int = typer.Option(1234, "--seed")) -> None:
    """Regenerate the data splits, lexicon (needs espeak-ng) and vocab.json."""
    from .data import build_assets

    build_assets(seed)


if __name__ == "__main__":
    app()
