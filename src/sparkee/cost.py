"""The cost model: what each pass of a run costs, counted and measured.

`CostMeter` counts, for every pass the engine actually ran (rejected work in verified mode
included):
- multiply-adds (FLOPs / 2): layer weights x rows, attention over the context, output projection
  and exit-head rows. Deferred deep fill computes the deep layers of every early position later,
  so SPAR-K saves little arithmetic; it saves *sequential* passes;
- weight reads: elements of weights and KV read. If decoding were purely memory-bound, a deep
  pass over k pending rows would cost what one row costs: `predicted_speedup_memory_bound`;
- the passes themselves (layer passes by rows and context, matrix products by size and rows, steps
  by kind), which a `Calibration` turns into seconds.

A `Calibration` is this machine's measured cost of a layer pass over 1..16 rows (as a + c * context,
fitted from two context lengths), of a matrix product by weight size and rows (output projection,
full and restricted, and the tuned-lens translator), and of each step kind's fixed overhead
(embedding, sampling, bookkeeping), all through the engine's own code paths and kernels. It is
measured once per (machine, model shape, dtype, device, torch version, kernels) and cached as
JSON under the user's cache directory (`SPARKEE_CACHE`, default ~/.cache/sparkee); a file whose
key does not match the current settings is never used. `predicted_speedup` is then the ratio of
predicted seconds, which is what lets a user choose a schedule before running an eval.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import hf

CALIBRATION_VERSION = 4
# rows of a layer pass that are measured; others interpolated (a fixed-exit flush can be long)
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


# ---------------------------------------------------------------------------------------------
# counting


@dataclass
class CostMeter:
    layer_params: list[int]
    kv_per_pos: list[int]  # K and V elements per position per layer
    attn_width: (
        int  # num_heads * head_dim: multiply-adds per context position per query row (x2 for QK and AV)
    )
    hidden: int
    vocab: int
    macs: float = 0.0
    reads: float = 0.0
    passes: dict = field(default_factory=lambda: {"layer": 0, "head": 0, "proj": 0})
    layer_rows: Counter = field(default_factory=Counter)  # rows -> layer passes
    layer_ctx: Counter = field(default_factory=Counter)  # rows -> summed context of those passes
    mats: Counter = field(default_factory=Counter)  # (weight elements, rows) -> products
    steps: Counter = field(default_factory=Counter)  # step kind -> count

    def layer(self, i: int, rows: int, ctx_end: int, seqs: int = 1) -> None:
        # ctx_end: context length seen by the last row; seqs: sequences in the pass (each reads its KV)
        self.macs += self.layer_params[i] * rows + 2 * self.attn_width * rows * ctx_end
        self.reads += self.layer_params[i] + self.kv_per_pos[i] * ctx_end * seqs
        self.passes["layer"] += 1
        self.layer_rows[rows] += 1
        self.layer_ctx[rows] += ctx_end

    def layers(self, a: int, b: int, rows: int, ctx_end: int, seqs: int = 1) -> None:
        """`layer` for each of layers a..b-1 (one call per block: this runs every step)."""
        n = b - a
        params = sum(self.layer_params[a:b])
        self.macs += params * rows + 2 * self.attn_width * rows * ctx_end * n
        self.reads += params + sum(self.kv_per_pos[a:b]) * ctx_end * seqs
        self.passes["layer"] += n
        self.layer_rows[rows] += n
        self.layer_ctx[rows] += ctx_end * n

    def matrix(self, elements: int, rows: int, kind: str) -> None:
        self.macs += elements * rows
        self.reads += elements
        self.passes[kind] += 1
        self.mats[(elements, rows)] += 1

    def step(self, kind: str, n: int = 1) -> None:
        self.steps[kind] += n

    def full_step_reads(self, ctx_end: int) -> float:
        """Weight reads of one plain full-depth decode step at context `ctx_end`."""
        return sum(self.layer_params) + sum(self.kv_per_pos) * ctx_end + self.hidden * self.vocab

    def full_step_macs(self, ctx_end: int) -> float:
        return (
            sum(self.layer_params)
            + 2 * self.attn_width * ctx_end * len(self.layer_params)
            + self.hidden * self.vocab
        )

    def snapshot(self) -> dict:
        return {"macs": self.macs, "reads": self.reads}

    def reset(self) -> None:
        self.macs = self.reads = 0.0
        self.passes = {"layer": 0, "head": 0, "proj": 0}
        self.layer_rows, self.layer_ctx, self.mats, self.steps = Counter(), Counter(), Counter(), Counter()


def new_meter(bb) -> CostMeter:
    return CostMeter(
        layer_params=bb.layer_params,
        kv_per_pos=[2 * bb.num_kv_heads * bb.head_dim] * bb.num_layers,
        attn_width=bb.shape.num_heads * bb.head_dim,
        hidden=bb.hidden_size,
        vocab=bb.vocab_size,
    )


# ---------------------------------------------------------------------------------------------
# a calibration table


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through the points, extended linearly beyond both ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    for k in range(1, len(xs)):
        if x <= xs[k] or k == len(xs) - 1:
            x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError


@dataclass
class Calibration:
    key: dict
    rows: list[int]
    layer_a: list[float]  # seconds per layer pass at context 0, by rows
    layer_c: list[float]  # extra seconds per context position, by rows
    mat_sizes: list[int]  # weight elements measured
    mat_rows: list[int]
    mat_s: list[list[float]]  # [size][rows] seconds
    overhead: dict[str, float]  # seconds of fixed work per step kind
    # how far the layer passes' medians moved between the first and second half of the rounds
    # (0.1 = 10%): a busy machine while calibrating shows here
    drift: float = 0.0

    def layer_time(self, rows: int, ctx: float) -> float:
        a = max(_interp(self.rows, self.layer_a, rows), 0.0)
        c = max(_interp(self.rows, self.layer_c, rows), 0.0)
        return a + c * ctx

    def matrix_time(self, elements: int, rows: int) -> float:
        by_size = [_interp(self.mat_rows, s, rows) for s in self.mat_s]
        return max(_interp(self.mat_sizes, by_size, elements), 0.0)

    def time(self, meter: CostMeter, with_overhead: bool = True) -> float:
        t = 0.0
        for rows, n in meter.layer_rows.items():
            a = max(_interp(self.rows, self.layer_a, rows), 0.0)
            c = max(_interp(self.rows, self.layer_c, rows), 0.0)
            t += n * a + c * meter.layer_ctx[rows]
        for (elements, rows), n in meter.mats.items():
            t += n * self.matrix_time(elements, rows)
        if with_overhead:
            for kind, n in meter.steps.items():
                t += n * self.overhead.get(kind, self.overhead.get("full", 0.0))
        return t

    def to_json(self) -> dict:
        return {
            "key": self.key,
            "rows": self.rows,
            "layer_a": self.layer_a,
            "layer_c": self.layer_c,
            "mat_sizes": self.mat_sizes,
            "mat_rows": self.mat_rows,
            "mat_s": self.mat_s,
            "overhead": self.overhead,
            "drift": self.drift,
        }

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---------------------------------------------------------------------------------------------
# keys and files


def cache_root() -> Path:
    return Path(os.environ.get("SPARKEE_CACHE") or Path.home() / ".cache" / "sparkee")


def machine_id() -> str:
    """CPU model (or GPU name), logical cores and torch threads: what makes timings comparable."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cpus | {torch.get_num_threads()} threads"


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


