"""Run statistics: `RunStats` of one row, `BatchStats` of a batch, each figure computed in one place.

A row's stats come from its trace (the step records, rejections, refreshes) and its cost meter
(the passes it ran), priced against plain full-depth decoding of the same tokens (cost.py).
Derived figures (depth reductions, tokens/s, the predicted speed-up, which is the calibrated one
when there is a calibration and the weight-read one otherwise) are properties, so they follow the
fields they come from and are never computed twice.

`RunStats.as_json()` is the `stats` object of the JSON output (its keys are the field and property
names, a batch's with their `batch_` prefix); `stats["decode_s"]` and `stats.get(...)` read the same
keys, as transformers' `ModelOutput` allows, for code written against the dict of earlier versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

from .cost import Calibration, CostMeter, baseline_meter, batch_baseline_meter, compare
from .trace import StepRecord


def depth_reduction_pct(avg_exit_layer: float | None, num_layers: int) -> float | None:
    """How much shallower than full depth the average step ran, in percent."""
    return None if avg_exit_layer is None else 100.0 * (1 - avg_exit_layer / num_layers)


def best_prediction(calibrated: float | None, memory_bound: float | None) -> float | None:
    """The predicted speed-up to report: this machine's calibrated one, else the weight-read one."""
    return calibrated if calibrated is not None else memory_bound


class _Keys:
    """Mapping-style read access to a stats dataclass (fields and `DERIVED` properties)."""

    DERIVED: tuple[str, ...] = ()

    def as_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "batch"}
        out |= {name: getattr(self, name) for name in self.DERIVED}
        batch = getattr(self, "batch", None)
        return out | (batch.as_json() if batch is not None else {})

    def __getitem__(self, key: str):
        return self.as_json()[key]

    def get(self, key: str, default=None):
        return self.as_json().get(key, default)

    def keys(self) -> list[str]:
        return list(self.as_json())

    def items(self):
        return self.as_json().items()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.as_json()


@dataclass
class BatchStats(_Keys):
    """The batch as a whole (generate_batch of two rows or more): against decoding the same batch
    at full depth, where at decode step s the rows still generating run every layer together."""

    batch_size: int
    batch_new_tokens: int
    batch_decode_s: float
    batch_predicted_speedup_memory_bound: float | None
    batch_predicted_speedup_calibrated: float | None
    batch_predicted_s: float | None  # calibrated seconds of the batch's passes (None: not calibrated)
    batch_predicted_full_s: float | None  # ... and of the batch at full depth

    DERIVED = ("batch_tokens_per_s", "batch_predicted_speedup")

    @property
    def batch_tokens_per_s(self) -> float | None:
        d, n = self.batch_decode_s, self.batch_new_tokens
        return n / d if d > 0 and n else None

    @property
    def batch_predicted_speedup(self) -> float | None:
        return best_prediction(
            self.batch_predicted_speedup_calibrated, self.batch_predicted_speedup_memory_bound
        )


@dataclass
class RunStats(_Keys):
    """One row's run statistics. Depths average layers executed per step; agreement and acceptance
    count early tokens a full pass checked; predictions compare this run's passes with plain
    full-depth decoding of the same tokens (prefill excluded, as in the timing)."""

    num_layers: int
    new_tokens: int  # the first comes from the prefill
    text_steps: int
    speech_steps: int
    avg_exit_layer_text: float | None  # layers executed per text step (None: no text step)
    avg_exit_layer_speech: float | None
    early_steps: int  # steps that exited early (their token kept or not)
    early_speech_steps: int
    fallback_steps: int  # confidence steps that ran on to the top
    misplanned_steps: int  # tokens of the other modality than the step was planned as
    speech_agreement: float | None  # checked early speech tokens equal to the last layer's argmax
    text_agreement: float | None
    speech_acceptance: float | None  # checked early speech tokens the acceptance rule kept
    text_acceptance: float | None
    accepted_early_steps: int
    refreshes: int  # full passes that checked at least one early token
    speech_vocab_changed: int  # audited --speech-vocab-only steps whose argmax changed
    speech_vocab_checked: int
    verify_rejections: int  # rollbacks of verified mode
    verify_wasted_steps: int  # steps a rollback discarded
    prefill_s: float
    decode_s: float
    flops: float  # of the decode passes this row ran (rejected work included)
    flops_full_estimate: float  # of full-depth decoding of the same tokens
    weight_reads: float  # weight and KV elements read
    weight_reads_full_estimate: float
    predicted_speedup_memory_bound: float | None  # weight-read ratio (decoding purely memory-bound)
    predicted_speedup_calibrated: float | None  # ratio of this machine's predicted seconds
    predicted_s: float | None  # calibrated seconds of this row's decode passes (None: not calibrated)
    predicted_full_s: float | None  # ... and of full-depth decoding of its tokens
    # the prompt and the cache, filled by the engine
    prefill_flops: float = 0.0
    prompt_len: int = 0
    prompt_len_first_layer: int = 0  # after Affinity Pooling at the embeddings
    prompt_len_last_layer: int = 0  # after pooling at the deep layer
    kv_bytes: int = 0
    batch: BatchStats | None = None  # generate_batch of two rows or more: the batch as a whole

    DERIVED = (
        "text_depth_reduction_pct",
        "speech_depth_reduction_pct",
        "accepted_per_refresh",
        "tokens_per_s",
        "flops_saved_pct",
        "predicted_speedup",
        "cost_model",
    )

    @property
    def text_depth_reduction_pct(self) -> float | None:
        return depth_reduction_pct(self.avg_exit_layer_text, self.num_layers)

    @property
    def speech_depth_reduction_pct(self) -> float | None:
        return depth_reduction_pct(self.avg_exit_layer_speech, self.num_layers)

    @property
    def accepted_per_refresh(self) -> float | None:
        return self.accepted_early_steps / self.refreshes if self.refreshes else None

    @property
    def tokens_per_s(self) -> float | None:
        n = max(self.new_tokens - 1, 0)  # one new token comes from the prefill alone
        return n / self.decode_s if self.decode_s > 0 and n else None

    @property
    def flops_saved_pct(self) -> float | None:
        f = self.flops_full_estimate
        return 100.0 * (1 - self.flops / f) if f else None

    @property
    def predicted_speedup(self) -> float | None:
        return best_prediction(self.predicted_speedup_calibrated, self.predicted_speedup_memory_bound)

    @property
    def cost_model(self) -> str:
        return "calibrated" if self.predicted_speedup_calibrated is not None else "memory-bound"


