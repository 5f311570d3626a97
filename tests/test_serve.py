"""`sparkee serve`: the OpenAI schema, continuous batching without cross-talk, cancellation,
admission, audio, metrics and one-sentence errors. Servers run on loopback in this process
(uvicorn in a thread, port 0) or, for SIGTERM, as a `sparkee serve` subprocess."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import tiny_model  # noqa: E402
from sparkee import GenerationConfig, generate, load_model, resolve_heads, wrap_model  # noqa: E402
from sparkee.profiles import ModelProfile, load_profile, resolve_config  # noqa: E402
from sparkee.refslm import bundled_model_dir  # noqa: E402
from sparkee.refslm.audio import espeak_available  # noqa: E402
from sparkee.refslm.data import load_split  # noqa: E402
from sparkee.serve import build_server, uvicorn_server  # noqa: E402

REF_DIR = bundled_model_dir()
QUESTIONS = [e.question for e in load_split("test")[:8]]
VERIFIED = {"speech_policy": "spar-k:FEEE:4", "verify": True, "accept": "exact"}
POLICIES = [{}, {"speech_policy": "spar-k:even:12"}, VERIFIED]


def wait_for(cond, what: str, limit_s: float = 20.0):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Running:
    """A server in a thread of this process."""

    def __init__(self, server) -> None:
        self.server = server
        self.uv = uvicorn_server(server, "127.0.0.1", 0, log_level="warning")
        self.thread = threading.Thread(target=self.uv.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.uv.started, "the server to start")
        port = self.uv.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        wait_for(lambda: self.http.get("/health").status_code == 200, "/health")

    def stop(self) -> None:
        self.server.worker.pause(False)
        self.http.close()
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()

    def health(self) -> dict:
        return self.http.get("/health").json()


@pytest.fixture(scope="module")
def ref():
    bb = load_model(REF_DIR)
    profile = load_profile(REF_DIR, bb=bb)
    cfg = resolve_config(profile, {})
    heads = resolve_heads(str(profile.heads), bb)
    r = Running(build_server(bb, heads, profile, cfg, max_batch_size=8, max_queue=8))
    r.bb, r.heads, r.profile = bb, heads, profile
    yield r
    r.stop()


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model with no stop token (answers run to max_tokens): one row, one waiting."""
    bb = wrap_model(tiny_model("qwen2", layers=4))
    profile = ModelProfile("tiny", None, GenerationConfig(max_new_tokens=16))
    r = Running(build_server(bb, None, profile, profile.defaults, "tiny", max_batch_size=1, max_queue=1))
    r.bb = bb
    yield r
    r.stop()


def solo(r: Running, question: str, sparkee: dict | None = None, **cfg_changes):
    """The answer decoded alone, in this process, with the server's own config."""
    cfg = replace(r.server.cfg, **(sparkee or {}), **cfg_changes)
    return generate(r.bb, r.profile.encode_text(question), cfg, r.heads)


def chat(r: Running, question: str, **body):
    body = {"model": "refslm", "messages": [{"role": "user", "content": question}], **body}
    return r.http.post("/v1/chat/completions", json=body)