def key_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / kind / f"{digest}.json"


def read_cached(kind: str, key: dict) -> dict | None:
    """The cached JSON for `key`, or None when there is none or it was made under other settings."""
    p = key_path(kind, key)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None  # stale or foreign: never reused
    return data


def write_cached(kind: str, key: dict, data: dict) -> Path:
    p = key_path(kind, key)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({**data, "key": key}, indent=1))
    tmp.replace(p)  # atomic: a reader never sees half a file
    return p


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


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _sync(bb) -> None:
    if torch.device(bb.device).type == "cuda":
        torch.cuda.synchronize()


def calibrate(bb, progress: bool = True, rows: tuple[int, ...] = ROWS, budget_s: float = 20.0) -> Calibration:
    """Measure this machine's costs for `bb` through the engine's own code paths (see module doc).

    Every measured point (a pass over all layers for each context and row count, each matrix
    product, and three short real generations for the step overheads) is timed once per round,
    and rounds repeat until about `budget_s` seconds are spent (at least 5, at most 41): drift in
    machine speed then hits every point alike, and medians over rounds keep one slow call from
    moving a point. The overheads are what the generations took beyond the passes the table
    predicts for them, with both measured in the same rounds.
    """
    from .cache import LayeredKVCache
    from .generate import GenerationConfig, context_limit, generate
    from .heads import ExitHeads
    from .kernels import fast_linear
    from .progress import Progress
    from .schedule import Interleave

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
        runs[name] = lambda cfg=cfg: generate(bb, prompt, cfg, heads=heads)
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
                res = fn()
                gens[k].append((res.stats["decode_s"], res.meter))
    med = {p: statistics.median(v) for p, v in samples.items()}
    c0, c1 = ctxs
    layer_c = [max((med[("layer", c1, r)] - med[("layer", c0, r)]) / (c1 - c0) / N, 0.0) for r in rows]
    layer_a = [med[("layer", c0, r)] / N - c * c0 for r, c in zip(rows, layer_c, strict=True)]
    mat_s = [[med[("mat", el, r)] for r in mat_rows] for el in sizes]
    cal = Calibration(calibration_key(bb), list(rows), layer_a, layer_c, sizes, mat_rows, mat_s, {})
    cal.overhead = _fit_overhead(cal, gens)
    cal.drift = split_half_drift([v for p, v in samples.items() if p[0] == "layer"])
    return cal


