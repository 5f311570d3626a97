"""Where the time of a decode step goes: each step kind timed alone, beside the cost model's figures.

Step kinds, each through the engine's own code paths (backbone blocks, layered KV cache, heads):
- early step: embed, layers 1..L over 1 row, exit head, argmax;
- full step: embed, layers 1..N over 1 row, final norm, output projection, argmax;
- refresh with k pending: embed, layers 1..L over 1 row, layers L+1..N over k + 1 rows (the
  deferred deep fill), projection of the k + 1 rows (verification comes free with it), argmax;
- exit head alone (logit lens and tuned lens), output projection alone (full vocabulary and a
  speech-sized slice of it), and a prefill.
Kinds are timed round-robin (one call each per round). For each: median milliseconds, milliseconds per layer-row, the weight-read (memory-bound) cost
model's figure relative to a full step, and the calibrated model's prediction (cost.py) with
measured/predicted. Run on a quiet machine (no tests, training or other benchmark beside it).

    python bench/step_kinds.py [--model smollm2-135m|refslm|DIR] [--dtype float32] [--layer L]
        [--context 64] [--repeats 30] [--plain] [--profile KIND] [--out bench/results/step_kinds.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparkee import calibrate, cost, load_model, store
from sparkee.cache import LayeredKVCache
from sparkee.heads import ExitHeads


def load(name: str, dtype: str, fast: bool):
    if name == "smollm2-135m":
        from sparkee.models.smollm2 import prepare_smollm2

        return load_model(prepare_smollm2(), dtype=dtype, fast=fast)
    if name == "refslm":
        from sparkee.refslm import bundled_model_dir

        return load_model(bundled_model_dir(), dtype=dtype, fast=fast)
    return load_model(name, dtype=dtype, fast=fast)


class Kinds:
    """Callables, one per step kind, on a cache prefilled to `context` positions."""

    def __init__(self, bb, layer: int, context: int, kmax: int = 8) -> None:
        self.bb, self.L, self.ctx = bb, layer, context
        N, H = bb.num_layers, bb.hidden_size
        self.cache = LayeredKVCache(
            N, context + kmax + 2, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices
        )
        gen = torch.Generator().manual_seed(0)
        self.h = torch.randn(1, context, H, generator=gen).to(bb.dtype)
        self.token = torch.tensor([[11]])
        with torch.inference_mode():
            pids = torch.arange(context)[None]
            self.cache.begin_pass([0], [context], [0])
            bb.run_block(0, N, self.h, None, pids, bb.rope(self.h, pids), self.cache)
        self.logit_lens = ExitHeads(bb, "logit-lens")
        self.tuned = ExitHeads(bb, "tuned-lens", layers=[layer])
        self.tuned.use_fast_kernels()
        V = bb.vocab_size
        self.speech_ids = torch.arange(V - max(V // 10, 1), V)

    def _pass(self, a: int, b: int, x: torch.Tensor, start: int) -> torch.Tensor:
        bb, r = self.bb, x.shape[1]
        pids = torch.arange(start, start + r)[None]
        mask = None
        if r > 1:
            q = torch.arange(start, start + r)[:, None]
            mask = (torch.arange(start + r)[None] <= q)[None, None]
        self.cache.begin_pass([0], [r], [start])
        out = bb.run_block(a, b, x, mask, pids, bb.rope(x, pids), self.cache)
        for i in range(a, b):
            self.cache.lens[i][0] = start  # roll back: every call sees the same context
        return out

    def early(self):
        h = self._pass(0, self.L, self.bb.embed(self.token), self.ctx)
        return int(torch.argmax(self.logit_lens(self.L, h[:, -1])))

    def full(self):
        bb = self.bb
        h = self._pass(0, bb.num_layers, bb.embed(self.token), self.ctx)
        return int(torch.argmax(bb.project(bb.final_norm(h[:, -1]))))

    def refresh(self, k: int):
        bb, L = self.bb, self.L
        own = self._pass(0, L, bb.embed(self.token), self.ctx)  # its own token to L
        x = torch.cat([self.h[:, self.ctx - k :], own], dim=1)  # k pending states join at L
        h = self._pass(L, bb.num_layers, x, self.ctx - k)
        return torch.argmax(bb.project(bb.final_norm(h[0])), dim=-1).tolist()

    def head(self, heads):
        return int(torch.argmax(heads(self.L, self.h[:, -1])))

    def projection(self, ids=None):
        bb = self.bb
        return int(torch.argmax(bb.project(bb.final_norm(self.h[:, -1]), ids)))

    def prefill(self, n: int = 64):
        bb = self.bb
        n = min(n, self.ctx)
        x = self.h[:, :n]
        cache = LayeredKVCache(bb.num_layers, n + 1, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices)
        pids = torch.arange(n)[None]
        cache.begin_pass([0], [n], [0])
        return bb.run_block(0, bb.num_layers, x, None, pids, bb.rope(x, pids), cache)


def round_robin_ms(fns: list, repeats: int) -> list[float]:
    """Median milliseconds of each callable, timed in turn (one call each per round): drift in
    machine speed hits every kind alike. Timing one kind in a block of calls, then the next, gave
    20-40% different ratios on this project's machines."""
    samples = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:
            fn()
            fn()
        for _ in range(repeats):
            for s, fn in zip(samples, fns, strict=True):
                t0 = time.perf_counter()
                fn()
                s.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(s) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--layer", type=int, default=None, help="exit layer L (default: half the depth)")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--plain", action="store_true", help="without the measured fast kernels (kernels.py)")
    ap.add_argument(
        "--profile", default=None, help="print torch.profiler's top ops for one kind, e.g. refresh-2"
    )
    ap.add_argument("--out", default="bench/results/step_kinds.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bb = load(args.model, args.dtype, fast=not args.plain)
    N, H, V = bb.num_layers, bb.hidden_size, bb.vocab_size
    L = args.layer or N // 2
    k = Kinds(bb, L, args.context)
    cal = calibrate.load_or_calibrate(bb)
    meter = cost.new_meter(bb)
    lp = sum(bb.layer_params) / N
    kv = meter.kv_per_pos[0]
    ctx = args.context + 1

    def reads(layers_rows: list[tuple[int, int]], mats: list[int]) -> float:
        # weight-read model: each layer pass reads its weights once and its KV; matrices once
        return sum(lp + kv * ctx for _ in layers_rows) + sum(mats)

    def predict(layers_rows: list[tuple[int, int]], mats: list[tuple[int, int]], kind: str | None) -> float:
        t = sum(cal.layer_time(r, ctx) for _, r in layers_rows) + sum(cal.matrix_time(e, r) for e, r in mats)
        return 1e3 * (t + (cal.overhead.get(kind, 0.0) if kind else 0.0))

    full_reads = reads([(i, 1) for i in range(N)], [H * V])
    kinds = [
        ("early step", k.early, [(i, 1) for i in range(L)], [(H * V, 1)], "early"),
        ("full step", k.full, [(i, 1) for i in range(N)], [(H * V, 1)], "full"),
    ]
    for n in (1, 2, 3, 4, 6, 8):
        kinds.append(
            (
                f"refresh-{n}",
                lambda n=n: k.refresh(n),
                [(i, 1) for i in range(L)] + [(i, n + 1) for i in range(L, N)],
                [(H * V, n + 1)],
                "full",
            )
        )
    kinds += [
        ("head: logit lens", lambda: k.head(k.logit_lens), [], [(H * V, 1)], None),
        ("head: tuned lens", lambda: k.head(k.tuned), [], [(H * H, 1), (H * V, 1)], None),
        ("projection: full", k.projection, [], [(H * V, 1)], None),
        (
            f"projection: {k.speech_ids.numel()} ids",
            lambda: k.projection(k.speech_ids),
            [],
            [(H * k.speech_ids.numel(), 1)],
            None,
        ),
        ("prefill 64", k.prefill, [(i, 64) for i in range(N)], [], None),
    ]
    rows = []
    times = round_robin_ms([fn for _, fn, *_ in kinds], args.repeats)
    for (name, _, layers_rows, mats, kind), ms in zip(kinds, times, strict=True):
        layer_rows = sum(r for _, r in layers_rows)
        pred = predict(layers_rows, mats, kind)
        rows.append(
            {
                "kind": name,
                "ms": ms,
                "ms_per_layer_row": ms / layer_rows if layer_rows else None,
                "memory_bound_vs_full_step": reads(layers_rows, [e for e, _ in mats]) / full_reads,
                "calibrated_ms": pred,
                "measured_over_predicted": ms / pred if pred else None,
            }
        )
    full_ms = next(r["ms"] for r in rows if r["kind"] == "full step")
    for r in rows:
        r["measured_vs_full_step"] = r["ms"] / full_ms

    from rich.console import Console
    from rich.table import Table

    title = (
        f"{args.model} {args.dtype}, {args.threads} threads, exit layer {L} of {N}, context {args.context}, "
        f"kernels: {'plain' if args.plain else bb.kernel_signature()}"
    )
    t = Table(title=title)
    for col in (
        "step kind",
        "ms",
        "ms / layer-row",
        "vs full step",
        "memory-bound model",
        "calibrated ms",
        "measured / calibrated",
    ):
        t.add_column(col)
    f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        t.add_row(
            r["kind"],
            f(r["ms"]),
            f(r["ms_per_layer_row"], 3),
            f(r["measured_vs_full_step"]),
            f(r["memory_bound_vs_full_step"]),
            f(r["calibrated_ms"]),
            f(r["measured_over_predicted"]),
        )
    Console(width=160).print(t)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        fn = next(fn for name, fn, *_ in kinds if name.replace("refresh-", "refresh-") == args.profile)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                fn()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "dtype": args.dtype, "threads": args.threads, "layer": L, "layers": N}
    out.write_text(
        json.dumps(
            {**meta, "kernels": bb.kernel_choice, "machine": store.machine_id(), "kinds": rows}, indent=1
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
