"""Batched decoding speed, measured side by side in one run (round-robin, medians).

For one model and dtype: tokens/s of sparkee `full` at batch 1 and batch B (and transformers'
`generate` at both, on the plain model, for scale); then, every step a speech step, each
schedule's speed-up over `full` at batch B beside the calibrated cost model's batch prediction
(`batch_predicted_speedup`) and measured/predicted. Prompts are equal-length random ids, so a
fixed schedule keeps the batch in lock-step.

    python bench/batch_speed.py [--model smollm2-135m] [--dtype float32] [--batch 8] [--tokens 64]
        [--repeats 3] [--layer L] [--out bench/results/batch_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparkee import GenerationConfig, Interleave, calibrate, generate_batch, load_model, store
from sparkee.models.smollm2 import prepare_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="bench/results/batch_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = prepare_smollm2() if args.model == "smollm2-135m" else args.model
    plain = load_model(path, dtype=args.dtype, fast=False).model
    bb = load_model(path, dtype=args.dtype)
    calibrate.load_or_calibrate(bb)
    N, n, B = bb.num_layers, args.tokens, args.batch
    L = args.layer or N // 2
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, min(bb.vocab_size, 20000), (16,), generator=gen).tolist() for _ in range(B)]

    def hf(rows: int) -> float:
        ids = torch.tensor(prompts[:rows])
        t0 = time.perf_counter()
        with torch.inference_mode():
            plain.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return rows * n / (time.perf_counter() - t0)

    def ours(rows: int, policy: str | None):
        il = None if policy is None else Interleave(0, 1)
        cfg = GenerationConfig(
            max_new_tokens=n, speech_policy=policy or "full", interleave=il, calibrate=True
        )
        t0 = time.perf_counter()
        res = generate_batch(bb, prompts[:rows], cfg)
        wall = time.perf_counter() - t0
        st = res[0].stats
        decode = st["decode_s"]
        return rows * n / wall, rows * (n - 1) / decode, st

    schedules = [f"spar-k:even:{L}", f"spar-k:triple:{L}", f"fixed:{L}"]
    runs = ["hf-1", f"hf-{B}", "text-1", f"text-{B}", f"full-{B}", *[f"{s}-{B}" for s in schedules]]
    speeds = {k: [] for k in runs}
    stats = {}
    ours(2, None)  # warm-up
    hf(2)
    for _ in range(args.repeats):
        for key in runs:
            name, rows = key.rsplit("-", 1)
            rows = int(rows)
            if name == "hf":
                speeds[key].append(hf(rows))
                continue
            wall_tps, decode_tps, st = ours(rows, None if name == "text" else name)
            speeds[key].append(wall_tps if name == "text" else decode_tps)
            stats[key] = st
    med = {k: statistics.median(v) for k, v in speeds.items()}
    full = stats[f"full-{B}"]
    rows_out = {}
    for s in schedules:
        st = stats[f"{s}-{B}"]
        measured = med[f"{s}-{B}"] / med[f"full-{B}"]
        predicted = st["batch_predicted_speedup_calibrated"] / full["batch_predicted_speedup_calibrated"]
        rows_out[s] = {
            "measured_speedup": measured,
            "predicted_speedup": predicted,
            "measured_over_predicted": measured / predicted,
            "memory_bound_predicted": st["batch_predicted_speedup_memory_bound"]
            / full["batch_predicted_speedup_memory_bound"],
        }
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "machine": store.machine_id(),
        "batch": B,
        "new_tokens": n,
        "tokens_per_s": med,
        "sparkee_batch_over_batch1": med[f"text-{B}"] / med["text-1"],
        "hf_batch_over_batch1": med[f"hf-{B}"] / med["hf-1"],
        "schedules": rows_out,
    }
    print(f"{args.model} {args.dtype}, {args.threads} threads, {n} new tokens, medians of {args.repeats}")
    print(
        f"tokens/s: sparkee batch 1 {med['text-1']:.1f}, batch {B} {med[f'text-{B}']:.1f} "
        f"({result['sparkee_batch_over_batch1']:.2f}x); transformers batch 1 {med['hf-1']:.1f}, "
        f"batch {B} {med[f'hf-{B}']:.1f} ({result['hf_batch_over_batch1']:.2f}x)"
    )
    for s, r in rows_out.items():
        print(
            f"batch {B}, all speech, {s}: {r['measured_speedup']:.3f}x over full; calibrated prediction "
            f"{r['predicted_speedup']:.3f} (measured/predicted {r['measured_over_predicted']:.3f}); "
            f"memory-bound {r['memory_bound_predicted']:.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
