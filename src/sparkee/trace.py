"""Per-step records of a row's trace (its statistics are in stats.py, the cost model in cost.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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


def steps_as_dicts(steps: list[StepRecord]) -> list[dict]:
    return [asdict(s) for s in steps]
