"""bench/gpu_check.py's CPU smoke run: the GPU check's code path on tiny shapes, every part,
section and row present with sane numbers and every exactness check passed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    # parts in this process (children cost an import each); a generous budget: this checks the structure,
    # never the speed of this machine
    cmd = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--budget-s", "900",
           "--exactness-budget-s", "300"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_exactness_checks_all_ran_and_passed(smoke):
    result, md = smoke
    ex = result["parts"]["exactness"]
    assert ex["status"] == "ok" and all(s["status"] == "ok" for s in ex["sections"].values())
    assert set(ex["sections"]) == {"qwen2-float32", "qwen2-bfloat16", "glm-float32", "glm-bfloat16"}
    kinds = {(c["check"], c["arch"], c["dtype"]) for c in ex["cases"]}
    for check in ("full == transformers greedy", "verified == full greedy", "KV == one full forward",
                  "batch row == alone"):  # fmt: skip
        for arch in ("qwen2", "glm"):
            for dtype in ("float32", "bfloat16"):
                assert (check, arch, dtype) in kinds
    assert all(c["ok"] for c in ex["cases"]) and ex["all_ok"] is True and result["exactness_ok"] is True
    for c in ex["cases"]:
        if "control_rel_error" in c:  # the tolerance tells a wrong cache apart
            assert c["rel_error"] <= c["tolerance"] < c["control_rel_error"] / 10
        if c["dtype"] == "float32" and "equal" in c:
            assert c["equal"], c  # no rounding excuse in float32
    assert "all passed: **True**" in md


@pytest.mark.parametrize("name", ["step-audio-2-mini", "glm-4-voice"])
def test_speed_part_has_every_section_and_row(smoke, name):
    result, md = smoke
    p = result["parts"][name]
    assert p["status"] == "ok" and p["finished"]
    assert {k: s["status"] for k, s in p["sections"].items()} == {
        k: "ok" for k in ("build", "calibration", "eager", "sparkee_compile", "hf_compile")
    }
    tags = {"step-audio-2-mini": ["S4", "S5", "S6"], "glm-4-voice": ["G4", "G5", "G6"]}[name]
    assert list(p["schedules"]) == tags and p["batches"] == [1, 8]
    rows = {(r["batch"], r["row"]): r for r in p["eager"]["rows"]}
    assert set(rows) == {(b, t) for b in (1, 8) for t in ["full", *tags]}
    for (_b, tag), r in rows.items():
        for key in ("decode_tokens_per_s", "measured_speedup", "predicted_speedup", "measured_over_predicted",
                    "predicted_speedup_memory_bound"):  # fmt: skip
            assert positive(r[key]), (tag, key, r[key])
        if tag == "full":
            assert r["measured_speedup"] == 1 and r["predicted_speedup"] == pytest.approx(1)
        else:  # early exits: fewer layers on average than the model has
            assert r["avg_exit_layer_speech"] < p["shape"]["num_hidden_layers"]
            assert r["predicted_speedup_memory_bound"] > 1
    for b in (1, 8):
        e = p["eager"][f"batch_{b}"]
        assert positive(e["hf_eager_tokens_per_s"]) and positive(e["sparkee_full_over_hf_eager"])
        c = p["sparkee_compile"][f"batch_{b}"]
        assert positive(c["compiled_over_eager"]) and c["same_tokens_as_eager"] is True
        h = p["hf_compile"][f"batch_{b}"]
        assert (
            "fallback" not in h
            and positive(h["sparkee_eager_over_hf"])
            and positive(h["sparkee_compiled_over_hf"])
        )
    assert f"## {name}" in md and "| 8 | " + tags[2] in md


def test_a_part_past_its_budget_is_recorded_not_lost(tmp_path):
    """With no time left the speed parts are skipped, saying why, and the run still writes its files."""
    cmd = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), "--budget-s", "2",
           "--parts", "step-audio-2-mini"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    part = result["parts"]["step-audio-2-mini"]
    assert part["status"] == "skipped" and "budget" in part["why"]
    assert "Not done: part skipped" in (tmp_path / "gpu_check.md").read_text()
