"""Command line: one thin function per command. Parsing and messages here, logic elsewhere.

Every bad input ends with one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer

from .errors import SparkeeError

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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
    no_tok = SparkeeError(f"--prompt needs a tokenizer in '{model_dir}'; pass --prompt-ids instead")
    # transformers 5 builds an empty tokenizer when the files are missing, so look for them first
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise no_tok
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001 - any failure means: no usable tokenizer there
        raise no_tok from None
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
    heads: str = typer.Option(
        "logit-lens", "--heads", help="Exit heads file (.safetensors) or 'logit-lens'."
    ),
    speech_policy: str = typer.Option(
        "full", "--speech-policy", help="full | fixed:L | confidence:L:H | spar-k:even|odd|triple|PATTERN:L"
    ),
    text_policy: str = typer.Option(
        "full", "--text-policy", help="Exit policy for text steps (same syntax)."
    ),
    interleave: str = typer.Option(
        None, "--interleave", help="T:S text:speech ratio; omit for all-text, 0:1 for all-speech."
    ),
    fmt: str = typer.Option(
        "padded", "--format", help="padded | early-stop (ESI: all speech after --text-end-id)."
    ),
    text_end_id: int = typer.Option(
        None, "--text-end-id", help="Token that ends the text in the early-stop format."
    ),
    speech_ids: str = typer.Option(
        None, "--speech-ids", help="Speech token ids as a half-open range START:END."
    ),
    prompt: str = typer.Option(
        None, "--prompt", help="Prompt text (needs a tokenizer in the model directory)."
    ),
    prompt_ids: str = typer.Option(None, "--prompt-ids", help="Prompt token ids, comma-separated."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    stop_ids: str = typer.Option(
        None, "--stop-ids", help="Comma-separated stop ids (default: the model's EOS ids)."
    ),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
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
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: tokens, modalities, exit_layers, stats."
    ),
    trace: bool = typer.Option(False, "--trace", help="With --json, add the per-step records."),
) -> None:
    """Generate with scheduled early exit and print the tokens, the per-step trace and stats."""
    from .backbone import load_model
    from .generate import Generation, GenerationConfig
    from .heads import resolve_heads
    from .schedule import parse_interleave, parse_pair, parse_policy

    sp, tp = parse_policy(speech_policy), parse_policy(text_policy)
    il = parse_interleave(interleave, fmt, text_end_id) if interleave else None
    if il is None and (fmt != "padded" or text_end_id is not None):
        raise SparkeeError("--format and --text-end-id need --interleave T:S")
    srange = parse_pair(speech_ids, "--speech-ids") if speech_ids else None
    ids = encode_prompt(model, prompt, prompt_ids)
    bb = load_model(model, dtype=dtype, device=device)
    stops = parse_ids(stop_ids, "--stop-ids") if stop_ids is not None else default_stop_ids(bb)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        speech_policy=sp,
        text_policy=tp,
        interleave=il,
        speech_ids=srange,
        stop_ids=stops,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        verify=verify,
        speech_vocab_only=speech_vocab_only,
        audit_vocab=vocab_audit,
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