def sse(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models(ref):
    h = ref.health()
    assert h["status"] == "ready" and h["model"] == "refslm" and h["max_batch_size"] == 8
    models = ref.http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["refslm"] and models["object"] == "list"


def test_openai_client_gets_the_same_text_streaming_and_not(ref):
    client = openai.OpenAI(base_url=ref.url + "/v1", api_key="unused", max_retries=0)
    q = QUESTIONS[0]
    msgs = [{"role": "user", "content": q}]
    whole = client.chat.completions.create(model="refslm", messages=msgs, max_tokens=120, temperature=0)
    parts, finish, stats = [], None, None
    for chunk in client.chat.completions.create(
        model="refslm", messages=msgs, max_tokens=120, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish, stats = chunk.choices[0].finish_reason, chunk.model_extra.get("sparkee")
    text = whole.choices[0].message.content
    assert text and "".join(parts) == text
    assert text == ref.profile.describe(solo(ref, q, max_new_tokens=120).tokens, ref.server.cfg)["text"]
    assert finish == whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(solo(ref, q, max_new_tokens=120).tokens)
    assert stats["avg_exit_layer_speech"] == 16 and whole.model_extra["sparkee"]["num_layers"] == 16


def test_eight_concurrent_clients_each_get_their_solo_answer(ref):
    jobs = [(q, POLICIES[n % 3], n % 2 == 1) for n, q in enumerate(QUESTIONS)]

    def ask(job):
        q, pol, stream = job
        body = {"max_tokens": 150, "sparkee": pol | {"return_tokens": True}}
        if not stream:
            return chat(ref, q, **body).json()["sparkee"]["tokens"]
        with ref.http.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": q}], "stream": True, **body},
        ) as resp:
            events = sse(resp.iter_lines())
        assert events[-1] == "[DONE]"
        return events[-2]["sparkee"]["tokens"]

    before = ref.server.metrics.batch_size.collect()[0].samples
    ref.server.worker.pause()  # all eight join the batch at one step boundary
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, j) for j in jobs]
            wait_for(lambda: ref.health()["waiting"] == 8, "eight waiting requests")
            ref.server.worker.pause(False)
            got = [f.result(timeout=120) for f in futures]
    finally:
        ref.server.worker.pause(False)
    for (q, pol, _), tokens in zip(jobs, got, strict=True):
        assert tokens == solo(ref, q, pol, max_new_tokens=150).tokens, (q, pol)
    after = ref.server.metrics.batch_size.collect()[0].samples
    le = lambda samples, b: next(s.value for s in samples if s.labels.get("le") == b)  # noqa: E731
    assert le(after, "+Inf") - le(after, "6.0") > le(before, "+Inf") - le(before, "6.0")  # a batch of 7-8 ran


def test_verified_exact_rule_equals_full_depth(ref):
    for q in QUESTIONS[:3]:
        full = chat(ref, q, max_tokens=150, sparkee={"return_tokens": True}).json()
        ver = chat(ref, q, max_tokens=150, sparkee=VERIFIED | {"return_tokens": True}).json()
        assert ver["sparkee"]["tokens"] == full["sparkee"]["tokens"]
        assert ver["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]
        assert ver["sparkee"]["avg_exit_layer_speech"] < 16 and 0 < ver["sparkee"]["speech_acceptance"] <= 1


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng and sox are needed for audio")
def test_audio_non_streaming_and_streaming(ref):
    q = QUESTIONS[1]
    body = {
        "max_tokens": 150,
        "modalities": ["text", "audio"],
        "audio": {"voice": "default", "format": "wav"},
    }
    msg = chat(ref, q, **body).json()["choices"][0]["message"]
    text = ref.profile.describe(solo(ref, q, max_new_tokens=150).tokens, ref.server.cfg)["text"]
    assert msg["content"] is None and msg["audio"]["transcript"] == text
    with wave.open(io.BytesIO(base64.b64decode(msg["audio"]["data"]))) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getnframes() > 1600
        whole = w.readframes(w.getnframes())
    with ref.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": q}], "stream": True, **body},
    ) as resp:
        events = sse(resp.iter_lines())
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    chunks = [d["audio"]["data"] for d in deltas if "audio" in d and "data" in d["audio"]]
    transcript = "".join(d["audio"].get("transcript", "") for d in deltas if "audio" in d)
    assert transcript == text and len(chunks) >= 2  # vocoded piece by piece
    pcm = b""
    for c in chunks:
        with wave.open(io.BytesIO(base64.b64decode(c))) as w:
            pcm += w.readframes(w.getnframes())
    assert len(pcm) == len(whole)  # the same pieces (sox dithers: samples differ in the last bit)
    stats = events[-2]["sparkee"]
    assert 0 < stats["time_to_first_audio_s"] < 60  # seconds from the request, on loopback


