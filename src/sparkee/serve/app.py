"""The HTTP front end: OpenAI's schema (pydantic models), routes, SSE streaming, the page.

Only this module speaks HTTP; the engine thread (worker.py) only steps. A request is checked here
with the library's own parsers (`parse_policy`, `parse_accept`, and `make_plan` through
`Engine.plan_for`, the checks the CLI runs), becomes a `Job`, and its events are read from the
job's queue: tokens turn into text deltas (the model profile's decoder), confirmed speech into
audio chunks (audio.py), and the end into the response with `usage` and a `sparkee` object.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from ..accept import parse_accept
from ..config import GenerationConfig
from ..engine import Engine, _check_prompt
from ..errors import SparkeeError
from ..schedule import parse_policy
from .audio import Audio, wav_bytes
from .metrics import Metrics, log_request
from .worker import Busy, Job, Worker

STATIC = Path(__file__).parent / "static"
Number = StrictFloat | StrictInt

# ---------------------------------------------------------------------------------------------
# the schema


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields sparkee does not use are ignored


class ContentPart(_Model):
    type: StrictStr
    text: StrictStr | None = None


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None


class AudioParams(_Model):
    voice: StrictStr = "default"
    format: Literal["wav", "pcm16"] = "wav"


class SparkeeParams(BaseModel):
    """sparkee's own knobs (the openai client sends them with `extra_body={"sparkee": {...}}`)."""

    model_config = ConfigDict(extra="forbid")
    speech_policy: StrictStr | None = None
    text_policy: StrictStr | None = None
    verify: StrictBool | None = None
    accept: StrictStr | None = None
    return_tokens: StrictBool = False


class StreamOptions(_Model):
    include_usage: StrictBool = False


class _Common(_Model):
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    sparkee: SparkeeParams | None = None


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioParams | None = None


class CompletionRequest(_Common):
    prompt: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | StrictStr


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, etype: str = ""
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = etype or ("invalid_request_error" if status < 500 else "server_error")
        self.headers: dict[str, str] = {}


def _error(status: int, message: str, param=None, code=None, etype: str = "", headers=None) -> JSONResponse:
    etype = etype or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _sentence(msg: str) -> str:
    msg = msg.strip()
    return msg if msg.endswith((".", "?", "!")) else msg + "."


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # drop the pydantic branch names of unions ("str", "list[...]", "constrained-int")
    loc = [p for p in loc if not (p[:1].isalpha() and ("[" in p or p in ("str", "int", "float", "bool")))]
    loc = [p for p in loc if not p.startswith(("function-", "constrained-", "literal["))]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None
    if kind == "missing":
        return f"The request is missing the required field '{param}'.", param
    if kind == "model_attributes_type" or (kind == "dict_type" and not loc):
        return "The request body must be a JSON object.", None
    if kind == "extra_forbidden":
        return f"Unknown field '{param}' (sparkee takes speech_policy, text_policy, verify, accept).", param
    if kind == "too_short" and param == "messages":
        return "'messages' must hold at least one message.", param
    msg = err.get("msg", "is invalid")
    return _sentence(f"Invalid value for '{param}': {msg}" if param else msg), param


# ---------------------------------------------------------------------------------------------
# the server's state


