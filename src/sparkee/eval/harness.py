"""The paper's comparison on any model: decode every example under every policy, measure, resume.

A *row* is one configuration of the paper's Table 2: an exit policy for text steps and one for
speech steps (`SPEECH` or `TEXT|SPEECH`). Examples (or batches of them) run round-robin over the
rows, the rows' order turning by one every round and after an untimed warm-up of each row, so
drift in machine load hits every row alike; a row whose measured speed-up still disagrees with its
calibrated prediction (`timing_warning`) is named, with advice to rerun on a quiet machine. Each finished (row, example) result is appended to
`results.jsonl` at once: a rerun skips what is there, Ctrl-C loses nothing finished, and an
example that raises is recorded with its error while the run goes on (and is retried by a rerun).
`manifest.json` records everything that determines a result (model, heads, data, decoding,
measures, code); a rerun with other settings is refused instead of mixing old and new results.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..accept import EXACT, AcceptRule, parse_accept
from ..backbone import Backbone
from ..config import GenerationConfig, PoolSpec, group_by_config, parse_pool
from ..engine import check_config
from ..errors import SparkeeError
from ..generate import generate, generate_batch
from ..heads import ExitHeads
from ..progress import Progress
from ..schedule import Policy, parse_pair, parse_policy
from ..scoring import accuracy, duration_drift, verdict, wer
from ..sources import PromptItem
from ..stats import best_prediction, depth_reduction_pct, mean
from .measures import Measures

RESULTS = "results.jsonl"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Row:
    """One eval row: policies, verified mode's rule, pooling and heads, parsed once (strings given
    to the constructor are parsed here, the edge of eval)."""

    text: Policy
    speech: Policy
    pool: PoolSpec | None = None  # --prefill-pool setting of this row, if any
    accept: AcceptRule | None = None  # verified mode with this acceptance rule (row suffix +verify[=RULE])
    heads: str | None = None  # this row's exit heads (row suffix @HEADS); None: the run's --heads

    def __post_init__(self) -> None:
        for name, parse in (
            ("text", parse_policy),
            ("speech", parse_policy),
            ("accept", parse_accept),
            ("pool", parse_pool),
        ):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, parse(value))

    @property
    def name(self) -> str:
        name = self.speech.name if self.text.kind == "full" else f"{self.text.name}|{self.speech.name}"
        if self.accept is not None:
            name += "+verify" if self.accept.lossless else f"+verify={self.accept.name}"
        if self.heads is not None:
            name += f"@{heads_label(self.heads)}"
        return name if self.pool is None else f"{name} pool({self.pool.text})"

    @property
    def is_full(self) -> bool:
        return (
            self.text.kind == "full"
            and self.speech.kind == "full"
            and self.pool is None
            and self.accept is None
        )

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)


VERIFY_SUFFIX = "+verify"


def heads_label(spec: str) -> str:
    """A row's heads as its name shows them: a file's stem, or the keyword (bundled, logit-lens)."""
    return spec if spec in ("bundled", "logit-lens") else Path(spec).stem


def parse_row(entry: str, text_policy: str | Policy = "full", num_layers: int | None = None) -> Row:
    """One row: `SPEECH` or `TEXT|SPEECH`, optionally followed by `+verify` (the exact rule) or
    `+verify=RULE` (an acceptance rule, see accept.py), then optionally `@HEADS` (a heads file,
    `bundled` or `logit-lens`: this row's exit heads instead of --heads), e.g.
    `spar-k:FEEE:8+verify=topk:2` or `spar-k:FEEEEE:1+verify@adapter.safetensors`."""
    heads = None
    if "@" in entry:
        entry, _, heads = entry.rpartition("@")
        heads = heads.strip()
        if not heads:
            raise SparkeeError(
                f"row '{entry}@' names no heads after '@' (a heads file, bundled or logit-lens)"
            )
    accept = None
    if VERIFY_SUFFIX in entry:
        entry, _, rule = entry.partition(VERIFY_SUFFIX)
        if rule and not rule.startswith("="):
            raise SparkeeError(f"a row ends in +verify or +verify=RULE, got '{VERIFY_SUFFIX}{rule}'")
        accept = parse_accept(rule[1:] if rule else "exact")
    text, speech = entry.split("|", 1) if "|" in entry else (text_policy, entry)
    text, speech = (p if isinstance(p, Policy) else parse_policy(p, num_layers) for p in (text, speech))
    if num_layers is not None:
        text.check_layers(num_layers)
        speech.check_layers(num_layers)
    return Row(text, speech, accept=accept, heads=heads)


# the frontier sweep of verified SPAR-K (`eval --frontier`): patterns x exit layers x rules
FRONTIER_PATTERNS = ("FE", "FEE", "FEEE", "FEEEEEEE", "adaptive")
FRONTIER_RULES = ("exact", "topk:2", "typical:0.2", "unit-distance:0.5")


def frontier_rows(
    layers: list[int], patterns=FRONTIER_PATTERNS, rules=FRONTIER_RULES, num_layers: int | None = None
) -> list[Row]:
    """Verified SPAR-K rows over every (pattern, exit layer, acceptance rule), plus `full`."""
    rows = [Row("full", "full")]
    for layer in layers:
        for pat in patterns:
            for rule in rules:
                rows.append(parse_row(f"spar-k:{pat}:{layer}+verify={rule}", "full", num_layers))
    return rows


def parse_rows(
    policies: str,
    text_policy: str = "full",
    sweep: str | None = None,
    num_layers: int | None = None,
    pools: list[str] | None = None,
) -> list[Row]:
    """'full,fixed:22,spar-k:even:22' (+ `TEXT|SPEECH` entries); a sweep 'A:B' repeats every
    layer-taking policy at exit layers A..B-1; `pools` (prefill-pool specs) repeat every row with
    each pooling setting. 'full' without pooling is always included (it is the baseline)."""
    rows: list[Row] = [
        parse_row(e.strip(), text_policy, num_layers) for e in policies.split(",") if e.strip()
    ]
    if sweep:
        a, b = parse_pair(sweep, "--sweep-exit-layers")
        if a >= b:
            raise SparkeeError(f"--sweep-exit-layers A:B needs A < B (layers A..B-1), got '{sweep}'")
        swept = []
        for r in rows:
            swept.append(r)
            if r.speech.layer is not None:
                for layer in range(a, b):
                    speech = r.speech.with_layer(layer)
                    if num_layers is not None:
                        speech.check_layers(num_layers)
                    swept.append(replace(r, speech=speech))
        rows = swept
    if pools:
        specs = [parse_pool(p) for p in pools]
        for spec in specs:
            if num_layers is not None:
                spec.check(num_layers)
        rows = rows + [replace(r, pool=spec) for r in rows for spec in specs]
    rows = list(dict.fromkeys(rows))
    if not any(r.is_full for r in rows):
        rows.insert(0, Row("full", "full"))
    return rows


@dataclass
class EvalRun:
    bb: Backbone
    heads: ExitHeads
    prompts: list[PromptItem]
    cfg_for: Callable[[PromptItem], GenerationConfig]
    rows: list[Row]
    measures: Measures
    out: Path
    audio_examples: int = 3
    verify: bool = False  # every row verified with the exact rule (rows may name their own rule)
    batch_size: int = 1  # examples of one row decoded together (generate_batch)
    records: list[dict] = field(default_factory=list)
    row_heads: dict[str, ExitHeads] = field(default_factory=dict)  # Row.heads spec -> loaded heads

    def heads_for(self, row: Row) -> ExitHeads:
        return self.heads if row.heads is None else self.row_heads[row.heads]


def _key(row: Row, i: int) -> str:
    return f"{row.name}#{i}"


def _load_done(path: Path) -> dict[str, dict]:
    """Finished results by key (a later line for a key replaces an earlier one).

    A line that is not a whole result (cut short by a kill, or damaged) is dropped from the file
    before anything is appended, so the file never keeps an invalid line; its example is redone.
    """
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    lines = path.read_text().splitlines()
    good = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str):
            good.append(line)
            done[rec["key"]] = rec
    if len(good) != len(lines) or (lines and not path.read_bytes().endswith(b"\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(g + "\n" for g in good))
        tmp.replace(path)
    return done


@functools.cache
def code_version() -> str:
    """sparkee's version and a hash of its source files: results of other code are not reused.

    Computed once per process: the code running is the code imported, whatever the files say now."""
    from .. import __version__

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def prepare_out(out: Path, manifest: dict, fresh: bool) -> None:
    """Start a run in `out`: refuse to resume results made with other settings, or (--fresh)
    remove them; then record this run's manifest."""
    if out.exists() and not out.is_dir():
        raise SparkeeError(f"--out '{out}' is a file; give a directory for the results")
    path, results = out / MANIFEST, out / RESULTS
    if fresh:
        results.unlink(missing_ok=True)
        for d in ("audio", ".pending-audio"):
            shutil.rmtree(out / d, ignore_errors=True)
    elif results.is_file() and results.stat().st_size > 0:
        old = json.loads(path.read_text()) if path.is_file() else {}
        changed = [k for k in manifest if old.get(k) != manifest[k]]
        if changed:
            raise SparkeeError(
                f"'{out}' holds results made with other settings ({', '.join(changed)}); "
                "rerun with --fresh to replace them or give another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def _row_config(cfg: GenerationConfig, row: Row, verify: bool) -> GenerationConfig:
    return replace(
        cfg,
        speech_policy=row.speech,
        text_policy=row.text,
        verify=verify or row.accept is not None,
        accept=row.accept or (EXACT if verify else cfg.accept),
        prefill_pool=row.pool,
    )


def evaluate_one(run: EvalRun, row: Row, i: int, item: PromptItem) -> dict:
    return evaluate_batch(run, row, [(i, item)])[0]


def evaluate_batch(run: EvalRun, row: Row, items: list[tuple[int, PromptItem]]) -> list[dict]:
    """Decode examples of one row together (one batch when they share a config) and measure them.

    Times are shared out: each example is charged its batch's decode and wall time divided by the
    batch's size (alone, that is its own time)."""
    cfg = _row_config(run.cfg_for(items[0][1]), row, run.verify)
    t0 = time.perf_counter()
    results = _decode(run, [item.ids for _, item in items], cfg, run.heads_for(row))
    wall = (time.perf_counter() - t0) / len(items)
    return [
        _record(run, row, i, item, res, cfg, wall, len(items))
        for (i, item), res in zip(items, results, strict=True)
    ]


def _decode(run: EvalRun, prompts: list[list[int]], cfg: GenerationConfig, heads: ExitHeads) -> list:
    """The timed work of a unit: one prompt alone, several as one batch (tests wrap this)."""
    if len(prompts) == 1:
        return [generate(run.bb, prompts[0], cfg, heads=heads)]
    return generate_batch(run.bb, prompts, cfg, heads=heads)


WARMUP_TOKENS = 4


def _warm_up(run: EvalRun, units: list[tuple[Row, list]]) -> None:
    """Decode a few tokens of each row's first unit, untimed and discarded: the first calls of a
    process and of each batch shape pay one-time costs (allocations, kernel set-up, with --compile
    compilation) that would otherwise land on whichever row happens to run first."""
    seen = set()
    for row, items in units:
        if row in seen:
            continue
        seen.add(row)
        cfg = _row_config(run.cfg_for(items[0][1]), row, run.verify)
        cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, WARMUP_TOKENS))
        with contextlib.suppress(Exception):  # the timed run records any error, with its example
            _decode(run, [item.ids for _, item in items], cfg, run.heads_for(row))


