"""A burst's prefill: prompts prefilled one after another (`Engine.add`) against one padded pass
(`Engine.add_many`, what `sparkee serve --prefill-batch` does with requests admitted together).
Never a timed test: run it on a quiet machine.

    python bench/prefill_batch.py [--models refslm,smollm2] [--sizes 1,2,4,8] [--threads 1,2]
        [--repeats 9]

The prompts are those `bench/serve_load.py` sends, built as the server builds them (the reference
SLM's test questions spoken into units; SmolLM2's questions in its chat template). Alone and
together are timed in turns (round-robin), medians; the work is also given as the prompts' FLOPs
(2 x matrix parameters x tokens) so the time a burst must take on this machine can be read off:
the last prompt of a burst of n gets its first token no sooner than the whole burst's prefill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import model_setups  # noqa: E402
from sparkee import load_model  # noqa: E402
from sparkee.engine import Engine  # noqa: E402
from sparkee.profiles import load_profile  # noqa: E402


def prompts_of(setup: dict, bb) -> list[list[int]]:
    profile = load_profile(setup["dir"], bb=bb)
    return [profile.encode_question(q) for q in setup["questions"]]


def matrix_params(bb) -> int:
    """Parameters of the decoder layers' linear maps (what a prompt's tokens multiply through)."""
    return sum(
        m.weight.numel() for layer in bb.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    )


def burst(eng: Engine, prompts: list[list[int]], together: bool) -> float:
    plans = [eng.plan_for(len(p)) for p in prompts]
    t = time.perf_counter()
    if together:
        rows = eng.add_many(prompts, plans)
    else:
        rows = [eng.add(p, plan=pl) for p, pl in zip(prompts, plans, strict=True)]
    dt = time.perf_counter() - t
    for r in rows:
        eng.release(r)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="refslm,smollm2")
    ap.add_argument("--sizes", default="1,2,4,8", help="prompts per burst")
    ap.add_argument("--threads", default="1,2", help="torch threads to time at")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    if args.repeats < 1 or min(sizes) < 1 or min(threads) < 1:
        raise SystemExit("--repeats, every --sizes and every --threads must be at least 1")
    print(
        "| model | threads | prompts | tokens | GFLOP | one after another | one padded pass | ratio | GFLOP/s (padded pass) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for setup in model_setups(args.models.split(",")):
        bb = load_model(setup["dir"])
        prompts = prompts_of(setup, bb)
        eng = Engine(bb, None, None, max_batch_size=max(sizes), max_len=512)
        params = matrix_params(bb)
        for th in threads:
            torch.set_num_threads(th)
            for n in sizes:
                group = prompts[:n]
                burst(eng, group, True), burst(eng, group, False)  # warm-up
                alone, together = [], []
                for _ in range(args.repeats):
                    alone.append(burst(eng, group, False))
                    together.append(burst(eng, group, True))
                a, b = statistics.median(alone), statistics.median(together)
                tokens = sum(map(len, group))
                gflop = 2 * params * tokens / 1e9
                print(
                    f"| {setup['name']} | {th} | {n} | {tokens} | {gflop:.2f} | {1e3 * a:.1f} ms | "
                    f"{1e3 * b:.1f} ms | {a / b:.2f}x | {gflop / b:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
