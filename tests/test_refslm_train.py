"""A few training steps of a tiny config (fast), resume, and the model directory it writes."""

from __future__ import annotations

import json

import torch

from sparkee.refslm.train import lr_schedule, train


def test_tiny_train_and_resume(tmp_path):
    rep = train(tmp_path, steps=3, batch_size=4, tiny=True, eval_limit=2, eval_test=False, progress=False)
    assert rep["training"]["steps"] == 3
    ck = tmp_path / "checkpoint"
    assert (ck / "model.safetensors").exists() and (ck / "optimizer.pt").exists()
    assert json.loads((ck / "state.json").read_text())["step"] == 3
    md = tmp_path / "model"
    for f in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "lexicon.json",
        "training_report.json",
        "sparkee_refslm.json",
    ):
        assert (md / f).exists(), f
    meta = json.loads((md / "sparkee_refslm.json").read_text())
    assert set(meta["formats"]) == {"padded", "early-stop"}
    assert meta["speech_range"][1] == meta["vocab_size"]
    rep2 = train(tmp_path, steps=5, batch_size=4, tiny=True, eval_limit=2, eval_test=False, progress=False)
    assert rep2["training"]["steps"] == 5  # resumed from step 3


def test_lr_schedule_is_transformers_cosine_to_5_percent():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    f = lr_schedule(100, 10)
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == 1.0  # linear warm-up
    assert abs(f(100) - 0.05) < 1e-12 and f(250) == f(100)  # ends at 5% and stays there
    assert f(40) > f(60) > f(80)
    # the factor at step k is what a scheduler stepped k times gives: resumes follow the schedule
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 10, 100, min_lr_rate=0.05)
    for k in range(100):
        assert abs(opt.param_groups[0]["lr"] - 2.0 * f(k)) < 1e-12, k
        opt.step()
        sched.step()
