"""GenerationConfig: what a run decodes and how, as data (no torch, no model).

The CLI, the HTTP server and eval rows build one and hand it to the engine; `engine.make_plan`
checks it against a model and its heads once, in one function, and resolves its strings
(policies, the acceptance rule) into the typed specs of schedule.py and accept.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config stays importable without torch
    from .accept import AcceptRule
    from .pooling import PoolSpec
    from .schedule import Interleave, Policy


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    speech_policy: str | Policy = "full"
    text_policy: str | Policy = "full"
    interleave: Interleave | None = None
    speech_ids: tuple[int, int] | None = None  # half-open range of speech token ids
    stop_ids: Sequence[int] = ()
    # non-speech ids legal at speech steps; default: stop + text-end ids
    control_ids: Sequence[int] | None = None
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0  # transformers' semantics, on every step kind
    seed: int | None = None
    verify: bool = False
    accept: str | AcceptRule = "exact"  # verified mode's rule at speech steps (accept.py)
    unit_distance: str | Callable[[int, int], float] | None = None  # plug-in of accept=unit-distance:D
    speech_vocab_only: bool = False
    # with speech_vocab_only, also compute the full projection to count changed tokens
    audit_vocab: bool = True
    prefill_pool: PoolSpec | None = None  # Affinity Pooling of the speech part of the prompt
    # predicted_speedup from this machine's measured costs (cost.py); None: yes unless the
    # environment sets SPARKEE_NO_CALIBRATE=1; False: the weight-read (memory-bound) model only
    calibrate: bool | None = None


def calibration_wanted(cfg: GenerationConfig) -> bool:
    """Whether predictions use this machine's measured costs (see GenerationConfig.calibrate)."""
    if cfg.calibrate is not None:
        return cfg.calibrate
    return os.environ.get("SPARKEE_NO_CALIBRATE", "") not in ("1", "true", "yes")


def group_by_config(
    items: Sequence, config_of: Callable[[object], GenerationConfig]
) -> list[tuple[GenerationConfig, list[int]]]:
    """Indices of `items` grouped by the config each decodes with (a prompt may fix its own
    interleave format), in first-seen order: each group can decode as one batch."""
    groups: dict[str, tuple[GenerationConfig, list[int]]] = {}
    for n, item in enumerate(items):
        cfg = config_of(item)
        groups.setdefault(repr(cfg), (cfg, []))[1].append(n)
    return list(groups.values())
