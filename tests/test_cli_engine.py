"""The engine's command-line surface: acceptance rules, batches, calibration, verified eval rows,
the frontier grid, dialogue histories; every bad value exits 2 with one sentence."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparkee import parse_accept, store
from sparkee.cli import app
from sparkee.errors import SparkeeError
from sparkee.eval.harness import Row, frontier_rows, parse_rows

runner = CliRunner()
DECODE = ["--interleave", "2:4", "--speech-ids", "40:80", "--max-new-tokens", "14", "--stop-ids", "1"]


def gen(qwen_dir, *args):
    return runner.invoke(app, ["generate", "--model", str(qwen_dir), *DECODE, *args])


def test_generate_accept_rule_and_repetition_penalty(qwen_dir):
    base = ["--prompt-ids", "5,7,9", "--speech-policy", "spar-k:FEE:2", "--json"]
    exact = json.loads(gen(qwen_dir, *base, "--verify").stdout)
    full = json.loads(gen(qwen_dir, "--prompt-ids", "5,7,9", "--json").stdout)
    assert exact["tokens"] == full["tokens"]  # verified with the exact rule: lossless
    everything = json.loads(gen(qwen_dir, *base, "--verify", "--accept", "topk:96").stdout)
    unverified = json.loads(gen(qwen_dir, *base).stdout)
    assert everything["tokens"] == unverified["tokens"]
    assert everything["stats"]["speech_acceptance"] == 1.0
    pen = json.loads(gen(qwen_dir, "--prompt-ids", "5,7,9", "--repetition-penalty", "1.5", "--json").stdout)
    assert pen["tokens"] != full["tokens"]


def test_generate_prompts_file_batches_one_line_per_prompt(qwen_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    prompts = [[5, 7, 9], [1, 2, 3, 4, 5], [42]]
    f.write_text("".join(json.dumps({"prompt_ids": p, "id": f"q{n}"}) + "\n" for n, p in enumerate(prompts)))
    res = gen(
        qwen_dir, "--prompts-file", str(f), "--batch-size", "2", "--speech-policy", "spar-k:even:3", "--json"
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["index"] for x in lines] == [0, 1, 2] and [x["id"] for x in lines] == ["q0", "q1", "q2"]
    for p, line in zip(prompts, lines, strict=True):
        alone = json.loads(
            gen(
                qwen_dir, "--prompt-ids", ",".join(map(str, p)), "--speech-policy", "spar-k:even:3", "--json"
            ).stdout
        )
        assert line["tokens"] == alone["tokens"]
    assert lines[0]["stats"]["batch_size"] == 2 and "batch_tokens_per_s" in lines[0]["stats"]
    text = gen(qwen_dir, "--prompts-file", str(f), "--batch-size", "3")
    assert text.exit_code == 0 and text.stdout.count("[") >= 3 and "batch of 3" in text.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt-ids", "1", "--accept", "topk:0"], "K >= 1"),
        (["--prompt-ids", "1", "--accept", "sometimes"], "unknown acceptance rule"),
        (["--prompt-ids", "1", "--repetition-penalty", "0"], "positive"),
        (["--prompt-ids", "1", "--repetition-penalty", "nan"], "finite"),
        (["--prompt-ids", "1", "--batch-size", "2"], "--prompts-file"),
        (["--prompt-ids", "1", "--batch-size", "0"], "at least 1"),
        (["--prompt-ids", "1", "--prompts-file", "x.jsonl"], "exactly one"),
        (["--prompt-ids", "1", "--verify", "--accept", "unit-distance:0.5"], "distance plug-in"),
        (
            ["--prompt-ids", "1", "--unit-distance", "nowhere:thing", "--accept", "unit-distance:1"],
            "cannot import",
        ),
        (["--prompt", "hello", "--history", "h.json"], "chat format"),
        (["--prompt-ids", "1", "--speech-policy", "spar-k:adaptive:2:0"], "KMAX >= 1"),
        (["--prompt-ids", "1", "--device", "cuda"], "CUDA"),
        (["--prompt-ids", "1", "--device", "tpu9"], "unknown device"),
    ],
)
def test_bad_engine_options_exit_2_with_one_sentence(qwen_dir, tmp_path, args, message):
    if "--history" in args:
        (tmp_path / "h.json").write_text(json.dumps([{"role": "user", "text": "hi"}]))
        args = [a if a != "h.json" else str(tmp_path / "h.json") for a in args]
    res = gen(qwen_dir, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_calibrate_command_measures_caches_and_prints(qwen_dir, tmp_path, monkeypatch):
    from sparkee import calibrate

    monkeypatch.setenv("SPARKEE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibrate, "split_half_drift", lambda series: 0.0)  # a busy CI machine caches nothing
    res = runner.invoke(app, ["calibrate", "--model", str(qwen_dir)])
    assert res.exit_code == 0, res.output
    assert "layer passes" in res.output and "predicted speed-up" in res.output
    assert "between the halves of the rounds" in res.output
    files = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(files) == 1
    again = runner.invoke(app, ["calibrate", "--model", str(qwen_dir), "--json"])
    assert json.loads(again.stdout)["key"] == json.loads(files[0].read_text())["key"]
    forced = runner.invoke(app, ["calibrate", "--model", str(qwen_dir), "--force"])
    assert forced.exit_code == 0 and "measuring decode costs" in forced.output
    # a machine whose speed moved, twice: the measurement is reported and not cached
    monkeypatch.setattr(calibrate, "split_half_drift", lambda series: 0.5)
    cached = set((tmp_path / "cache" / "calibration").glob("*.json"))
    busy = runner.invoke(app, ["calibrate", "--model", str(qwen_dir), "--force"])
    assert busy.exit_code == 0 and "UNSTEADY" in busy.output and "not cached" in busy.output
    # --force measured the kernels again: a new choice gives a new calibration key, and the file
    # of the former choice may stay (valid for those kernels); nothing new is written, and the
    # file of this key is gone
    assert set((tmp_path / "cache" / "calibration").glob("*.json")) <= cached
    key = json.loads(runner.invoke(app, ["calibrate", "--model", str(qwen_dir), "--json"]).stdout)["key"]
    assert not store.key_path("calibration", key).exists()


def test_rows_carry_their_acceptance_rule():
    rows = parse_rows("spar-k:FEEE:3+verify=topk:2,spar-k:even:3+verify,spar-k:even:3", num_layers=6)
    assert [r.name for r in rows] == [
        "full",
        "spar-k:FEEE:3+verify=topk:2",
        "spar-k:even:3+verify",
        "spar-k:even:3",
    ]
    assert rows[1].accept == parse_accept("topk:2") and rows[2].accept.lossless and rows[3].accept is None
    assert not Row("full", "full", accept="exact").is_full
    with pytest.raises(SparkeeError, match="unknown acceptance rule"):
        parse_rows("spar-k:even:3+verify=maybe", num_layers=6)
    with pytest.raises(SparkeeError, match=r"\+verify=RULE"):
        parse_rows("spar-k:even:3+verifyx", num_layers=6)
    grid = frontier_rows([2, 4], num_layers=6)
    assert len(grid) == 1 + 2 * 5 * 4 and grid[0].is_full
    assert {r.accept.name for r in grid[1:]} == {"exact", "topk:2", "typical:0.2", "unit-distance:0.5"}


def eval_args(qwen_dir, data, out, *extra):
    plugins = [
        "--transcriber",
        "eval_plugins:id_transcriber",
        "--vocoder",
        "none",
        "--unit-distance",
        "eval_plugins:close_ids",
    ]
    return [
        "eval",
        "--model",
        str(qwen_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        *DECODE,
        *plugins,
        *extra,
    ]


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [
        {"prompt_ids": [5, 6, 7], "question": "q1", "accepted": ["s45"]},
        {"prompt_ids": [1, 2, 3, 4], "question": "q2", "accepted": ["nothing"]},
        {"prompt_ids": [10, 20], "question": "q3", "accepted": ["s50"]},
        {"prompt_ids": [11, 12, 13, 14, 15, 16], "question": "q4", "accepted": ["s51"]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


TIMING = {"speedup", "speedup_wall", "measured_over_predicted", "ttft_s", "predicted_speedup"}
# what the tokens alone decide: all an exact verified row keeps from alone to batched (in a batch
# its refreshes move to the steps its batch-mates run deep, so its schedule figures change)
TOKEN_KEYS = {"policy", "text_policy", "speech_policy", "n", "errors", "accuracy_speech", "accuracy_text",
              "accuracy_asr", "wer", "mos", "speech_frames", "speech_frames_drift", "unit_duration_drift",
              "mean_new_tokens", "pool", "prefill_flops", "kv_bytes"}  # fmt: skip


def comparable(summary_row: dict) -> dict:
    """A summary row's figures that must not change with --batch-size."""
    exact = summary_row["policy"].split("@")[0].endswith("+verify")
    keep = TOKEN_KEYS if exact else set(summary_row) - TIMING
    assert keep <= set(summary_row)
    return {k: v for k, v in summary_row.items() if k in keep}


