"""Head distillation, resume, multi-process labelling/training, and the per-layer report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from sparkee import ExitHeads, load_heads, wrap_model
from sparkee.cli import app
from sparkee.errors import SparkeeError
from sparkee.heads import read_metadata
from sparkee.train_heads import parse_layers

runner = CliRunner()
COMMON = ["--max-new-tokens", "16", "--interleave", "1:3", "--speech-ids", "40:80"]


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [[5, 7, 9], [1, 2, 3, 4], [10, 20], [33, 34, 35], [8, 8, 8], [60, 61], [12, 13], [70, 2, 5]]
    p.write_text("\n".join(json.dumps({"prompt_ids": r}) for r in rows) + "\n")
    return p


def train(qwen_dir, prompts, out, *extra):
    args = [
        "train-heads",
        "--model",
        str(qwen_dir),
        "--data",
        str(prompts),
        "--out",
        str(out),
        "--batch-size",
        "32",
    ]
    return runner.invoke(app, args + COMMON + list(extra))


def test_trained_tuned_lens_beats_logit_lens_on_validation(qwen_dir, prompts, tmp_path):
    out = tmp_path / "h.safetensors"
    res = train(qwen_dir, prompts, out, "--steps", "60", "--layers", "all")
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "h.metrics.json").read_text())
    for layer, h in metrics["heads"].items():
        assert h["kl_all"] < metrics["logit_lens"][layer]["kl_all"], layer
    heads = load_heads(out, wrap_model(__import__("conftest").tiny_model("qwen2")))
    assert heads.kind == "tuned-lens" and heads.layers == [1, 2, 3, 4, 5]


def test_speech_token_set_heads_cover_speech_ids_only(qwen_dir, prompts, tmp_path):
    out = tmp_path / "s.safetensors"
    res = train(
        qwen_dir, prompts, out, "--steps", "5", "--layers", "3", "--head", "full", "--token-set", "speech"
    )
    assert res.exit_code == 0, res.output
    from conftest import tiny_model

    heads = load_heads(out, wrap_model(tiny_model("qwen2")))
    assert heads.kind == "full" and heads.token_ids.tolist() == list(range(40, 80))


def test_interrupted_training_resumes_to_the_same_heads(qwen_dir, prompts, tmp_path):
    straight = tmp_path / "a.safetensors"
    assert train(qwen_dir, prompts, straight, "--steps", "20", "--layers", "2,4").exit_code == 0
    resumed = tmp_path / "b.safetensors"
    first = train(qwen_dir, prompts, resumed, "--steps", "20", "--layers", "2,4", "--stop-after", "8")
    assert first.exit_code == 0 and "rerun the same command" in first.stdout
    assert (tmp_path / "b.work" / "train-state-tuned-lens-all.safetensors").is_file() and not resumed.exists()
    # the rerun picks up at step 8 (labels and optimizer state from the work dir)
    assert train(qwen_dir, prompts, resumed, "--steps", "20", "--layers", "2,4").exit_code == 0
    from conftest import tiny_model

    bb = wrap_model(tiny_model("qwen2"))
    a, b = load_heads(straight, bb), load_heads(resumed, bb)
    h = torch.randn(2, bb.hidden_size)
    torch.testing.assert_close(a(2, h), b(2, h), atol=1e-5, rtol=1e-5)


def test_parse_layers():
    assert parse_layers("all", 5) == [1, 2, 3, 4]
    assert parse_layers("3,1", 5) == [1, 3]
    assert parse_layers("2:4", 5) == [2, 3]
    with pytest.raises(SparkeeError, match="out of range"):
        parse_layers("5", 5)
    with pytest.raises(SparkeeError, match="must be 'all'"):
        parse_layers("x", 5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no prompts"),
        ("{not json\n", "not valid JSON"),
        ('{"foo": 1}\n', "has none of the keys"),
        ('{"prompt_ids": []}\n', "non-empty list"),
    ],
)
def test_bad_data_files(qwen_dir, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    res = train(qwen_dir, data, tmp_path / "h.safetensors", "--steps", "1")
    assert res.exit_code == 2 and message in res.stderr, res.output


def test_bad_train_head_arguments(qwen_dir, prompts, tmp_path):
    res = train(qwen_dir, prompts, tmp_path / "h.safetensors", "--layers", "9")
    assert res.exit_code == 2 and "out of range" in res.stderr
    res = train(qwen_dir, prompts, tmp_path / "h.safetensors", "--head", "logit-lens")
    assert res.exit_code == 2 and "needs no training" in res.stderr
    res = train(qwen_dir, prompts, tmp_path / "h.bin")
    assert res.exit_code == 2 and "must name a .safetensors file" in res.stderr
    (tmp_path / "d.safetensors").mkdir()
    res = train(qwen_dir, prompts, tmp_path / "d.safetensors")
    assert res.exit_code == 2 and "must name a .safetensors file" in res.stderr
    (tmp_path / "h.work").write_text("not a directory")
    res = train(qwen_dir, prompts, tmp_path / "h.safetensors", "--steps", "1")
    assert res.exit_code == 2 and "is a file" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--steps", "-3"], "--steps must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--val-fraction", "-1"], "--val-fraction must be between 0 and 1"),
        (["--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--limit", "-1"], "--limit must be at least 1"),
        (["--stop-after", "0"], "--stop-after must be at least 1"),
    ],
)
def test_numbers_that_cannot_describe_a_run_are_refused(qwen_dir, prompts, tmp_path, args, message):
    res = train(qwen_dir, prompts, tmp_path / "h.safetensors", *args)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "h.work").exists()


def _same_heads(a, b) -> bool:
    from conftest import tiny_model

    bb = wrap_model(tiny_model("qwen2"))
    ha, hb = load_heads(a, bb), load_heads(b, bb)
    h = torch.randn(3, bb.hidden_size)
    return ha.layers == hb.layers and all(torch.allclose(ha(L, h), hb(L, h), atol=1e-5) for L in ha.layers)


def test_resume_never_reuses_work_made_with_other_settings(qwen_dir, prompts, tmp_path):
    def straight(name, *extra):
        out = tmp_path / "straight" / name
        assert train(qwen_dir, prompts, out, "--layers", "2,4", *extra).exit_code == 0
        return out

    out = tmp_path / "h.safetensors"
    # a lower --steps after a finished run trains anew to that many steps
    assert train(qwen_dir, prompts, out, "--layers", "2,4", "--steps", "12").exit_code == 0
    res = train(qwen_dir, prompts, out, "--layers", "2,4", "--steps", "6")
    assert res.exit_code == 0 and "training afresh" in res.stderr
    assert _same_heads(out, straight("s6.safetensors", "--steps", "6"))
    assert read_metadata(out)["steps"] == "6"
    # other decoding makes other labels: they are made afresh, never reused
    res = train(qwen_dir, prompts, out, "--layers", "2,4", "--steps", "6", "--max-new-tokens", "8")
    assert res.exit_code == 0 and "labelling afresh" in res.stderr
    assert _same_heads(out, straight("m8.safetensors", "--steps", "6", "--max-new-tokens", "8"))
    # other layers after an interrupted run: no traceback, heads for the new layers
    part = train(qwen_dir, prompts, out, "--layers", "2,4", "--steps", "6", "--stop-after", "3")
    assert part.exit_code == 0
    res = train(qwen_dir, prompts, out, "--layers", "1,3", "--steps", "6")
    assert res.exit_code == 0, res.output
    from conftest import tiny_model

    assert load_heads(out, wrap_model(tiny_model("qwen2"))).layers == [1, 3]


def test_layer_report_writes_table_plot_and_json(qwen_dir, prompts, tmp_path):
    out = tmp_path / "report"
    res = runner.invoke(
        app, ["layer-report", "--model", str(qwen_dir), "--data", str(prompts), "--out", str(out)] + COMMON
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "layer_report.json").read_text())
    assert set(rep["logit_lens"]) == {"1", "2", "3", "4", "5"}
    assert rep["speech_rows"] > 0 and rep["rows"] > rep["speech_rows"]
    assert (out / "layer_report.png").stat().st_size > 1000
    assert "| 5 |" in (out / "layer_report.md").read_text()


def test_layer_report_refuses_heads_of_another_model(qwen_dir, prompts, tmp_path):
    from conftest import tiny_model

    other = ExitHeads(wrap_model(tiny_model("qwen2", seed=5)), "tuned-lens", [2]).save(
        tmp_path / "o.safetensors"
    )
    res = runner.invoke(
        app, ["layer-report", "--model", str(qwen_dir), "--heads", str(other), "--data", str(prompts)]
    )
    assert res.exit_code == 2 and "made for another model" in res.stderr


@pytest.mark.slow
def test_two_process_data_parallel_training(qwen_dir, prompts, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    out = tmp_path / "dp.safetensors"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "sparkee.cli", "train-heads",
           "--model", str(qwen_dir), "--data", str(prompts), "--out", str(out), "--steps", "10", "--layers", "2,4",
           "--batch-size", "16"] + COMMON  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    work = tmp_path / "dp.work"
    assert (work / "labels-train-0of2.safetensors").is_file() and (
        work / "labels-train-1of2.safetensors"
    ).is_file()
    assert out.is_file()
