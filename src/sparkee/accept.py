"""Acceptance rules of verified mode: keep an early token, or replace it with the full model's choice.

At a full step the deep pass yields the last layer's logits for every pending early position. A
rule compares the early token x with them (text steps always use `exact`):

- `exact`: greedy: x is the last layer's argmax. Sampling: speculative sampling (accept with
  probability min(1, p(x) / q(x)), else draw from max(0, p - q)), so the output distribution is
  the full model's. This is lossless.
- `topk:K`: x is among the last layer's K most likely tokens (`topk:1` is `exact` when greedy).
- `typical:EPS[:DELTA]`: Medusa's typical acceptance, p(x) >= min(EPS, DELTA * exp(-H(p))), with
  DELTA = sqrt(EPS) by default; p is the full model's distribution (temperature 1 when greedy).
- `unit-distance:D`: distance(x, y) <= D where y is the full model's choice (argmax, or a draw
  when sampling) and `distance` is a plug-in saying how far apart two speech tokens sound.
- `no-stretch:RULE`: RULE, except that x is rejected when it repeats the previous token while y
  does not. Speech units run for several frames; an early layer is drawn to "repeat the unit"
  where the full model "switches unit" (about 4:1 among accepted near-ties on the reference SLM),
  which stretches speech: this keeps durations while accepting near-tie switches.

A rejected token is replaced by the full model's choice: its argmax when greedy, a draw from its
distribution when sampling (the residual max(0, p - q) under `exact`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import SparkeeError
from .plugin import load_plugin
from .syntax import ACCEPT_SYNTAX

Distance = Callable[[int, int], float]


@dataclass(frozen=True)
class AcceptRule:
    kind: str  # exact | topk | typical | unit-distance | no-stretch
    k: int = 1
    eps: float = 0.0
    delta: float = 0.0
    max_distance: float = 0.0
    name: str = "exact"
    inner: AcceptRule | None = None  # no-stretch: the rule it guards

    @property
    def lossless(self) -> bool:
        return self.kind == "exact"


EXACT = AcceptRule("exact")


def _number(text: str, spec: str, what: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise SparkeeError(f"acceptance rule '{spec}' needs a number for {what}, got '{text}'") from None
    if not math.isfinite(x):
        raise SparkeeError(f"acceptance rule '{spec}' needs a finite {what}, got '{text}'")
    return x


def parse_accept(spec: str | AcceptRule | None) -> AcceptRule:
    """Parse an acceptance rule string (see ACCEPT_SYNTAX)."""
    if spec is None:
        return EXACT
    if isinstance(spec, AcceptRule):
        return spec
    s = spec.strip()
    parts = s.split(":")
    kind = parts[0].lower()
    if kind == "exact" and len(parts) == 1:
        return EXACT
    if kind == "topk" and len(parts) == 2:
        if not re.fullmatch(r"\d+", parts[1]) or int(parts[1]) < 1:
            raise SparkeeError(f"acceptance rule '{s}' needs a whole number K >= 1, got '{parts[1]}'")
        return AcceptRule("topk", k=int(parts[1]), name=s)
    if kind == "typical" and len(parts) in (2, 3):
        eps = _number(parts[1], s, "EPS")
        if not 0 < eps <= 1:
            raise SparkeeError(f"acceptance rule '{s}' needs 0 < EPS <= 1, got {parts[1]}")
        delta = _number(parts[2], s, "DELTA") if len(parts) == 3 else math.sqrt(eps)
        if delta <= 0:
            raise SparkeeError(f"acceptance rule '{s}' needs DELTA > 0, got {parts[2]}")
        return AcceptRule("typical", eps=eps, delta=delta, name=s)
    if kind == "no-stretch" and len(parts) >= 2:
        inner = parse_accept(":".join(parts[1:]))
        if inner.kind in ("exact", "no-stretch"):
            raise SparkeeError(
                f"acceptance rule '{s}' guards a tolerant rule (topk, typical or unit-distance): "
                "exact never keeps a token the full model did not choose"
            )
        return AcceptRule("no-stretch", name=s, inner=inner)
    if kind == "unit-distance" and len(parts) == 2:
        d = _number(parts[1], s, "D")
        if d < 0:
            raise SparkeeError(f"acceptance rule '{s}' needs D >= 0, got {parts[1]}")
        return AcceptRule("unit-distance", max_distance=d, name=s)
    raise SparkeeError(f"unknown acceptance rule '{spec}': use {ACCEPT_SYNTAX}")


def entropy(p: torch.Tensor) -> float:
    """Entropy in nats of a probability vector."""
    logp = p.clamp_min(1e-30).log()
    return float(-(p * logp).sum())


def criterion(
    rule: AcceptRule,
    token: int,
    logits: torch.Tensor,
    ids: torch.Tensor | None,
    probs: torch.Tensor | None,
    choice: int,
    distance: Distance | None,
    previous: int | None = None,
) -> bool:
    """Whether a tolerant rule keeps `token` (greedy or sampling; not the `exact` sampling rule).

    logits: the full model's processed logits over `ids` (or the whole vocabulary); probs: its
    sampling distribution over the same entries (None when greedy); choice: the full model's own
    token (argmax, or a draw); previous: the token before `token` (for no-stretch).
    """
    if rule.kind == "exact":
        return token == choice
    if rule.kind == "no-stretch":
        if previous is not None and token == previous and choice != previous and token != choice:
            return False
        return criterion(rule.inner, token, logits, ids, probs, choice, distance, previous)
    if rule.kind == "unit-distance":
        if distance is None:
            raise SparkeeError("acceptance rule unit-distance needs a distance plug-in (--unit-distance)")
        return token == choice or float(distance(token, choice)) <= rule.max_distance
    col = _column(token, ids)
    if col is None:  # the early token is not even a candidate of the full model's projection
        return False
    if rule.kind == "topk":
        src = probs if probs is not None else logits
        k = min(rule.k, src.numel())
        kth = torch.topk(src, k).values[-1]
        return bool(src[col] >= kth) and (probs is None or bool(probs[col] > 0))
    if rule.kind == "typical":
        p = probs if probs is not None else torch.softmax(logits.float(), -1)
        return float(p[col]) >= min(rule.eps, rule.delta * math.exp(-entropy(p)))
    raise AssertionError(rule.kind)


def _column(token: int, ids: torch.Tensor | None) -> int | None:
    if ids is None:
        return token
    i = int(torch.searchsorted(ids, token))
    return i if i < ids.numel() and int(ids[i]) == token else None


# ---------------------------------------------------------------------------------------------
# distance plug-ins for unit-distance

# built-ins by name: import paths, so that the reference SLM's phonetics stay in refslm/
BUILTIN_DISTANCES = {
    "refslm": "sparkee.refslm.distance:unit_distance",
    "refslm-phone-class": "sparkee.refslm.distance:PhoneClassDistance",
}


def resolve_distance(spec: str | Distance | None) -> Distance | None:
    """A built-in name (refslm, refslm-phone-class), a module:attribute path, or a callable."""
    if spec is None or callable(spec):
        return spec
    return load_plugin(BUILTIN_DISTANCES.get(spec, spec), "unit-distance")
