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

Each rule is one small class: `keeps(token, evidence)` says whether it keeps an early token, and
`decide(token, evidence)` says what the row goes on with (the token, or the full model's choice);
`Exact.decide` is speculative sampling when sampling in verified mode. The engine builds one
`evidence.Evidence` per checked position and calls `rule.decide`, whatever the rule. This module is
pure Python (the config floor: specs parse without torch); the evidence does the tensor work.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .errors import SparkeeError
from .plugin import load_plugin
from .syntax import ACCEPT_SYNTAX

if TYPE_CHECKING:  # annotations only: the rules are pure Python, the evidence holds the tensors
    from .evidence import Evidence

Distance = Callable[[int, int], float]


class AcceptRule:
    """An acceptance rule of verified mode (see the module docstring); `name` is its spec string."""

    kind: ClassVar[str]
    lossless: ClassVar[bool] = False
    name: str

    def __str__(self) -> str:  # the spec string: what logs, JSON and the API show
        return self.name

    @property
    def needs_distance(self) -> bool:
        """Whether the rule asks a unit-distance plug-in (so the plan must resolve one)."""
        return False

    def keeps(self, token: int, ev: Evidence) -> bool:
        raise NotImplementedError

    def decide(self, token: int, ev: Evidence) -> tuple[bool, int]:
        """(kept, the token the row goes on with): `token` when kept, else the full model's choice.
        The full model's own choice is always kept."""
        if token == ev.choice or self.keeps(token, ev):
            return True, token
        return False, ev.choice


@dataclass(frozen=True)
class Exact(AcceptRule):
    """x is the full model's choice; sampling in verified mode: speculative sampling (lossless)."""

    name: str = "exact"
    kind: ClassVar[str] = "exact"
    lossless: ClassVar[bool] = True

    def keeps(self, token: int, ev: Evidence) -> bool:
        return token == ev.choice

    def decide(self, token: int, ev: Evidence) -> tuple[bool, int]:
        if ev.speculative:  # sampling in verified mode: the output distribution is the full model's
            return ev.speculative_sample(token)
        return super().decide(token, ev)  # greedy, or judged greedily


@dataclass(frozen=True)
class TopK(AcceptRule):
    """x is among the full model's K most likely tokens."""

    k: int
    name: str
    kind: ClassVar[str] = "topk"

    def keeps(self, token: int, ev: Evidence) -> bool:
        return ev.in_top_k(token, self.k)


@dataclass(frozen=True)
class Typical(AcceptRule):
    """Medusa's typical acceptance: p(x) >= min(EPS, DELTA * exp(-H(p)))."""

    eps: float
    delta: float
    name: str
    kind: ClassVar[str] = "typical"

    def keeps(self, token: int, ev: Evidence) -> bool:
        if ev.column(token) is None:  # not even a candidate of the full model's projection
            return False
        return ev.prob(token) >= min(self.eps, self.delta * math.exp(-ev.entropy))


@dataclass(frozen=True)
class UnitDistance(AcceptRule):
    """distance(x, y) <= D, y the full model's choice, `distance` a plug-in."""

    max_distance: float
    name: str
    kind: ClassVar[str] = "unit-distance"

    @property
    def needs_distance(self) -> bool:
        return True

    def keeps(self, token: int, ev: Evidence) -> bool:
        if ev.distance is None:
            raise SparkeeError("acceptance rule unit-distance needs a distance plug-in (--unit-distance)")
        return token == ev.choice or float(ev.distance(token, ev.choice)) <= self.max_distance


@dataclass(frozen=True)
class NoStretch(AcceptRule):
    """`inner`, except that x is rejected when it repeats the previous token while y does not."""

    inner: AcceptRule
    name: str
    kind: ClassVar[str] = "no-stretch"

    @property
    def needs_distance(self) -> bool:
        return self.inner.needs_distance

    def keeps(self, token: int, ev: Evidence) -> bool:
        prev, choice = ev.previous, ev.choice
        if prev is not None and token == prev and choice != prev and token != choice:
            return False  # a repeat of the unit where the full model switches: it would stretch speech
        return self.inner.keeps(token, ev)


EXACT = Exact()


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
        return TopK(int(parts[1]), name=s)
    if kind == "typical" and len(parts) in (2, 3):
        eps = _number(parts[1], s, "EPS")
        if not 0 < eps <= 1:
            raise SparkeeError(f"acceptance rule '{s}' needs 0 < EPS <= 1, got {parts[1]}")
        delta = _number(parts[2], s, "DELTA") if len(parts) == 3 else math.sqrt(eps)
        if delta <= 0:
            raise SparkeeError(f"acceptance rule '{s}' needs DELTA > 0, got {parts[2]}")
        return Typical(eps, delta, name=s)
    if kind == "no-stretch" and len(parts) >= 2:
        inner = parse_accept(":".join(parts[1:]))
        if isinstance(inner, (Exact, NoStretch)):
            raise SparkeeError(
                f"acceptance rule '{s}' guards a tolerant rule (topk, typical or unit-distance): "
                "exact never keeps a token the full model did not choose"
            )
        return NoStretch(inner, name=s)
    if kind == "unit-distance" and len(parts) == 2:
        d = _number(parts[1], s, "D")
        if d < 0:
            raise SparkeeError(f"acceptance rule '{s}' needs D >= 0, got {parts[1]}")
        return UnitDistance(d, name=s)
    raise SparkeeError(f"unknown acceptance rule '{spec}': use {ACCEPT_SYNTAX}")


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