def _record(
    run: EvalRun, row: Row, i: int, item: PromptItem, res, cfg: GenerationConfig, wall: float, batch: int
) -> dict:
    from ..scoring import unit_runs

    m, meta = run.measures, item.meta
    text = m.text_of(res.tokens)
    speech_ids = m.speech_of(res.tokens)
    stats = {k: res.stats.get(k) for k in STAT_KEYS}
    for k in ("decode_s", "prefill_s"):  # a batch's times, shared by its examples
        stats[k] = res.stats[k] / batch
    if batch > 1:  # predicted like measured: the batch's calibrated time, shared by its examples
        for k in ("predicted_s", "predicted_full_s"):
            t = res.stats.get("batch_" + k)
            stats[k] = None if t is None else t / batch
    rec = {
        "key": _key(row, i),
        "row": row.name,
        "example": i,
        "id": meta.get("id", str(i)),
        "format": cfg.interleave.format if cfg.interleave else None,
        "tokens": res.tokens,
        "modalities": ["s" if x == "speech" else "t" for x in res.modalities],
        "exit_layers": res.exit_layers,
        "text": text,
        "speech_runs": unit_runs(speech_ids),
        "wall_s": wall,
        "batch": batch,
        "stats": stats,
    }
    question = meta.get("question", "")
    rec["text_ok"] = verdict(m.judge, question, text, meta)
    rec["speech_transcript"] = m.transcriber(speech_ids) if m.transcriber is not None else ""
    rec["speech_ok"] = verdict(m.judge, question, rec["speech_transcript"], meta)
    keep = i < run.audio_examples
    measures_audio = m.mos is not None or m.asr is not None
    if m.vocoder is not None and speech_ids and (keep or measures_audio):
        folder = "audio" if keep else ".pending-audio"
        wav = m.vocoder(speech_ids, run.out / folder / row.slug / f"{rec['id']}.wav")
        if wav is not None:
            rec["audio" if keep else "pending_wav"] = str(Path(wav).relative_to(run.out))
            rec["audio_pending"] = measures_audio
    return rec


