"""`sparkee demo`, the README's main job, end to end on two questions of the bundled model."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from sparkee.cli import app

KEYS = {
    "policy",
    "accuracy_speech",
    "accuracy_text",
    "wer",
    "avg_exit_layer_speech",
    "speech_depth_reduction_pct",
    "speedup",
}


@pytest.mark.slow
def test_demo_on_two_questions(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--limit", "2", "--out", str(out), "--audio-examples", "1"])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in rows][0] == "full"
    assert {r["policy"].split(":")[0] for r in rows} == {"full", "fixed", "confidence", "spar-k"}
    ADAPTER = "spar-k:FEEEEEE:1+verify@adapter-speech"  # the bundled adapter heads' row
    assert len(rows) == 8 and [r["policy"] for r in rows[-2:]] == ["spar-k:FEEE:4+verify", ADAPTER]
    for r in rows:
        assert set(r) >= KEYS
        assert 0.3 < r["speedup"] < 4  # a ratio of two timings of the same work, not a stray value
    by = {r["policy"]: r for r in rows}
    full = by["full"]
    # the bundled model answers both questions at full depth, in text and in speech, and its
    # speech says exactly its text; SPAR-K even at layer 12 keeps all of that (greedy, fp32)
    assert full["accuracy_speech"] == full["accuracy_text"] == 1.0 and full["wer"] == 0.0
    assert by["spar-k:even:12"]["accuracy_speech"] == 1.0 and by["spar-k:even:12"]["wer"] == 0.0
    # the verified row (exact rule) answers exactly what full depth answers, token for token
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    tokens = {(r["row"], r["example"]): r["tokens"] for r in recs}
    for i in (0, 1):
        assert tokens[("spar-k:FEEE:4+verify", i)] == tokens[("full", i)] == tokens[(ADAPTER, i)]
    # the adapter's draft runs one layer (plus itself) and keeps more early tokens than the tuned lens
    assert by[ADAPTER]["avg_exit_layer_speech"] < by["spar-k:FEEE:4+verify"]["avg_exit_layer_speech"]
    assert by[ADAPTER]["speech_acceptance"] > by["spar-k:FEEE:4+verify"]["speech_acceptance"]
    # fixed-layer exit drifts (the paper's finding): its speech is worse than full's
    assert by["fixed:12"]["accuracy_speech"] < 1.0 and by["fixed:12"]["wer"] > 0.0
    assert by["spar-k:even:12"]["speech_depth_reduction_pct"] == pytest.approx(12.5, abs=0.5)
    assert full["speech_depth_reduction_pct"] == 0
    assert all(
        r["speech_depth_reduction_pct"] > 0 for r in rows if r["policy"].startswith(("fixed", "spar-k"))
    )
    table = (out / "table.md").read_text()
    assert "acc. speech %" in table and "measured speed-up" in table
    if shutil.which("espeak-ng"):
        assert len(list((out / "audio").rglob("*.wav"))) == 8  # one answer per policy


def test_demo_bad_inputs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--format", "zigzag", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown format" in res.stderr
    res = runner.invoke(app, ["demo", "--exit-layer", "99", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "out of range" in res.stderr
    res = runner.invoke(app, ["demo", "--model", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "missing" in res.stderr
    res = runner.invoke(app, ["demo", "--exit-layer", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "exit layer 0" in res.stderr and "out of range" in res.stderr
    for limit in ("0", "-1"):
        res = runner.invoke(app, ["demo", "--limit", limit, "--out", str(tmp_path)])
        assert res.exit_code == 2 and "--limit must be at least 1" in res.stderr
    res = runner.invoke(app, ["demo", "--audio-examples", "-2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--audio-examples must be at least 0" in res.stderr
    (tmp_path / "f").write_text("x")
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "f")])
    assert res.exit_code == 2 and "is a file" in res.stderr
