"""`sparkee eval` timings on a busy machine: rows interleaved round-robin, and a warning when a
measured speed-up leaves the sane band around its calibrated prediction.

Decode times are injected (each unit's time = its calibrated prediction x a load factor), so the
tests are deterministic and never depend on this machine's speed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from sparkee import GenerationConfig, calibrate, cost
from sparkee.cli import app
from sparkee.eval import harness
from sparkee.eval.harness import SANE_BAND, Row, timing_warning
from sparkee.sources import PromptItem

runner = CliRunner()
DECODE = ["--interleave", "2:4", "--speech-ids", "40:80", "--max-new-tokens", "12", "--stop-ids", "1"]
ROWS = "full,spar-k:FEEE:2+verify,spar-k:even:3"


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "qa.jsonl"
    prompts = [[5, 6, 7], [1, 2, 3, 4], [10, 20], [11, 12, 13, 14, 15, 16]]
    p.write_text(
        "".join(json.dumps({"prompt_ids": ids, "question": f"q{n}"}) + "\n" for n, ids in enumerate(prompts))
    )
    return p


@pytest.fixture()
def calibrated(monkeypatch):
    """A made-up calibration, so rows get calibrated predictions without measuring anything."""
    cal = cost.Calibration(
        key={}, rows=[1, 64], layer_a=[1e-3, 2e-3], layer_c=[1e-4, 1e-4], mat_sizes=[1, 10**9],
        mat_rows=[1, 64], mat_s=[[0.0, 0.0], [0.0, 0.0]], overhead={"full": 5e-3, "early": 1e-3},
    )  # fmt: skip
    monkeypatch.setattr(calibrate, "load_or_calibrate", lambda *a, **k: cal)
    monkeypatch.setenv("SPARKEE_NO_CALIBRATE", "0")


def fake_timer(monkeypatch, load):
    """Each timed unit's decode time becomes its calibrated prediction x load(policy, unit index):
    a machine whose only variation is the load we inject. Returns the policies in timed order."""
    real = harness._decode
    order = []

    def timed(run, prompts, cfg, heads):
        results = real(run, prompts, cfg, heads)
        if cfg.max_new_tokens == harness.WARMUP_TOKENS:  # the untimed warm-up
            return results
        factor = load(cfg.speech_policy.name, len(order))
        order.append(cfg.speech_policy.name)
        for res in results:
            predicted = res.stats["batch_predicted_s" if len(prompts) > 1 else "predicted_s"]
            res.stats.decode_s = predicted * factor
        return results

    monkeypatch.setattr(harness, "_decode", timed)
    return order


def run_eval(qwen_dir, data, out, *extra):
    args = ["eval", "--model", str(qwen_dir), "--data", str(data), "--out", str(out), "--policies", ROWS]
    args += ["--transcriber", "eval_plugins:id_transcriber", "--vocoder", "none", *DECODE, *extra]
    return runner.invoke(app, args)


def test_units_go_round_robin_and_the_rows_order_turns_each_round():
    rows = [Row("full", "full"), Row("full", "fixed:2"), Row("full", "spar-k:even:2")]
    items = [PromptItem(ids=[1, 2 + i], meta={}) for i in range(6)]
    run = SimpleNamespace(batch_size=2, cfg_for=lambda item: GenerationConfig())
    todo = [(i, item, row) for i, item in enumerate(items) for row in rows]
    units = harness._batches(run, todo)
    assert [(rows.index(r), [i for i, _ in its]) for r, its in units] == [
        (0, [0, 1]), (1, [0, 1]), (2, [0, 1]),  # round 1
        (1, [2, 3]), (2, [2, 3]), (0, [2, 3]),  # round 2 starts one row later
        (2, [4, 5]), (0, [4, 5]), (1, [4, 5]),
    ]  # fmt: skip
    # a resumed run (only some rows left) still goes round by round
    left = [(i, item, row) for i, item, row in todo if row != rows[1]]
    assert [([i for i, _ in its]) for _, its in harness._batches(run, left)] == [[0, 1]] * 2 + [
        [2, 3]
    ] * 2 + [[4, 5]] * 2


def test_no_warning_when_measured_matches_predicted(qwen_dir, data, tmp_path, monkeypatch, calibrated):
    fake_timer(monkeypatch, lambda policy, n: 1.0)
    res = run_eval(qwen_dir, data, tmp_path / "ev", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [s["measured_over_predicted"] for s in summary] == pytest.approx([1.0] * 3)
    assert [s["timing_suspect"] for s in summary] == [False] * 3
    assert "warning" not in res.stderr and timing_warning(summary) is None
    assert "rerun on a quiet machine" not in (tmp_path / "ev" / "table.md").read_text()


def test_a_slowed_row_is_named_once_with_a_rerun_hint(qwen_dir, data, tmp_path, monkeypatch, calibrated):
    """The full row timed while another process took a core: every other row's measured speed-up
    is 3x its prediction, and the command says so (exit 0: the results are kept)."""
    fake_timer(monkeypatch, lambda policy, n: 3.0 if policy == "full" else 1.0)
    out = tmp_path / "ev"
    res = run_eval(qwen_dir, data, out, "--batch-size", "2")
    assert res.exit_code == 0, res.output
    summary = {s["policy"]: s for s in json.loads((out / "summary.json").read_text())}
    for name in ("spar-k:FEEE:2+verify", "spar-k:even:3"):
        assert summary[name]["measured_over_predicted"] == pytest.approx(3.0)
        assert summary[name]["timing_suspect"] is True
    assert summary["full"]["timing_suspect"] is False
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    (warning,) = warnings
    assert "'spar-k:FEEE:2+verify'" in warning and "'spar-k:even:3'" in warning and "'full'" not in warning
    assert "rerun on a quiet machine" in warning and f"{SANE_BAND[0]}-{SANE_BAND[1]}" in warning
    assert warning in (out / "table.md").read_text()
    assert "timing-warning" in (out / "report.html").read_text()


def test_a_row_slower_than_predicted_is_named_too(qwen_dir, data, tmp_path, monkeypatch, calibrated):
    fake_timer(monkeypatch, lambda policy, n: 2.0 if policy == "spar-k:even:3" else 1.0)
    res = run_eval(qwen_dir, data, tmp_path / "ev")
    assert res.exit_code == 0, res.output
    summary = {s["policy"]: s for s in json.loads((tmp_path / "ev" / "summary.json").read_text())}
    assert summary["spar-k:even:3"]["measured_over_predicted"] == pytest.approx(0.5)
    assert [k for k, s in summary.items() if s["timing_suspect"]] == ["spar-k:even:3"]
    assert "'spar-k:even:3'" in res.stderr and "'spar-k:FEEE:2+verify'" not in res.stderr


def test_a_load_change_midway_hits_every_row_alike(qwen_dir, data, tmp_path, monkeypatch, calibrated):
    """The machine turns 3x slower halfway through the timed units. Round-robin spreads it over
    every row, so no speed-up leaves the band (timed row after row, the last row alone would
    carry it: 3x off)."""
    order = fake_timer(monkeypatch, lambda policy, n: 1.0 if n < 6 else 3.0)
    res = run_eval(qwen_dir, data, tmp_path / "ev")
    assert res.exit_code == 0, res.output
    assert len(order) == 12 and all(len(set(order[k : k + 3])) == 3 for k in range(0, 12, 3))
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert [s["timing_suspect"] for s in summary] == [False] * 3, [
        s["measured_over_predicted"] for s in summary
    ]
    assert "warning:" not in res.stderr


def test_warm_up_is_untimed_and_the_timed_units_are_complete(qwen_dir, data, tmp_path, monkeypatch):
    calls = []
    real = harness._decode
    monkeypatch.setattr(
        harness,
        "_decode",
        lambda run, p, cfg, h: (
            calls.append((cfg.speech_policy.name, cfg.max_new_tokens)) or real(run, p, cfg, h)
        ),
    )
    res = run_eval(qwen_dir, data, tmp_path / "ev", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    warm = [c for c in calls if c[1] == harness.WARMUP_TOKENS]
    assert sorted(p for p, _ in warm) == sorted(["full", "spar-k:FEEE:2", "spar-k:even:3"])
    assert calls[: len(warm)] == warm and len(calls) == 2 * len(warm)  # warm-up first, then one unit per row
    recs = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and not any("error" in r for r in recs)