def _batches(run: EvalRun, todo: list[tuple[int, PromptItem, Row]]) -> list[tuple[Row, list]]:
    """Work units in round-robin order: chunks of `batch_size` examples (one round per chunk),
    each chunk through every row, the rows' order turning by one each round so that no row always
    runs first or right after another; inside a unit, examples share a decoding config (a prompt
    may fix its own format)."""
    rounds: dict[int, dict[Row, list]] = {}
    for i, item, row in todo:
        rounds.setdefault(i // run.batch_size, {}).setdefault(row, []).append((i, item))
    units = []
    for n, chunk in enumerate(rounds.values()):
        rows = list(chunk)
        k = n % len(rows)
        for row in rows[k:] + rows[:k]:
            examples = chunk[row]
            for _, members in group_by_config(examples, lambda ex: run.cfg_for(ex[1])):
                units.append((row, [examples[m] for m in members]))
    return units


def audio_measures(run: EvalRun, rec: dict, item: PromptItem) -> dict:
    """ASR and MOS of a record's vocoded answer. Run after all decoding: their thread pools would
    otherwise keep the cores busy while the next row is being timed."""
    m, meta = run.measures, item.meta
    rec = dict(rec)
    wav = run.out / (rec.get("audio") or rec["pending_wav"])
    if m.asr is not None:
        rec["asr_transcript"] = m.asr(wav)
        rec["asr_ok"] = verdict(m.judge, meta.get("question", ""), rec["asr_transcript"], meta)
        if m.transcriber is None:  # no token-level transcript: the speech is judged by the ASR
            rec["speech_transcript"], rec["speech_ok"] = rec["asr_transcript"], rec["asr_ok"]
    if m.mos is not None:
        rec["mos"] = m.mos(wav)
    if "pending_wav" in rec:
        wav.unlink(missing_ok=True)
        del rec["pending_wav"]
    rec["audio_pending"] = False
    return rec


STAT_KEYS = (
    "text_steps",
    "speech_steps",
    "avg_exit_layer_text",
    "avg_exit_layer_speech",
    "speech_agreement",
    "text_agreement",
    "speech_acceptance",
    "text_acceptance",
    "early_speech_steps",
    "accepted_early_steps",
    "refreshes",
    "verify_wasted_steps",
    "misplanned_steps",
    "predicted_s",
    "predicted_full_s",
    "flops",
    "flops_full_estimate",
    "weight_reads",
    "weight_reads_full_estimate",
    "early_steps",
    "fallback_steps",
    "verify_rejections",
    "prefill_s",
    "decode_s",
    "prefill_flops",
    "kv_bytes",
    "prompt_len",
    "prompt_len_last_layer",
)


def run_eval(run: EvalRun, progress: bool = True) -> list[dict]:
    """Decode every (row, example), appending each result to results.jsonl as it completes.

    Results already in the file are kept; examples that failed before are tried again."""
    for row in run.rows:  # settings that would fail every example fail here, once
        probe = run.prompts[0]
        check_config(run.bb, run.heads_for(row), _row_config(run.cfg_for(probe), row, run.verify))
    run.out.mkdir(parents=True, exist_ok=True)
    path = run.out / RESULTS
    done = _load_done(path)
    todo = [
        (i, item, row)
        for i, item in enumerate(run.prompts)
        for row in run.rows
        if _key(row, i) not in done or "error" in done[_key(row, i)]
    ]
    units = _batches(run, todo)
    _warm_up(run, units)
    with path.open("a") as f, Progress(total=len(todo), desc="eval", enabled=progress, unit="run") as bar:
        for row, items in units:
            try:
                recs = evaluate_batch(run, row, items)
            except Exception as e:  # noqa: BLE001 - one bad example must not end a long run
                if len(items) == 1:
                    i = items[0][0]
                    recs = [
                        {
                            "key": _key(row, i),
                            "row": row.name,
                            "example": i,
                            "error": f"{type(e).__name__}: {e}",
                        }
                    ]
                else:  # find which example of the batch fails: decode them alone
                    recs = [_one_or_error(run, row, i, item) for i, item in items]
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
                done[rec["key"]] = rec
            f.flush()
            bar.update(len(items))
        pending = [k for k, r in done.items() if r.get("audio_pending") and "error" not in r]
        for key in Progress(pending, desc="audio measures", enabled=progress and bool(pending), unit="clip"):
            rec = done[key]
            try:
                rec = audio_measures(run, rec, run.prompts[rec["example"]])
            except Exception as e:  # noqa: BLE001 - keep the decode result, record the failure
                rec = {**rec, "audio_pending": False, "audio_error": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(rec) + "\n")  # a later line for the same key replaces the earlier one
            f.flush()
            done[key] = rec
    run.records = [done[_key(r, i)] for i in range(len(run.prompts)) for r in run.rows if _key(r, i) in done]
    return run.records


def _one_or_error(run: EvalRun, row: Row, i: int, item: PromptItem) -> dict:
    """An example decoded alone (after its batch failed), or the record of its error."""
    try:
        return evaluate_one(run, row, i, item)
    except Exception as e:  # noqa: BLE001
        return {"key": _key(row, i), "row": row.name, "example": i, "error": f"{type(e).__name__}: {e}"}


def failures(records: list[dict], rows: list[Row]) -> tuple[list[dict], list[str]]:
    """(failed records, names of rows where every example failed)."""
    failed = [r for r in records if "error" in r]
    dead = [
        row.name
        for row in rows
        if any(r["row"] == row.name for r in failed)
        and not any(r["row"] == row.name and "error" not in r for r in records)
    ]
    return failed, dead


def _speech_early_steps(rec: dict, num_layers: int) -> int:
    """Speech steps that exited early: the steps `speech_agreement` is a rate over."""
    return sum(
        1
        for layer, m in zip(rec["exit_layers"], rec["modalities"], strict=True)
        if m == "s" and layer < num_layers
    )


# measured / predicted speed-ups outside this band mean the timings are off (the machine's load
# changed between rows, or the calibration is stale), not that the cost model is
SANE_BAND = (0.75, 1.33)


def timing_warning(summary: list[dict]) -> str | None:
    """One warning naming every row whose measured speed-up left SANE_BAND of its calibrated
    prediction (`timing_suspect` of `summarize`), or None when every row is in it (or none has both)."""
    bad = [s for s in summary if s.get("timing_suspect")]
    if not bad:
        return None
    rows = ", ".join(
        f"'{s['policy']}' ({s['speedup']:.2f}x measured, {s['predicted_speedup']:.2f}x predicted)"
        for s in bad
    )
    lo, hi = SANE_BAND
    return (
        f"warning: measured speed-ups disagree with the calibrated predictions (measured / predicted "
        f"outside {lo}-{hi}) in {len(bad)} row{'s' if len(bad) > 1 else ''}: {rows}; the machine's load "
        "probably changed while rows were timed (or the calibration is stale): rerun on a quiet machine "
        "(`sparkee calibrate --force` there first if unsure) before trusting these speed-ups"
    )


def summarize(records: list[dict], rows: list[Row], num_layers: int) -> list[dict]:
    """One line per row in the shape of the paper's Table 2 (accuracies and WER as fractions)."""
    ok = [r for r in records if "error" not in r]
    full = next((r for r in rows if r.is_full), None)
    full_recs = {r["example"]: r for r in ok if full and r["row"] == full.name}
    out = []
    for row in rows:
        rs = [r for r in ok if r["row"] == row.name]
        shared = [r for r in rs if r["example"] in full_recs]  # examples the full row ran too
        line = {
            "policy": row.name,
            "text_policy": row.text.name,
            "speech_policy": row.speech.name,
            "n": len(rs),
            "errors": sum(1 for r in records if r.get("row") == row.name and "error" in r),
        }
        line |= _quality(rs)
        line |= _depth(rs, num_layers)
        line |= _speed(rs, shared, full_recs)
        line |= _acceptance(rs, num_layers)
        line |= _durations(rs, shared, full_recs)
        line |= _prefill(row, rs, list(full_recs.values()))
        out.append(line)
    return out


def _quality(rs: list[dict]) -> dict:
    return {
        "accuracy_speech": accuracy([r["speech_ok"] for r in rs]),
        "accuracy_text": accuracy([r["text_ok"] for r in rs]),
        "accuracy_asr": accuracy([r.get("asr_ok") for r in rs]),
        "wer": wer([r["text"] for r in rs], [r["speech_transcript"] for r in rs]),
        "mos": mean([r["mos"] for r in rs if r.get("mos") is not None]),
    }


def _depth(rs: list[dict], num_layers: int) -> dict:
    def layers(mod: str) -> float | None:
        return mean(
            [e for r in rs for e, m in zip(r["exit_layers"], r["modalities"], strict=True) if m == mod]
        )

    text, speech = layers("t"), layers("s")
    flops = sum(r["stats"]["flops"] for r in rs)
    flops_full = sum(r["stats"]["flops_full_estimate"] for r in rs)
    return {
        "avg_exit_layer_text": text,
        "avg_exit_layer_speech": speech,
        "speech_depth_reduction_pct": depth_reduction_pct(speech, num_layers),
        "flops_reduction_pct": 100 * (1 - flops / flops_full) if flops_full else None,
    }


def _speed(rs: list[dict], shared: list[dict], full_recs: dict[int, dict]) -> dict:
    """Speed-ups over the full row on the examples both ran: measured (decode time; the same
    prefill is reported apart, as TTFT) and predicted (calibrated seconds of the passes each
    example ran, against the full row's)."""
    decode = sum(r["stats"]["decode_s"] for r in shared)
    measured = (
        sum(full_recs[r["example"]]["stats"]["decode_s"] for r in shared) / decode if decode > 0 else None
    )
    pred_run = [r["stats"].get("predicted_s") for r in shared]
    pred_full = [full_recs[r["example"]]["stats"].get("predicted_s") for r in shared]
    predicted = (
        sum(pred_full) / sum(pred_run)
        if shared and None not in pred_run and None not in pred_full and sum(pred_run) > 0
        else None
    )
    reads = sum(r["stats"]["weight_reads"] for r in rs)
    memory_bound = sum(r["stats"]["weight_reads_full_estimate"] for r in rs) / reads if reads else None
    return {
        "predicted_speedup": best_prediction(predicted, memory_bound),
        "predicted_speedup_memory_bound": memory_bound,
        "speedup": measured,
        "measured_over_predicted": measured / predicted if measured and predicted else None,
        # measured/predicted outside SANE_BAND: the timings are not to be trusted (timing_warning)
        "timing_suspect": None
        if not (measured and predicted)
        else not (SANE_BAND[0] <= measured / predicted <= SANE_BAND[1]),
        "speedup_wall": (
            sum(full_recs[r["example"]]["wall_s"] for r in shared) / sum(r["wall_s"] for r in shared)
            if shared
            else None
        ),
    }


def _acceptance(rs: list[dict], num_layers: int) -> dict:
    # each example's agreement rate is over its early speech steps, so those are its weight
    weights = [
        _speech_early_steps(r, num_layers) if r["stats"]["speech_agreement"] is not None else 0 for r in rs
    ]
    agreed = sum((r["stats"]["speech_agreement"] or 0) * w for r, w in zip(rs, weights, strict=True))
    early_speech = sum(r["stats"].get("early_speech_steps") or 0 for r in rs)
    accepted_speech = sum(
        (r["stats"].get("speech_acceptance") or 0) * (r["stats"].get("early_speech_steps") or 0) for r in rs
    )
    refreshes = sum(r["stats"].get("refreshes") or 0 for r in rs)
    accepted = sum(r["stats"].get("accepted_early_steps") or 0 for r in rs)
    return {
        "speech_agreement": agreed / sum(weights) if sum(weights) else None,
        "speech_acceptance": accepted_speech / early_speech if early_speech else None,
        "accepted_per_refresh": accepted / refreshes if refreshes else None,
        "verify_rejections": sum(r["stats"]["verify_rejections"] for r in rs),
        "rejected_steps": sum(r["stats"].get("verify_wasted_steps") or 0 for r in rs),
        "misplanned_steps": sum(r["stats"].get("misplanned_steps") or 0 for r in rs),
    }


def _durations(rs: list[dict], shared: list[dict], full_recs: dict[int, dict]) -> dict:
    """Speech length and unit durations, against the full row's answers to the same examples."""
    drift = [duration_drift(r.get("speech_runs"), full_recs[r["example"]].get("speech_runs")) for r in shared]
    drift = [d for d in drift if d is not None]
    return {
        "speech_frames": mean([sum(n for _, n in r.get("speech_runs") or []) for r in rs]),
        "speech_frames_drift": mean([d["frames"] for d in drift]),
        "unit_duration_drift": mean([d["durations"] for d in drift if d["durations"] is not None]),
        "mean_new_tokens": mean([len(r["tokens"]) for r in rs]),
    }


def _prefill(row: Row, rs: list[dict], full_rs: list[dict]) -> dict:
    """Prefill and Affinity Pooling figures, against the full row's prefill."""
    base = mean([r["stats"]["prefill_flops"] for r in full_rs])
    flops = mean([r["stats"]["prefill_flops"] for r in rs])
    return {
        "pool": None if row.pool is None else row.pool.text,
        "prefill_flops": flops,
        "kv_bytes": mean([r["stats"]["kv_bytes"] for r in rs]),
        "ttft_s": mean([r["stats"]["prefill_s"] for r in rs]),
        "prefill_flops_reduction_pct": 100 * (1 - flops / base) if base and rs else None,
        "prompt_len_last_layer": mean([r["stats"]["prompt_len_last_layer"] for r in rs]),
    }