def test_metrics_report_latencies_batches_and_speech(ref):
    chat(ref, QUESTIONS[2], max_tokens=100, sparkee=VERIFIED)
    text = ref.http.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for name in (
        "sparkee_time_to_first_token_seconds_count",
        "sparkee_inter_token_latency_seconds_count",
        "sparkee_batch_size_count",
        "sparkee_generated_tokens_total",
        "sparkee_speech_acceptance_count",
        "sparkee_speech_depth_saved_ratio_count",
    ):
        assert values.get(name, 0) > 0, name
    assert "sparkee_requests_running" in values and "sparkee_requests_waiting" in values
    assert "sparkee_tokens_per_second" in values
    if espeak_available():
        assert values["sparkee_time_to_first_audio_seconds_count"] > 0


def test_a_dropped_client_frees_its_row_and_the_next_request_is_unaffected(tiny):
    w = tiny.server.worker
    rows_before, asked_before = w.cancelled_rows, w.cancel_requests
    try:
        with tiny.http.stream(
            "POST", "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 400, "stream": True}
        ) as resp:
            for line in resp.iter_lines():
                if '"token"' in line:  # the row is decoding
                    w.pause()  # hold it between two steps while the client goes away
                    break
        wait_for(lambda: w.cancel_requests > asked_before, "the server to notice the dropped client")
        assert tiny.health()["running"] == 1
    finally:
        w.pause(False)
    wait_for(lambda: tiny.health()["running"] == 0, "the row to be freed")
    assert w.cancelled_rows == rows_before + 1 and tiny.server.engine.free_slots() == 1
    out = tiny.http.post("/v1/completions", json={"prompt": [9, 4], "max_tokens": 12}).json()
    assert out["sparkee"]["tokens"] == generate(tiny.bb, [9, 4], GenerationConfig(max_new_tokens=12)).tokens


def test_a_full_queue_answers_429_with_retry_after(tiny):
    w = tiny.server.worker
    body = {"prompt": [3, 4, 5], "max_tokens": 8}
    w.pause()
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(tiny.http.post, "/v1/completions", json=body) for _ in range(2)]
            wait_for(lambda: tiny.health()["waiting"] == 2, "a taken row and a full queue")
            r = tiny.http.post("/v1/completions", json=body)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
            w.pause(False)
            done = [f.result(timeout=60) for f in waiting]
    finally:
        w.pause(False)
    want = generate(tiny.bb, [3, 4, 5], GenerationConfig(max_new_tokens=8)).tokens
    assert [d.status_code for d in done] == [200, 200]
    assert [d.json()["sparkee"]["tokens"] for d in done] == [want, want]


def one_sentence(msg: str) -> bool:
    return bool(re.fullmatch(r"[^\n]+[.?!]", msg)) and not re.search(r"[.!?]\s+[A-Z]", msg)


