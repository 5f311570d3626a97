"""The engine loop in one thread, fed by a queue: admission, cancellation, deadlines, audio.

The asyncio side (app.py) never touches torch: it checks a request (its row plan, through the
engine's own checks), `submit`s a `Job` and reads the job's asyncio queue, where this thread puts
("tokens", [Emitted]), ("audio", seq, future), ("done", info) or ("error", status, message) with
`loop.call_soon_threadsafe`. Between two engine steps the thread aborts cancelled rows, drops rows
past their deadline and admits waiting jobs into free slots, so a request joins the running batch
at the next step boundary and leaves it when it stops. Jobs admitted at one boundary (a burst of
arrivals) are prefilled together, `prefill_batch` prompts per padded pass (1: each alone).

Admission: at most `max_batch_size` rows decode (the engine's slots) and at most `max_queue` jobs
wait; `submit` raises `Busy` beyond that (HTTP 429).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..engine import Engine, Plan
from ..errors import SparkeeError
from .audio import Audio, Chunker
from .metrics import LOG, Metrics


class Busy(Exception):
    """The queue is full (or the server is stopping): try again later."""

    def __init__(self, message: str, retry_after: int = 1, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


@dataclass
class Job:
    prompt: list[int]
    plan: Plan
    loop: asyncio.AbstractEventLoop
    audio: bool = False
    deadline: float = float("inf")  # time.monotonic() after which the job is dropped
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    row: int | None = None
    cancelled: bool = False
    chunker: Chunker | None = None
    audio_chunks: int = 0
    started: float | None = None  # admitted (prefill begins)

    def send(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Worker:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        max_queue: int = 64,
        audio: Audio | None = None,
        audio_threads: int = 1,
        prefill_threads: int | None = None,
        prefill_batch: int = 8,
    ) -> None:
        self.engine, self.metrics, self.max_queue, self.audio = engine, metrics, max_queue, audio
        # torch threads while prompts are prefilled (None: those of the decoding steps): a prefill
        # is one large compute-bound pass that every core speeds up, while a decoding step is many
        # small products whose spinning OpenMP workers would starve the event loop and the vocoder
        self.prefill_threads = prefill_threads
        # prompts per prefill pass: 8 arrivals prefilled one after another keep the last waiting for
        # all 8 passes (reference SLM, 2 threads: 157-170 ms), one padded pass takes 64-91 ms
        # (bench/prefill_batch.py)
        if prefill_batch < 1:
            raise SparkeeError(f"prefill_batch must be at least 1, got {prefill_batch}")
        self.prefill_batch = prefill_batch
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cancels: list[Job] = []
        self._rows: dict[int, Job] = {}
        self._paused = False
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max(1, audio_threads), thread_name_prefix="sparkee-vocoder")
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.cancel_requests = 0  # jobs asked to stop (client gone, stop string, shutdown)
        self.cancelled_rows = 0  # rows aborted because their client went away or asked to stop
        self.full_s_per_token: float | None = None  # recent full-depth rows' decode time per token
        self.steps = 0

    # -- the asyncio side ---------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._accepting

    def submit(self, job: Job) -> None:
        with self._cv:
            if not self._accepting:
                raise Busy("the server is shutting down", retry_after=5, status=503)
            free = self.engine.max_batch_size - len(self._rows)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise Busy(
                    f"the server is busy: {self.engine.max_batch_size} requests are decoding and "
                    f"{self.max_queue} are waiting; retry later",
                    retry_after=max(1, round(len(self._waiting) / self.engine.max_batch_size)),
                )
            if self.audio is not None and job.audio:
                job.chunker = self.audio.chunker()
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away, or a stop string ended it): its row is freed at once."""
        with self._cv:
            if job.cancelled:
                return
            job.cancelled = True
            self.cancel_requests += 1
            self._cancels.append(job)
            self._cv.notify()

    def pause(self, paused: bool = True) -> None:
        """Hold the loop between steps (tests fill the queue deterministically with it)."""
        with self._cv:
            self._paused = paused
            self._cv.notify()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="sparkee-engine", daemon=True)
        self._thread.start()

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop admitting; let in-flight rows finish for up to `drain_s`, then cancel the rest."""
        with self._cv:
            self._accepting = False
            self._paused = False
            self._cv.notify()
        end = time.monotonic() + drain_s
        while (self._rows or self._waiting) and time.monotonic() < end and self._alive():
            time.sleep(0.02)
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while self._once():
                pass
        except BaseException as e:  # noqa: BLE001 - report to every client, then die loudly
            LOG.exception("the engine loop failed")
            for job in [*self._rows.values(), *self._waiting]:
                job.send(("error", 500, f"the engine failed: {e}"))
            raise
        finally:
            self._shutdown_jobs()

    def _shutdown_jobs(self) -> None:
        for row, job in list(self._rows.items()):
            self.engine.abort(row)
            job.send(("error", 503, "the server shut down before the answer was complete"))
            self.metrics.requests.labels("cancelled").inc()
        self._rows.clear()
        while self._waiting:
            self._waiting.popleft().send(("error", 503, "the server shut down before the request started"))
        self.metrics.running.set(0)
        self.metrics.waiting.set(0)

    def _admit(self, admit: list[Job]) -> None:
        """Prefill the admitted jobs' prompts, `prefill_batch` per pass, and send each pass's first
        tokens at once."""
        now = time.monotonic()
        ready = []
        for job in admit:
            if job.cancelled:
                continue
            if now > job.deadline:
                job.send(("error", 504, "the request's deadline passed while it waited for a row"))
                self.metrics.requests.labels("error").inc()
                continue
            ready.append(job)
        for k in range(0, len(ready), self.prefill_batch):
            group = ready[k : k + self.prefill_batch]
            started = time.perf_counter()
            try:
                rows = self.engine.add_many([j.prompt for j in group], [j.plan for j in group], group)
            except SparkeeError:  # nothing was added: each alone, so only the refused job fails
                rows = [self._add_alone(j, time.perf_counter()) for j in group]
            else:
                for job in group:
                    job.started = started
            for job, row in zip(group, rows, strict=True):
                if row is None:
                    continue
                job.row = row
                self._rows[row] = job
                self.metrics.prompt_tokens.inc(len(job.prompt))
            # first tokens (from the prefill) go out now, not after the other prefills
            self._dispatch(self.engine.drain())

    def _add_alone(self, job: Job, started: float) -> int | None:
        job.started = started
        try:
            return self.engine.add(job.prompt, plan=job.plan, tag=job)
        except SparkeeError as e:
            job.send(("error", 400, str(e)))
            self.metrics.requests.labels("error").inc()
            return None

    @contextlib.contextmanager
    def _prefill_threads(self, prefilling: bool):
        """torch's threads set to `prefill_threads` for the prefills, then back (this thread runs
        all of the engine's torch work)."""
        decode = torch.get_num_threads()
        if not prefilling or not self.prefill_threads or self.prefill_threads == decode:
            yield
            return
        torch.set_num_threads(self.prefill_threads)
        try:
            yield
        finally:
            torch.set_num_threads(decode)

    def _once(self) -> bool:
        eng = self.engine
        with self._cv:
            while not self._stop and (
                self._paused or (not self._waiting and not self._rows and not self._cancels)
            ):
                self._cv.wait(timeout=0.5)
            if self._stop:
                return False
            cancels, self._cancels = self._cancels, []
            now = time.monotonic()
            late = [j for j in self._waiting if now > j.deadline]
            for job in late:  # waited past the deadline: never admitted
                self._waiting.remove(job)
                job.send(("error", 504, "the request's deadline passed while it waited for a row"))
                self.metrics.requests.labels("error").inc()
            admit = []
            while self._waiting and len(self._rows) + len(admit) < eng.max_batch_size:
                admit.append(self._waiting.popleft())
            self.metrics.waiting.set(len(self._waiting))
        for job in cancels:
            if job.row is not None and self._rows.get(job.row) is job:
                del self._rows[job.row]
                eng.abort(job.row)
                self.cancelled_rows += 1
                self.metrics.requests.labels("cancelled").inc()
            job.send(("cancelled",))
        with self._prefill_threads(bool(admit)):
            self._admit(admit)
        self.metrics.running.set(len(self._rows))
        if not self._rows:
            return True
        step = eng.step()
        self.steps += 1
        if step.rows:
            self.metrics.batch_size.observe(step.rows)
        self._dispatch(step.events)
        for row in step.finished:
            job = self._rows.pop(row)
            self._finish(job, row)
        now = time.monotonic()
        for row, job in list(self._rows.items()):
            if now > job.deadline:
                del self._rows[row]
                eng.abort(row)
                job.send(("error", 504, "the request ran past its deadline"))
                self.metrics.requests.labels("error").inc()
        self.metrics.running.set(len(self._rows))
        return True

    def _dispatch(self, events) -> None:
        per_job: dict[int, list] = {}
        for ev in events:
            job = self._rows.get(ev.row)
            if job is None:
                continue
            per_job.setdefault(ev.row, []).append(ev)
            if job.chunker is not None:
                piece = job.chunker.push(ev.token)
                if piece:
                    self._vocode(job, piece)
        for row, evs in per_job.items():
            self._rows[row].send(("tokens", evs))  # one wake-up of the event loop per job and step
        self._count(len(events))

    def _vocode(self, job: Job, piece: list[int]) -> None:
        seq = job.audio_chunks
        job.audio_chunks += 1
        fut = self._pool.submit(self.audio.pcm, piece)
        fut.add_done_callback(lambda f, job=job, seq=seq: job.send(("audio", seq, f)))

    def _count(self, n: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else None
        if span:
            self.metrics.tokens_per_s.set(sum(k for _, k in self._recent) / max(span, 1.0))

    def _finish(self, job: Job, row: int) -> None:
        eng = self.engine
        res = eng.result(row)
        eng.release(row)
        if job.chunker is not None:
            piece = job.chunker.flush()
            if piece:
                self._vocode(job, piece)
        stats = res.stats.as_json()  # a plain dict crosses to the HTTP side
        plan = job.plan
        finish = "stop" if res.tokens and res.tokens[-1] in plan.stop_ids else "length"
        per_token = stats["decode_s"] / max(len(res.tokens) - 1, 1)
        full = plan.speech_policy.kind == "full" and plan.text_policy.kind == "full"
        if full and len(res.tokens) > 8:  # the measured baseline of later rows' speed-ups
            old = self.full_s_per_token
            self.full_s_per_token = per_token if old is None else 0.8 * old + 0.2 * per_token
        measured = None
        if not full and self.full_s_per_token and len(res.tokens) > 8:
            measured = self.full_s_per_token / per_token
        job.send(
            (
                "done",
                {
                    "tokens": res.tokens,
                    "modalities": res.modalities,
                    "finish_reason": finish,
                    "stats": stats,
                    "measured_speedup": measured,
                    "audio_chunks": job.audio_chunks,
                },
            )
        )
