"""GenerationConfig: what a run decodes and how, as data (no torch, no model).

The config floor is pure Python: this module (`GenerationConfig`, the Affinity Pooling spec
`PoolSpec`), schedule.py (`Policy`, `Interleave`) and accept.py (the acceptance rules). The CLI, the
HTTP server and eval rows parse their strings into these specs once, at the edge, and hand a
config to the engine; `engine.make_plan` checks it against a model and its heads once, in one
function (a string still given there is parsed there, for Python callers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .accept import AcceptRule
from .errors import SparkeeError
from .schedule import Interleave, Policy

POSITION_RULES = ("first", "mean")


@dataclass(frozen=True)
class PoolSpec:
    tau_in: float
    tau_deep: float
    layer: int  # pool the state after this many layers (1 <= layer < num_layers)
    window_in: int = 1
    window_deep: int = 3
    position: str = "first"  # measured better than "mean" on the reference SLM (docs/results.md)
    text: str = field(default="", compare=False)  # as the user wrote it (eval's row names show it)

    def check(self, num_layers: int) -> None:
        if not 1 <= self.layer < num_layers:
            raise SparkeeError(
                f"pooling layer {self.layer} is out of range: this model has {num_layers} layers, so use 1..{num_layers - 1}"
            )


def parse_pool(text: str) -> PoolSpec:
    """`in=TAU_IN,deep=TAU_DEEP@LAYER[,window-in=1,window-deep=3,pos=first|mean]`."""
    usage = "--prefill-pool must look like in=0.8,deep=0.7@12[,window-in=1,window-deep=3,pos=first]"
    fields: dict[str, str] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if "=" not in part:
            raise SparkeeError(f"{usage}, got '{text}'")
        k, v = part.split("=", 1)
        fields[k.strip()] = v.strip()
    m = re.fullmatch(r"(-?[\d.]+)@(\d+)", fields.get("deep", ""))
    if "in" not in fields or not m or set(fields) - {"in", "deep", "window-in", "window-deep", "pos"}:
        raise SparkeeError(f"{usage}, got '{text}'")
    try:
        spec = PoolSpec(
            tau_in=float(fields["in"]),
            tau_deep=float(m.group(1)),
            layer=int(m.group(2)),
            window_in=int(fields.get("window-in", 1)),
            window_deep=int(fields.get("window-deep", 3)),
            position=fields.get("pos", "first"),
            text=text.strip(),
        )
    except ValueError:
        raise SparkeeError(f"{usage}, got '{text}'") from None
    if spec.window_in < 1 or spec.window_deep < 1:
        raise SparkeeError("pooling windows must be at least 1")
    if spec.position not in POSITION_RULES:
        raise SparkeeError(
            f"unknown pooled-position rule '{spec.position}': use {' or '.join(POSITION_RULES)}"
        )
    return spec


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
