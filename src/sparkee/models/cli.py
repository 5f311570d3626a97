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
from ..options import parse_ids

app = typer.Typer(
    help="Convert an interleaved SLM checkpoint to a transformers directory sparkee can load.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SRC_HELP = "the downloaded checkpoint directory (config.json and weight shards)"
DST_HELP = "where to write the converted checkpoint (a new or empty directory)"
ASSETS_HELP = (
    "copy (default) or link: how non-LM assets such as token2wav/ reach DST (link = symlinks to SRC)"
)
SET_HELP = (
    "KEY=VALUE filling or overriding a field of the source config (VALUE as JSON), e.g. rope_theta=1000000"
)
EOS_HELP = "comma-separated EOS ids, when neither the config nor the tokenizer files give them"


def _parse_ids(text: str | None) -> list[int] | None:
    return None if text is None else parse_ids(text, "--eos-ids")


def _run(fn, src: Path, dst: Path, as_json: bool, assets: str, set_items: list[str] | None, eos_ids) -> None:
    from .convert import parse_set

    try:
        report = fn(
            src,
            dst,
            log=(lambda m: None) if as_json else (lambda m: typer.echo(m, err=True)),
            assets=assets,
            set_config=parse_set(set_items),
            eos_ids=_parse_ids(eos_ids),
        )
    except SparkeeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:
        typer.echo(f"error: cannot read or write '{e.filename}': {e.strerror}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        assets_note = (
            f"; {'linked' if report['assets_mode'] == 'link' else 'copied'} assets {', '.join(report['assets'])}"
            if report["assets"]
            else ""
        )
        typer.echo(
            f"wrote {report['architecture']} ({report['num_layers']} layers, vocab {report['vocab_size']}, "
            f"{report['tensors_out']} tensors in {report['shards']} shards, EOS {report['eos_token_id']}) to "
            f"{report['dst']}; dropped {len(report['dropped'])} tensors; copied "
            f"{len(report['copied_files'])} tokenizer files{assets_note}; see {report['dst']}/README.md"
        )


@app.command("glm-4-voice")
def glm_4_voice(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help=DST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
    assets: str = typer.Option("copy", "--assets", help=ASSETS_HELP),
    set_items: list[str] = typer.Option(None, "--set", help=SET_HELP),
    eos_ids: str = typer.Option(None, "--eos-ids", help=EOS_HELP),
) -> None:
    """GLM-4-Voice-9B (ChatGLM layout) -> GlmForCausalLM."""
    from .convert import convert_glm4_voice

    _run(convert_glm4_voice, src, dst, as_json, assets, set_items, eos_ids)


@app.command("step-audio-2-mini")
def step_audio_2_mini(
    src: Path = typer.Argument(..., help=SRC_HELP),
    dst: Path = typer.Argument(..., help=DST_HELP),
    as_json: bool = typer.Option(False, "--json", help="print the conversion report as JSON"),
    assets: str = typer.Option("copy", "--assets", help=ASSETS_HELP),
    set_items: list[str] = typer.Option(None, "--set", help=SET_HELP),
    eos_ids: str = typer.Option(None, "--eos-ids", help=EOS_HELP + " (Step-Audio-2: the id of <|EOT|>)"),
) -> None:
    """Step-Audio-2-mini's language model -> Qwen2ForCausalLM (audio encoder and adapter dropped)."""
    from .convert import convert_step_audio2

    _run(convert_step_audio2, src, dst, as_json, assets, set_items, eos_ids)
