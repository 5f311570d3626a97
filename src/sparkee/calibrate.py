"""Measuring a machine: the `Calibration` table of cost.py, read from the cache or measured now.

A calibration is measured once per (machine, model shape, dtype, device, torch version, kernels)
through the engine's own code paths and kernels, and cached as JSON (store.py); a file whose key
does not match the current settings is never used, and one whose timings moved while it was
measured (a busy machine) is measured again and, moving again, used but never cached. This module
runs the engine (three short generations fit the step overheads), so it sits on the top floor:
generate.py, eval, the server and the CLI read a calibration here and hand it to the engine.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from . import hf
from .cache import LayeredKVCache
from .config import GenerationConfig
from .cost import Calibration, CostMeter
from .engine import Engine, context_limit
from .heads import ExitHeads
from .kernels import fast_linear
from .progress import Progress
from .schedule import Interleave
from .store import cache_root, machine_id, read_cached, write_cached

CALIBRATION_VERSION = 4
# rows of a layer pass that are measured; others interpolated (a fixed-exit flush can be long)
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def calibration_key(bb) -> dict:
    dev = torch.device(bb.device)
    machine = machine_id()
    if dev.type == "cuda":
        machine = f"{torch.cuda.get_device_name(dev)} | {machine}"
    return {
        "version": CALIBRATION_VERSION,
        "machine": machine,
        "arch": bb.architecture,
        "layers": bb.num_layers,
        "hidden": bb.hidden_size,
        "intermediate": bb.shape.intermediate_size,
        "heads": bb.shape.num_heads,
        "kv_heads": bb.num_kv_heads,
        "head_dim": bb.head_dim,
        "vocab": bb.vocab_size,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "device": dev.type,
        "torch": torch.__version__,
        "kernels": bb.kernel_signature(),
        "device_map": hf.has_device_map(bb.model),
    }


def cached_calibration(bb) -> Calibration | None:
    data = read_cached("calibration", calibration_key(bb))
    if data is None:
        return None
    try:
        cal = Calibration.from_json(data)
    except (KeyError, TypeError):
        return None
    # written before unsteady calibrations stopped being cached: measure again rather than trust it
    return None if cal.drift > UNSTEADY else cal


def load_or_calibrate(bb, heads=None, progress: bool = True) -> Calibration:
    """This machine's calibration for `bb` from the cache, measured now when there is none."""
    key = calibration_key(bb)
    hit = getattr(bb, "_calibration", None)
    if hit is not None and hit.key == key:  # read once per loaded model, not per generation
        return hit
    cal = cached_calibration(bb)
    if cal is not None:
        bb._calibration = cal
        return cal
    if progress:
        print(
            f"sparkee: measuring decode costs on this machine once (cached under {cache_root()}/calibration)...",
            file=sys.stderr,
            flush=True,
        )
    cal = calibrate(bb, progress=progress)
    if cal.drift > UNSTEADY:  # the machine changed speed while measuring: once more, keep the steadier
        again = calibrate(bb, progress=progress)
        cal = min(cal, again, key=lambda c: c.drift)
    if cal.drift > UNSTEADY:
        # never cached: a cached calibration is used by every later run on this machine
        print(
            f"sparkee: warning: layer timings moved by {100 * cal.drift:.0f}% while calibrating, twice (a "
            "busy machine?); predictions may be off and this calibration is not cached: rerun "
            "`sparkee calibrate` on a quiet machine.",
            file=sys.stderr,
            flush=True,
        )
    else:
        write_cached("calibration", cal.key, cal.to_json())
    bb._calibration = cal
    return cal


# ---------------------------------------------------------------------------------------------
# measuring
def _sync(bb) -> None:
    if torch.device(bb.device).type == "cuda":
        torch.cuda.synchronize()


def _timed_generation(
    bb, heads: ExitHeads, prompt: list[int], cfg: GenerationConfig
) -> tuple[float, CostMeter]:
    """One generation through the engine, as `generate` runs it: (decode seconds, its meter)."""
    eng = Engine(bb, heads, cfg)
    row = eng.add(prompt)
    t0 = time.perf_counter()
    while eng.active():
        eng.step()
    return time.perf_counter() - t0, eng.result(row).meter


