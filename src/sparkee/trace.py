"""Per-step records and run statistics (the cost model itself is in cost.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .cost import Calibration, CostMeter, baseline_meter, compare

# kept importable from here: the cost meter used to live in this module
__all__ = ["CostMeter", "StepRecord", "compute_stats", "steps_as_dicts"]


@dataclass
class StepRecord:
    position: int  # position of the fed token; the step produced the token at position + 1
    token: int
    modality: str  # the modality the step was planned as
    exit_layer: int  # layers executed for this step's own token (num_layers when full)
    action: str  # "full", "early", or "fallback" (confidence exit that ran on to the top)
    filled: int = 0  # pending positions whose deep layers this step computed
    agreed: bool | None = None  # early token vs the last layer's argmax, once a full pass checked it
    accepted: bool | None = None  # the acceptance rule kept the early token (checked, verify or not)
    vocab_changed: bool | None = None  # --speech-vocab-only changed the argmax (audited full speech steps)
    corrected: bool = False  # verified mode replaced this step's token with the full model's choice
    misplanned: bool = False  # the token produced is of the other modality (speech range known)


def _mean(xs: list[float]) -> float | None:
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
) -> dict:
    """Run statistics of one row. Depths average layers executed per step; agreement and acceptance
    count early tokens a full pass checked; predictions compare this run's passes with plain
    full-depth decoding of the same tokens."""
    steps: list[StepRecord] = trace.records
    prompt_len = trace.prompt_len
    by = {m: [s for s in steps if s.modality == m] for m in ("text", "speech")}
    avg = {m: _mean([s.exit_layer for s in by[m]]) for m in by}
    base = baseline_meter(meter, steps, prompt_len, full_projection_sizes(steps, meter, plan))
    decode_tokens = max(len(steps) - 1, 0)  # the first token comes from the prefill
    accepted = sum(bool(s.accepted) for s in steps if s.action == "early")
    pred_mem, pred_cal, run_t, base_t = compare(meter, base, calibration)
    return {
        "num_layers": num_layers,
        "new_tokens": len(steps),
        "text_steps": len(by["text"]),
        "speech_steps": len(by["speech"]),
        "avg_exit_layer_text": avg["text"],
        "avg_exit_layer_speech": avg["speech"],
        "text_depth_reduction_pct": None if avg["text"] is None else 100.0 * (1 - avg["text"] / num_layers),
        "speech_depth_reduction_pct": None
        if avg["speech"] is None
        else 100.0 * (1 - avg["speech"] / num_layers),
        "early_steps": sum(s.action == "early" for s in steps),
        "early_speech_steps": sum(s.action == "early" for s in by["speech"]),
        "fallback_steps": sum(s.action == "fallback" for s in steps),
        "misplanned_steps": sum(s.misplanned for s in steps),
        "speech_agreement": _rate([s.agreed for s in by["speech"]]),
        "text_agreement": _rate([s.agreed for s in by["text"]]),
        "speech_acceptance": _rate([s.accepted for s in by["speech"]]),
        "text_acceptance": _rate([s.accepted for s in by["text"]]),
        "accepted_per_refresh": accepted / trace.refreshes if trace.refreshes else None,
        "accepted_early_steps": accepted,
        "refreshes": trace.refreshes,
        "speech_vocab_changed": sum(bool(s.vocab_changed) for s in steps),
        "speech_vocab_checked": sum(s.vocab_changed is not None for s in steps),
        "verify_rejections": trace.rejections,
        "verify_wasted_steps": trace.wasted,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        # one new token comes from the prefill alone: no decode rate to report
        "tokens_per_s": decode_tokens / decode_s if decode_s > 0 and decode_tokens else None,
        "flops": 2 * meter.macs,
        "flops_full_estimate": 2 * base.macs,
        "flops_saved_pct": 100.0 * (1 - meter.macs / base.macs) if base.macs else None,
        "weight_reads": meter.reads,
        "weight_reads_full_estimate": base.reads,
        "predicted_speedup": pred_cal if pred_cal is not None else pred_mem,
        "predicted_speedup_memory_bound": pred_mem,
        "predicted_speedup_calibrated": pred_cal,
        # calibrated seconds of this run's decode passes, and of full-depth decoding of its tokens
        "predicted_s": run_t,
        "predicted_full_s": base_t,
        "cost_model": "calibrated" if pred_cal is not None else "memory-bound",
    }


def steps_as_dicts(steps: list[StepRecord]) -> list[dict]:
    return [asdict(s) for s in steps]