def test_eval_verified_rows_batches_and_timing_drift(qwen_dir, data, tmp_path):
    pol = "full,spar-k:FEEE:2,spar-k:FEEE:2+verify,spar-k:FEEE:2+verify=topk:3,spar-k:adaptive:2+verify=unit-distance:0"
    one = runner.invoke(app, eval_args(qwen_dir, data, tmp_path / "b1", "--policies", pol))
    assert one.exit_code == 0, one.output
    four = runner.invoke(
        app, eval_args(qwen_dir, data, tmp_path / "b4", "--policies", pol, "--batch-size", "4")
    )
    assert four.exit_code == 0, four.output
    s1 = {s["policy"]: s for s in json.loads((tmp_path / "b1" / "summary.json").read_text())}
    s4 = {s["policy"]: s for s in json.loads((tmp_path / "b4" / "summary.json").read_text())}
    for name in s1:  # batching changes timings only, and the schedule of exact verified rows
        assert comparable(s1[name]) == comparable(s4[name])
    recs = [json.loads(x) for x in (tmp_path / "b4" / "results.jsonl").read_text().splitlines()]
    assert {r["batch"] for r in recs} == {4}
    exact = s1["spar-k:FEEE:2+verify"]
    assert exact["accuracy_speech"] == s1["full"]["accuracy_speech"] and exact["speech_frames_drift"] == 0
    assert exact["unit_duration_drift"] in (0, None)
    tolerant = s1["spar-k:FEEE:2+verify=topk:3"]
    assert tolerant["speech_acceptance"] >= exact["speech_acceptance"]
    assert tolerant["rejected_steps"] <= exact["rejected_steps"]
    # FEEE keeps at most 3 early tokens per refresh; topk:3 keeps at least as many as exact
    assert 0 <= exact["accepted_per_refresh"] <= tolerant["accepted_per_refresh"] <= 3
    table = (tmp_path / "b1" / "table.md").read_text()
    assert "speech acceptance %" in table and "length drift (frames)" in table
    assert (tmp_path / "b1" / "frontier.png").is_file()


