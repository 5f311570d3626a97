"""Why a served batch keeps less of SPAR-K's gain: deep passes per step when rows join at
different times (never a timed test; it counts steps, and with --timed times them on a quiet machine).

A batch step skips the deep layers only when every row exits early; a text step, a refresh or a
rejection of any row runs them for the whole step. Requests that join a running batch one after
another (as a server's do) sit at different places of their interleave (text or speech chunk) and
of their refresh pattern, so fewer steps are all-early than for a row alone or for rows that
started together. Decodes the reference SLM's test questions through the engine the server uses
(`Engine.add` / `step`), closed loop: a finished row's slot takes the next question.

    python bench/serve_phases.py [--policy spar-k:FEEE:4] [--text-policy full] [--heads bundled]
        [--requests 16] [--batch 8] [--format padded] [--timed ROUNDS]

`--timed` also times each row against full depth (the same joins, in turns, medians of the rounds),
the engine alone without HTTP: what the served gain would be with no server around it.

With text steps drafted too (`--text-policy spar-k:FE:4 --heads
src/sparkee/refslm/assets/heads/tuned-lens-all.safetensors`, heads that cover text), a batch's deep
passes are its shared refreshes rather than the union of every row's text steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparkee import load_model
from sparkee.engine import Engine
from sparkee.profiles import heads_of, load_profile, resolve_config
from sparkee.refslm import bundled_model_dir


def count_steps(
    bb, heads, cfg, prompts: list[list[int]], batch: int, join_every: int | None
) -> tuple[int, int, int, float]:
    """(all-early steps, steps with deep layers, tokens, seconds). join_every: a new row every that
    many steps while a slot is free; None: rows join only when every slot is free (they start
    together)."""
    eng = Engine(bb, heads, cfg, max_batch_size=batch, calibration=None)
    queue, steps, tokens = list(prompts), 0, 0
    eng.reset_batch_meter()
    t0 = time.perf_counter()
    while queue or eng.active():
        if join_every is None:
            if eng.free_slots() == batch:  # every slot free: the next batch starts together
                for _ in range(min(batch, len(queue))):
                    eng.add(queue.pop(0))
        elif queue and eng.free_slots() and (steps % join_every == 0 or not eng.active()):
            eng.add(queue.pop(0))
        tokens += len(eng.step().events)  # confirmed tokens streamed (first tokens included)
        steps += 1
        for b in range(batch):
            if eng.done(b):  # finished (or empty): the slot is free for the next question
                eng.release(b)
    seconds = time.perf_counter() - t0
    st = eng.batch_meter.steps
    return st.get("early", 0), st.get("full", 0), tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="spar-k:FEEE:4")
    ap.add_argument("--text-policy", default="full")
    ap.add_argument("--heads", default="bundled")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--format", default="padded")
    ap.add_argument(
        "--timed",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time every row against full depth in turns, ROUNDS rounds (medians; a quiet machine)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = bundled_model_dir()
    bb = load_model(model)
    profile = load_profile(model, bb=bb)
    heads = heads_of(args.heads, profile, bb)
    common = {"format": args.format, "max_new_tokens": 200, "calibrate": False}
    cfg = resolve_config(
        profile, {"speech_policy": args.policy, "text_policy": args.text_policy, "verify": True} | common
    )
    full = resolve_config(profile, {"speech_policy": "full", "text_policy": "full"} | common)
    prompts = [item.ids for item in profile.prompts("refslm:test", args.format)[: args.requests]]
    print(
        f"text {args.text_policy}, speech {args.policy}, verified, heads {args.heads}, "
        f"{len(prompts)} test questions, format {args.format}, 1 torch thread"
    )
    timed = " tokens/s | full depth tokens/s | gain |" if args.timed else ""
    print("| batch | rows join | steps | all-early steps | steps with deep layers |" + timed)
    print("|---|---|---|---|---|" + ("---|---|---|" if args.timed else ""))
    for batch, join, label in (
        (1, 1, "one at a time"),
        (args.batch, None, "together, a batch at a time"),
        (args.batch, 1, "one a step while a slot is free"),
        (args.batch, 5, "one every 5 steps while a slot is free"),
    ):
        early, deep, _, _ = count_steps(bb, heads, cfg, prompts, batch, join)
        line = (
            f"| {batch} | {label} | {early + deep} | {early} ({100 * early / (early + deep):.0f}%) | {deep} |"
        )
        if args.timed:
            ours, base = [], []
            for _ in range(args.timed):  # in turns, so drift of the machine hits both alike
                _, _, n, sec = count_steps(bb, heads, cfg, prompts, batch, join)
                ours.append(n / sec)
                _, _, n, sec = count_steps(bb, heads, full, prompts, batch, join)
                base.append(n / sec)
            a, b = statistics.median(ours), statistics.median(base)
            line += f" {a:.1f} | {b:.1f} | {a / b:.2f}x |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