@dataclass
class Server:
    """What the routes need: the model's profile and config, the engine's worker, limits."""

    engine: Engine
    worker: Worker
    metrics: Metrics
    profile: Any  # sparkee.profiles.ModelProfile
    cfg: GenerationConfig  # the server's decoding defaults (profile + command line)
    model_name: str
    audio: Audio | None = None
    api_key: str | None = None
    request_timeout: float = 600.0
    shutdown_drain_s: float = 10.0
    created: int = 0

    @property
    def num_layers(self) -> int:
        return self.engine.bb.num_layers

    # -- token -> text ------------------------------------------------------------------------

    def text_of(self, tokens: list[int]) -> str:
        from ..profiles import ReferenceProfile

        if isinstance(self.profile, ReferenceProfile):
            from ..refslm.data import answer_text_from_tokens

            return answer_text_from_tokens(tokens, self.profile.vocab)
        tok = self.profile.tokenizer
        if tok is None:
            return ""
        lo, hi = self.cfg.speech_ids or (0, 0)
        stops = set(self.cfg.stop_ids)
        return tok.decode(
            [t for t in tokens if not lo <= t < hi and t not in stops], skip_special_tokens=True
        )

    # -- a request -> a job -------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(
                404,
                f"The model '{name}' does not exist: this server serves '{self.model_name}'.",
                "model",
                "model_not_found",
            )

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation as the model's prompt, through its profile (as `generate --prompt`
        and `--history` build it)."""
        turns = []
        for n, m in enumerate(messages):
            if isinstance(m.content, list):
                if any(p.type != "text" for p in m.content):
                    raise ApiError(400, "Only text content parts are supported.", f"messages.{n}.content")
                text = " ".join(p.text or "" for p in m.content)
            else:
                text = m.content or ""
            role = "system" if m.role == "developer" else m.role
            turns.append((role, text))
        if turns[-1][0] != "user":
            raise ApiError(400, "The last message must be the user's.", "messages")
        fmt = self.cfg.interleave.format if self.cfg.interleave else None
        rest = turns[:-1]
        question = turns[-1][1]
        if not question.strip():
            raise ApiError(400, "The user's message is empty.", "messages")
        system = [t for r, t in rest if r == "system"]
        if len(system) > 1 or (system and rest[0][0] != "system"):
            raise ApiError(400, "Give at most one system message, first.", "messages")
        history = [{"role": r, "text": t} for r, t in rest if r != "system"]
        doc: dict = {"turns": history}
        if system:
            doc["system"] = system[0]
        if not rest:
            return self.profile.encode_question(question, fmt)
        if self.profile.chat_template:  # a plain instruct model: every conversation in its template
            return self.profile.encode_dialogue(doc, text=question)
        if not history and system and not hasattr(self.profile, "preset"):
            # a plain or reference model has no system prompt: the question alone
            return self.profile.encode_text(question, fmt)
        return self.profile.encode_dialogue(doc, text=question)

    def config(self, req: _Common, max_new: int | None) -> GenerationConfig:
        sp = req.sparkee or SparkeeParams()
        specs = {}  # parsed once here, the edge; the engine takes the objects as they are
        for name in ("speech_policy", "text_policy", "accept"):
            spec = getattr(sp, name)
            if spec is not None:
                try:
                    specs[name] = (
                        parse_accept(spec) if name == "accept" else parse_policy(spec, self.num_layers)
                    )
                except SparkeeError as e:
                    raise ApiError(400, _sentence(str(e)), f"sparkee.{name}") from None
        changes = {
            "max_new_tokens": max_new if max_new is not None else self.cfg.max_new_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "seed": req.seed,
            "verify": sp.verify,
            **specs,
        }
        return replace(self.cfg, **{k: v for k, v in changes.items() if v is not None})

    def job(self, prompt: list[int], cfg: GenerationConfig, audio: bool, param_tokens: str) -> Job:
        room = self.engine.max_len - 1 - len(prompt)
        if room < 1:
            raise ApiError(
                400,
                f"The prompt ({len(prompt)} tokens) leaves no room for an answer in the "
                f"{self.engine.max_len - 1} positions a row holds.",
                "messages" if param_tokens != "max_tokens" else "prompt",
                "context_length_exceeded",
            )
        if cfg.max_new_tokens > room:
            raise ApiError(
                400,
                f"'{param_tokens}' must be at most {room} for this prompt ({len(prompt)} tokens; a row "
                f"holds {self.engine.max_len - 1} positions), got {cfg.max_new_tokens}.",
                param_tokens,
            )
        try:
            plan = self.engine.plan_for(len(prompt), cfg)
        except SparkeeError as e:
            raise ApiError(400, _sentence(str(e))) from None
        try:
            _check_prompt(self.engine.bb, prompt)  # the check generate runs
        except SparkeeError as e:
            msg = _sentence(str(e))
            raise ApiError(400, msg[0].upper() + msg[1:], "prompt") from None
        return Job(
            prompt,
            plan,
            asyncio.get_running_loop(),
            audio=audio,
            deadline=time.monotonic() + self.request_timeout,
        )

    def sparkee_stats(self, info: dict, return_tokens: bool, cfg: GenerationConfig) -> dict:
        st = info["stats"]
        out = {
            "speech_policy": str(cfg.speech_policy),
            "text_policy": str(cfg.text_policy),
            "verify": cfg.verify,
            "accept": str(cfg.accept),
            "num_layers": st["num_layers"],
            "avg_exit_layer_text": st["avg_exit_layer_text"],
            "avg_exit_layer_speech": st["avg_exit_layer_speech"],
            "speech_depth_reduction_pct": st["speech_depth_reduction_pct"],
            "speech_agreement": st["speech_agreement"],
            "speech_acceptance": st["speech_acceptance"],
            "speech_tokens": st["speech_steps"],
            "text_tokens": st["text_steps"],
            "verify_rejections": st["verify_rejections"],
            "predicted_speedup": st["predicted_speedup"],
            "measured_speedup": info.get("measured_speedup"),
            "prefill_s": st["prefill_s"],
            "decode_s": st["decode_s"],
            "tokens_per_s": st["tokens_per_s"],
        }
        if return_tokens:
            out["tokens"] = info["tokens"]
        return out


# ---------------------------------------------------------------------------------------------
# one job's events, shared by streaming and non-streaming responses


@dataclass
class Out:
    kind: str  # text | audio | done
    text: str = ""
    pcm: bytes = b""
    info: dict | None = None


async def _events(server: Server, job: Job, stops: list[str], request: Request, tag: dict, ids: bool = False):
    """Text deltas, audio chunks in order, then the end; cancels the job when the consumer leaves.
    With `ids`, every token id also comes as its own event (kind "token")."""
    tokens: list[int] = []
    sent = ""  # text handed out so far
    hold = max((len(s) for s in stops), default=1) - 1
    audio_next, audio_ready, audio_total = 0, {}, None
    done_info = None
    t0, last = job.created, None
    m = server.metrics
    lo, hi = server.cfg.speech_ids or (0, 0)
    finished = False
    try:
        while True:
            if done_info is not None and audio_total is not None and audio_next >= audio_total:
                break
            try:
                item = await asyncio.wait_for(job.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            kind = item[0]
            if kind == "tokens":  # one step's tokens of this job
                stopped = False
                for ev in item[1]:
                    now = time.perf_counter()
                    if last is None:
                        tag["ttft"] = now - t0
                        m.ttft.observe(now - t0)
                    else:
                        m.itl.observe(now - last)
                    last = now
                    m.tokens.inc()
                    tokens.append(ev.token)
                    if ids:
                        yield Out("token", info={"token": ev.token})
                    if lo <= ev.token < hi:
                        continue  # speech: the text is unchanged
                    text = server.text_of(tokens)
                    if stops:
                        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                        if cut >= 0:  # a stop string: the answer ends before it
                            if len(text[:cut]) > len(sent) and text.startswith(sent):
                                yield Out("text", text[len(sent) : cut])
                            tag["finish_reason"] = "stop"
                            server.worker.cancel(job)  # frees the row; audio not yet out is dropped
                            done_info = {"stop_string": True, "tokens": tokens, "text": text[:cut]}
                            stopped = True
                            break
                    safe = text[: len(text) - hold] if hold else text
                    if len(safe) > len(sent) and safe.startswith(sent) and not safe.endswith("\ufffd"):
                        yield Out("text", safe[len(sent) :])
                        sent = safe
                if stopped:
                    break
            elif kind == "audio":
                audio_ready[item[1]] = item[2]
                while audio_next in audio_ready:
                    fut = audio_ready.pop(audio_next)
                    audio_next += 1
                    try:
                        pcm = fut.result()
                    except Exception as e:  # noqa: BLE001 - a vocoder failure ends the audio, not the text
                        tag["audio_error"] = str(e)
                        pcm = b""
                    if pcm:
                        if "ttfa" not in tag:
                            tag["ttfa"] = time.perf_counter() - t0
                            m.ttfa.observe(tag["ttfa"])
                        yield Out("audio", pcm=pcm)
            elif kind == "done":
                done_info = item[1]
                audio_total = done_info["audio_chunks"]
                text = server.text_of(done_info["tokens"])
                if text.startswith(sent) and len(text) > len(sent):
                    yield Out("text", text[len(sent) :])
                    sent = text
            elif kind == "cancelled":
                return
            elif kind == "error":
                raise ApiError(item[1], _sentence(item[2]))
        finished = True
        now = time.perf_counter()
        m.e2e.observe(now - t0)
        tag["total_s"] = now - t0
        if "stats" in done_info:
            m.finished(done_info["stats"], done_info["finish_reason"])
        yield Out("done", info=done_info)
    finally:
        if not finished:
            server.worker.cancel(job)
            tag.setdefault("finish_reason", "cancelled")


def _usage(job: Job, info: dict) -> dict:
    n = len(info["tokens"])
    return {"prompt_tokens": len(job.prompt), "completion_tokens": n, "total_tokens": len(job.prompt) + n}


# ---------------------------------------------------------------------------------------------
# the app


def create_app(server: Server) -> FastAPI:
    """The HTTP app over a server: its routes, error handlers and API-key check. Handlers find the
    server at `request.app.state.server`."""
    app = FastAPI(title="sparkee", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ApiError, _api_error)
    app.middleware("http")(_auth)
    for path, endpoint in (
        ("/health", health),
        ("/metrics", metrics),
        ("/", page),
        ("/static/{name}", static),
        ("/v1/models", models),
        ("/v1/sparkee/config", sparkee_config),
    ):
        app.add_api_route(path, endpoint, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


def _server(request: Request) -> Server:
    return request.app.state.server


async def _invalid(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    msg, param = _validation_message(errors[0]) if errors else ("The request is invalid.", None)
    _server(request).metrics.requests.labels("rejected").inc()
    return _error(400, msg, param, "invalid_request")


async def _api_error(request: Request, exc: ApiError):
    _server(request).metrics.requests.labels("rejected" if exc.status < 500 else "error").inc()
    return _error(exc.status, exc.message, exc.param, exc.code, exc.type, exc.headers or None)


async def _auth(request: Request, call_next):
    key = _server(request).api_key
    if (
        key
        and request.url.path.startswith("/v1/")
        and request.headers.get("authorization") != f"Bearer {key}"
    ):
        return _error(401, "Invalid or missing API key (Authorization: Bearer KEY).", None, "invalid_api_key")
    return await call_next(request)


# ---------------------------------------------------------------------------------------------
# routes


async def health(request: Request):
    server = _server(request)
    w = server.worker
    body = {
        "status": "ready" if w.ready else "stopping",
        "model": server.model_name,
        "running": w.running,
        "waiting": w.waiting,
        "max_batch_size": server.engine.max_batch_size,
        "max_queue": w.max_queue,
        "cancelled_rows": w.cancelled_rows,
        "audio": server.audio is not None,
    }
    return JSONResponse(body, status_code=200 if w.ready else 503)


async def metrics(request: Request):
    m = _server(request).metrics
    return Response(m.render(), media_type=m.content_type)


async def page():
    return FileResponse(STATIC / "index.html")


async def static(name: str):
    p = STATIC / name
    if "/" in name or not p.is_file():
        raise ApiError(404, f"No static file '{name}'.", None, "not_found")
    return FileResponse(p)


async def models(request: Request):
    server = _server(request)
    return {
        "object": "list",
        "data": [
            {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "sparkee"}
        ],
    }


async def sparkee_config(request: Request):  # what the page offers
    server = _server(request)
    c = server.cfg
    return {
        "model": server.model_name,
        "num_layers": server.num_layers,
        "speech_policy": str(c.speech_policy),
        "text_policy": str(c.text_policy),
        "verify": c.verify,
        "audio": server.audio is not None,
        "suggested_policies": _suggested(server),
    }


async def chat(request: Request):
    server = _server(request)
    req = await _parse(request, ChatRequest)
    server.check_model(req.model)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "Give max_tokens or max_completion_tokens, not both.", "max_completion_tokens")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    want_audio = "audio" in (req.modalities or [])
    if want_audio and server.audio is None:
        raise ApiError(400, "This server has no vocoder: ask for modalities ['text'] only.", "modalities")
    if req.audio is not None and not want_audio:
        raise ApiError(400, "'audio' needs modalities ['text', 'audio'].", "modalities")
    try:
        prompt = server.chat_prompt(req.messages)
    except SparkeeError as e:
        raise ApiError(400, _sentence(str(e)), "messages") from None
    cfg = server.config(req, max_new)
    job = server.job(prompt, cfg, want_audio, param)
    fmt = (req.audio or AudioParams()).format
    return await _respond(server, job, req, request, cfg, "chat", want_audio, fmt)


async def completions(request: Request):
    server = _server(request)
    req = await _parse(request, CompletionRequest)
    server.check_model(req.model)
    if isinstance(req.prompt, str):
        tok = server.profile.tokenizer
        if tok is None or not req.prompt:
            raise ApiError(400, "Give the prompt as a list of token ids.", "prompt")
        prompt = list(tok(req.prompt)["input_ids"])
    else:
        prompt = list(req.prompt)
    cfg = server.config(req, req.max_tokens)
    job = server.job(prompt, cfg, False, "max_tokens")
    return await _respond(server, job, req, request, cfg, "text", False, "wav")


async def _parse(request: Request, cls: type[BaseModel]):
    """The body as JSON (whatever the content type says), checked against the schema."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The request body is not valid JSON.", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", None, "invalid_request")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        msg, param = _validation_message(e.errors()[0])
        raise ApiError(400, msg, param, "invalid_request") from None


