"""`sparkee serve`: an OpenAI-compatible speech server over the step-able engine.

app.py speaks HTTP (OpenAI's schema), worker.py runs the engine loop in one thread, audio.py
vocodes confirmed speech in chunks, metrics.py keeps the Prometheus metrics, static/ the page.
Needs the `serve` extra: pip install 'sparkee[serve]'.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import replace

from ..errors import SparkeeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _imports():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SparkeeError(
            f"sparkee serve needs the serve extra ({e.name} is missing): pip install 'sparkee[serve]'"
        ) from None


def default_model_name(profile, model_dir) -> str:
    from ..profiles import PresetProfile, ReferenceProfile

    if isinstance(profile, PresetProfile | ReferenceProfile):
        return profile.name
    return model_dir.name if model_dir is not None else "model"


def build_server(
    bb,
    heads,
    profile,
    cfg,
    model_name: str | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    max_len: int | None = None,
    vocoder: str | None = "auto",
    api_key: str | None = None,
    request_timeout: float = 600.0,
    shutdown_drain_s: float = 10.0,
    calibrate: bool = True,
    prefill_threads: int | None = None,
    prefill_batch: int = 8,
):
    """A ready `Server` (engine, worker, metrics, audio) for a loaded model; start it with `run`
    or mount `create_app(server)` in any ASGI server. `prefill_threads`: torch threads while
    prompts are prefilled (None: torch's current number, that of the decoding steps);
    `prefill_batch`: prompts admitted together that share one padded prefill pass (1: each alone)."""
    _imports()
    from ..calibrate import cached_calibration
    from ..engine import Engine
    from .app import Server
    from .audio import resolve_audio
    from .metrics import Metrics
    from .worker import Worker

    # never measure at start-up: a calibration cached by `sparkee calibrate` is used when there is one
    calibration = cached_calibration(bb) if calibrate else None
    cfg = replace(cfg, calibrate=calibration is not None)
    engine = Engine(bb, heads, cfg, max_batch_size, max_len, calibration)
    if cfg.max_new_tokens > engine.max_len - 2:
        cfg = replace(cfg, max_new_tokens=max(1, engine.max_len // 2))
    metrics = Metrics()
    audio = resolve_audio(profile, cfg, vocoder)
    worker = Worker(
        engine, metrics, max_queue, audio, prefill_threads=prefill_threads, prefill_batch=prefill_batch
    )
    return Server(
        engine,
        worker,
        metrics,
        profile,
        cfg,
        model_name or default_model_name(profile, getattr(profile, "model_dir", None)),
        audio,
        api_key,
        request_timeout,
        shutdown_drain_s,
        int(time.time()),
    )


def lifespan(server):
    @asynccontextmanager
    async def span(app):
        import asyncio

        server.worker.start()
        try:
            yield
        finally:  # SIGTERM: uvicorn has let open responses finish; end the rest cleanly
            await asyncio.get_running_loop().run_in_executor(
                None, server.worker.stop, server.shutdown_drain_s
            )

    return span


def make_app(server):
    from .app import create_app

    app = create_app(server)
    app.router.lifespan_context = lifespan(server)
    return app


def uvicorn_server(server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(
        make_app(server),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=max(1, int(server.shutdown_drain_s)),
        access_log=False,
    )
    return uvicorn.Server(config)


def run(server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C; a clean shutdown by SIGTERM exits with status 0."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # uvicorn re-raises the signal it shut down for once it is done; by then every request has
    # finished or been cancelled, so the re-raised SIGTERM only has to end the call
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn_server(server, host, port, log_level).run()
    finally:
        signal.signal(signal.SIGTERM, old)
