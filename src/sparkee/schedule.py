"""Interleave tracker and exit policies: which modality the next step has and how deep it runs.

Pure Python (no torch) so the schedule can be property-tested on its own. The decode loop asks the
tracker for the next step's modality and position in its chunk, asks the policy of that modality
for a plan, and tells the tracker which token the step produced (and of which kind: text, speech
or control), so that the `auto` format can follow what the model actually emits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from .errors import SparkeeError
from .syntax import POLICY_SYNTAX

Modality = Literal["text", "speech"]
NAMED_PATTERNS = {"even": "FE", "odd": "EF", "triple": "FEE"}
# the one list of interleave formats (the CLI, the profiles and eval read it from here)
FORMATS = ("padded", "early-stop", "auto")
DEFAULT_KMAX = 8  # longest run of early steps of spar-k:adaptive unless the spec says otherwise


@dataclass(frozen=True)
class Policy:
    """An exit policy for one modality.

    kind: "full" (always all layers), "fixed" (always exit at `layer`), "confidence" (run to
    `layer`, exit when the head's entropy in nats is below `threshold`, else run to the top),
    "spar-k" (inside each chunk, step i follows `pattern[(i - 1) % K]`: F = full, E = exit at
    `layer`), "adaptive" (after each full step run `run_len` early steps at `layer`, where the
    decode loop grows `run_len` by one after a refresh that accepted every early token and halves
    it after a rejection, within 1..`kmax`).
    `layer` counts layers executed: 1 <= layer < num_layers.
    """

    kind: Literal["full", "fixed", "confidence", "spar-k", "adaptive"]
    layer: int | None = None
    threshold: float | None = None
    pattern: str | None = None
    kmax: int | None = None
    name: str = "full"

    @property
    def spec(self) -> str:
        return self.name

    def __str__(self) -> str:  # the spec string, as written: what logs, JSON and the API show
        return self.name

    @property
    def refresh_every(self) -> int | None:
        """K for a spar-k pattern of one F in K steps (even, triple, FEEE, ...): a full pass every K
        steps, which a batch may clock by full passes instead of chunk positions; else None."""
        if self.kind == "spar-k" and self.pattern and self.pattern.count("F") == 1:
            return len(self.pattern)
        return None

    @property
    def uses_heads(self) -> bool:
        return self.kind != "full"

    def plan(self, index_in_chunk: int, since_full: int = 0, run_len: int = 1) -> tuple[str, int | None]:
        """Plan for the `index_in_chunk`-th step (1-based) of a chunk.

        `since_full`: early steps since the last full step (any modality); `run_len`: the adaptive
        policy's current run of early steps. Returns ("full", None), ("exit", L) or ("try", L)
        where "try" means: run to L, decide there.
        """
        if self.kind == "full":
            return ("full", None)
        if self.kind == "fixed":
            return ("exit", self.layer)
        if self.kind == "confidence":
            return ("try", self.layer)
        if self.kind == "adaptive":
            return ("exit", self.layer) if since_full < run_len else ("full", None)
        assert self.pattern is not None
        letter = self.pattern[(index_in_chunk - 1) % len(self.pattern)]
        return ("exit", self.layer) if letter == "E" else ("full", None)

    def with_layer(self, layer: int) -> Policy:
        """The same policy exiting at `layer` (a layer sweep); its name says the new layer."""
        if self.layer is None:
            raise SparkeeError(f"policy '{self.name}' has no exit layer to change")
        parts = self.name.split(":")
        parts[1 if self.kind in ("fixed", "confidence") else 2] = str(layer)
        return replace(self, layer=layer, name=":".join(parts))

    def check_layers(self, num_layers: int) -> None:
        if self.layer is not None and not 1 <= self.layer < num_layers:
            raise SparkeeError(
                f"exit layer {self.layer} in policy '{self.name}' is out of range: "
                f"this model has {num_layers} layers, so use 1..{num_layers - 1}"
            )


def _parse_int(text: str, spec: str, what: str = "exit layer") -> int:
    if not re.fullmatch(r"\d+", text):
        raise SparkeeError(f"policy '{spec}' needs a whole-number {what}, got '{text}'")
    return int(text)


def parse_policy(spec: str, num_layers: int | None = None) -> Policy:
    """Parse a policy string (see POLICY_SYNTAX); with `num_layers` the exit layer is checked too."""
    s = spec.strip()
    parts = s.split(":")
    kind = parts[0].lower()
    if kind == "full" and len(parts) == 1:
        pol = Policy("full", name="full")
    elif kind == "fixed" and len(parts) == 2:
        pol = Policy("fixed", layer=_parse_int(parts[1], s), name=s)
    elif kind == "confidence" and len(parts) == 3:
        try:
            thr = float(parts[2])
        except ValueError:
            raise SparkeeError(f"policy '{s}' needs an entropy threshold in nats, got '{parts[2]}'") from None
        if not thr >= 0 or thr == float("inf"):
            raise SparkeeError(f"policy '{s}' needs a finite non-negative entropy threshold, got {parts[2]}")
        pol = Policy("confidence", layer=_parse_int(parts[1], s), threshold=thr, name=s)
    elif kind == "spar-k" and len(parts) in (3, 4) and parts[1].lower() == "adaptive":
        kmax = _parse_int(parts[3], s, "KMAX") if len(parts) == 4 else DEFAULT_KMAX
        if kmax < 1:
            raise SparkeeError(f"policy '{s}' needs KMAX >= 1 (the longest run of early steps)")
        pol = Policy("adaptive", layer=_parse_int(parts[2], s), kmax=kmax, name=s)
    elif kind == "spar-k" and len(parts) == 3:
        pat = NAMED_PATTERNS.get(parts[1].lower(), parts[1].upper())
        if not pat or not re.fullmatch(r"[FE]+", pat):
            raise SparkeeError(
                f"schedule pattern '{parts[1]}' in policy '{s}' must be even, odd, triple, adaptive "
                "or a string of the letters F and E"
            )
        pol = Policy("spar-k", layer=_parse_int(parts[2], s), pattern=pat, name=s)
    else:
        raise SparkeeError(f"unknown policy '{spec}': use {POLICY_SYNTAX}")
    if num_layers is not None:
        pol.check_layers(num_layers)
    return pol


@dataclass(frozen=True)
class Interleave:
    """Text:speech ratio. Generation starts with `text` text steps, then `speech` speech steps, repeating.

    format "padded": the ratio holds to the end (the model pads text slots after its text ends).
    format "early-stop" (ESI): once `text_end_id` is produced, every later step is speech.
    format "auto": the ratio predicts the next step's modality and the tokens the model actually
      produces correct it (see `advance`); `text_end_ids` are tokens that end the text while the
      model keeps the slots' ratio (Step-Audio-2's `<tts_pad>`). Needs the speech id range.
    """

    text: int
    speech: int
    format: str = "padded"
    text_end_id: int | None = None
    text_end_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.text < 0 or self.speech < 0 or self.text + self.speech == 0:
            raise SparkeeError(
                f"interleave {self.text}:{self.speech} needs non-negative counts with at least one step"
            )
        if self.format not in FORMATS:
            raise SparkeeError(f"unknown format '{self.format}': use {', '.join(FORMATS)}")
        if self.format == "early-stop" and self.text_end_id is None:
            raise SparkeeError("format early-stop needs the text-end token id (--text-end-id N)")
        object.__setattr__(self, "text_end_ids", tuple(int(t) for t in self.text_end_ids))

    @property
    def cycle(self) -> int:
        return self.text + self.speech


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

    steps: int = 0  # slot counter of the ratio (auto re-synchronises it)
    text_ended: bool = False  # every later step is speech (early-stop's text end, or auto's)
    padding: bool = False  # auto: a text-end token was produced; text slots now hold padding
    last_modality: str | None = None
    run_length: int = 0  # length of the current chunk (consecutive steps of last_modality)
    since_full: int = 0  # early steps since the last full step (spar-k:adaptive)


def next_modality(il: Interleave | None, st: TrackerState) -> Modality:
    if il is None:
        return "text"
    if st.text_ended and il.format in ("early-stop", "auto"):
        return "speech"
    if il.text == 0:
        return "speech"
    if il.speech == 0:
        return "text"
    return "text" if st.steps % il.cycle < il.text else "speech"


def chunk_index(modality: str, st: TrackerState) -> int:
    """1-based index of the next step inside its chunk (a maximal run of one modality)."""
    return st.run_length + 1 if modality == st.last_modality else 1


TokenKind = Literal["text", "speech", "control"]


def advance(
    il: Interleave | None,
    st: TrackerState,
    modality: str,
    token: int,
    kind: TokenKind | None = None,
    early: bool = False,
) -> TrackerState:
    """The state after a step planned as `modality` produced `token` (of `kind`, when known).

    In the `auto` format the produced token corrects the plan: a text step that produced a
    speech token ends the text (every later step is speech, as in early-stop); a text-end token
    (`il.text_end_ids`) marks the text as ended while the ratio's slots go on (the model pads
    them); a speech step that produced a text token re-synchronises the counter so that this
    step counts as the first of a text chunk (and the text is no longer ended). Control tokens
    (stop ids, audio control tokens) correct nothing.
    """
    run = chunk_index(modality, st)
    since = st.since_full + 1 if early else 0
    steps, ended, padding = st.steps + 1, st.text_ended, st.padding
    if il is not None and il.format == "early-stop" and modality == "text" and token == il.text_end_id:
        ended = True
    if il is not None and il.format == "auto" and kind is not None:
        if token in il.text_end_ids:
            padding = True
        elif modality == "text" and kind == "speech":
            ended = True
        elif modality == "speech" and kind == "text" and il.text > 0:
            # this step was the first text slot of a cycle, so the next one is slot 2
            ended, padding, steps = False, False, 1
    return TrackerState(steps, ended, padding, modality, run, since)  # (every step: no replace())


def misplanned(modality: str, kind: TokenKind | None) -> bool:
    """A step planned as one modality that produced a token of the other."""
    return kind in ("text", "speech") and kind != modality


def expected_depth(policy: Policy, num_layers: int, chunk_len: int) -> float:
    """Average layers executed over one chunk of `chunk_len` steps (exact arithmetic, METHOD.md section 2).

    Confidence exit and the adaptive schedule depend on the data, so they have no expected depth.
    """
    if policy.kind in ("confidence", "adaptive"):
        raise SparkeeError(f"policy '{policy.name}' depends on the data, so it has no expected depth")
    depths = []
    for i in range(1, chunk_len + 1):
        action, layer = policy.plan(i)
        depths.append(layer if action == "exit" else num_layers)
    return sum(depths) / len(depths)
