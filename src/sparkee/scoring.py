"""The one scorer for answers and transcripts, used by `eval`, `demo` and `layer-report`.

Rules, in one place:
- an example is judged only when its metadata names an answer (`accepted` or `answer`); without
  one its verdict is None, and accuracy over no verdicts is None (shown as "n/a"), never 0;
- alignment WER compares each speech transcript with the model's own text; a pair whose text is
  empty has nothing to align against and is left out (an empty transcript against non-empty text
  counts as all deletions); with no pair left the WER is None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Judge = Callable[[str, str, dict], bool]


def has_reference(meta: dict) -> bool:
    return bool(meta.get("accepted")) or bool(str(meta.get("answer", "")).strip())


def verdict(judge: Judge, question: str, answer: str, meta: dict) -> bool | None:
    """The judge's verdict, or None when the example carries no reference answer."""
    return bool(judge(question, answer, meta)) if has_reference(meta) else None


def accuracy(verdicts: Sequence[bool | None]) -> float | None:
    seen = [v for v in verdicts if v is not None]
    return sum(seen) / len(seen) if seen else None


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float | None:
    """Corpus WER of `hyps` against `refs` (word edits / reference words) over non-empty refs."""
    import jiwer

    pairs = [(" ".join(r.split()), " ".join(h.split())) for r, h in zip(refs, hyps, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return None
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


# ---------------------------------------------------------------------------------------------
# timing drift: a rule that only changes how long a unit lasts keeps the transcript


def unit_runs(speech_ids: Sequence[int]) -> list[list[int]]:
    """Speech tokens collapsed into [unit, frames] runs (repeated tokens make one unit)."""
    runs: list[list[int]] = []
    for t in speech_ids:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([int(t), 1])
    return runs


def duration_drift(runs: Sequence | None, ref: Sequence | None) -> dict | None:
    """How a speech answer's timing differs from a reference answer's (the full row's):
    `frames`, the absolute difference in length (frames), and `durations`, the mean absolute
    difference of per-unit durations over the units the two collapsed sequences have in common
    (aligned with difflib; None when they share none)."""
    if runs is None or ref is None:
        return None
    import difflib

    a, b = [u for u, _ in runs], [u for u, _ in ref]
    frames = abs(sum(n for _, n in runs) - sum(n for _, n in ref))
    diffs = []
    for blk in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        diffs += [abs(runs[blk.a + k][1] - ref[blk.b + k][1]) for k in range(blk.size)]
    return {"frames": frames, "durations": sum(diffs) / len(diffs) if diffs else None}
