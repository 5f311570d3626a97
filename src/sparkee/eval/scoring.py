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