# beyond this, the machine's speed moved while calibrating and predictions may be off by as much:
# such a calibration is measured once more and, if it moves again, used but never cached
UNSTEADY = 0.15


def split_half_drift(series: list[list[float]]) -> float:
    """The largest relative difference between the median of the first and of the second half
    of each series of timings (rounds in order). Drift that hits every point alike cancels in
    ratios; a large value still says the machine was busy while it was measured."""
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


# ---------------------------------------------------------------------------------------------
# predictions


def baseline_meter(meter: CostMeter, records, prompt_len: int, full_proj: list[int]) -> CostMeter:
    """The passes of plain full-depth decoding of the same tokens (prefill excluded, as in the run).

    full_proj[k]: weight elements of the output projection a full step k of this run computes.
    """
    base = CostMeter(meter.layer_params, meter.kv_per_pos, meter.attn_width, meter.hidden, meter.vocab)
    N = len(meter.layer_params)
    # step k >= 1 feeds new token k - 1 at position prompt_len + k - 1, so it sees prompt_len + k positions
    for k in range(1, len(records)):
        base.layers(0, N, 1, prompt_len + k)
        base.matrix(full_proj[k], 1, "proj")
        base.step("full")
    return base


def compare(meter: CostMeter, base: CostMeter, calibration: Calibration | None) -> tuple:
    """A run's passes against the baseline's: (weight-read speed-up, calibrated speed-up, calibrated
    seconds of the run, of the baseline); the calibrated figures are None without a calibration."""
    pred_mem = base.reads / meter.reads if meter.reads else None
    if calibration is None or not meter.reads:
        return pred_mem, None, None, None
    t, t_base = calibration.time(meter), calibration.time(base)
    return pred_mem, (t_base / t if t > 0 else None), t, t_base


def batch_stats(meter: CostMeter, traces, num_layers: int, decode_s: float, calibration, plan) -> dict:
    """The batch as a whole: tokens/s and the predicted speed-up over decoding the same batch at
    full depth, where at decode step s the rows still generating run every layer together."""
    lengths = [len(t.records) for t in traces]
    base = CostMeter(meter.layer_params, meter.kv_per_pos, meter.attn_width, meter.hidden, meter.vocab)
    for s in range(1, max(lengths)):
        live = [t for t, n in zip(traces, lengths, strict=True) if n > s]
        ctx = max(t.prompt_len + s for t in live)
        base.layers(0, num_layers, len(live), ctx, seqs=len(live))
        base.matrix(meter.hidden * meter.vocab, len(live), "proj")
        base.step("full")  # once per batch step, as the engine's batch meter counts it
    tokens = sum(max(n - 1, 0) for n in lengths)
    pred_mem, pred_cal, t, t_base = compare(meter, base, calibration)
    return {
        "batch_size": len(traces),
        "batch_new_tokens": tokens,
        "batch_tokens_per_s": tokens / decode_s if decode_s > 0 and tokens else None,
        "batch_predicted_speedup": pred_cal if pred_cal is not None else pred_mem,
        "batch_predicted_speedup_memory_bound": pred_mem,
        "batch_predicted_speedup_calibrated": pred_cal,
        "batch_predicted_s": t,  # calibrated seconds of the batch's passes (None: not calibrated)
        "batch_predicted_full_s": t_base,
    }


def predict_schedules(bb, cal: Calibration, new_tokens: int = 64, context: int = 80) -> dict[str, float]:
    """Predicted speed-ups over full depth of a few schedules with every step a speech step, as the
    engine would run them unverified (exit layers at 1/2 and 3/4 of the depth; logit-lens heads)."""
    from .schedule import parse_policy

    N, H, V = bb.num_layers, bb.hidden_size, bb.vocab_size
    out = {}
    base = None
    for L in sorted({max(1, N // 2), max(1, round(0.75 * N))}):
        for spec in ("full", f"spar-k:even:{L}", f"spar-k:triple:{L}", f"spar-k:FEEE:{L}", f"fixed:{L}"):
            pol = parse_policy(spec, N)
            m = new_meter(bb)
            pending = 0
            for k in range(1, new_tokens + 1):
                ctx = context + k
                action, layer = pol.plan(k)
                if action == "exit":
                    m.layers(0, layer, 1, ctx)
                    m.matrix(H * V, 1, "head")
                    m.step("early")
                    pending += 1
                elif pending:
                    lo = pol.layer
                    m.layers(0, lo, 1, ctx)
                    m.layers(lo, N, pending + 1, ctx)
                    m.matrix(H * V, pending + 1, "proj")
                    m.step("full")
                    m.step("check", pending)
                    pending = 0
                else:
                    m.layers(0, N, 1, ctx)
                    m.matrix(H * V, 1, "proj")
                    m.step("full")
            if pending:  # the final flush
                m.layers(pol.layer, N, pending, context + new_tokens)
                m.matrix(H * V, pending, "proj")
                m.step("check", pending)
            t = cal.time(m)
            if spec == "full":
                base = t
            else:
                out[spec] = base / t
    return out
