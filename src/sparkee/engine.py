"""The step-able engine: `add(prompt, cfg)` / `step()` / `abort(row)`, one decode loop for everyone.

`generate`, `stream`, `generate_batch` (generate.py), eval (through `generate_batch`) and the server
(serve/worker.py) all drive this object; the passes themselves (deferred deep fill, verification,
early exits) are the functions of generate.py that it calls.

The engine owns a fixed number of row slots (`max_batch_size`) and a KV cache preallocated for
them (`max_len` positions per row). `add` takes a free slot, prefills the prompt alone (as
`generate_batch` always did) and returns the slot as the row's id; the row's plan (policies,
sampling, rule, its own max_new_tokens) is its own, so rows of different policies and sampling
settings share the loop. `step` runs one step of every live row: rows whose steps reach the same
depth share each layer pass (SPAR-K rows in lock-step run as one batch), rows of other depths
join or leave the pass at their layers. A row that stops is flushed (its pending deep layers
filled and checked) and reported in `Step.finished`; its slot stays readable (`result`) until
`release`. `abort` frees a slot at once, finished or not.

What rows must share: the backbone, the exit heads and the vocabulary restriction of speech steps
(`speech_vocab_only`, `audit_vocab` and the speech token set), which the engine's own config fixes.
Not thread-safe: one thread (the server's worker) drives it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from . import cost
from .backbone import Backbone
from .errors import SparkeeError
from .generate import (
    Emitted,
    GenerationConfig,
    GenerationResult,
    Plan,
    _calibrate_wanted,
    _check_prompt,
    _flush,
    _prefill,
    _Run,
    _step,
    _unfinished,
    context_limit,
    make_plan,
)
from .heads import ExitHeads
from .trace import compute_stats

DEFAULT_MAX_LEN = 2048  # positions per row when neither the caller nor the model says less
_UNSET = object()


@dataclass
class Step:
    """What one `step()` did: tokens confirmed (streamable) and rows that finished."""

    events: list[Emitted] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    rows: int = 0  # rows that ran a step (0 for a flush-only or idle step)


@dataclass
class _RowTimes:
    tag: object
    added: float
    prefilled: float = 0.0
    finished: float | None = None
    prefill_meter: dict = field(default_factory=dict)


class Engine:
    """A continuous batch over one backbone (see the module docstring)."""

    def __init__(
        self,
        bb: Backbone,
        heads: ExitHeads | None = None,
        cfg: GenerationConfig | None = None,
        max_batch_size: int = 1,
        max_len: int | None = None,
        calibration: cost.Calibration | None | object = _UNSET,
    ) -> None:
        if max_batch_size < 1:
            raise SparkeeError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.bb = bb
        self.heads = heads if heads is not None else ExitHeads(bb, "logit-lens")
        self.cfg = cfg or GenerationConfig()
        limit = context_limit(bb)
        if max_len is None:
            max_len = min(limit, DEFAULT_MAX_LEN) if limit else DEFAULT_MAX_LEN
        if max_len < 2:
            raise SparkeeError(f"max_len must be at least 2 positions, got {max_len}")
        # the shared plan: also checks the engine's own config against the model and heads
        self.plan = make_plan(bb, self.heads, replace(self.cfg, max_new_tokens=1), prompt_len=1)
        if calibration is _UNSET:
            calibration = cost.load_or_calibrate(bb, self.heads) if _calibrate_wanted(self.cfg) else None
        self.calibration = calibration
        self._run = _Run(self.plan, max_batch_size, max_len)
        self._times: dict[int, _RowTimes] = {}
        self._outbox: list[Emitted] = []

    # -- capacity ---------------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self._run.capacity

    @property
    def max_len(self) -> int:
        return self._run.max_len

    def free_slots(self) -> int:
        return sum(tr is None for tr in self._run.traces)

    def active(self) -> list[int]:
        """Rows still decoding, in slot order."""
        return [b for b, tr in enumerate(self._run.traces) if tr is not None and not tr.done]

    def done(self, row: int) -> bool:
        tr = self._run.traces[row]
        return tr is None or tr.done

    def tag(self, row: int):
        t = self._times.get(row)
        return None if t is None else t.tag

    # -- add / step / abort -----------------------------------------------------------------------

    def plan_for(self, prompt_len: int, cfg: GenerationConfig | None = None) -> Plan:
        """Check a request against the model, the heads and this engine; returns its row plan."""
        cfg = cfg or self.cfg
        plan = make_plan(self.bb, self.heads, cfg, prompt_len)
        if plan.max_len > self.max_len:
            raise SparkeeError(
                f"prompt ({prompt_len}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                f"{self.max_len - 1} positions this engine holds per row"
            )
        base = self.plan
        same = (
            plan.cfg.speech_vocab_only == base.cfg.speech_vocab_only
            and plan.cfg.audit_vocab == base.cfg.audit_vocab
            and (plan.speech_set is None) == (base.speech_set is None)
            and (plan.speech_set is None or torch.equal(plan.speech_set, base.speech_set))
        )
        if not same:
            raise SparkeeError(
                "rows of one engine share the speech-vocabulary restriction: speech_vocab_only, "
                "audit_vocab and the speech ids must be the engine's own"
            )
        return replace(plan, speech_set=base.speech_set)

    def add(
        self,
        prompt: Sequence[int],
        cfg: GenerationConfig | None = None,
        seed: int | None | object = _UNSET,
        tag: object = None,
        plan: Plan | None = None,
    ) -> int:
        """Prefill `prompt` alone in a free slot and return the slot (the row's id). The row joins
        the batch at the next `step()`; its first token (from the prefill) comes with that step's
        events, or from `drain()`. `seed` defaults to the config's; `tag` is the caller's."""
        _check_prompt(self.bb, prompt)
        plan = plan or self.plan_for(len(prompt), cfg)
        run = self._run
        free = [b for b, tr in enumerate(run.traces) if tr is None]
        if not free:
            raise SparkeeError(f"the engine is full: {self.max_batch_size} rows are in use")
        b = free[0]
        run.open(b, plan, list(prompt), plan.cfg.seed if seed is _UNSET else seed)
        times = self._times[b] = _RowTimes(tag, time.perf_counter())
        try:
            with torch.inference_mode():
                _prefill(run, b)
        except BaseException:
            self.release(b)
            raise
        times.prefilled = time.perf_counter()
        # costs below are decode costs; the all-full baseline excludes prefill too
        times.prefill_meter = run.meters[b].snapshot()
        run.meters[b].reset()
        self._outbox.extend(self._confirmed(b, len(run.traces[b].records)))
        return b

    def drain(self) -> list[Emitted]:
        """Events not yet handed out (first tokens of rows added since the last step)."""
        out, self._outbox = self._outbox, []
        return out

    def step(self) -> Step:
        """One step of every live row (or, when some rows just stopped, their flush)."""
        run = self._run
        out = Step(self.drain())
        active = self.active()
        if not active:
            return out
        with torch.inference_mode():
            finished = [b for b in active if not _unfinished(run, b)]
            if finished:
                revived = _flush(run, finished)
                for b in finished:
                    if b not in revived:
                        run.traces[b].done = True
                        self._times[b].finished = time.perf_counter()
                        out.events.extend(self._confirmed(b, len(run.traces[b].records)))
                        out.finished.append(b)
                for b in revived:
                    out.events.extend(self._stream(b))
                return out
            _step(run, active)
        out.rows = len(active)
        for b in active:
            out.events.extend(self._stream(b))
        return out

    def abort(self, row: int) -> bool:
        """Cancel a row and free its slot and KV at once; False when the slot was already free."""
        if self._run.traces[row] is None:
            return False
        self.release(row)
        return True

    def release(self, row: int) -> None:
        """Free a (finished or aborted) row's slot for the next `add`."""
        self._run.release(row)
        self._times.pop(row, None)
        self._outbox = [e for e in self._outbox if e.row != row]

    def reset_batch_meter(self) -> None:
        """Forget the batch's passes so far (generate_batch: its batch stats count decode only)."""
        self._run.batch_meter.reset()

    # -- streaming --------------------------------------------------------------------------------

    def _confirmed(self, b: int, upto: int) -> list[Emitted]:
        tr = self._run.traces[b]
        out = []
        while tr.emitted < upto:
            r = tr.records[tr.emitted]
            out.append(Emitted(tr.emitted, r.token, r.modality, r.exit_layer, b))
            tr.emitted += 1
        return out

    def _stream(self, b: int) -> list[Emitted]:
        run = self._run
        tr, plan = run.traces[b], run.plans[b]
        # in verified mode, stream only what a full pass has confirmed
        if not plan.cfg.verify or run.cache.next_position(self.bb.num_layers - 1, b) >= tr.pos:
            return self._confirmed(b, len(tr.records))
        return []

    # -- results ----------------------------------------------------------------------------------

    def result(
        self,
        row: int,
        decode_s: float | None = None,
        prefill_s: float | None = None,
        calibration: cost.Calibration | None | object = _UNSET,
        plan: Plan | None = None,
    ) -> GenerationResult:
        """A row's tokens, trace and stats (timings: the row's own unless given)."""
        run = self._run
        tr = run.traces[row]
        if tr is None:
            raise SparkeeError(f"row {row} holds no sequence")
        plan = plan or run.plans[row]
        t = self._times[row]
        if prefill_s is None:
            prefill_s = t.prefilled - t.added
        if decode_s is None:
            decode_s = (t.finished or time.perf_counter()) - t.prefilled
        if calibration is _UNSET:
            calibration = self.calibration if _calibrate_wanted(plan.cfg) else None
        N = self.bb.num_layers
        stats = compute_stats(tr, N, run.meters[row], decode_s, prefill_s, calibration, plan)
        P = tr.prompt_len
        stats["prefill_flops"] = 2 * t.prefill_meter["macs"]
        stats["prompt_len"] = P
        stats["prompt_len_first_layer"] = P - run.cache.shift[0][row]
        stats["prompt_len_last_layer"] = P - run.cache.shift[N - 1][row]
        stats["kv_bytes"] = run.cache.nbytes(row)
        return GenerationResult(
            prompt=tr.seq[:P],
            tokens=tr.seq[P:],
            modalities=[r.modality for r in tr.records],
            exit_layers=[r.exit_layer for r in tr.records],
            steps=tr.records,
            stats=stats,
            cache=run.cache.row(row),
            meter=run.meters[row],
            draft_cache=None if run.draft is None else run.draft.row(row),
        )

    def batch_stats(
        self, rows: Sequence[int], decode_s: float, calibration, plan: Plan | None = None
    ) -> dict:
        """Stats of the batch as a whole (generate_batch's `batch_*` keys)."""
        run = self._run
        return cost.batch_stats(
            run.batch_meter,
            [run.traces[b] for b in rows],
            self.bb.num_layers,
            decode_s,
            calibration,
            plan or self.plan,
        )