def calibrate(bb, progress: bool = True, rows: tuple[int, ...] = ROWS, budget_s: float = 20.0) -> Calibration:
    """Measure this machine's costs for `bb` through the engine's own code paths (see module doc).

    Every measured point (a pass over all layers for each context and row count, each matrix
    product, and three short real generations for the step overheads) is timed once per round,
    and rounds repeat until about `budget_s` seconds are spent (at least 5, at most 41): drift in
    machine speed then hits every point alike, and medians over rounds keep one slow call from
    moving a point. The overheads are what the generations took beyond the passes the table
    predicts for them, with both measured in the same rounds.
    """
    N, H, V = bb.num_layers, bb.hidden_size, bb.vocab_size
    limit = context_limit(bb) or 4096
    ctxs = (min(32, limit // 4), min(512, limit // 2))
    kmax = max(rows)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(bb.device, bb.dtype)

    points: dict[tuple, object] = {}
    with torch.inference_mode():
        for ctx in ctxs:
            cache = LayeredKVCache(
                N, ctx + kmax + 1, bb.num_kv_heads, bb.head_dim, bb.dtype, bb.layer_devices
            )
            h = randn(1, ctx, H)
            pids = torch.arange(ctx, device=bb.device)[None]
            cache.begin_pass([0], [ctx], [0])
            bb.run_block(0, N, h, None, pids, bb.rope(h, pids), cache)
            for r in rows:
                x = randn(1, r, H)
                pids = torch.arange(ctx, ctx + r, device=bb.device)[None]
                pe = bb.rope(x, pids)
                mask = hf.attention_mask([ctx], [r], r, bb.device)  # the engine's offset causal mask

                def one_pass(x=x, mask=mask, pids=pids, pe=pe, r=r, cache=cache, ctx=ctx):
                    cache.begin_pass([0], [r], [ctx])
                    bb.run_block(0, N, x, mask, pids, pe, cache)
                    for i in range(N):
                        cache.lens[i][0] = ctx
                    _sync(bb)

                points[("layer", ctx, r)] = one_pass
        # matrix products: the output projection (full and restricted) and an H x H translator
        sizes = sorted({H * H, H * max(V // 16, 1), H * max(V // 4, 1), H * V})
        mat_rows = [r for r in rows if r <= 8] or [1]
        for el in sizes:
            out = el // H
            if out == V:
                lin = bb.lm_head
            else:
                w = bb.lm_head.weight.detach()[:out] if out <= V else randn(out, H)
                lin = fast_linear(
                    torch.nn.Linear(H, out, bias=False, device=bb.device, dtype=bb.dtype), bb, w
                )
            for r in mat_rows:
                x = randn(1, r, H)

                def prod(lin=lin, x=x):
                    lin(x)
                    _sync(bb)

                points[("mat", el, r)] = prod
    # short real generations, all speech: plain full steps; one and three early steps per refresh
    heads = ExitHeads(bb, "logit-lens")
    prompt = torch.randint(0, V, (16,), generator=gen).tolist()
    L = max(1, N // 2)
    runs: dict[str, object] = {}
    for name, policy in (("full", "full"), ("even", f"spar-k:FE:{L}"), ("feee", f"spar-k:FEEE:{L}")):
        cfg = GenerationConfig(
            max_new_tokens=17, speech_policy=policy, interleave=Interleave(0, 1), calibrate=False
        )
        runs[name] = lambda cfg=cfg: _timed_generation(bb, heads, prompt, cfg)
    with torch.inference_mode():
        for fn in points.values():  # warm-up: allocator, thread pool, packed weights
            fn()
        for fn in runs.values():
            fn()
        t0 = time.perf_counter()
        for fn in (*points.values(), *runs.values()):
            fn()
        per_round = time.perf_counter() - t0
        rounds = int(min(41, max(5, budget_s / max(per_round, 1e-6))))
        samples: dict[tuple, list[float]] = {p: [] for p in points}
        gens: dict[str, list] = {k: [] for k in runs}
        for _ in Progress(range(rounds), desc="calibrating", enabled=progress, leave=False):
            for p, fn in points.items():
                t = time.perf_counter()
                fn()
                samples[p].append(time.perf_counter() - t)
            for k, fn in runs.items():
                gens[k].append(fn())
    med = {p: statistics.median(v) for p, v in samples.items()}
    c0, c1 = ctxs
    layer_c = [max((med[("layer", c1, r)] - med[("layer", c0, r)]) / (c1 - c0) / N, 0.0) for r in rows]
    layer_a = [med[("layer", c0, r)] / N - c * c0 for r, c in zip(rows, layer_c, strict=True)]
    mat_s = [[med[("mat", el, r)] for r in mat_rows] for el in sizes]
    cal = Calibration(calibration_key(bb), list(rows), layer_a, layer_c, sizes, mat_rows, mat_s, {})
    cal.overhead = _fit_overhead(cal, gens)
    cal.drift = split_half_drift([round_totals([v for p, v in samples.items() if p[0] == "layer"])])
    return cal


def round_totals(series: list[list[float]]) -> list[float]:
    """The sum over points of each round's timings: what the machine's speed did, round by round.

    Drift is judged on these rather than point by point: on a quiet 2-core EPYC, the largest of 20
    layer points' split-half differences was 20-29% (5 to 23 rounds) from single-call noise alone,
    while the rounds' totals moved 1.5-7%, so the per-point maximum flagged a quiet machine as
    busy and kept its calibration out of the cache."""
    return [sum(r) for r in zip(*series, strict=True)]


# beyond this, the machine's speed moved while calibrating and predictions may be off by as much:
# such a calibration is measured once more and, if it moves again, used but never cached
UNSTEADY = 0.15


def split_half_drift(series: list[list[float]]) -> float:
    """The largest relative difference between the median of the first and of the second half
    of each series of timings (rounds in order; calibrate passes one: the rounds' totals). Drift
    that hits every point alike cancels in ratios; a large value still says the machine was busy
    while it was measured."""
    worst = 0.0
    for ts in series:
        h = len(ts) // 2
        if h < 2:
            continue
        a, b = statistics.median(ts[:h]), statistics.median(ts[h:])
        if min(a, b) > 0:
            worst = max(worst, abs(a - b) / min(a, b))
    return worst


def _fit_overhead(cal: Calibration, gens: dict[str, list]) -> dict[str, float]:
    """Seconds of fixed work per step (embedding, sampling, bookkeeping: the same for a full and
    an early step, whose matrices are modelled apart) and per checked early token, fitted by
    non-negative least squares to three generations' median residues beyond the modelled passes.

    One figure for both step kinds: fitting them apart from three noisy residues gave a full-step
    overhead of 8 ms and an early one of 0 on SmolLM2 (a 2x2 solve amplifies noise), which
    predicted fixed exit 20% too fast."""
    rows = []  # (residue, steps, checked tokens) per generation
    for samples in gens.values():
        resid = statistics.median(t - cal.time(m, with_overhead=False) for t, m in samples)
        steps = samples[0][1].steps
        n_steps = sum(n for kind, n in steps.items() if kind != "check")
        rows.append((resid, float(n_steps), float(steps.get("check", 0))))
    step, check = _nnls2(rows)
    return {"full": step, "fallback": step, "early": step, "check": check}


def _nnls2(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """argmin over x, y >= 0 of sum (r - x a - y b)^2 for rows (r, a, b)."""
    saa = sum(a * a for _, a, _ in rows)
    sbb = sum(b * b for _, _, b in rows)
    sab = sum(a * b for _, a, b in rows)
    sra = sum(r * a for r, a, _ in rows)
    srb = sum(r * b for r, _, b in rows)
    det = saa * sbb - sab * sab
    if det > 1e-12 * max(saa * sbb, 1e-30):
        x, y = (sra * sbb - srb * sab) / det, (saa * srb - sab * sra) / det
        if x >= 0 and y >= 0:
            return x, y
    # the optimum lies on an edge: one of the two is zero
    cands = [(0.0, 0.0)]
    if saa > 0:
        cands.append((max(sra / saa, 0.0), 0.0))
    if sbb > 0:
        cands.append((0.0, max(srb / sbb, 0.0)))
    return min(cands, key=lambda c: sum((r - c[0] * a - c[1] * b) ** 2 for r, a, b in rows))


def predict_schedules(bb, cal: Calibration, new_tokens: int = 32, context: int = 80) -> dict[str, float]:
    """Predicted speed-ups over full depth of a few schedules with every step a speech step
    (exit layers at 1/2 and 3/4 of the depth; logit-lens heads; unverified), priced from the
    passes the engine itself runs for them on a random prompt: the decode loop is the only
    simulator. Costs one short generation per schedule."""
    N, V = bb.num_layers, bb.vocab_size
    limit = context_limit(bb)
    if limit is not None:
        context = max(1, min(context, limit - new_tokens - 1))
    heads = ExitHeads(bb, "logit-lens")
    prompt = torch.randint(0, V, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    out: dict[str, float] = {}
    base = None
    for L in sorted({max(1, N // 2), max(1, round(0.75 * N))}):
        for spec in ("full", f"spar-k:even:{L}", f"spar-k:triple:{L}", f"spar-k:FEEE:{L}", f"fixed:{L}"):
            if spec == "full" and base is not None:
                continue
            cfg = GenerationConfig(
                max_new_tokens=new_tokens, speech_policy=spec, interleave=Interleave(0, 1), calibrate=False
            )
            with torch.inference_mode():
                _, meter = _timed_generation(bb, heads, prompt, cfg)
            t = cal.time(meter)
            if spec == "full":
                base = t
            else:
                out[spec] = base / t
    return out