def mean(xs: list[float]) -> float | None:
    """The mean, or None for no values."""
    return sum(xs) / len(xs) if xs else None


def _rate(flags: list[bool | None]) -> float | None:
    seen = [f for f in flags if f is not None]
    return sum(seen) / len(seen) if seen else None


def full_projection_sizes(records: list[StepRecord], meter: CostMeter, plan) -> list[int]:
    """Weight elements of the output projection that a full step of each record's modality computes."""
    H, V = meter.hidden, meter.vocab
    restricted = plan is not None and plan.cfg.speech_vocab_only and plan.speech_set is not None
    sizes = []
    for r in records:
        if restricted and r.modality == "speech":
            n = H * int(plan.speech_set.numel()) + (H * V if plan.cfg.audit_vocab else 0)
        else:
            n = H * V
        sizes.append(n)
    return sizes


def compute_stats(
    trace,
    num_layers: int,
    meter: CostMeter,
    decode_s: float,
    prefill_s: float,
    calibration: Calibration | None = None,
    plan=None,
) -> RunStats:
    """A row's `RunStats` from its trace (engine.Trace) and the passes its meter counted."""
    steps: list[StepRecord] = trace.records
    by = {m: [s for s in steps if s.modality == m] for m in ("text", "speech")}
    base = baseline_meter(meter, steps, trace.prompt_len, full_projection_sizes(steps, meter, plan))
    pred_mem, pred_cal, run_t, base_t = compare(meter, base, calibration)
    return RunStats(
        num_layers=num_layers,
        new_tokens=len(steps),
        text_steps=len(by["text"]),
        speech_steps=len(by["speech"]),
        avg_exit_layer_text=mean([s.exit_layer for s in by["text"]]),
        avg_exit_layer_speech=mean([s.exit_layer for s in by["speech"]]),
        early_steps=sum(s.action == "early" for s in steps),
        early_speech_steps=sum(s.action == "early" for s in by["speech"]),
        fallback_steps=sum(s.action == "fallback" for s in steps),
        misplanned_steps=sum(s.misplanned for s in steps),
        speech_agreement=_rate([s.agreed for s in by["speech"]]),
        text_agreement=_rate([s.agreed for s in by["text"]]),
        speech_acceptance=_rate([s.accepted for s in by["speech"]]),
        text_acceptance=_rate([s.accepted for s in by["text"]]),
        accepted_early_steps=sum(bool(s.accepted) for s in steps if s.action == "early"),
        refreshes=trace.refreshes,
        speech_vocab_changed=sum(bool(s.vocab_changed) for s in steps),
        speech_vocab_checked=sum(s.vocab_changed is not None for s in steps),
        verify_rejections=trace.rejections,
        verify_wasted_steps=trace.wasted,
        prefill_s=prefill_s,
        decode_s=decode_s,
        flops=2 * meter.macs,
        flops_full_estimate=2 * base.macs,
        weight_reads=meter.reads,
        weight_reads_full_estimate=base.reads,
        predicted_speedup_memory_bound=pred_mem,
        predicted_speedup_calibrated=pred_cal,
        predicted_s=run_t,
        predicted_full_s=base_t,
    )


def batch_stats(meter: CostMeter, traces, decode_s: float, calibration) -> BatchStats:
    """The batch's `BatchStats` from its batch meter (one step's fixed work counted once)."""
    lengths = [len(t.records) for t in traces]
    base = batch_baseline_meter(meter, [t.prompt_len for t in traces], lengths)
    pred_mem, pred_cal, t, t_base = compare(meter, base, calibration)
    return BatchStats(
        batch_size=len(traces),
        batch_new_tokens=sum(max(n - 1, 0) for n in lengths),
        batch_decode_s=decode_s,
        batch_predicted_speedup_memory_bound=pred_mem,
        batch_predicted_speedup_calibrated=pred_cal,
        batch_predicted_s=t,
        batch_predicted_full_s=t_base,
    )
