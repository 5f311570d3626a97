"""`sparkee eval` on a tiny model: Table 2 outputs, resume, per-example errors, HTTP judge, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from conftest import tiny_model
from sparkee import ExitHeads, parse_policy, wrap_model
from sparkee.cli import app
from sparkee.errors import SparkeeError
from sparkee.eval.harness import Row, parse_rows, summarize

runner = CliRunner()
DECODE = ["--interleave", "2:4", "--speech-ids", "40:80", "--max-new-tokens", "18", "--stop-ids", "1"]
PLUGINS = ["--transcriber", "eval_plugins:id_transcriber", "--vocoder", "eval_plugins:tone_vocoder"]


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [
        {"prompt_ids": [5, 7, 9], "question": "q1", "accepted": ["s45"]},
        {"prompt_ids": [1, 2, 3, 4], "question": "q2", "accepted": ["nothing"]},
        {"prompt_ids": [10, 20], "question": "q3", "accepted": ["s50"]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def run_eval(qwen_dir, data, out, *extra):
    args = ["eval", "--model", str(qwen_dir), "--data", str(data), "--out", str(out)]
    return runner.invoke(app, args + DECODE + PLUGINS + list(extra))


def test_parse_rows_adds_full_text_rows_and_sweeps():
    rows = parse_rows("spar-k:even:4,spar-k:even:3|fixed:2", sweep="2:4", num_layers=6)
    assert rows[0] == Row("full", "full")
    names = [r.name for r in rows]
    assert names == ["full", "spar-k:even:4", "spar-k:even:2", "spar-k:even:3", "spar-k:even:3|fixed:2",
                     "spar-k:even:3|fixed:3"]  # fmt: skip
    swept = parse_rows("confidence:4:0.5", sweep="2:3", num_layers=6)[-1].speech
    assert swept == parse_policy("confidence:2:0.5")  # a sweep is the policy at another layer, named so
    assert parse_policy("spar-k:adaptive:4:6").with_layer(2) == parse_policy("spar-k:adaptive:2:6")
    with pytest.raises(SparkeeError, match="out of range"):
        parse_rows("fixed:9", num_layers=6)
    with pytest.raises(SparkeeError, match="needs A < B"):
        parse_rows("fixed:4", sweep="3:1", num_layers=6)
    with pytest.raises(SparkeeError, match="needs A < B"):
        parse_rows("fixed:4", sweep="3:3", num_layers=6)


def test_eval_writes_table_plots_report_and_resumes(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    res = run_eval(qwen_dir, data, out, "--policies", "full,fixed:3,spar-k:even:3", "--audio-examples", "2")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["policy"] for s in summary] == ["full", "fixed:3", "spar-k:even:3"]
    full = summary[0]
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by_row = {row: [r for r in recs if r["row"] == row] for row in ("full", "fixed:3", "spar-k:even:3")}
    # measured speed-up: summed decode time of the full row over that of the row, example by
    # example (the prefill is the same for every row and reported apart); the wall-clock one beside
    decode = {row: sum(r["stats"]["decode_s"] for r in rs) for row, rs in by_row.items()}
    assert summary[1]["speedup"] == pytest.approx(decode["full"] / decode["fixed:3"])
    wall = {row: sum(r["wall_s"] for r in rs) for row, rs in by_row.items()}
    assert summary[1]["speedup_wall"] == pytest.approx(wall["full"] / wall["fixed:3"])
    # alignment WER: the speech transcripts against the row's own text (jiwer, non-empty texts)
    import jiwer

    pairs = [(r["text"], r["speech_transcript"]) for r in by_row["fixed:3"] if r["text"].strip()]
    assert summary[1]["wer"] == pytest.approx(jiwer.wer([a for a, _ in pairs], [b for _, b in pairs]))
    # accuracy: the contains judge (accepted answer as whole words) on each transcript, averaged
    accepted = {0: "s45", 1: "nothing", 2: "s50"}
    for r in recs:
        assert r["speech_ok"] is (accepted[r["example"]] in r["speech_transcript"].split())
    assert full["accuracy_speech"] == pytest.approx(sum(r["speech_ok"] for r in by_row["full"]) / 3)
    assert full["avg_exit_layer_speech"] == 6 and full["speech_depth_reduction_pct"] == 0
    assert summary[1]["avg_exit_layer_speech"] == 3.0  # fixed exit: every speech step at 3
    assert 3 < summary[2]["avg_exit_layer_speech"] < 6
    for s in summary:
        assert s["n"] == 3 and s["errors"] == 0
    for f in (
        "table.md",
        "table.csv",
        "results.jsonl",
        "report.html",
        "quality_vs_depth.png",
        "timeline.png",
    ):
        assert (out / f).is_file(), f
    assert len(list((out / "audio").rglob("*.wav"))) == 3 * 2  # 3 rows x 2 examples kept
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 9
    # rerun with one more row: only that row's examples are decoded
    res = run_eval(qwen_dir, data, out, "--policies", "full,fixed:3,spar-k:even:3,spar-k:triple:3")
    assert res.exit_code == 0, res.output
    assert len((out / "results.jsonl").read_text().splitlines()) == 12
    assert (out / "results.jsonl").read_text().splitlines()[:9] == lines


def test_an_example_that_raises_is_recorded_and_the_run_goes_on(qwen_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + json.dumps({"prompt_ids": [5000], "accepted": ["x"]}) + "\n")
    out = tmp_path / "ev"
    res = run_eval(qwen_dir, bad, out, "--policies", "full")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    errs = [r for r in recs if "error" in r]
    assert len(errs) == 1 and "outside the vocabulary" in errs[0]["error"]
    assert json.loads((out / "summary.json").read_text())[0]["n"] == 3


class JudgeHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        JudgeHandler.seen.append((self.path, prompt))
        verdict = "YES" if "Question: q1" in prompt else "NO"
        reply = {"choices": [{"message": {"role": "assistant", "content": verdict}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_judge_through_an_openai_compatible_endpoint(qwen_dir, data, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        res = run_eval(qwen_dir, data, tmp_path / "ev", "--policies", "full", "--judge-url", url)
        assert res.exit_code == 0, res.output
    finally:
        server.shutdown()
    assert JudgeHandler.seen and all(path == "/v1/chat/completions" for path, _ in JudgeHandler.seen)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary[0]["accuracy_text"] == pytest.approx(1 / 3)  # the judge says YES to q1 only


def test_bad_eval_inputs(qwen_dir, data, tmp_path):
    res = run_eval(qwen_dir, data, tmp_path / "e", "--policies", "fixed:99")
    assert res.exit_code == 2 and "out of range" in res.stderr
    res = run_eval(
        qwen_dir, data, tmp_path / "e", "--policies", "full", "--transcriber", "no_such_module:thing"
    )
    assert res.exit_code == 2 and "cannot import transcriber plug-in" in res.stderr
    res = runner.invoke(
        app, ["eval", "--model", str(qwen_dir), "--data", str(data), "--out", str(tmp_path / "e"), *DECODE]
    )
    assert res.exit_code == 2 and "speech needs a transcript" in res.stderr


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)"
)
def test_report_loads_in_headless_chromium(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    assert (
        run_eval(qwen_dir, data, out, "--policies", "full,spar-k:odd:2", "--audio-examples", "2").exit_code
        == 0
    )
    profile = tmp_path / "chrome-profile"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
           (out / "report.html").as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'id="selfcheck"' in dom
    assert 'data-ok="true"' in dom, dom[-1500:]
    assert 'data-rows="2"' in dom and 'data-images="2"' in dom and 'data-audio="4"' in dom


def test_prefill_pool_sweep_rows(qwen_dir, tmp_path):
    data = tmp_path / "speechy.jsonl"
    data.write_text(json.dumps({"prompt_ids": [3, 41, 41, 42, 42, 43, 5], "accepted": ["s45"]}) + "\n")
    out = tmp_path / "ev"
    res = run_eval(
        qwen_dir, data, out, "--policies", "full", "--prefill-pool", "in=1.01,deep=1.01@3", "--prefill-pool",
        "in=-1,deep=-1@3",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = {s["policy"]: s for s in json.loads((out / "summary.json").read_text())}
    assert set(summary) == {"full", "full pool(in=1.01,deep=1.01@3)", "full pool(in=-1,deep=-1@3)"}
    assert summary["full pool(in=1.01,deep=1.01@3)"]["prefill_flops_reduction_pct"] == pytest.approx(0.0)
    assert summary["full pool(in=-1,deep=-1@3)"]["prefill_flops_reduction_pct"] > 20
    assert summary["full pool(in=-1,deep=-1@3)"]["prompt_len_last_layer"] == 3
    assert "prefill FLOPs red. %" in (out / "table.md").read_text()


def test_waveform_asr_and_mos_run_after_decoding(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    args = [
        "eval",
        "--model",
        str(qwen_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--policies",
        "full,fixed:3",
    ]
    args += DECODE + ["--vocoder", "eval_plugins:tone_vocoder", "--asr", "eval_plugins:tone_asr"]
    args += ["--mos", "eval_plugins:loudness_mos", "--audio-examples", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    final = {r["key"]: r for r in lines}  # later lines replace earlier ones
    assert len(final) == 6
    from eval_plugins import id_transcriber

    for r in final.values():
        speech = [t for t in r["tokens"] if 40 <= t < 80]
        if speech:  # the ASR heard back exactly the speech ids, and judged the speech by it
            assert r["asr_transcript"] == r["speech_transcript"] == id_transcriber(speech)
            assert 1 <= r["mos"] <= 5 and not r["audio_pending"] and "pending_wav" not in r
    assert not (out / ".pending-audio").exists() or not list((out / ".pending-audio").rglob("*.wav"))
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["n"] == 3 and s["mos"] is not None and s["accuracy_asr"] is not None for s in summary)


def test_resume_refuses_other_settings_and_fresh_starts_over(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    assert run_eval(qwen_dir, data, out, "--policies", "full").exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest) >= {"model", "heads", "data", "decoding", "verify", "measures", "code"}
    # the same settings resume (nothing to redo); other decoding, heads or data are refused
    assert run_eval(qwen_dir, data, out, "--policies", "full").exit_code == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(json.dumps({"prompt_ids": [9, 9], "accepted": ["x"]}) + "\n")
    heads = ExitHeads(wrap_model(tiny_model("qwen2")), "tuned-lens", [3]).save(tmp_path / "h.safetensors")
    for extra, what in (
        (["--max-new-tokens", "12"], "decoding"),  # a later option replaces DECODE's
        (["--heads", str(heads)], "heads"),
        (["--verify"], "verify"),
        (["--judge-url", "http://127.0.0.1:9/v1"], "measures"),
    ):
        res = run_eval(qwen_dir, data, out, "--policies", "full", *extra)
        assert res.exit_code == 2, (what, res.output)
        assert f"other settings ({what})" in res.stderr and "--fresh" in res.stderr
    res = run_eval(qwen_dir, other_data, out, "--policies", "full")
    assert res.exit_code == 2 and "other settings (data)" in res.stderr
    # --limit takes a prefix of the same data: that resumes
    assert run_eval(qwen_dir, data, out, "--policies", "full", "--limit", "2").exit_code == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines
    res = run_eval(qwen_dir, data, out, "--policies", "full", "--max-new-tokens", "12", "--fresh")
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["tokens"]) <= 12 for r in recs)
    res = run_eval(qwen_dir, data, tmp_path / "h.safetensors", "--policies", "full")
    assert res.exit_code == 2 and "is a file" in res.stderr


def test_failures_are_counted_retried_and_a_dead_row_exits_1(qwen_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [5000], "accepted": ["x"]}) + "\n")
    out = tmp_path / "ev"
    res = run_eval(qwen_dir, bad, out, "--policies", "full")
    assert res.exit_code == 1
    assert "1 of 1 runs failed" in res.stderr and "outside the vocabulary" in res.stderr
    assert "every example failed in row 'full'" in res.stderr
    # a rerun tries the failed example again (a second error line), and still fails
    assert run_eval(qwen_dir, bad, out, "--policies", "full").exit_code == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_a_torn_last_line_is_dropped_and_redone(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    assert run_eval(qwen_dir, data, out, "--policies", "full").exit_code == 0
    path = out / "results.jsonl"
    whole = path.read_text()
    path.write_text(whole[: len(whole) - 40])  # a kill in the middle of the last line
    assert run_eval(qwen_dir, data, out, "--policies", "full").exit_code == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(isinstance(json.loads(x), dict) for x in lines)
    assert lines[:2] == whole.splitlines()[:2]


@pytest.mark.parametrize("line", ["[5, 7]", "5", '"text"', "null"])
def test_a_jsonl_line_that_is_not_an_object_is_refused(qwen_dir, tmp_path, line):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_ids": [5, 7]}) + "\n" + line + "\n")
    res = run_eval(qwen_dir, bad, tmp_path / "ev", "--policies", "full")
    assert res.exit_code == 2 and "line 2 of" in res.stderr and "is not a JSON object" in res.stderr


def test_data_without_answers_scores_n_a(qwen_dir, tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in ([5, 7], [9, 3])))
    out = tmp_path / "ev"
    assert run_eval(qwen_dir, plain, out, "--policies", "full").exit_code == 0
    s = json.loads((out / "summary.json").read_text())[0]
    assert s["accuracy_text"] is None and s["accuracy_speech"] is None
    assert "| n/a | n/a |" in (out / "table.md").read_text()


def _record(example: int, layers: list[int], modalities: str, agreement: float | None) -> dict:
    return {
        "row": "fixed:3",
        "example": example,
        "exit_layers": layers,
        "modalities": list(modalities),
        "tokens": [1] * len(layers),
        "text": "a b",
        "speech_transcript": "a b",
        "text_ok": None,
        "speech_ok": None,
        "wall_s": 1.0,
        "stats": {
            "speech_agreement": agreement,
            "early_steps": sum(layer < 6 for layer in layers),
            "flops": 1.0,
            "flops_full_estimate": 1.0,
            "weight_reads": 1.0,
            "weight_reads_full_estimate": 1.0,
            "verify_rejections": 0,
            "prefill_flops": 1.0,
            "kv_bytes": 1,
            "prefill_s": 0.1,
            "prompt_len_last_layer": 2,
        },
    }


def test_speech_agreement_is_weighted_by_early_speech_steps():
    # example 0: one early speech step (agreement 0) and four early text steps; example 1: two
    # early speech steps, both agreeing. Over early speech steps that is 2 of 3.
    recs = [
        _record(0, [3, 3, 3, 3, 3], "tttts", 0.0),
        _record(1, [3, 3, 6], "sst", 1.0),
    ]
    (line,) = summarize(recs, [Row("full", "fixed:3")], num_layers=6)
    assert line["speech_agreement"] == pytest.approx(2 / 3)


def test_wer_leaves_out_answers_without_text():
    recs = [_record(0, [6, 6], "ts", None), _record(1, [6, 6], "ts", None)]
    recs[0]["text"], recs[0]["speech_transcript"] = "", "s1 s2 s3 s4"  # nothing to align against
    recs[1]["speech_transcript"] = "a c"
    (line,) = summarize(recs, [Row("full", "fixed:3")], num_layers=6)
    assert line["wer"] == pytest.approx(0.5)
    recs = [recs[0]]
    assert summarize(recs, [Row("full", "fixed:3")], num_layers=6)[0]["wer"] is None


def test_rows_may_name_their_own_heads(qwen_dir, data, tmp_path):
    """`@HEADS` gives one row heads of its own, beside the run's --heads, in one timed run."""
    from sparkee import load_model

    bb = load_model(qwen_dir)
    adapter = ExitHeads(bb, "adapter", [2]).save(tmp_path / "adapter.safetensors")
    row = parse_rows(f"spar-k:FEE:2+verify@{adapter}", num_layers=6)[1]
    assert row.heads == str(adapter) and row.name == "spar-k:FEE:2+verify@adapter"
    assert parse_rows("spar-k:FEE:2@bundled", sweep="3:4", num_layers=6)[-1].heads == "bundled"
    out = tmp_path / "ev"
    policies = f"full,spar-k:FEE:2+verify,spar-k:FEE:2+verify@{adapter}"
    res = run_eval(qwen_dir, data, out, "--policies", policies, "--audio-examples", "0")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by_row = {}
    for r in lines:
        by_row.setdefault(r["row"], []).append(r["tokens"])
    assert set(by_row) == {"full", "spar-k:FEE:2+verify", "spar-k:FEE:2+verify@adapter"}
    assert by_row["spar-k:FEE:2+verify@adapter"] == by_row["full"] == by_row["spar-k:FEE:2+verify"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["row_heads"][str(adapter)].startswith("adapter:")
    for bad in (f"spar-k:FEE:2@{tmp_path / 'missing.safetensors'}", "spar-k:FEE:2@", "spar-k:FEE:2@bundled"):
        res = run_eval(qwen_dir, data, tmp_path / "bad", "--policies", bad)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