def _suggested(server: Server) -> list[dict]:
    N = server.num_layers
    L = max(1, N // 4)
    out = [{"label": "full depth", "speech_policy": "full", "verify": False}]
    heads = server.engine.heads
    if heads.attends:  # adapter heads: a long draft after their shallowest layer
        A = heads.layers[0]
        label = f"SPAR-K FEEEEEE at {A} with the adapter, verified (lossless)"
        out.append({"label": label, "speech_policy": f"spar-k:FEEEEEE:{A}", "verify": True})
        return out
    if server.engine.heads.has(L) or server.engine.heads.kind == "logit-lens":
        out.append(
            {
                "label": f"SPAR-K FEEE at {L}, verified (lossless)",
                "speech_policy": f"spar-k:FEEE:{L}",
                "verify": True,
            }
        )
        L2 = max(1, round(0.75 * N))
        if server.engine.heads.has(L2) or server.engine.heads.kind == "logit-lens":
            out.append(
                {"label": f"SPAR-K even at {L2}", "speech_policy": f"spar-k:even:{L2}", "verify": False}
            )
    return out


async def _respond(server: Server, job: Job, req, request: Request, cfg, kind: str, audio: bool, fmt: str):
    """Queue the job and answer: one JSON body, or server-sent events when the request streams."""
    _submit(server, job)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    reply = _Reply(
        server,
        job,
        cfg,
        kind,
        audio,
        fmt,
        return_tokens=bool(req.sparkee and req.sparkee.return_tokens) or kind == "text",
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
    events = _events(
        server, job, [s for s in stops if s], request, reply.tag, ids=kind == "text" and req.stream
    )
    if not req.stream:
        return await _whole_response(reply, events)
    # the first event decides the status: an error before any output is still an HTTP error
    return _ClosingStream(
        _event_stream(reply, events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _submit(server: Server, job: Job) -> None:
    """Admit the job, or answer 429 (queue full) / 503 (shutting down) with Retry-After."""
    try:
        server.worker.submit(job)
    except Busy as e:
        err = ApiError(
            e.status, _sentence(str(e)), None, "rate_limit_exceeded" if e.status == 429 else "unavailable"
        )
        err.type = "rate_limit_error" if e.status == 429 else "server_error"
        err.headers = {"Retry-After": str(e.retry_after)}
        raise err from None


@dataclass
class _Reply:
    """What one response is built from: the job, its config and answer options, its ids."""

    server: Server
    job: Job
    cfg: GenerationConfig
    kind: str  # chat | completion ("text": completions of token ids)
    audio: bool
    fmt: str  # the audio format: wav | pcm16
    return_tokens: bool
    include_usage: bool

    def __post_init__(self) -> None:
        self.created = int(time.time())
        self.rid = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.job.id
        self.tag: dict = {}  # timings and the finish reason, filled as the events pass

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.server.model_name}

    def stats(self, info: dict) -> dict:
        """The response's `sparkee` object: the run's stats (or its tokens, when a stop string
        ended it before the engine did), and the request's timings."""
        stats = self.server.sparkee_stats(info, self.return_tokens, self.cfg) if "stats" in info else {}
        if self.return_tokens and "tokens" not in stats:
            stats["tokens"] = info["tokens"]
        return stats | _timings(self.tag)

    def finish_reason(self, info: dict) -> str:
        return self.tag.get("finish_reason") or info["finish_reason"]

    def log(self, info: dict | None) -> None:
        job, tag = self.job, self.tag
        log_request(
            id=self.rid,
            prompt_tokens=len(job.prompt),
            completion_tokens=len(info["tokens"]) if info else None,
            queue_s=None if job.started is None else job.started - job.created,
            ttft_s=tag.get("ttft"),
            ttfa_s=tag.get("ttfa"),
            total_s=tag.get("total_s"),
            speech_policy=str(self.cfg.speech_policy),
            text_policy=str(self.cfg.text_policy),
            verify=self.cfg.verify,
            finish_reason=tag.get("finish_reason") or (info or {}).get("finish_reason"),
        )


async def _whole_response(reply: _Reply, events) -> JSONResponse:
    """A non-streaming answer: every event gathered into one OpenAI-style body."""
    text, pcm, info = [], [], None
    try:
        async for o in events:
            if o.kind == "text":
                text.append(o.text)
            elif o.kind == "audio":
                pcm.append(o.pcm)
            else:
                info = o.info
    finally:
        await events.aclose()
    finish = reply.finish_reason(info)
    reply.log(info)
    content = "".join(text)
    if reply.kind == "chat":
        msg: dict = {"role": "assistant", "content": content}
        if reply.audio:
            data = b"".join(pcm)
            msg["content"] = None
            msg["audio"] = {
                "id": "audio_" + reply.job.id,
                "data": base64.b64encode(wav_bytes(data) if reply.fmt == "wav" else data).decode(),
                "transcript": content,
                "expires_at": reply.created + 3600,
            }
        body = reply.head("chat.completion")
        body["choices"] = [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}]
    else:
        body = reply.head("text_completion")
        body["choices"] = [{"index": 0, "text": content, "logprobs": None, "finish_reason": finish}]
    body["usage"] = _usage(reply.job, info)
    body["sparkee"] = reply.stats(info)
    return JSONResponse(body)


async def _event_stream(reply: _Reply, events):
    """A streaming answer: OpenAI's chunks as server-sent events, `[DONE]` at the end (an error
    after the first chunk goes out as an error event)."""
    chat, job = reply.kind == "chat", reply.job
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict | None = None, finish=None, text: str | None = None, **extra) -> str:
        if chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps(reply.head(obj) | {'choices': [choice]} | extra)}\n\n"

    info = None
    try:
        if chat:
            yield chunk({"role": "assistant", "content": None if reply.audio else ""})
        async for o in events:
            if o.kind == "token":
                yield chunk(text="", sparkee={"token": o.info["token"]})
            elif o.kind == "text" and o.text:
                if not chat:
                    yield chunk(text=o.text)
                elif reply.audio:
                    yield chunk({"audio": {"id": "audio_" + job.id, "transcript": o.text}})
                else:
                    yield chunk({"content": o.text})
            elif o.kind == "audio":
                data = wav_bytes(o.pcm) if reply.fmt == "wav" else o.pcm
                yield chunk({"audio": {"id": "audio_" + job.id, "data": base64.b64encode(data).decode()}})
            elif o.kind == "done":
                info = o.info
        yield chunk({}, reply.finish_reason(info), sparkee=reply.stats(info))
        if reply.include_usage:
            body = reply.head(obj) | {"choices": [], "usage": _usage(job, info)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        reply.log(info)
    except ApiError as e:
        err = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
        yield f"data: {json.dumps(err)}\n\n"
        yield "data: [DONE]\n\n"
        reply.log(info)
    finally:
        await events.aclose()


class _ClosingStream(StreamingResponse):
    """A stream that closes its body iterator however it ends. Starlette (ASGI 2.4) stops at the
    first send to a client that went away and leaves the suspended generator to the garbage
    collector, so the generator's `finally` (which frees the row) could run late or never."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _timings(tag: dict) -> dict:
    return {
        "time_to_first_token_s": tag.get("ttft"),
        "time_to_first_audio_s": tag.get("ttfa"),
        "total_s": tag.get("total_s"),
    }
