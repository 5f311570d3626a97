"""Per-layer report (the paper's Table 1): how often layer L's head agrees with the last layer.

Teacher-forced on full-depth outputs: for every layer and for text and speech steps separately,
top-1 agreement with the last layer and KL(last || head). When the model's profile has a
token-level transcriber (the reference SLM), also the transcript accuracy and WER of the speech
made of each layer's tokens: the paper's observation is that layer-L speech tokens differ from
the last layer's yet carry the same content, while layer-L text does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from .backbone import Backbone
from .config import GenerationConfig
from .eval.measures import Measures
from .heads import ExitHeads
from .labels import Labels, collect_labels, layer_metrics
from .scoring import accuracy, verdict, wer
from .sources import PromptItem


def layer_tokens(bb: Backbone, heads: ExitHeads, labels: Labels, layer: int) -> torch.Tensor:
    """Each row's argmax token from the layer's head (teacher-forced), as vocabulary ids ([M])."""
    with torch.no_grad():
        idx = heads(layer, labels.layer(layer).to(bb.dtype)).argmax(-1)
    return heads.token_ids[idx] if heads.token_ids is not None else idx


def transcript_scores(
    bb: Backbone,
    heads: ExitHeads,
    labels: Labels,
    prompts: list[PromptItem],
    layers: list[int],
    measures: Measures,
    speech_ids: tuple[int, int],
) -> dict[int, dict]:
    """Accuracy and WER of the speech built from each layer's speech tokens (teacher-forced).

    The reference text is the full model's own text answer; scoring follows scoring.py."""
    lo, hi = speech_ids
    examples = sorted(set(labels.example.tolist()))
    own_text = {e: measures.text_of(labels.tokens[labels.example == e].tolist()) for e in examples}
    out = {}
    for L in layers + [bb.num_layers]:
        toks = labels.tokens if bb.num_layers == L else layer_tokens(bb, heads, labels, L)
        said, verdicts = [], []
        for e in examples:
            rows = (labels.example == e) & labels.speech
            units = [t for t in toks[rows].tolist() if lo <= t < hi]
            said.append(measures.transcriber(units))
            meta = prompts[e].meta
            verdicts.append(verdict(measures.judge, meta.get("question", ""), said[-1], meta))
        out[L] = {
            "transcript_accuracy": accuracy(verdicts),
            "transcript_wer": wer([own_text[e] for e in examples], said),
        }
    return out


def run_report(
    bb: Backbone,
    heads: ExitHeads,
    prompts: list[PromptItem],
    cfg_for: Callable[[PromptItem], GenerationConfig],
    out_dir: Path,
    measures: Measures | None = None,
) -> dict:
    """Write layer_report.{json,md,png}; `measures` with a transcriber adds the transcript columns."""
    layers = list(range(1, bb.num_layers))
    # adapter heads attend over whole sequences: their labels keep the prompt's positions
    context = collect_labels(bb, prompts, cfg_for, layers, desc="report", context=heads.attends)
    labels = context.target_rows()
    lens = ExitHeads(bb, "logit-lens", layers)
    report = {"num_layers": bb.num_layers, "rows": len(labels), "speech_rows": int(labels.speech.sum())}
    report["logit_lens"] = {str(k): v for k, v in layer_metrics(bb, lens, labels).items()}
    if heads.kind != "logit-lens":
        # a head restricted to a token set only speaks for speech steps
        if heads.attends:
            sub = replace(context, target=context.targets() & (context.speech | (heads.token_ids is None)))
        else:
            sub = labels if heads.token_ids is None else labels.speech_rows()
        sub = sub.only_layers([L for L in layers if heads.has(L)])
        report["heads"] = {str(k): v for k, v in layer_metrics(bb, heads, sub).items()}
        report["heads_kind"] = heads.kind
    speech_ids = cfg_for(prompts[0]).speech_ids
    if measures is not None and measures.transcriber is not None and speech_ids is not None:
        own = heads.kind != "logit-lens" and not heads.attends and all(heads.has(L) for L in layers)
        tr_heads = heads if own else lens
        scores = transcript_scores(bb, tr_heads, labels, prompts, layers, measures, speech_ids)
        report["transcripts"] = {str(k): v for k, v in scores.items()}
        report["transcripts_from"] = tr_heads.kind
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "layer_report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "layer_report.md").write_text(markdown(report))
    plot(report, out_dir / "layer_report.png")
    return report


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def markdown(report: dict) -> str:
    has_heads = "heads" in report
    tr = report.get("transcripts", {})
    cols = ["layer", "lens agree text %", "lens agree speech %", "lens KL text", "lens KL speech"]
    if has_heads:
        cols += [
            f"{report['heads_kind']} agree text %",
            f"{report['heads_kind']} agree speech %",
            "heads KL speech",
        ]
    if tr:
        cols += ["speech transcript acc %", "speech transcript WER"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for L in range(1, report["num_layers"] + 1):
        k = str(L)
        if report["num_layers"] == L:
            row = [k, "100.0", "100.0", "0", "0"] + (["-", "-", "-"] if has_heads else [])
        else:
            ll = report["logit_lens"][k]
            row = [
                k,
                _fmt(ll["agree_text"], 1),
                _fmt(ll["agree_speech"], 1),
                _fmt(ll["kl_text"]),
                _fmt(ll["kl_speech"]),
            ]
            if has_heads:
                h = report["heads"].get(k, {})
                row += [
                    _fmt(h.get("agree_text"), 1),
                    _fmt(h.get("agree_speech"), 1),
                    _fmt(h.get("kl_speech")),
                ]
        if tr:
            row += [_fmt(tr[k]["transcript_accuracy"], 1), _fmt(tr[k]["transcript_wer"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["num_layers"]
    xs = list(range(1, n))
    tr = report.get("transcripts")
    fig, axes = plt.subplots(1, 2 if tr else 1, figsize=(11 if tr else 6, 4), squeeze=False)
    ax = axes[0][0]
    for src, style in (("logit_lens", "--"), ("heads", "-")):
        if src not in report:
            continue
        for mod, color in (("text", "tab:blue"), ("speech", "tab:orange")):
            ys = [report[src].get(str(x), {}).get(f"agree_{mod}") for x in xs]
            if any(y is not None for y in ys):
                name = "logit lens" if src == "logit_lens" else report.get("heads_kind", "heads")
                ax.plot(
                    xs,
                    [None if y is None else 100 * y for y in ys],
                    style,
                    color=color,
                    label=f"{name}, {mod}",
                )
    ax.set_xlabel("exit layer (layers executed)")
    ax.set_ylabel("top-1 agreement with last layer (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if tr:
        ax2 = axes[0][1]
        ls = list(range(1, n + 1))
        pct = lambda v: None if v is None else 100 * v  # noqa: E731 - "n/a" scores leave gaps
        ax2.plot(
            ls,
            [pct(tr[str(x)]["transcript_wer"]) for x in ls],
            "-o",
            ms=3,
            label="speech transcript WER vs own text",
        )
        ax2.plot(
            ls,
            [pct(tr[str(x)]["transcript_accuracy"]) for x in ls],
            "-s",
            ms=3,
            label="speech transcript accuracy",
        )
        ax2.set_xlabel("layer whose tokens make the speech")
        ax2.set_ylabel("%")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
