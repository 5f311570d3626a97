"""generate / stream / generate_batch: thin loops over the engine (engine.py).

Each prompt is prefilled alone, then the engine steps until every row has stopped. These entry
points are also where a run's calibration (this machine's measured costs, calibrate.py) is read or
measured, once per loaded model, when the config wants calibrated predictions.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from . import calibrate
from .backbone import Backbone
from .config import GenerationConfig, calibration_wanted
from .engine import Emitted, Engine, GenerationResult, _check_prompt, _Run, make_plan
from .errors import SparkeeError
from .heads import ExitHeads

__all__ = [  # GenerationConfig, Emitted, GenerationResult: re-exported where they used to live
    "BatchGeneration",
    "Emitted",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "generate",
    "generate_batch",
    "stream",
    "stream_batch",
]


class BatchGeneration:
    """A streaming generation of one or more prompts: iterate for tokens as they are produced
    (`Emitted.row` says whose), then call `results()`. A thin loop over `engine.Engine`: every
    prompt prefilled alone, then steps until every row has stopped."""

    def __init__(
        self, bb: Backbone, heads: ExitHeads | None, prompts: Sequence[Sequence[int]], cfg: GenerationConfig
    ):
        heads = heads if heads is not None else ExitHeads(bb, "logit-lens")
        if len(prompts) == 0:
            raise SparkeeError("no prompts to generate from")
        for n, p in enumerate(prompts):
            _check_prompt(bb, p, "the prompt" if len(prompts) == 1 else f"prompt {n + 1}")
        plan = make_plan(bb, heads, cfg, max(len(p) for p in prompts))
        self.calibration = calibrate.load_or_calibrate(bb, heads) if calibration_wanted(cfg) else None
        self._plan = plan
        self._prompts = [list(p) for p in prompts]
        self._seeds = [None if cfg.seed is None else cfg.seed + n for n in range(len(prompts))]
        self._engine = Engine(bb, heads, cfg, len(prompts), plan.max_len, self.calibration)
        self._times = (0.0, 0.0)
        self._iter = self._loop()

    def __iter__(self) -> Iterator[Emitted]:
        return self._iter

    @property
    def _run(self) -> _Run:  # the engine's batch (tests look at its meters)
        return self._engine._run

    def _loop(self) -> Iterator[Emitted]:
        eng = self._engine
        t0 = time.perf_counter()
        # one plan for every prompt (make_plan once, as before the engine), checked in __init__
        rows = [
            eng.add(p, seed=seed, plan=self._plan) for p, seed in zip(self._prompts, self._seeds, strict=True)
        ]
        assert rows == list(range(len(rows)))  # an empty engine fills its slots in order
        t1 = time.perf_counter()
        eng.reset_batch_meter()  # costs below are decode costs
        yield from eng.drain()
        while eng.active():
            yield from eng.step().events
        self._times = (t1 - t0, time.perf_counter() - t1)

    def results(self) -> list[GenerationResult]:
        for _ in self._iter:
            pass
        prefill_s, decode_s = self._times
        eng, plan = self._engine, self._plan
        rows = list(range(len(self._prompts)))
        out = [eng.result(b, decode_s, prefill_s, self.calibration, plan) for b in rows]
        if len(out) > 1:
            batch = eng.batch_stats(rows, decode_s, self.calibration)
            for r in out:
                r.stats.batch = batch
        return out


class Generation(BatchGeneration):
    """A streaming generation of one prompt: iterate for tokens as they come, then call `result()`."""

    def __init__(self, bb: Backbone, heads: ExitHeads | None, prompt: Sequence[int], cfg: GenerationConfig):
        if len(prompt) == 0:
            raise SparkeeError("the prompt is empty: give at least one token")
        super().__init__(bb, heads, [prompt], cfg)

    def result(self) -> GenerationResult:
        return self.results()[0]


def stream(
    bb: Backbone, prompt: Sequence[int], cfg: GenerationConfig, heads: ExitHeads | None = None
) -> Generation:
    """Start a generation; iterate over it for tokens as they come (see `Emitted`)."""
    return Generation(bb, heads, prompt, cfg)


def generate(
    bb: Backbone, prompt: Sequence[int], cfg: GenerationConfig | None = None, heads: ExitHeads | None = None
) -> GenerationResult:
    """Generate to completion and return tokens, per-step trace and stats."""
    return Generation(bb, heads, prompt, cfg or GenerationConfig()).result()


def stream_batch(
    bb: Backbone, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, heads: ExitHeads | None = None
) -> BatchGeneration:
    """Start a batched generation; events carry their row index (`Emitted.row`)."""
    return BatchGeneration(bb, heads, prompts, cfg)


def generate_batch(
    bb: Backbone,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    heads: ExitHeads | None = None,
) -> list[GenerationResult]:
    """Decode several prompts in one loop; each result equals the prompt decoded alone (greedy)."""
    return BatchGeneration(bb, heads, prompts, cfg or GenerationConfig()).results()
