"""`sparkee eval` on a tiny model: Table 2 outputs, resume, per-example errors, HTTP judge, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from sparkee.cli import app
from sparkee.errors import SparkeeError
from sparkee.eval.harness import Row, parse_rows

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
    assert parse_rows("confidence:4:0.5", sweep="2:3", num_layers=6)[-1].speech == "confidence:2:0.5"
    with pytest.raises(SparkeeError, match="out of range"):
        parse_rows("fixed:9", num_layers=6)


def test_eval_writes_table_plots_report_and_resumes(qwen_dir, data, tmp_path):
    out = tmp_path / "ev"
    res = run_eval(qwen_dir, data, out, "--policies", "full,fixed:3,spar-k:even:3", "--audio-examples", "2")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["policy"] for s in summary] == ["full", "fixed:3", "spar-k:even:3"]
    full = summary[0]
    assert full["speedup"] == pytest.approx(1.0)
    assert isinstance(full["wer"], float)
    assert full["avg_exit_layer_speech"] == 6 and full["speech_depth_reduction_pct"] == 0
    assert summary[1]["avg_exit_layer_speech"] == 3.0  # fixed exit: every speech step at 3
    assert 3 < summary[2]["avg_exit_layer_speech"] < 6
    for s in summary:
        assert s["n"] == 3 and s["errors"] == 0
        assert 0 <= s["accuracy_speech"] <= 1 and 0 <= s["accuracy_text"] <= 1
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
