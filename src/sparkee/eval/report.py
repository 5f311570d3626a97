"""Outputs of an evaluation: Table 2 as Markdown, CSV and JSON, plots, and a self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

COLUMNS = [
    ("policy", "policy (text|speech)", None),
    ("accuracy_speech", "acc. speech %", "score"),
    ("accuracy_text", "acc. text %", "score"),
    ("accuracy_asr", "acc. ASR %", "pct"),
    ("wer", "align. WER %", "score"),
    ("mos", "MOS", "f2"),
    ("avg_exit_layer_text", "avg exit text", "f2"),
    ("avg_exit_layer_speech", "avg exit speech", "f2"),
    ("speech_depth_reduction_pct", "speech depth red. %", "f1"),
    ("flops_reduction_pct", "FLOPs red. %", "f1"),
    ("speech_agreement", "early-token agreement %", "pct"),
    ("speech_acceptance", "speech acceptance %", "pct"),
    ("accepted_per_refresh", "accepted per refresh", "f2"),
    ("rejected_steps", "rejected steps", "int"),
    ("speech_frames_drift", "length drift (frames)", "f1"),
    ("unit_duration_drift", "unit duration drift (frames)", "f2"),
    ("predicted_speedup", "predicted speed-up", "f2"),
    ("speedup", "measured speed-up", "f2"),
    ("measured_over_predicted", "measured / predicted", "f2"),
    ("prefill_flops_reduction_pct", "prefill FLOPs red. %", "f1"),
    ("kv_bytes", "KV bytes", "int"),
    ("ttft_s", "TTFT s", "f3"),
]


def _cell(v, kind) -> str:
    if v is None:
        # a score without anything to score (no reference answers, no text) is "n/a", not 0
        return "n/a" if kind == "score" else "-"
    if kind in ("pct", "score"):
        return f"{100 * v:.1f}"
    if kind == "f2":
        return f"{v:.2f}"
    if kind == "f1":
        return f"{v:.1f}"
    if kind == "f3":
        return f"{v:.3f}"
    if kind == "int":
        return f"{v:.0f}"
    return str(v)


def _columns(summary: list[dict]) -> list[tuple]:
    # drop columns no row has a value for (no MOS plug-in, no ASR plug-in), except the scores,
    # which say "n/a"; prefill columns only matter when some row pools the prompt
    pooled = any(s.get("pool") for s in summary)
    verified = any("+verify" in s["policy"] for s in summary)
    keep = [c for c in COLUMNS if c[2] == "score" or any(s.get(c[0]) is not None for s in summary)]
    keep = [c for c in keep if pooled or c[0] not in ("prefill_flops_reduction_pct", "kv_bytes", "ttft_s")]
    # acceptance and timing drift matter when rows verify with tolerant rules
    return [c for c in keep if verified or c[0] not in VERIFY_COLUMNS]


VERIFY_COLUMNS = (
    "speech_acceptance",
    "accepted_per_refresh",
    "rejected_steps",
    "speech_frames_drift",
    "unit_duration_drift",
)


def markdown_table(summary: list[dict]) -> str:
    cols = _columns(summary)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for s in summary:
        lines.append("| " + " | ".join(_cell(s.get(k), kind) for k, _, kind in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(summary: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with (out / "table.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)


def plot_quality(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in summary:
        x = s["speech_depth_reduction_pct"] or 0.0
        for key, marker, color in (
            ("accuracy_speech", "o", "tab:orange"),
            ("accuracy_text", "s", "tab:blue"),
        ):
            if s.get(key) is not None:
                a1.scatter(x, 100 * s[key], marker=marker, color=color)
        if s.get("accuracy_speech") is not None:
            a1.annotate(
                s["policy"],
                (x, 100 * s["accuracy_speech"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        if s.get("wer") is not None:
            a2.scatter(x, 100 * s["wer"], color="tab:red")
            a2.annotate(
                s["policy"], (x, 100 * s["wer"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    a1.scatter([], [], marker="o", color="tab:orange", label="speech transcript")
    a1.scatter([], [], marker="s", color="tab:blue", label="text")
    a1.set_xlabel("speech depth reduction (%)")
    a1.set_ylabel("QA accuracy (%)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.set_xlabel("speech depth reduction (%)")
    a2.set_ylabel("speech-to-text alignment WER (%)")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]], higher_y_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both axes (x = speed-up, higher is better)."""
    sign = 1 if higher_y_is_better else -1
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any(
            (x2 >= x and sign * y2 >= sign * y) and (x2 > x or sign * y2 > sign * y)
            for j, (x2, y2) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return front


def plot_frontier(summary: list[dict], path: Path) -> bool:
    """Measured speed-up against speech accuracy and alignment WER, Pareto front marked; False
    when there is nothing to plot (no measured speed-ups)."""
    rows = [s for s in summary if s.get("speedup") is not None]
    if len(rows) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, better_high, label in (
        (axes[0], "accuracy_speech", True, "speech QA accuracy (%)"),
        (axes[1], "wer", False, "alignment WER (%)"),
    ):
        pts = [(s["speedup"], 100 * s[key]) for s in rows if s.get(key) is not None]
        names = [s["policy"] for s in rows if s.get(key) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color="tab:gray", alpha=0.7)
        front = sorted(pareto_front(pts, better_high), key=lambda i: pts[i][0])
        ax.plot(
            [pts[i][0] for i in front],
            [pts[i][1] for i in front],
            "-o",
            color="tab:red",
            ms=4,
            label="Pareto front",
        )
        for i in front:
            ax.annotate(names[i], pts[i], fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("measured speed-up over full depth (decode wall-clock)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_timeline(records: list[dict], example: int, path: Path, num_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r.get("example") == example and "error" not in r]
    fig, axes = plt.subplots(len(recs), 1, figsize=(11, 0.9 * len(recs) + 0.8), sharex=True, squeeze=False)
    for ax, r in zip(axes[:, 0], recs, strict=True):
        xs = range(len(r["exit_layers"]))
        colors = ["tab:orange" if m == "s" else "tab:blue" for m in r["modalities"]]
        ax.bar(xs, r["exit_layers"], color=colors, width=1.0)
        ax.set_ylim(0, num_layers)
        ax.set_ylabel(r["row"], rotation=0, ha="right", va="center", fontsize=7)
        ax.set_yticks([])
    axes[-1, 0].set_xlabel("step (blue = text, orange = speech; bar height = layers executed)")
    fig.suptitle(f"exit layer per step, example {recs[0]['id'] if recs else example}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


SELF_CHECK = """
<script>
// Marks the page once every image decoded and every audio element has loaded its metadata,
// so a headless browser can tell that the report is whole (see tests/test_eval.py).
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const audios = [...document.querySelectorAll('audio')];
  const check = () => {
    const okImg = imgs.every(i => i.complete && i.naturalWidth > 0);
    const okAud = audios.every(a => a.readyState >= 1 && a.duration > 0);
    const el = document.getElementById('selfcheck');
    el.dataset.images = imgs.length; el.dataset.audio = audios.length;
    el.dataset.rows = document.querySelectorAll('#table tbody tr').length;
    el.dataset.ok = String(okImg && okAud);
  };
  audios.forEach(a => a.addEventListener('loadedmetadata', check));
  check(); setTimeout(check, 500);
});
</script>
"""


def write_html(summary: list[dict], records: list[dict], out: Path, title: str, notes: str = "") -> Path:
    cols = _columns(summary)
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(s.get(k), kind))}</td>" for k, _, kind in cols) + "</tr>"
        for s in summary
    )
    imgs = "".join(
        f'<figure><img src="{_data_uri(out / name, "image/png")}" alt="{name}"><figcaption>{cap}</figcaption></figure>'
        for name, cap in (
            ("quality_vs_depth.png", "QA accuracy and alignment WER against speech depth reduction"),
            ("frontier.png", "speed-quality frontier: measured speed-up against accuracy and WER"),
            ("timeline.png", "exit layer per step for one example"),
        )
        if (out / name).is_file()
    )
    by_example: dict[int, list[dict]] = {}
    for r in records:
        if r.get("audio"):
            by_example.setdefault(r["example"], []).append(r)
    audio_rows = []
    for _ex, recs in sorted(by_example.items()):
        cells = "".join(
            f"<td><div class='pol'>{html.escape(r['row'])}</div>"
            f"<audio controls preload='metadata' src='{_data_uri(out / r['audio'], 'audio/wav')}'></audio>"
            f"<div class='tr'>text: {html.escape(r['text'])}<br>speech: {html.escape(r['speech_transcript'])}</div></td>"
            for r in recs
        )
        audio_rows.append(f"<tr><th>{html.escape(str(recs[0]['id']))}</th>{cells}</tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}}img{{max-width:100%}}
.tr{{font-size:11px;color:#555;max-width:260px}}.pol{{font-weight:bold;font-size:11px}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{notes}</p>
<h2>Table (the paper's Table 2 shape)</h2><table id="table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Plots</h2>{imgs}
<h2>Audio per example and policy</h2><table id="audio">{"".join(audio_rows)}</table>
<div id="selfcheck" data-ok="pending"></div>{SELF_CHECK}</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def write_report(
    summary: list[dict], records: list[dict], out: Path, num_layers: int, title: str, notes: str = ""
) -> None:
    from .harness import timing_warning

    write_tables(summary, out)
    warning = timing_warning(summary)
    if warning:  # recorded beside the table and at the top of the page, as the command prints it
        with (out / "table.md").open("a") as f:
            f.write(f"\n> {warning}\n")
        notes = f"<p id='timing-warning' style='color:#a00'><b>{html.escape(warning)}</b></p>{notes}"
    plot_quality(summary, out / "quality_vs_depth.png")
    if any("+verify" in s["policy"] for s in summary):
        plot_frontier(summary, out / "frontier.png")
    first = min((r["example"] for r in records if "error" not in r), default=None)
    if first is not None:
        plot_timeline(records, first, out / "timeline.png", num_layers)
    write_html(summary, records, out, title, notes)
