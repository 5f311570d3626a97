"""The step-able engine: `add(prompt, cfg)` / `step()` / `abort(row)`, and the decode loop it runs.

`generate`, `stream`, `generate_batch` (generate.py), eval (through `generate_batch`) and the server
(serve/worker.py) all drive this object. Read top to bottom: the engine (entry points, the step
driver), one step and its kinds, verification, the batch's layer passes, sampling, the plan.

The engine owns a fixed number of row slots (`max_batch_size`) and a KV cache preallocated for
them (`max_len` positions per row). `add` takes a free slot, prefills the prompt alone (as
`generate_batch` always did) and returns the slot as the row's id (`add_many`: several slots, their
prompts prefilled in one padded pass, as the server does with a burst); the row's plan (policies,
sampling, rule, its own max_new_tokens) is its own, so rows of different policies and sampling
settings share the loop. `step` runs one step of every live row: rows whose steps reach the same
depth share each layer pass (SPAR-K rows in lock-step run as one batch), rows of other depths
join or leave the pass at their layers. A row that stops is flushed (its pending deep layers
filled and checked) and reported in `Step.finished`; its slot stays readable (`result`) until
`release`. `abort` frees a slot at once, finished or not.

What rows must share: the backbone, the exit heads and the vocabulary restriction of speech steps
(`speech_vocab_only`, `audit_vocab` and the speech token set), which the engine's own config fixes.
Not thread-safe: one thread (the server's worker) drives it.

The decode loop: a batch of sequences, one token per row per step. A step
feeds each row's last token at its position `pos` and produces the token at `pos + 1`. Its
modality comes from the row's interleave tracker, its depth from the policy of that modality:

- full step: all layers, the model's own output projection;
- early step: layers 1..L, then the exit head of layer L. Layers L+1..N of this position stay
  empty in the KV cache ("pending"), and the state after layer L is kept;
- confidence step: run to L, exit if the head's entropy is below the threshold, else go on.

Deferred deep fill: a pass that runs layer i first takes in every position of its row still
missing layer i (their kept states), so a full step runs the deep layers over all pending
positions plus its own in one causal pass, like a small prefill. By induction the positions
missing layer i are always a contiguous tail, so a length per (layer, row) describes the cache and
an offset causal mask is enough. That pass also yields the last layer's prediction for every
pending position: compared with the tokens the early steps emitted it gives the agreement rate for
free, and in verified mode an acceptance rule (accept.py) keeps or replaces each early token; at
the first replacement the row is rolled back (self-speculative decoding). With the `exact` rule
greedy output equals full-depth greedy output token for token.

Batches: rows are independent sequences (own positions; `add` prefills each row alone, `add_many`
pads the prompts of one pass, the padding never attended nor kept). A step groups the rows by how deep they run: layers 1..L run over every row
whose step reaches L, deeper layers over the rows that go on. In the padded format with equal
prompts the rows are in lock-step; otherwise the step handles a mix. Finished rows stop costing
compute. Each row samples with its own generator, so its tokens do not depend on its batch-mates.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from . import cost, hf
from .accept import EXACT, AcceptRule, parse_accept, resolve_distance
from .backbone import Backbone
from .cache import LayeredKVCache, RowView
from .config import GenerationConfig, PoolSpec, calibration_wanted
from .cost import CostMeter
from .errors import SparkeeError
from .evidence import Evidence, entropy, token_of
from .heads import ExitHeads
from .pooling import affinity_groups, pool
from .schedule import (
    Policy,
    TrackerState,
    advance,
    chunk_index,
    misplanned,
    next_modality,
    parse_policy,
)
from .stats import BatchStats, RunStats, batch_stats, compute_stats
from .trace import StepRecord

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
    """A continuous batch over one backbone (see the module docstring).

    `calibration`: this machine's measured costs (`calibrate.load_or_calibrate(bb)`), which the
    results' calibrated predictions use; the engine never measures the machine itself (None: the
    weight-read model only).
    """

    def __init__(
        self,
        bb: Backbone,
        heads: ExitHeads | None = None,
        cfg: GenerationConfig | None = None,
        max_batch_size: int = 1,
        max_len: int | None = None,
        calibration: cost.Calibration | None = None,
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
        return self._open([(list(prompt), plan, plan.cfg.seed if seed is _UNSET else seed, tag)])[0]

    def add_many(
        self, prompts: Sequence[Sequence[int]], plans: Sequence[Plan], tags: Sequence[object] | None = None
    ) -> list[int]:
        """Prefill several prompts in one padded pass (each right-padded to the longest; padding is
        never attended nor kept) and return their slots, in order; each row's seed is its plan's.

        Not bitwise `add` one by one: a pass over several rows rounds differently (its K/V ~1e-6
        apart), so a row's tokens equal its tokens prefilled alone except at a near-tie of the
        logits, as a batched decoding step's do. Rows that pool their prompt are prefilled alone.
        Nothing is added when a prompt is refused or the free slots are too few."""
        if len(plans) != len(prompts) or (tags is not None and len(tags) != len(prompts)):
            raise SparkeeError("add_many takes one plan (and one tag, if any) per prompt")
        for p in prompts:
            _check_prompt(self.bb, p)
        tags = tags if tags is not None else [None] * len(prompts)
        return self._open(
            [(list(p), plan, plan.cfg.seed, tag) for p, plan, tag in zip(prompts, plans, tags, strict=True)]
        )

    def _open(self, rows: list[tuple[list[int], Plan, int | None, object]]) -> list[int]:
        """Open a slot per (prompt, plan, seed, tag), prefill them (together where they can be) and
        queue their first tokens."""
        run = self._run
        free = [b for b, tr in enumerate(run.traces) if tr is None]
        if len(free) < len(rows):
            raise SparkeeError(
                f"the engine is full: {self.max_batch_size - len(free)} of {self.max_batch_size} rows "
                f"are in use, {len(rows)} asked for"
            )
        slots = free[: len(rows)]
        added = time.perf_counter()
        for b, (prompt, plan, seed, tag) in zip(slots, rows, strict=True):
            run.open(b, plan, prompt, seed)
            self._times[b] = _RowTimes(tag, added)
        together = [b for b in slots if run.plans[b].cfg.prefill_pool is None]
        try:
            with torch.inference_mode():
                if together:
                    _prefill(run, together)
                for b in slots:
                    if b not in together:
                        _prefill(run, [b])
        except BaseException:
            for b in slots:
                self.release(b)
            raise
        done = time.perf_counter()
        for b in slots:
            times = self._times[b]
            times.prefilled = done
            # costs below are decode costs; the all-full baseline excludes prefill too
            times.prefill_meter = run.meters[b].snapshot()
            run.meters[b].reset()
            self._outbox.extend(self._confirmed(b, len(run.traces[b].records)))
        return slots

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

    @property
    def batch_meter(self) -> CostMeter:
        """The passes the batch as a whole ran since the last `reset_batch_meter` (its `steps`
        count batch steps by their deepest kind: "early" when every row exited early)."""
        return self._run.batch_meter

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
        if not plan.rolls_back or run.cache.next_position(self.bb.num_layers - 1, b) >= tr.pos:
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
            calibration = self.calibration if calibration_wanted(plan.cfg) else None
        N = self.bb.num_layers
        stats = compute_stats(tr, N, run.meters[row], decode_s, prefill_s, calibration, plan)
        P = tr.prompt_len
        stats.prefill_flops = 2 * t.prefill_meter["macs"]
        stats.prompt_len = P
        stats.prompt_len_first_layer = P - run.cache.shift[0][row]
        stats.prompt_len_last_layer = P - run.cache.shift[N - 1][row]
        stats.kv_bytes = run.cache.nbytes(row)
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

    def batch_stats(self, rows: Sequence[int], decode_s: float, calibration) -> BatchStats:
        """Stats of the batch of `rows` as a whole (generate_batch's `batch_*` keys)."""
        run = self._run
        traces = [run.traces[b] for b in rows]
        return batch_stats(run.batch_meter, traces, decode_s, calibration)


@dataclass
class Emitted:
    """One streamed token. In verified mode a token is streamed once a full pass has confirmed it."""

    index: int  # 0-based index among the new tokens
    token: int
    modality: str
    exit_layer: int
    row: int = 0  # batch row


@dataclass
class GenerationResult:
    prompt: list[int]
    tokens: list[int]
    modalities: list[str]
    exit_layers: list[int]
    steps: list[StepRecord]
    stats: RunStats
    cache: RowView = field(repr=False)
    meter: CostMeter | None = field(default=None, repr=False)  # the passes this row ran (cost.py)
    draft_cache: RowView | None = field(default=None, repr=False)  # an adapter head's own cache

    def as_json(self) -> dict:
        return {
            "tokens": self.tokens,
            "modalities": self.modalities,
            "exit_layers": self.exit_layers,
            "stats": self.stats.as_json(),
        }


# ---------------------------------------------------------------------------------------------
# one step: plan each row, run the layers by depth, exit early or finish at the top


@dataclass
class _RowPlan:
    row: int
    state: TrackerState
    modality: str
    policy: Policy
    action: str  # full | exit | try
    depth: int  # layers to run before deciding (N for a full step)


def _plan_row(run: _Run, b: int) -> _RowPlan:
    plan, tr = run.plans[b], run.traces[b]
    state = tr.state(plan)
    modality = next_modality(plan.cfg.interleave, state)
    policy = plan.policy(modality)
    if run.capacity > 1 and plan.refreshes_with_batch and policy.refresh_every:
        # in a batch, a pattern of one F in K steps runs on the clock of full passes: K - 1 early
        # steps after each (see _share_refreshes), so rows that refreshed together go on together
        action, L = ("exit", policy.layer) if state.since_full < policy.refresh_every - 1 else ("full", None)
    else:
        action, L = policy.plan(chunk_index(modality, state) + tr.phase, state.since_full, tr.run_len)
    return _RowPlan(b, state, modality, policy, action, L if L else plan.bb.num_layers)


def _share_refreshes(run: _Run, plans: list[_RowPlan]) -> None:
    """When a step runs the deep layers for some row anyway (a text step, a refresh), rows that may
    refresh at any step join it: their pending early tokens are checked in the same pass, which
    costs little more (a layer pass over more rows is far cheaper than another pass), and their
    clock restarts with their batch-mates'. Only rows of exact greedy verification, whose tokens
    are full depth's whatever the schedule, so a row's answer never depends on its batch-mates."""
    N = run.plan.bb.num_layers
    if not any(rp.depth == N for rp in plans):
        return
    for rp in plans:
        if rp.action == "exit" and rp.state.since_full > 0 and run.plans[rp.row].refreshes_with_batch:
            rp.action, rp.depth = "full", N


def _step(run: _Run, rows: list[int]) -> None:
    """One step for each of `rows`: early rows stop at their exit layer, the others go on."""
    plan = run.plan
    bb, N = plan.bb, plan.bb.num_layers
    plans = [_plan_row(run, b) for b in rows]
    _share_refreshes(run, plans)
    h = bb.embed(torch.tensor([[run.traces[b].seq[-1]] for b in rows], device=bb.device))
    carry = _Carry(list(rows), h, [run.traces[b].pos for b in rows], [1] * len(rows))
    live = {rp.row: rp for rp in plans}
    if run.draft is not None:
        run.draft_need = {rp.row for rp in plans if rp.depth < N}
    at = 0
    for depth in sorted({rp.depth for rp in plans if rp.depth < N}):
        carry = run.run_layers(carry, range(at, depth))
        at = depth
        here = [j for j, b in enumerate(carry.rows) if live[b].depth == depth]
        head_logits = run.head_logits(depth, carry, here)
        keep = [j for j in range(len(carry.rows)) if j not in here]
        for n, j in enumerate(here):
            b, rp = carry.rows[j], live[carry.rows[j]]
            if (
                rp.action == "exit"
                or entropy(torch.softmax(head_logits[n].float(), -1)) < rp.policy.threshold
            ):
                tr = run.traces[b]
                s = carry.start[j]
                run.pend_h[b, s : s + carry.count[j]] = carry.h[j, : carry.count[j]]
                _emit_early(run, b, head_logits[n], rp, filled=tr.pos - s)
            else:
                rp.action, rp.depth = "fallback", N  # confidence too low: run on to the top
                keep.append(j)
        carry = carry.select(sorted(keep))
        if not carry.rows:
            run.draft_need = set()
            _record_fixed_work(run, None, live)
            return
    run.draft_need = set()
    carry = run.run_layers(carry, range(at, N))
    _record_fixed_work(run, carry, live)
    _finish_full(run, carry, live)


def _record_fixed_work(run: _Run, carry: _Carry | None, live: dict[int, _RowPlan] | None) -> None:
    """Tell the cost model a step's fixed work (the passes tell it their own): the batch's, paid
    once at the cost of its deepest kind (embedding, masks, dispatch); each row's own step kind
    (the rows of `live` that left the carry exited early); and the check of each pending early
    token (`live` None: a flush, which checks only)."""
    if live is not None:
        run.record_step("early" if carry is None else "full", {}, batch=1)
        deep = set() if carry is None else set(carry.rows)
        for b in live:
            if b not in deep:
                run.record_step("early", {b: 1})
    if carry is None:
        return
    for b, c in zip(carry.rows, carry.count, strict=True):
        if live is not None:
            run.record_step(live[b].action, {b: 1})
        n_pending = c - (1 if live is not None else 0)
        if n_pending:
            run.record_step("check", {b: n_pending}, batch=n_pending)


def _emit_early(run: _Run, b: int, logits: torch.Tensor, rp: _RowPlan, filled: int) -> None:
    plan, tr = run.plans[b], run.traces[b]
    cfg, ids = plan.cfg, plan.heads.token_ids
    logits = _penalize(logits, tr.seq, cfg.repetition_penalty, ids)
    idx, probs = _draw(logits, cfg, tr.gen)
    if probs is not None and plan.samples_verified:  # the proposal distribution, over the whole vocabulary
        q = torch.zeros(plan.bb.vocab_size)
        q[ids.cpu() if ids is not None else slice(None)] = probs.cpu()
        tr.early_probs[tr.pos] = q
    token = token_of(idx, ids)
    rec = StepRecord(tr.pos, token, rp.modality, rp.depth, "early", filled=filled)
    rec.misplanned = misplanned(rp.modality, plan.kind_of(token))
    tr.append(rec, rp.state)


def _finish_full(run: _Run, carry: _Carry, live: dict[int, _RowPlan] | None) -> None:
    """Project the last layer for every real state of the carry, check each row's pending early
    tokens and emit its own token (`live` is None for a flush: no own token)."""
    plan = run.plan
    speech_rows, owner = [], []
    for b, s, c in zip(carry.rows, carry.start, carry.count, strict=True):
        tr = run.traces[b]
        n_pending = c - (1 if live is not None else 0)
        speech_rows += [tr.at(p).modality == "speech" for p in range(s, s + n_pending)]
        if live is not None:
            speech_rows.append(live[b].modality == "speech")
        owner += [b] * c
    audit = plan.cfg.audit_vocab and live is not None
    full, restricted = run.project(plan.bb.final_norm(carry.flat()), speech_rows, owner, audit)
    first = 0
    for b, s, c in zip(carry.rows, carry.start, carry.count, strict=True):
        tr = run.traces[b]
        n_pending = c - (1 if live is not None else 0)
        before = len(tr.records) + (live is not None)  # steps this row has run, its own included
        if _check_pending(run, b, full, restricted, first, s, n_pending):
            if live is not None:
                tr.wasted += 1  # this step's own pass served the check only
            # the row's chunk index fell back by the steps it discarded; its pattern keeps the
            # batch's clock (steps since the last full pass), so it goes on sharing passes
            tr.phase += before - len(tr.records)
        elif live is not None:
            _emit_full(run, live[b], full, restricted, first + n_pending, filled=n_pending)
        first += c


def _emit_full(run: _Run, rp: _RowPlan, full, restricted, j: int, filled: int) -> None:
    """Row rp.row's token from the last layer's logits at entry j (full [n, V] and/or restricted
    [n, |set|], see _Run.project); `filled`: pending positions this step's pass computed."""
    b, modality = rp.row, rp.modality
    plan, tr = run.plans[b], run.traces[b]
    logits, ids = _choice(plan, full, restricted, j, modality == "speech")
    logits = _penalize(logits, tr.seq, plan.cfg.repetition_penalty, ids)
    idx, _ = _draw(logits, plan.cfg, tr.gen)
    token = token_of(idx, ids)
    changed = None
    if ids is not None and full is not None:  # audited --speech-vocab-only
        changed = int(torch.argmax(full[j])) != int(ids[int(torch.argmax(logits))])
    rec = StepRecord(
        tr.pos, token, modality, plan.bb.num_layers, rp.action, filled=filled, vocab_changed=changed
    )
    rec.misplanned = misplanned(modality, plan.kind_of(token))
    tr.append(rec, rp.state)


def _flush(run: _Run, rows: list[int]) -> list[int]:
    """Fill the deep layers of finished rows' pending tails (so their caches are complete) and check
    their tokens; returns the rows that a rejection brought back to life."""
    N = run.plan.bb.num_layers
    pending = [b for b in rows if run.cache.next_position(N - 1, b) < run.traces[b].pos]
    if not pending:
        return []
    h = run.pend_h.new_zeros(len(pending), 0, run.pend_h.shape[-1])
    carry = _Carry(pending, h, [run.traces[b].pos for b in pending], [0] * len(pending))
    carry = run.run_layers(carry, range(N))
    before = {b: run.traces[b].rejections for b in pending}
    _record_fixed_work(run, carry, None)
    _finish_full(run, carry, None)
    return [b for b in pending if run.traces[b].rejections > before[b] and _unfinished(run, b)]


def _unfinished(run: _Run, b: int) -> bool:
    tr, plan = run.traces[b], run.plans[b]
    return len(tr.records) < plan.cfg.max_new_tokens and tr.records[-1].token not in plan.stop_ids


def _prefill(run: _Run, rows: list[int]) -> None:
    """Prompts of `rows` through every layer (several rows: one pass, right-padded to the longest,
    the padding after each row's positions, never attended), then each row's first token."""
    bb = run.plan.bb
    lens = [run.traces[b].prompt_len for b in rows]
    ids = torch.zeros(len(rows), max(lens), dtype=torch.long)  # [R, longest prompt]
    for j, b in enumerate(rows):
        ids[j, : lens[j]] = torch.tensor(run.traces[b].seq)
    h = bb.embed(ids.to(bb.device))
    pool = run.plans[rows[0]].cfg.prefill_pool
    if pool is None:
        carry = run.run_layers(_Carry(rows, h, [0] * len(rows), lens), range(bb.num_layers), prefill=True)
    else:  # one row
        carry = _pooled_prefill(run, rows[0], h, pool)
    plans = []
    for b in rows:
        state = TrackerState()
        modality = next_modality(run.plans[b].cfg.interleave, state)
        plans.append(_RowPlan(b, state, modality, run.plans[b].policy(modality), "full", bb.num_layers))
    full, restricted = run.project(
        bb.final_norm(carry.last()[:, 0]),
        [rp.modality == "speech" for rp in plans],
        rows,
        run.plan.cfg.audit_vocab,
    )
    for j, rp in enumerate(plans):
        _emit_full(run, rp, full, restricted, j, filled=0)


def _pooled_prefill(run: _Run, b: int, h: torch.Tensor, spec: PoolSpec) -> _Carry:
    """Prefill with Affinity Pooling at the embeddings and after layer `spec.layer` (see pooling.py).

    Layers after each pooling point run on the shorter sequence; `cache.shift` records how many
    positions each layer dropped, so later steps keep the usual positions P, P + 1, ...
    """
    plan, tr, cache = run.plans[b], run.traces[b], run.cache
    bb, P, N = plan.bb, tr.prompt_len, plan.bb.num_layers
    ids = torch.tensor(tr.seq)
    lo, hi = plan.cfg.speech_ids
    speech = (ids >= lo) & (ids < hi)
    pos = torch.arange(P, dtype=torch.float32)
    for first, last, tau, window in (
        (0, spec.layer, spec.tau_in, spec.window_in),
        (spec.layer, N, spec.tau_deep, spec.window_deep),
    ):
        h, pos, speech = pool(h, pos, speech, affinity_groups(h[0], speech, tau, window), spec.position)
        pids = pos[None].to(bb.device)
        pe = bb.rope(h, pids)
        T = h.shape[1]
        for i in range(first, last):
            cache.shift[i][b] = P - T
        cache.begin_pass([b], [T], [0])
        h = bb.run_block(first, last, h, None, pids, pe, cache)  # slots start at 0: is_causal masks it
        run.record(cost.Pass("layers", ((b, T, T),), T, first, last))
    return _Carry([b], h[:, -1:], [P - 1], [1])  # only the last state is projected


# ---------------------------------------------------------------------------------------------
# verification


def _verify_one(plan: Plan, tr: Trace, pos: int, rec: StepRecord, logits, ids) -> tuple[bool, int, bool]:
    """Check the early token produced at step `pos` against the last layer's logits.

    Returns (accepted, the token the row goes on with, agreed: the early token is the full model's
    argmax). Without verified mode the rule is judged greedily (no random draws), so that
    unverified output never depends on the rule.
    """
    cfg = plan.cfg
    logits = _penalize(logits, tr.seq[: pos + 1], cfg.repetition_penalty, ids)
    rule = plan.accept if rec.modality == "speech" else EXACT
    ev = Evidence(logits, ids, token_of(int(torch.argmax(logits)), ids), tr.seq[pos], plan.distance)
    if plan.samples_verified:  # the rule decides on the full model's distribution
        ev.probs, ev.early_probs, ev.gen = _distribution(logits, cfg), tr.early_probs[pos], tr.gen
    accepted, token = rule.decide(rec.token, ev)
    return accepted, token, ev.best == rec.token


def _check_pending(run: _Run, b: int, full, restricted, first: int, start: int, n: int) -> bool:
    """Check row b's pending early tokens (positions start..start+n-1, at logits rows first..) and,
    in verified mode, roll back at the first rejection. Returns True when a rollback happened."""
    plan, tr = run.plans[b], run.traces[b]
    if n == 0:
        return False
    tr.refreshes += 1
    all_ok = True
    for j in range(n):
        pos = start + j
        rec = tr.at(pos)
        logits, ids = _choice(plan, full, restricted, first + j, rec.modality == "speech")
        ok, token, agreed = _verify_one(plan, tr, pos, rec, logits, ids)
        rec.agreed, rec.accepted = agreed, ok
        all_ok &= ok
        if plan.rolls_back and not ok:
            _adapt(plan, tr, False)
            k = tr.step_index(pos)
            tr.truncate(k)
            tr.rejections += 1
            tr.seq[pos + 1] = token
            rec.token, rec.corrected = token, True
            run.cache.truncate(pos + 1, b)  # positions <= pos saw only kept tokens
            if run.draft is not None:
                run.draft.truncate(pos + 1, b)
            return True
        tr.early_probs.pop(pos, None)
    _adapt(plan, tr, all_ok)
    return False


def _adapt(plan: Plan, tr: Trace, all_accepted: bool) -> None:
    """spar-k:adaptive: grow the run of early steps after a clean refresh, halve it after a miss."""
    pol = plan.speech_policy
    if pol.kind == "adaptive":
        tr.run_len = min(tr.run_len + 1, pol.kmax) if all_accepted else max(1, tr.run_len // 2)


# ---------------------------------------------------------------------------------------------
# passes


@dataclass
class _Carry:
    """States of a pass: batch rows `rows`; row j holds positions start[j] .. start[j] + count[j] - 1
    left-aligned in h[j] ([R, r, H]); the rest of h[j] is padding."""

    rows: list[int]
    h: torch.Tensor
    start: list[int]
    count: list[int]

    def select(self, keep: list[int]) -> _Carry:
        if len(keep) == len(self.rows):
            return self
        if not keep:
            return _Carry([], self.h[:0], [], [])
        idx = torch.tensor(keep, device=self.h.device)
        r = max(self.count[j] for j in keep)
        return _Carry(
            [self.rows[j] for j in keep],
            self.h.index_select(0, idx)[:, :r],
            [self.start[j] for j in keep],
            [self.count[j] for j in keep],
        )

    def last(self) -> torch.Tensor:
        """Each row's newest state: [R, 1, H]."""
        idx = torch.tensor([c - 1 for c in self.count], device=self.h.device)
        return self.h[torch.arange(len(self.rows), device=self.h.device), idx][:, None]

    def flat(self) -> torch.Tensor:
        """Every real state, row by row: [sum(count), H]."""
        return torch.cat([self.h[j, :c] for j, c in enumerate(self.count)])


class _Run:
    """A batch in flight: a fixed number of row slots, each with its own plan and trace (None when
    free), the cache and the kept states of pending positions. `plan` is the batch's shared plan
    (backbone, heads, the vocabulary restriction every row follows); `plans[b]` is row b's own."""

    def __init__(self, plan: Plan, capacity: int, max_len: int) -> None:
        bb = plan.bb
        self.plan = plan
        self.capacity, self.max_len = capacity, max_len
        self.static = bb.compiled  # compiled step kinds need fixed shapes: a static cache
        self.cache = LayeredKVCache(
            bb.num_layers,
            max_len,
            bb.num_kv_heads,
            bb.head_dim,
            bb.dtype,
            bb.layer_devices,
            capacity,
            self.static,
        )
        # state of each pending position at its first missing layer
        self.pend_h = torch.zeros(capacity, max_len, bb.hidden_size, dtype=bb.dtype, device=bb.device)
        self.plans: list[Plan | None] = [None] * capacity
        self.traces: list[Trace | None] = [None] * capacity
        # every pass goes to the meters as one record (record()): each row's passes as if alone,
        # and the passes the batch actually ran
        self.costs = cost.Meters(bb, capacity)
        self.meters, self.batch_meter = self.costs.rows, self.costs.batch
        self._masks: dict = {}
        # an adapter head's own cache (cache layer k = heads.layers[k]; never static: the adapter
        # runs eagerly) and its output at each row's last position of the latest pass
        heads = plan.heads
        self.draft = None
        if heads.attends:
            n = len(heads.layers)
            dev = [bb.device] * n
            self.draft = LayeredKVCache(n, max_len, bb.num_kv_heads, bb.head_dim, bb.dtype, dev, capacity)
        self.draft_out: dict[tuple[int, int], torch.Tensor] = {}  # (row, layer) -> [H]
        self.draft_h: dict[int, torch.Tensor] = {}  # layer -> states kept for its adapter
        self.draft_need: set[int] = set()  # rows exiting in the current step: their adapter runs

    def open(self, b: int, plan: Plan, prompt: list[int], seed: int | None) -> Trace:
        """Give free slot b to a new sequence (its prompt not yet prefilled)."""
        gen = None
        if plan.cfg.temperature > 0:  # a private generator: never reseeds torch's global one
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.release(b)
        self.plans[b] = plan
        tr = self.traces[b] = Trace(len(prompt), [int(t) for t in prompt], gen=gen)
        return tr

    def release(self, b: int) -> None:
        """Free slot b: its KV lengths go to 0 (the buffers are reused as they are)."""
        for lens, shift in zip(self.cache.lens, self.cache.shift, strict=True):
            lens[b] = shift[b] = 0
        if self.draft is not None:
            self.draft.truncate(0, b)
        self.plans[b] = self.traces[b] = None
        self.meters[b].reset()

    # -- layers ---------------------------------------------------------------------------------

    def run_layers(self, carry: _Carry, layers: range, prefill: bool = False) -> _Carry:
        """Run `layers` over the carry; a row's positions missing a layer join the pass there."""
        i, end = layers.start, layers.stop
        lens, shift = self.cache.lens, self.cache.shift
        stops = frozenset().union(*(self.plans[b].draft_layers for b in carry.rows)) if self.draft else ()
        while i < end:
            carry = self._join(carry, i)
            # a block: the layers after i that hold what layer i holds (same length and position
            # shift for every row): nobody joins there and one mask serves them all. Lengths never
            # grow with depth, so the block ends where some row's length drops.
            # It also ends at a layer whose adapter head some row uses: it takes the states there.
            j = i + 1
            key = [(lens[i][b], shift[i][b]) for b in carry.rows]
            while j < end and j not in stops and [(lens[j][b], shift[j][b]) for b in carry.rows] == key:
                j += 1
            if carry.h.shape[1] > 0:
                carry = self._block(carry, i, j, prefill)
                if j in stops:
                    self._draft_pass(carry, j)
            i = j
        return carry

    def _draft_pass(self, carry: _Carry, layer: int) -> None:
        """The carry's states after `layer` layers, for the adapter head of `layer`. Each position
        crosses a layer once (an early step's, a full step's, a joined one, a prompt's); its state
        is kept, and the adapter runs when a row exits at `layer` (rows in `draft_need`), over the
        row's kept positions and the new ones: the deep cache's deferred fill, one layer long, so a
        full step pays no adapter pass. Keeps the output at each such row's last position."""
        sel = [j for j, b in enumerate(carry.rows) if layer in self.plans[b].draft_layers]
        if not sel:
            return
        bb, k = self.plan.bb, self.plan.heads.layers.index(layer)
        kept = self.draft_h.get(layer)
        if kept is None:  # [capacity, max_len, H], made on first use
            kept = self.draft_h[layer] = self.pend_h.new_zeros(self.pend_h.shape)
        rows = []
        for j in sel:
            b, s, c = carry.rows[j], carry.start[j], carry.count[j]
            kept[b, s : s + c] = carry.h[j, :c]
            if b in self.draft_need:
                rows.append((b, s + c))
        if not rows:
            return
        lens = [self.draft.lens[k][b] for b, _ in rows]
        counts = [end - n for (_, end), n in zip(rows, lens, strict=True)]
        r = max(counts)
        # left-aligned, padding after each row's positions (never written, never attended)
        h = kept.new_zeros(len(rows), r, kept.shape[-1])
        for n, ((b, end), start) in enumerate(zip(rows, lens, strict=True)):
            h[n, : end - start] = kept[b, start:end]
        pids = torch.tensor(lens, device=bb.device)[:, None] + torch.arange(r, device=bb.device)
        pe = bb.rope(h, pids)
        mask = hf.attention_mask(lens, counts, r, bb.device, self._masks)
        self.draft.begin_pass([b for b, _ in rows], counts, lens)
        out = self.plan.heads.adapter_layer(layer, h, mask, pids, pe, self.draft)
        for n, ((b, _), c) in enumerate(zip(rows, counts, strict=True)):
            self.draft_out[(b, layer)] = out[n, c - 1]
        # a decoder layer like the model's
        self.record(
            cost.Pass(
                "layers",
                tuple((b, c, end) for (b, end), c in zip(rows, counts, strict=True)),
                len(rows) * r,
                layer,
                layer + 1,
            )
        )

    def head_logits(self, depth: int, carry: _Carry, here: list[int]) -> torch.Tensor:
        """Exit-head logits [len(here), out] for carry rows `here`, whose states are after `depth` layers."""
        heads = self.plan.heads
        if heads.attends:  # the adapter ran as the pass crossed `depth`
            out = torch.stack([self.draft_out[(carry.rows[j], depth)] for j in here])
            logits = heads.adapter_logits(depth, out)
        else:
            last = carry.last()  # [R, 1, H]
            hl = last if len(here) == len(carry.rows) else last[here]
            logits = heads(depth, hl)
        self._record_matrix(heads.cost(depth), [carry.rows[j] for j in here], "head")
        return logits.float().reshape(len(here), -1)

    def _joins(self, carry: _Carry, i: int) -> bool:
        return any(self.cache.next_position(i, b) < s for b, s in zip(carry.rows, carry.start, strict=True))

    def _join(self, carry: _Carry, i: int) -> _Carry:
        if not self._joins(carry, i):
            return carry
        starts = [
            min(self.cache.next_position(i, b), s) for b, s in zip(carry.rows, carry.start, strict=True)
        ]
        counts = [c + s - n for c, s, n in zip(carry.count, carry.start, starts, strict=True)]
        h = carry.h.new_zeros(len(carry.rows), max(counts), carry.h.shape[-1])
        for j, b in enumerate(carry.rows):
            n = carry.start[j] - starts[j]
            h[j, :n] = self.pend_h[b, starts[j] : carry.start[j]]
            h[j, n : counts[j]] = carry.h[j, : carry.count[j]]
        return _Carry(carry.rows, h, starts, counts)

    def _block(self, carry: _Carry, a: int, b: int, prefill: bool = False) -> _Carry:
        """Layers a..b-1 over the carry, all rows at once (one offset causal mask per block)."""
        bb, cache = self.plan.bb, self.cache
        R, r = carry.h.shape[:2]
        lens = [cache.lens[a][row] for row in carry.rows]
        pids = torch.tensor(carry.start, device=bb.device)[:, None] + torch.arange(r, device=bb.device)
        pe = bb.rope(carry.h, pids)
        if self.static and not prefill:  # a compiled step kind: fixed shapes, lengths kept here
            mask, slots = self._static_mask(lens, carry.count, r)
            cache.begin_pass(carry.rows, carry.count, lens, slots)
            h = bb.run_block(a, b, carry.h, mask, pids, pe, cache, compiled=True)
            for i in range(a, b):
                for row, n, c in zip(carry.rows, lens, carry.count, strict=True):
                    cache.lens[i][row] = n + c
        else:
            mask = self._mask(lens, carry.count, r)
            cache.begin_pass(carry.rows, carry.count, lens)
            h = bb.run_block(a, b, carry.h, mask, pids, pe, cache)
        per_row = tuple((row, c, n + c) for row, n, c in zip(carry.rows, lens, carry.count, strict=True))
        self.record(cost.Pass("layers", per_row, R * r, a, b))
        return _Carry(carry.rows, h, carry.start, carry.count)

    def _mask(self, lens: list[int], counts: list[int], r: int) -> torch.Tensor | None:
        """[R, 1, r, kv_len] bool (True = attend) or None: query j of row k sees slots <= lens[k] + j."""
        return hf.attention_mask(lens, counts, r, self.plan.bb.device, self._masks)

    def _static_mask(self, lens: list[int], counts: list[int], r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Static passes attend over the whole buffer: [R, 1, r, max_len + 1] mask and [R, r] write slots."""
        return hf.static_mask(lens, counts, r, self.cache.max_len + 1, self.plan.bb.device, self._masks)

    # -- projections ----------------------------------------------------------------------------

    def project(self, hn: torch.Tensor, speech_rows: list[bool], rows: list[int], audit: bool):
        """Last-layer logits for states `hn` ([n, H], one per entry of speech_rows, from batch rows
        `rows`); speech rows restricted under --speech-vocab-only.

        Returns (full, restricted): full [n, V] or None, restricted [n, |set|] or None.
        """
        plan = self.plan
        bb, restrict = plan.bb, plan.cfg.speech_vocab_only and plan.speech_set is not None
        need_full = not restrict or audit or not all(speech_rows)
        if need_full:
            full = bb.project(hn).float()
            self._record_matrix(bb.hidden_size * bb.vocab_size, rows, "proj")
            return full, (full[:, plan.speech_set] if restrict else None)
        self._record_matrix(bb.hidden_size * plan.speech_set.numel(), rows, "proj")
        return None, bb.project(hn, plan.speech_set).float()

    # -- costs ------------------------------------------------------------------------------------

    def record(self, p: cost.Pass) -> None:
        """Tell the meters about a pass (the only way costs are counted)."""
        self.costs.record(p)

    def _record_matrix(self, elements: int, rows: list[int], kind: str) -> None:
        """A matrix product over one entry per element of `rows` (batch rows, repeated per entry)."""
        per = Counter(rows)
        self.record(cost.Pass(kind, tuple((r, k, 0) for r, k in per.items()), len(rows), elements=elements))

    def record_step(self, kind: str, rows: dict[int, int], batch: int = 0) -> None:
        """Fixed work: `rows[b]` steps (or checked tokens) of `kind` for row b, and `batch` of them
        for the batch as a whole (a batch step's fixed work is paid once, whatever its rows)."""
        self.record(
            cost.Pass("step", tuple((b, n, 0) for b, n in rows.items()), batch, step=kind, batch=batch > 0)
        )


def _choice(plan: Plan, full, restricted, j: int, speech: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits the full model decides from at row j, and the id map when they cover a token subset."""
    if speech and restricted is not None:
        return restricted[j], plan.speech_set
    return full[j], None


# ---------------------------------------------------------------------------------------------
# sampling


def _filter_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Temperature, top-k, top-p (the order transformers uses); logits: [V] float32."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _penalize(logits: torch.Tensor, context: Sequence[int], penalty: float, ids: torch.Tensor | None):
    """transformers' repetition penalty: scores of tokens already in `context` are divided by the
    penalty when positive, multiplied when negative. logits: [V] or [|ids|] over `ids`."""
    if penalty == 1.0:
        return logits
    seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
    if ids is not None:  # restricted logits: columns of the seen tokens that are in the set
        loc = torch.searchsorted(ids, seen).clamp_max(ids.numel() - 1)
        seen = loc[ids[loc] == seen]
    s = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(s < 0, s * penalty, s / penalty)
    return logits


def _distribution(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor | None:
    return None if cfg.temperature == 0 else _filter_logits(logits.float(), cfg).softmax(-1)


def _draw(logits: torch.Tensor, cfg: GenerationConfig, gen) -> tuple[int, torch.Tensor | None]:
    """A column of `logits` (argmax when greedy) and the distribution it was drawn from."""
    probs = _distribution(logits, cfg)
    if probs is None:
        return int(torch.argmax(logits)), None
    return int(torch.multinomial(probs, 1, generator=gen)), probs


# ---------------------------------------------------------------------------------------------
# the run's fixed plan and each row's trace


@dataclass
class Plan:
    """Everything fixed for a run: resolved config, policies, rule, speech set and its weight slice."""

    bb: Backbone
    heads: ExitHeads
    cfg: GenerationConfig
    speech_policy: Policy
    text_policy: Policy
    accept: AcceptRule
    distance: Callable[[int, int], float] | None
    speech_set: torch.Tensor | None  # ids legal at speech steps, for --speech-vocab-only
    stop_ids: frozenset[int]
    control: frozenset[int]  # tokens that are neither text nor speech for the auto tracker
    max_len: int
    # exit layers whose adapter head (heads.attends) needs every position's state: its cache is
    # filled wherever a pass crosses the layer, at full steps and prefill too
    draft_layers: frozenset[int] = frozenset()

    def kind_of(self, token: int) -> str | None:
        """text, speech or control; None when the speech range is unknown."""
        if self.cfg.speech_ids is None:
            return None
        if token in self.control:
            return "control"
        lo, hi = self.cfg.speech_ids
        return "speech" if lo <= token < hi else "text"

    def policy(self, modality: str) -> Policy:
        return self.speech_policy if modality == "speech" else self.text_policy

    # what verified mode (cfg.verify) means, in the two places the loop asks
    @property
    def rolls_back(self) -> bool:
        """A rejected early token is replaced by the full model's choice and its row rolled back,
        so a token streams only once a full pass has confirmed it (otherwise checks only count)."""
        return self.cfg.verify

    @property
    def refreshes_with_batch(self) -> bool:
        """Exact greedy verification: the tokens are full depth's token for token whatever the
        schedule, so in a batch the row's refreshes may move to steps its batch-mates run deep."""
        return self.cfg.verify and self.accept.lossless and self.cfg.temperature == 0

    @property
    def samples_verified(self) -> bool:
        """Verified sampling: early steps keep their proposal distribution q, and checks decide on
        the full model's distribution p (speculative sampling under `exact`); otherwise a check is
        judged greedily, with no random draws, so unverified output never depends on the rule."""
        return self.cfg.verify and self.cfg.temperature > 0


@dataclass
class Trace:
    """One row's history: tokens, per-step records, tracker states, early proposal distributions.

    Step k (0-based among the new tokens) fed the token at position prompt_len - 1 + k and produced
    the token at position prompt_len + k; `at(pos)` finds the step that fed `pos`.
    """

    prompt_len: int
    seq: list[int]  # prompt + new tokens
    records: list[StepRecord] = field(default_factory=list)
    trackers: list[TrackerState] = field(default_factory=list)  # state before each step
    early_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # pos -> q over the vocabulary
    gen: torch.Generator | None = None
    run_len: int = 1  # spar-k:adaptive: early steps after each full step
    emitted: int = 0
    rejections: int = 0
    wasted: int = 0
    refreshes: int = 0  # full passes that checked at least one early token
    # spar-k patterns read index_in_chunk + phase: the steps a rollback discarded, so that a row
    # that rolled back stays in step with its batch-mates (0 without rollbacks: the paper's index)
    phase: int = 0
    done: bool = False

    @property
    def pos(self) -> int:  # position of the next token to feed
        return len(self.seq) - 1

    def step_index(self, pos: int) -> int:
        return pos - (self.prompt_len - 1)

    def at(self, pos: int) -> StepRecord:
        return self.records[self.step_index(pos)]

    def append(self, rec: StepRecord, state: TrackerState) -> None:
        self.records.append(rec)
        self.trackers.append(state)
        self.seq.append(rec.token)

    def truncate(self, k: int) -> None:
        """Forget every step after step k (and the tokens they produced)."""
        self.wasted += len(self.records) - (k + 1)
        del self.records[k + 1 :], self.trackers[k + 1 :], self.seq[self.prompt_len + k + 1 :]
        pos = self.prompt_len - 1 + k
        for p in [p for p in self.early_probs if p >= pos]:
            del self.early_probs[p]

    def state(self, plan: Plan) -> TrackerState:
        """Tracker state before the next step."""
        if not self.records:
            return TrackerState()
        r = self.records[-1]
        early = r.action == "early" and not r.corrected
        return advance(
            plan.cfg.interleave, self.trackers[-1], r.modality, r.token, plan.kind_of(r.token), early
        )


def check_config(bb: Backbone, heads: ExitHeads, cfg: GenerationConfig):
    """Check a configuration against a model and heads; returns (speech policy, text policy, speech set)."""
    plan = make_plan(bb, heads, cfg, prompt_len=1)
    return plan.speech_policy, plan.text_policy, plan.speech_set


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def make_plan(bb: Backbone, heads: ExitHeads, cfg: GenerationConfig, prompt_len: int) -> Plan:
    """Check a config against a model and its heads, once, and resolve it into a row's plan."""
    N, V = bb.num_layers, bb.vocab_size
    _check_lengths_and_sampling(bb, cfg, prompt_len)
    sp, tp = _policies(cfg, heads, N)
    rule, distance = _acceptance(cfg)
    _check_token_ids(cfg, V)
    draft = frozenset(p.layer for p in (sp, tp) if p.uses_heads) if heads.attends else frozenset()
    _check_pooling(cfg, N, draft)
    control = set(int(t) for t in cfg.stop_ids) | set(int(t) for t in cfg.control_ids or [])
    return Plan(
        bb,
        heads,
        cfg,
        sp,
        tp,
        rule,
        distance,
        _speech_set(bb, heads, cfg),
        frozenset(int(t) for t in cfg.stop_ids),
        frozenset(control),
        prompt_len + cfg.max_new_tokens + 1,
        draft,
    )


def _check_lengths_and_sampling(bb: Backbone, cfg: GenerationConfig, prompt_len: int) -> None:
    if cfg.max_new_tokens < 1:
        raise SparkeeError(f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    limit = context_limit(bb)
    if limit is not None and prompt_len + cfg.max_new_tokens > limit:
        raise SparkeeError(
            f"prompt ({prompt_len}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's context "
            f"length of {limit} positions"
        )
    if not (_finite(cfg.temperature) and _finite(cfg.top_p) and _finite(cfg.repetition_penalty)):
        raise SparkeeError("temperature, top_p and repetition_penalty must be finite numbers")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise SparkeeError("sampling needs temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    if cfg.repetition_penalty <= 0:
        raise SparkeeError(f"repetition_penalty must be positive, got {cfg.repetition_penalty}")


def _policies(cfg: GenerationConfig, heads: ExitHeads, num_layers: int) -> tuple[Policy, Policy]:
    """(speech, text) policies, parsed if still strings, checked against the depth and the heads."""
    sp = cfg.speech_policy if isinstance(cfg.speech_policy, Policy) else parse_policy(cfg.speech_policy)
    tp = cfg.text_policy if isinstance(cfg.text_policy, Policy) else parse_policy(cfg.text_policy)
    for pol in (sp, tp):
        pol.check_layers(num_layers)
        if pol.uses_heads and not heads.has(pol.layer):
            raise SparkeeError(
                f"the {heads.kind} heads have no head for exit layer {pol.layer} (they cover layers {heads.layers})"
            )
    if tp.uses_heads and heads.token_ids is not None:
        raise SparkeeError("these heads are restricted to a token set, so they cannot serve text steps")
    if tp.kind == "adaptive":
        raise SparkeeError("spar-k:adaptive is a speech policy: its run length follows speech refreshes")
    return sp, tp


def _acceptance(cfg: GenerationConfig) -> tuple[AcceptRule, Callable[[int, int], float] | None]:
    """The acceptance rule and, when it asks for one, its unit-distance plug-in."""
    rule = parse_accept(cfg.accept)
    if not rule.needs_distance:
        return rule, None
    distance = resolve_distance(cfg.unit_distance)
    if distance is None:
        raise SparkeeError(
            "acceptance rule unit-distance needs a distance plug-in (--unit-distance refslm|module:attr)"
        )
    return rule, distance


def _check_token_ids(cfg: GenerationConfig, V: int) -> None:
    """The speech range and every special token id lie inside the vocabulary."""
    if cfg.speech_ids is not None:
        a, b = cfg.speech_ids
        if not 0 <= a < b <= V:
            raise SparkeeError(f"speech id range {a}:{b} is outside the vocabulary (need 0 <= A < B <= {V})")
    il = cfg.interleave
    for t in list(cfg.stop_ids) + list(cfg.control_ids or []) + list(il.text_end_ids if il else []):
        if not 0 <= int(t) < V:
            raise SparkeeError(
                f"token id {t} (stop, control or text-end token) is outside the vocabulary (0..{V - 1})"
            )
    if il and il.text_end_id is not None and not 0 <= il.text_end_id < V:
        raise SparkeeError(f"text-end id {il.text_end_id} is outside the vocabulary (0..{V - 1})")
    if il and il.format == "auto" and cfg.speech_ids is None:
        raise SparkeeError("the auto interleave format needs the speech token range (--speech-ids A:B)")


def _check_pooling(cfg: GenerationConfig, num_layers: int, draft: frozenset[int]) -> None:
    if cfg.prefill_pool is None:
        return
    if draft:
        raise SparkeeError(
            "adapter heads attend over every prompt position, so they cannot follow --prefill-pool "
            "(which drops positions): use tuned-lens heads with pooling"
        )
    cfg.prefill_pool.check(num_layers)
    if cfg.speech_ids is None:
        raise SparkeeError(
            "--prefill-pool needs the speech token range (--speech-ids A:B) to know what may merge"
        )


def _speech_set(bb: Backbone, heads: ExitHeads, cfg: GenerationConfig) -> torch.Tensor | None:
    """--speech-vocab-only: the token ids speech steps project onto (the heads' own set, if any)."""
    if not cfg.speech_vocab_only:
        return None
    if heads.token_ids is not None:
        return heads.token_ids
    if cfg.speech_ids is not None:
        return speech_token_set(cfg, bb.vocab_size).to(bb.lm_head.weight.device)
    raise SparkeeError("--speech-vocab-only needs the speech token range (--speech-ids A:B)")


def context_limit(bb: Backbone) -> int | None:
    """Longest sequence the model was built for (max_position_embeddings), if it says."""
    n = bb.shape.context
    return int(n) if n else None


def speech_token_set(cfg: GenerationConfig, vocab_size: int) -> torch.Tensor:
    """Speech ids plus the control ids that can end speech (stop ids and the text-end id by default)."""
    if cfg.speech_ids is None:
        raise SparkeeError("a speech token set needs the speech token range (--speech-ids A:B)")
    extra = list(cfg.control_ids) if cfg.control_ids is not None else list(cfg.stop_ids)
    if cfg.control_ids is None and cfg.interleave is not None and cfg.interleave.text_end_id is not None:
        extra.append(cfg.interleave.text_end_id)
    ids = torch.cat([torch.arange(*cfg.speech_ids), torch.tensor(extra, dtype=torch.long)])
    return ids[(ids >= 0) & (ids < vocab_size)].unique(sorted=True)


def _check_prompt(bb: Backbone, prompt: Sequence[int], where: str = "the prompt") -> None:
    V = bb.vocab_size
    if len(prompt) == 0:
        raise SparkeeError(f"{where} is empty: give at least one token")
    bad = [t for t in prompt if not 0 <= int(t) < V]
    if bad:
        raise SparkeeError(f"{where} has token id {bad[0]}, outside the vocabulary (0..{V - 1})")
