"""Prometheus metrics of the server (GET /metrics) and its one log line per request.

One registry per server, so several servers (tests) can live in one process.
"""

from __future__ import annotations

import json
import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LOG = logging.getLogger("sparkee.serve")

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_FRACTION = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "sparkee_time_to_first_token_seconds",
            "Request arrival to its first token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.ttfa = Histogram(
            "sparkee_time_to_first_audio_seconds",
            "Request arrival to its first vocoded audio chunk.",
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "sparkee_inter_token_latency_seconds",
            "Time between a request's tokens.",
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            "sparkee_request_duration_seconds",
            "Request arrival to its last token.",
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens = Counter("sparkee_generated_tokens", "Tokens generated (all requests).", registry=r)
        self.prompt_tokens = Counter("sparkee_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.tokens_per_s = Gauge(
            "sparkee_tokens_per_second", "Tokens generated per second over the last 10 s.", registry=r
        )
        self.running = Gauge("sparkee_requests_running", "Rows decoding in the batch.", registry=r)
        self.waiting = Gauge("sparkee_requests_waiting", "Requests waiting for a row.", registry=r)
        self.batch_size = Histogram(
            "sparkee_batch_size",
            "Rows per decode step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.requests = Counter(
            "sparkee_requests", "Finished requests by outcome.", ["outcome"], registry=r
        )  # stop, length, cancelled, error, rejected
        self.acceptance = Histogram(
            "sparkee_speech_acceptance",
            "Share of a request's checked early speech tokens the acceptance rule kept.",
            buckets=_FRACTION,
            registry=r,
        )
        self.depth_saved = Histogram(
            "sparkee_speech_depth_saved_ratio",
            "Share of layers a request's speech steps skipped (1 - average exit layer / layers).",
            buckets=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
            registry=r,
        )
        self.layers_run = Counter(
            "sparkee_speech_layers_run", "Layers run by speech steps (all requests).", registry=r
        )
        self.layers_full = Counter(
            "sparkee_speech_layers_full", "Layers speech steps would have run at full depth.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def finished(self, stats: dict, outcome: str) -> None:
        """Per-request speech measures from the run's stats."""
        self.requests.labels(outcome).inc()
        acc = stats.get("speech_acceptance")
        if acc is not None:
            self.acceptance.observe(acc)
        n, avg, N = (
            stats.get("speech_steps") or 0,
            stats.get("avg_exit_layer_speech"),
            stats.get("num_layers"),
        )
        if n and avg is not None and N:
            self.depth_saved.observe(stats["speech_depth_reduction_pct"] / 100)
            self.layers_run.inc(n * avg)
            self.layers_full.inc(n * N)


def log_request(**fields) -> None:
    """One line per request: id, tokens, timings, policy, outcome."""
    LOG.info("request %s", json.dumps(fields, default=str, separators=(",", ":")))