MSG = [{"role": "user", "content": "tell me one plus two"}]
BAD = [
    (b'{"messages": [', 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": "refslm"}, 400, "messages", "missing"),
    ({"messages": []}, 400, "messages", "at least one"),
    ({"messages": "hello"}, 400, "messages", None),
    ({"messages": MSG, "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"messages": MSG, "temperature": "hot"}, 400, "temperature", None),
    ({"messages": MSG, "stream": "yes"}, 400, "stream", None),
    ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": MSG, "max_tokens": 100000}, 400, "max_tokens", "at most"),
    ({"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens", None),
    ({"messages": MSG, "model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"messages": MSG, "sparkee": {"speech_policy": "spar-k:zz:4"}}, 400, "sparkee.speech_policy", None),
    ({"messages": MSG, "sparkee": {"speech_policy": "fixed:99"}}, 400, "sparkee.speech_policy", "layer"),
    ({"messages": MSG, "sparkee": {"text_policy": "sometimes"}}, 400, "sparkee.text_policy", None),
    ({"messages": MSG, "sparkee": {"accept": "topk:x"}}, 400, "sparkee.accept", None),
    ({"messages": MSG, "sparkee": {"verify": "yes"}}, 400, "sparkee.verify", None),
    ({"messages": MSG, "sparkee": {"speed": 2}}, 400, "sparkee.speed", "Unknown field"),
    ({"messages": MSG, "temperature": -1}, 400, None, "temperature"),
    ({"messages": MSG, "top_p": 0}, 400, None, "top_p"),
    ({"messages": [{"role": "user", "content": "tell me xylophone"}]}, 400, "messages", "xylophone"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", "user"),
    ({"messages": MSG, "audio": {"format": "wav"}}, 400, "modalities", None),
    (
        {"messages": MSG, "audio": {"format": "mp3"}, "modalities": ["text", "audio"]},
        400,
        "audio.format",
        None,
    ),
    ({"messages": MSG, "n": 2}, 400, "n", None),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD)
def test_bad_requests_get_an_openai_style_error_in_one_sentence(ref, body, status, param, words):
    if isinstance(body, bytes):
        r = ref.http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = ref.http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert one_sentence(err["message"]), err["message"]
    if words:
        assert words in err["message"], err["message"]


def test_completions_take_token_ids_and_refuse_bad_ones(tiny):
    r = tiny.http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "total_tokens": 8,
    }
    assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["finish_reason"] == "length"
    for body, param in (
        ({"prompt": [1, 999], "max_tokens": 5}, "prompt"),
        ({"prompt": [], "max_tokens": 5}, "prompt"),
        ({"prompt": [1, -2]}, "prompt.1"),
        ({"prompt": "some text"}, "prompt"),  # no tokenizer: ids only
    ):
        r = tiny.http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert one_sentence(r.json()["error"]["message"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sparkee_serve_command_starts_and_sigterm_finishes_in_flight_requests(tmp_path):
    port = free_port()
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sparkee.cli", "serve", "--model", str(REF_DIR), "--heads", "bundled"]
    cmd += ["--port", str(port), "--max-batch-size", "2", "--vocoder", "none"]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, Path(tmp_path / "serve.log").read_text()
                return False

        wait_for(ready, "sparkee serve to be ready", 90)
        body = {"messages": MSG, "stream": True, "max_tokens": 150}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            first = [next(lines) for _ in range(2)]  # the role chunk, then the first text
            proc.send_signal(signal.SIGTERM)
            events = sse(first + list(lines))
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        assert proc.wait(timeout=60) == 0
        assert "request" in (tmp_path / "serve.log").read_text()  # the request's log line
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_serve_command_refuses_bad_options_in_one_sentence():
    from typer.testing import CliRunner

    from sparkee.cli import app

    for args, words in (
        (["--speech-policy", "spar-k:zz:4"], "pattern"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--prefill-batch", "0"], "--prefill-batch"),
        (["--port", "70000"], "--port"),
        (["--accept", "topk:x"], None),
    ):
        res = CliRunner().invoke(app, ["serve", "--model", str(REF_DIR), *args])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert line.startswith("error: ") and "\n" not in line, line
        if words:
            assert words in line, line


def test_serve_help_fits_80_columns():
    from typer.testing import CliRunner

    from sparkee.cli import app

    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0 and "--max-batch-size" in res.output and "--served-model-name" in res.output
    assert "--prefill-batch" in res.output
    assert "\u2026" not in res.output  # no word cut by rich


def test_an_api_key_guards_the_api_but_not_health(tiny):
    tiny.server.api_key = "sesame"
    try:
        body = {"prompt": [1, 2], "max_tokens": 2}
        r = tiny.http.post("/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert one_sentence(r.json()["error"]["message"])
        ok = tiny.http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert tiny.http.get("/health").status_code == 200
    finally:
        tiny.server.api_key = None


def test_messages_become_the_presets_chat_prompts(tmp_path):
    """One user turn: the preset's chat template (as `generate --prompt`); several: its dialogue
    builder (as `--history`), with the system message as the dialogue's system prompt."""
    from test_model_presets import GLM_SPECIALS, make_tokenizer

    d = tmp_path / "glm"
    tok = make_tokenizer([*GLM_SPECIALS, *(f"<|audio_{i}|>" for i in range(40))])
    tok.save_pretrained(d)
    tiny_model("qwen2", layers=3, vocab=len(tok)).save_pretrained(d)
    bb = load_model(d)
    profile = load_profile(d, "glm-4-voice", bb)
    over = {"temperature": 0.0, "max_new_tokens": 6, "speech_policy": "full", "speech_ids": (110, len(tok))}
    cfg = resolve_config(profile, over)
    r = Running(build_server(bb, None, profile, cfg, max_batch_size=2))
    try:
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        cases = [
            ([{"role": "user", "content": "and now?"}], profile.encode_text("and now?")),
            (
                [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "and now?"}],
                profile.encode_dialogue(
                    {
                        "system": "Be brief.",
                        "turns": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}],
                    },
                    text="and now?",
                ),
            ),
        ]
        for messages, want in cases:
            body = {"messages": messages, "max_tokens": 6, "sparkee": {"return_tokens": True}}
            out = r.http.post("/v1/chat/completions", json=body).json()
            assert out["usage"]["prompt_tokens"] == len(want), out
            assert (
                out["sparkee"]["tokens"] == generate(bb, want, replace(r.server.cfg, max_new_tokens=6)).tokens
            )
        text = tok.decode(cases[1][1]).replace(" ", "")
        assert (
            "Bebrief." in text
            and "hello" in text
            and "Bebrief." not in tok.decode(cases[0][1]).replace(" ", "")
        )
    finally:
        r.stop()


def test_a_plain_instruct_models_messages_go_through_its_chat_template(tmp_path):
    """As vLLM's chat endpoint: one user message or several, the tokenizer's chat template with the
    assistant's turn opened (not the bare question, which an instruct model often answers with
    its end token at once); a model without a template takes one bare question, no dialogue."""
    from test_profiles import instruct_dir

    for template in (True, False):
        d, tok = instruct_dir(tmp_path, **({} if template else {"template": None}))
        bb = load_model(d)
        profile = load_profile(d, bb=bb)
        cfg = resolve_config(profile, {"temperature": 0.0, "max_new_tokens": 4})
        r = Running(build_server(bb, None, profile, cfg, max_batch_size=2))
        try:
            one = [{"role": "user", "content": "hi"}]
            more = [{"role": "system", "content": "Be brief."}, *one, {"role": "assistant", "content": "yo"}]
            more.append({"role": "user", "content": "and now?"})
            for messages in (one, more):
                body = {"messages": messages, "max_tokens": 4, "sparkee": {"return_tokens": True}}
                resp = r.http.post("/v1/chat/completions", json=body)
                if not template and messages is more:
                    err = resp.json()["error"]
                    assert resp.status_code == 400 and "chat template" in err["message"], err
                    assert one_sentence(err["message"]) and err["param"] == "messages"
                    continue
                want = (
                    tok.apply_chat_template(
                        [{"role": m["role"], "content": m["content"]} for m in messages],
                        tokenize=False,
                        add_generation_prompt=True,
                    )
                    if template
                    else "hi"
                )
                ids = tok(want, add_special_tokens=False)["input_ids"]
                out = resp.json()
                assert out["usage"]["prompt_tokens"] == len(ids), out
                assert out["sparkee"]["tokens"] == generate(bb, ids, replace(cfg, max_new_tokens=4)).tokens
        finally:
            r.stop()


def test_a_stop_string_ends_the_answer_before_it_streaming_or_not(ref):
    q = "tell me one plus two"  # answers "one plus two is three"
    whole = chat(ref, q, stop=["two is", "zebra"]).json()
    assert whole["choices"][0]["message"]["content"] == "one plus "
    assert whole["choices"][0]["finish_reason"] == "stop"
    with ref.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": q}], "stream": True, "stop": "two is"},
    ) as resp:
        events = sse(resp.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == "one plus " and events[-2]["choices"][0]["finish_reason"] == "stop"
    wait_for(lambda: ref.health()["running"] == 0, "the stopped rows to be freed")


def test_a_request_past_its_deadline_gets_504(tiny):
    w, old = tiny.server.worker, tiny.server.request_timeout
    tiny.server.request_timeout = 0.3
    w.pause()
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(tiny.http.post, "/v1/completions", json={"prompt": [3, 4], "max_tokens": 4})
            wait_for(lambda: tiny.health()["waiting"] == 1, "the request to wait")
            t = time.monotonic()
            wait_for(lambda: time.monotonic() > t + 0.5, "the deadline to pass")
            w.pause(False)
            r = fut.result(timeout=30)
    finally:
        tiny.server.request_timeout = old
        w.pause(False)
    assert r.status_code == 504 and "deadline" in r.json()["error"]["message"]
    ok = tiny.http.post("/v1/completions", json={"prompt": [3, 4], "max_tokens": 4})
    assert ok.status_code == 200


def test_adapter_heads_serve_verified_rows_that_equal_full_depth():
    """The bundled adapter heads behind the server: concurrent verified requests (which roll back
    at different steps) each get exactly their full-depth answer; the page suggests their row."""
    bb = load_model(REF_DIR)
    profile = load_profile(REF_DIR, bb=bb)
    heads = resolve_heads(str(profile.adapter), bb)
    r = Running(build_server(bb, heads, profile, resolve_config(profile, {}), max_batch_size=4, max_queue=8))
    try:
        suggested = r.http.get("/v1/sparkee/config").json()["suggested_policies"]
        assert {"speech_policy": "spar-k:FEEEEEE:1", "verify": True} in [
            {k: p[k] for k in ("speech_policy", "verify")} for p in suggested
        ]
        ver = {"speech_policy": "spar-k:FEEEEEE:1", "verify": True, "accept": "exact", "return_tokens": True}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda q: chat(r, q, max_tokens=150, sparkee=ver).json(), QUESTIONS[:4]))
        for q, a in zip(QUESTIONS[:4], answers, strict=True):
            full = generate(
                bb, profile.encode_text(q), replace(resolve_config(profile, {}), max_new_tokens=150)
            )
            assert a["sparkee"]["tokens"] == full.tokens
            assert a["sparkee"]["avg_exit_layer_speech"] < 8
    finally:
        r.stop()


def admit_together(worker, jobs, until, what: str) -> None:
    """Submit `jobs` to a paused worker so that one step boundary admits them all, then run it until
    `until()` holds."""
    worker.pause()
    worker.start()
    try:
        for job in jobs:
            worker.submit(job)
        worker.pause(False)
        wait_for(until, what)
    finally:
        worker.stop(drain_s=5)


@pytest.mark.parametrize("prefill_batch", [1, 2, 3])
def test_admitted_rows_are_prefilled_in_groups_and_send_first_tokens_before_the_next(prefill_batch):
    """Requests admitted together: prefilled `prefill_batch` prompts per pass, and each pass's first
    tokens leave before the next pass, so time to first token in a burst is not every admitted
    prompt's prefill; the answers are the rows' own, as decoded alone."""
    from sparkee.engine import Engine
    from sparkee.serve.metrics import Metrics
    from sparkee.serve.worker import Job, Worker

    bb = wrap_model(tiny_model("qwen2", layers=2))
    cfg = GenerationConfig(max_new_tokens=3)
    engine = Engine(bb, None, cfg, max_batch_size=3, calibration=None)
    worker = Worker(engine, Metrics(), prefill_batch=prefill_batch)
    log: list[tuple] = []
    add_many = engine.add_many

    def spy_add_many(prompts, *a, **k):
        log.append(("prefill", tuple(tuple(p) for p in prompts)))
        return add_many(prompts, *a, **k)

    engine.add_many = spy_add_many
    jobs = [Job([3, 4, 5 + i, 6][: 2 + i], engine.plan_for(2 + i), loop=None) for i in range(3)]
    answers: dict[tuple, list[int]] = {}
    for job in jobs:

        def send(item, job=job):
            log.append((item[0], tuple(job.prompt)))
            if item[0] == "tokens":
                answers.setdefault(tuple(job.prompt), []).extend(e.token for e in item[1])

        job.send = send
    admit_together(worker, jobs, lambda: sum(k == "done" for k, _ in log) == 3, "three answers")
    groups = [jobs[k : k + prefill_batch] for k in range(0, 3, prefill_batch)]
    want = []
    for g in groups:
        want.append(("prefill", tuple(tuple(j.prompt) for j in g)))
        want += [("tokens", tuple(j.prompt)) for j in g]
    assert [e for e in log if e[0] in ("prefill", "tokens")][: len(want)] == want
    for job in jobs:
        assert answers[tuple(job.prompt)] == generate(bb, job.prompt, cfg).tokens


def test_a_refused_prompt_in_a_prefill_group_fails_alone():
    from sparkee.engine import Engine
    from sparkee.serve.metrics import Metrics
    from sparkee.serve.worker import Job, Worker

    bb = wrap_model(tiny_model("qwen2", layers=2))
    cfg = GenerationConfig(max_new_tokens=3)
    engine = Engine(bb, None, cfg, max_batch_size=3, calibration=None)
    worker = Worker(engine, Metrics(), prefill_batch=3)
    prompts = [[3, 4], [5, bb.vocab_size + 7], [6, 7, 8]]  # the middle one: outside the vocabulary
    jobs = [Job(p, engine.plan_for(len(p)), loop=None) for p in prompts]
    got: dict[int, list] = {n: [] for n in range(3)}
    for n, job in enumerate(jobs):
        job.send = lambda item, n=n: got[n].append(item)
    outcomes = lambda: all(any(i[0] in ("done", "error") for i in got[n]) for n in got)  # noqa: E731
    admit_together(worker, jobs, outcomes, "three outcomes")
    assert [i[:2] for i in got[1]] == [("error", 400)] and "outside the vocabulary" in got[1][0][2]
    for n in (0, 2):
        tokens = [e.token for i in got[n] if i[0] == "tokens" for e in i[1]]
        assert tokens == generate(bb, prompts[n], cfg).tokens


def test_prompts_are_prefilled_on_prefill_threads_and_steps_run_on_the_others():
    """The worker gives a prefill `prefill_threads` torch threads and every decoding step its
    usual number again; the answers are the rows' own, as decoded alone."""
    import torch

    from sparkee.engine import Engine
    from sparkee.serve.metrics import Metrics
    from sparkee.serve.worker import Job, Worker

    bb = wrap_model(tiny_model("qwen2", layers=2))
    cfg = GenerationConfig(max_new_tokens=4)
    engine = Engine(bb, None, cfg, max_batch_size=2, calibration=None)
    decode = torch.get_num_threads()
    worker = Worker(engine, Metrics(), prefill_threads=decode + 1)
    seen: dict[str, set] = {"prefill": set(), "step": set()}
    add_many, step = engine.add_many, engine.step

    def spy_add_many(*a, **k):
        seen["prefill"].add(torch.get_num_threads())
        return add_many(*a, **k)

    def spy_step():
        seen["step"].add(torch.get_num_threads())
        return step()

    engine.add_many, engine.step = spy_add_many, spy_step
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    jobs = [Job(p, engine.plan_for(len(p)), loop=None) for p in prompts]
    tokens: dict[int, list] = {0: [], 1: []}
    for n, job in enumerate(jobs):
        job.send = lambda item, n=n: tokens[n].extend(item[1]) if item[0] == "tokens" else None
    worker.start()
    try:
        for job in jobs:
            worker.submit(job)
        wait_for(lambda: all(j.row is not None for j in jobs) and worker.running == 0, "both answers")
    finally:
        worker.stop(drain_s=5)
    assert seen == {"prefill": {decode + 1}, "step": {decode}}
    assert torch.get_num_threads() == decode
    for n, p in enumerate(prompts):
        assert [e.token for e in tokens[n]] == generate(bb, p, cfg).tokens