def test_batched_eval_predicts_on_the_batch_as_it_measures(qwen_dir, data, tmp_path, monkeypatch):
    """At --batch-size B an example's predicted time is its batch's calibrated time / B, like its
    measured time (a batch-1 prediction beside a batched measurement would mislead)."""
    from sparkee import calibrate, cost

    cal = cost.Calibration(
        key={}, rows=[1, 64], layer_a=[1e-3, 2e-3], layer_c=[1e-4, 1e-4], mat_sizes=[1, 10**9],
        mat_rows=[1, 64], mat_s=[[0.0, 0.0], [0.0, 0.0]], overhead={"full": 5e-3, "early": 1e-3},
    )  # fmt: skip
    monkeypatch.setattr(calibrate, "load_or_calibrate", lambda *a, **k: cal)
    monkeypatch.setenv("SPARKEE_NO_CALIBRATE", "0")
    res = runner.invoke(
        app,
        eval_args(qwen_dir, data, tmp_path / "b4", "--policies", "full,spar-k:FEEE:2", "--batch-size", "4"),
    )
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (tmp_path / "b4" / "results.jsonl").read_text().splitlines()]
    for row in ("full", "spar-k:FEEE:2"):
        pred = {r["stats"]["predicted_s"] for r in recs if r["row"] == row}
        assert len(pred) == 1 and None not in pred  # one batch: one shared share of its time
    one = runner.invoke(app, eval_args(qwen_dir, data, tmp_path / "b1", "--policies", "full,spar-k:FEEE:2"))
    assert one.exit_code == 0, one.output
    recs = [json.loads(x) for x in (tmp_path / "b1" / "results.jsonl").read_text().splitlines()]
    assert len({r["stats"]["predicted_s"] for r in recs if r["row"] == "full"}) > 1  # per example


