"""Interleave tracker and exit policies: which modality the next step has and how deep it runs.

Pure Python (no torch) so the schedule can be property-tested on its own. The decode loop asks the
tracker for the next step's modality and position in its chunk, asks the policy of that modality
for a plan, and tells the tracker which token the step produced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from .errors import SparkeeError

Modality = Literal["text", "speech"]
NAMED_PATTERNS = {"even": "FE", "odd": "EF", "triple": "FEE"}
FORMATS = ("padded", "early-stop")


@dataclass(frozen=True)
class Policy:
    """An exit policy for one modality.

    kind: "full" (always all layers), "fixed" (always exit at `layer`), "confidence" (run to
    `layer`, exit when the head's entropy in nats is below `threshold`, else run to the top),
    "spar-k" (inside each chunk, step i follows `pattern[(i - 1) % K]`: F = full, E = exit at `layer`).
    `layer` counts layers executed: 1 <= layer < num_layers.
    """

    kind: Literal["full", "fixed", "confidence", "spar-k"]
    layer: int | None = None
    threshold: float | None = None
    pattern: str | None = None
    name: str = "full"

    @property
    def spec(self) -> str:
        return self.name

    @property
    def uses_heads(self) -> bool:
        return self.kind != "full"

    def plan(self, index_in_chunk: int) -> tuple[str, int | None]:
        """Plan for the `index_in_chunk`-th step (1-based) of a chunk.

        Returns ("full", None), ("exit", L) or ("try", L) where "try" means: run to L, decide there.
        """
        if self.kind == "full":
            return ("full", None)
        if self.kind == "fixed":
            return ("exit", self.layer)
        if self.kind == "confidence":
            return ("try", self.layer)
        assert self.pattern is not None
        letter = self.pattern[(index_in_chunk - 1) % len(self.pattern)]
        return ("exit", self.layer) if letter == "E" else ("full", None)

    def check_layers(self, num_layers: int) -> None:
        if self.layer is not None and not 1 <= self.layer < num_layers:
            raise SparkeeError(
                f"exit layer {self.layer} in policy '{self.name}' is out of range: "
                f"this model has {num_layers} layers, so use 1..{num_layers - 1}"
            )


def _parse_layer(text: str, spec: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise SparkeeError(f"policy '{spec}' needs a whole-number exit layer, got '{text}'")
    return int(text)


def parse_policy(spec: str, num_layers: int | None = None) -> Policy:
    """Parse a policy string: full, fixed:L, confidence:L:H, spar-k:(even|odd|triple|PATTERN):L."""
    s = spec.strip()
    parts = s.split(":")
    kind = parts[0].lower()
    help_ = "use full, fixed:L, confidence:L:H or spar-k:even|odd|triple|PATTERN:L"
    if kind == "full" and len(parts) == 1:
        pol = Policy("full", name="full")
    elif kind == "fixed" and len(parts) == 2:
        pol = Policy("fixed", layer=_parse_layer(parts[1], s), name=s)
    elif kind == "confidence" and len(parts) == 3:
        try:
            thr = float(parts[2])
        except ValueError:
            raise SparkeeError(f"policy '{s}' needs an entropy threshold in nats, got '{parts[2]}'") from None
        if not thr >= 0:
            raise SparkeeError(f"policy '{s}' needs a non-negative entropy threshold, got {parts[2]}")
        pol = Policy("confidence", layer=_parse_layer(parts[1], s), threshold=thr, name=s)
    elif kind == "spar-k" and len(parts) == 3:
        pat = NAMED_PATTERNS.get(parts[1].lower(), parts[1].upper())
        if not pat or not re.fullmatch(r"[FE]+", pat):
            raise SparkeeError(
                f"schedule pattern '{parts[1]}' in policy '{s}' must be even, odd, triple or a string of the letters F and E"
            )
        pol = Policy("spar-k", layer=_parse_layer(parts[2], s), pattern=pat, name=s)
    else:
        raise SparkeeError(f"unknown policy '{spec}': {help_}")
    if num_layers is not None:
        pol.check_layers(num_layers)
    return pol


@dataclass(frozen=True)
class Interleave:
    """Fixed text:speech ratio. Generation starts with `text` text steps, then `speech` speech steps, repeating.

    format "padded": the ratio holds to the end (the model pads text slots after its text ends).
    format "early-stop" (ESI): once the text-end token is produced, every later step is speech.
    """

    text: int
    speech: int
    format: str = "padded"
    text_end_id: int | None = None

    def __post_init__(self) -> None:
        if self.text < 0 or self.speech < 0 or self.text + self.speech == 0:
            raise SparkeeError(
                f"interleave {self.text}:{self.speech} needs non-negative counts with at least one step"
            )
        if self.format not in FORMATS:
            raise SparkeeError(f"unknown format '{self.format}': use padded or early-stop")
        if self.format == "early-stop" and self.text_end_id is None:
            raise SparkeeError("format early-stop needs the text-end token id (--text-end-id N)")


def parse_pair(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not m:
        raise SparkeeError(f"{what} must look like A:B with whole numbers, got '{text}'")
    return int(m.group(1)), int(m.group(2))


def parse_interleave(text: str, fmt: str = "padded", text_end_id: int | None = None) -> Interleave:
    t, s = parse_pair(text, "--interleave")
    return Interleave(t, s, fmt, text_end_id)


@dataclass(frozen=True)
class TrackerState:
    """Where generation stands: immutable so the decode loop can keep one per step for rollback."""

    steps: int = 0  # steps produced so far
    text_ended: bool = False  # early-stop: the text-end token has been produced
    last_modality: str | None = None
    run_length: int = 0  # length of the current chunk (consecutive steps of last_modality)


def next_modality(il: Interleave | None, st: TrackerState) -> Modality:
    if il is None:
        return "text"
    if il.format == "early-stop" and st.text_ended:
        return "speech"
    if il.text == 0:
        return "speech"
    if il.speech == 0:
        return "text"
    return "text" if st.steps % (il.text + il.speech) < il.text else "speech"


def chunk_index(modality: str, st: TrackerState) -> int:
    """1-based index of the next step inside its chunk (a maximal run of one modality)."""
    return st.run_length + 1 if modality == st.last_modality else 1


def advance(il: Interleave | None, st: TrackerState, modality: str, token: int) -> TrackerState:
    ended = st.text_ended or (
        il is not None and il.format == "early-stop" and modality == "text" and token == il.text_end_id
    )
    run = chunk_index(modality, st)
    return replace(st, steps=st.steps + 1, text_ended=ended, last_modality=modality, run_length=run)


def expected_depth(policy: Policy, num_layers: int, chunk_len: int) -> float:
    """Average layers executed over one chunk of `chunk_len` steps (exact arithmetic, METHOD.md section 2).

    Confidence exit depends on the data, so it has no expected depth here.
    """
    if policy.kind == "confidence":
        raise SparkeeError("confidence exit has no data-free expected depth")
    depths = []
    for i in range(1, chunk_len + 1):
        action, layer = policy.plan(i)
        depths.append(layer if action == "exit" else num_layers)
    return sum(depths) / len(depths)
