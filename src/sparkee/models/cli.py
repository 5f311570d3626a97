"""`sparkee convert MODEL SRC DST`: checkpoint converters as a typer app.

Mount with `app.add_typer(convert_app, name="convert")`; the subcommands are the model names,
so the command lines read `sparkee convert glm-4-voice SRC DST` and
`sparkee convert step-audio-2-mini SRC DST`. Bad inputs end with one sentence and status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import SparkeeError

app = typer.Typer(
    help="Convert an interleaved SLM checkpoint to a transformers directory sparkee can load.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SRC_HELP = "the downloaded checkpoint directory (config.json and weight shards)"
DST_HELP = "where to write the converted checkpoint (new or empty directory)"


def _run(fn, src: Path, dst: Path, as_json: bool) -> None:
    try:
        report = fn(src, dst, log=(lambda m: None) if as_json else (lambda m: typer.echo(m, err=True)))
    except SparkeeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: cannot read or write '{e.filename}': {e.strerror}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(
            f"wrote {report['architecture']} ({report['num_layers']} layers, vocab {report['vocab_size']}, "
            f"{report['tensors_out']} tensors in {report['shards']} shards) to {report['dst']}; "
            f"dropped {len(report['dropped'])} tensors; copied {len(report['copied_files'])} tokenizer files"
        )


@app.command("glm-4-voice")
def glm_4_voice(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help=DST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
) -> None:
    """GLM-4-Voice-9B (ChatGLM layout) -> GlmForCausalLM."""
    from .convert import convert_glm4_voice

    _run(convert_glm4_voice, src, dst, as_json)


@app.command("step-audio-2-mini")
def step_audio_2_mini(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help=DST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
) -> None:
    """Step-Audio-2-mini's language model -> Qwen2ForCausalLM (audio encoder and adapter dropped)."""
    from .convert import convert_step_audio2

    _run(convert_step_audio2, src, dst, as_json)