def test_eval_frontier_grid_and_its_errors(qwen_dir, data, tmp_path):
    out = tmp_path / "fr"
    res = runner.invoke(
        app, eval_args(qwen_dir, data, out, "--frontier", "--frontier-layers", "3", "--limit", "1")
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 + 5 * 4
    assert (out / "frontier.png").is_file()
    bad = runner.invoke(app, eval_args(qwen_dir, data, out, "--frontier", "--policies", "full"))
    assert bad.exit_code == 2 and "leave out --policies" in bad.output
    bad = runner.invoke(
        app, eval_args(qwen_dir, data, tmp_path / "x", "--frontier", "--frontier-layers", "9")
    )
    assert bad.exit_code == 2 and "out of range" in bad.output


def test_demo_batch_size_gives_the_same_table(tmp_path):
    a = runner.invoke(app, ["demo", "--limit", "3", "--out", str(tmp_path / "a"), "--audio-examples", "0"])
    b = runner.invoke(
        app,
        ["demo", "--limit", "3", "--out", str(tmp_path / "b"), "--audio-examples", "0", "--batch-size", "3"],
    )
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [comparable(s) for s in sa] == [comparable(s) for s in sb]
    assert any(s["policy"].endswith("+verify") for s in sa)  # an exact verified row is compared too


def test_train_heads_label_batches_give_the_same_labels(qwen_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt_ids": [k, k + 1, k + 2]}) + "\n" for k in range(3, 30, 3)))
    outs = []
    for bs in ("1", "4"):
        out = tmp_path / f"h{bs}.safetensors"
        res = runner.invoke(
            app,
            ["train-heads", "--model", str(qwen_dir), "--data", str(f), "--layers", "2,4", "--out", str(out),
             "--steps", "3", "--train-batch-size", "16", "--batch-size", bs, *DECODE],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        outs.append(json.loads(out.with_name(out.stem + ".metrics.json").read_text()))
    assert outs[0]["heads"] == outs[1]["heads"]


def test_generate_history_continues_a_glm_dialogue(tmp_path):
    """`--history FILE --prompt TEXT` on a GLM-4-Voice-shaped checkpoint: the prompt is the
    history's turns in the model's chat format plus the new question (models.build_dialogue)."""
    from conftest import tiny_model
    from sparkee import GenerationConfig, generate, load_model, resolve_config
    from sparkee.models import build_dialogue, load_history
    from sparkee.profiles import load_profile
    from test_model_presets import GLM_SPECIALS, make_tokenizer

    tok = make_tokenizer([*GLM_SPECIALS, *(f"<|audio_{i}|>" for i in range(40))])
    d = tmp_path / "glm"
    tiny_model("glm", layers=3, vocab=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    hist = tmp_path / "h.json"
    audio0 = tok.convert_tokens_to_ids("<|audio_0|>")
    hist.write_text(
        json.dumps(
            {"turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "ids": [audio0 + 3, 40]}]}
        )
    )
    args = [
        "generate",
        "--preset",
        "glm-4-voice",
        "--model",
        str(d),
        "--history",
        str(hist),
        "--prompt",
        "and?",
        "--speech-policy",
        "spar-k:even:2",
        "--speech-ids",
        f"{audio0}:{audio0 + 40}",  # the tiny tokenizer has 40 audio tokens, not 16384
    ]
    res = runner.invoke(app, [*args, "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    bb = load_model(d)
    ids = build_dialogue("glm-4-voice", load_history(hist, "glm-4-voice").ask(text="and?"), tok, d)
    assert (
        tok.convert_tokens_to_ids("<|assistant|>") in ids
        and ids.count(tok.convert_tokens_to_ids("<|user|>")) == 2
    )
    cfg = resolve_config(
        load_profile(d, "glm-4-voice", bb),
        {"max_new_tokens": 6, "speech_policy": "spar-k:even:2", "speech_ids": (audio0, audio0 + 40)},
    )
    assert out["tokens"] == generate(bb, ids, GenerationConfig(**{**cfg.__dict__, "calibrate": False})).tokens
    # a history that names another model is refused in one sentence
    hist.write_text(json.dumps({"model": "step-audio-2-mini", "turns": [{"role": "user", "text": "hi"}]}))
    bad = runner.invoke(app, [*args, "--max-new-tokens", "2"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_eval_data_lines_carry_a_history(tmp_path):
    from sparkee.models import build_dialogue, parse_dialogue
    from sparkee.profiles import load_profile
    from test_model_presets import GLM_SPECIALS, make_tokenizer

    tok = make_tokenizer([*GLM_SPECIALS, *(f"<|audio_{i}|>" for i in range(40))])
    d = tmp_path / "glm"
    d.mkdir()
    tok.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"architectures": ["GlmForCausalLM"], "num_hidden_layers": 3}))
    history = [{"role": "user", "speech": [1, 2, 3]}, {"role": "assistant", "text": "fine"}]
    data = tmp_path / "qa.jsonl"
    data.write_text(
        json.dumps({"history": history, "prompt": "and now?", "accepted": ["x"], "id": "h1"}) + "\n"
    )
    items = load_profile(d, "glm-4-voice").prompts(str(data))
    expect = build_dialogue(
        "glm-4-voice", parse_dialogue(history, "glm-4-voice").ask(text="and now?"), tok, d
    )
    assert items[0].ids == expect and items[0].meta["id"] == "h1" and "history" not in items[0].meta
    plain = load_profile(tmp_path / "nowhere")
    with pytest.raises(SparkeeError, match="chat format"):
        plain.prompts(str(data))
