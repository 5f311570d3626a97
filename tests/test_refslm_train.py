"""A few training steps of a tiny config (fast), resume, and the model directory it writes."""

from __future__ import annotations

import json

from sparkee.refslm.train import lr_at, train


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


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) < lr_at(9, 100, 1.0, 10) <= 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.05) < 1e-9
    assert lr_at(50, 100, 1.0, 10) > lr_at(80, 100, 1.0, 10)
