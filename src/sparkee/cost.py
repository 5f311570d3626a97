"""The cost model: what each pass of a run costs, counted, and a measured table that prices it.

The engine tells the cost model about every pass it runs with one record (`Pass`: rows, layers,
positions, kind), and nothing else; `Meters` folds the records into each row's meter and the
batch's as they come (a log of them can be kept), and schedule predictions (calibrate.py) price the
records of real runs, so there is one simulator of decoding: the decode loop itself.

`CostMeter` counts, for every pass the engine actually ran (rejected work in verified mode
included):
- multiply-adds (FLOPs / 2): layer weights x rows, attention over the context, output projection
  and exit-head rows. Deferred deep fill computes the deep layers of every early position later,
  so SPAR-K saves little arithmetic; it saves *sequential* passes;
- weight reads: elements of weights and KV read. If decoding were purely memory-bound, a deep
  pass over k pending rows would cost what one row costs: `predicted_speedup_memory_bound`;
- the passes themselves (layer passes by rows and context, matrix products by size and rows, steps
  by kind), which a `Calibration` turns into seconds.

A `Calibration` is this machine's measured cost of a layer pass over 1..64 rows (as a + c * context,
fitted from two context lengths), of a matrix product by weight size and rows (output projection,
full and restricted, and the tuned-lens translator), and of each step kind's fixed overhead
(embedding, sampling, bookkeeping). Measuring one, and its cache, are calibrate.py's job (it runs
the engine, so it sits above it); this module only prices passes. `predicted_speedup` is the ratio
of predicted seconds, which is what lets a user choose a schedule before running an eval.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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


def blank_meter(like: CostMeter) -> CostMeter:
    """An empty meter of the same model as `like`."""
    return CostMeter(like.layer_params, like.kv_per_pos, like.attn_width, like.hidden, like.vocab)


# ---------------------------------------------------------------------------------------------
# the engine's pass records, and the meters that fold them


@dataclass(frozen=True)
class Pass:
    """One pass the engine ran, as the cost model sees it: the engine's only word to the meters.

    kind: "layers" (decoder layers first..last-1), "head" or "proj" (a matrix product of `elements`
    weights: an exit head, the output projection) or "step" (the fixed work of step kind `step`:
    early, full, fallback, check).
    rows: (row, entries, end) per batch row: the positions it ran and the positions it attends to
    (layers), its products (matrix), its steps or checked tokens (step).
    padded: what the batch computed, padding included (R * r positions of a layer pass, products,
    steps); batch: whether the batch as a whole pays it (a batch step's fixed work is paid once
    and a row's own step kind only by the row).
    """

    kind: str
    rows: tuple[tuple[int, int, int], ...]
    padded: int
    first: int = 0
    last: int = 0
    elements: int = 0
    step: str = ""
    batch: bool = True


class Meters:
    """Each row's meter (the passes it ran, as if alone) and the batch's (the passes the batch
    actually ran), both folded from the engine's pass records as they come; `log`, when set to a
    list, keeps every record too. `capacity` 0 keeps the batch's meter only."""

    def __init__(self, bb, capacity: int, like: CostMeter | None = None) -> None:
        make = (lambda: blank_meter(like)) if like is not None else (lambda: new_meter(bb))
        self.rows = [make() for _ in range(capacity)]
        self.batch = make()
        self.log: list[Pass] | None = None

    def record(self, p: Pass) -> None:
        if self.log is not None:
            self.log.append(p)
        rows = p.rows if self.rows else ()
        if p.kind == "layers":
            for row, n, end in rows:
                self.rows[row].layers(p.first, p.last, n, end)
            if p.batch:
                end = max(e for _, _, e in p.rows)
                self.batch.layers(p.first, p.last, p.padded, end, seqs=len(p.rows))
        elif p.kind == "step":
            for row, n, _ in rows:
                self.rows[row].step(p.step, n)
            if p.batch:
                self.batch.step(p.step, p.padded)
        else:
            for row, n, _ in rows:
                self.rows[row].matrix(p.elements, n, p.kind)
            if p.batch:
                self.batch.matrix(p.elements, p.padded, p.kind)


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
# predictions


def full_step_passes(ends: dict[int, int], num_layers: int, proj_elements: int) -> list[Pass]:
    """The passes of one plain full-depth decode step over the rows `ends` ({row: positions it
    attends to}): every layer over one position a row, the output projection, the step itself
    (its fixed work paid once by the batch)."""
    ones = tuple((b, 1, 0) for b in ends)
    return [
        Pass("layers", tuple((b, 1, e) for b, e in ends.items()), len(ends), 0, num_layers),
        Pass("proj", ones, len(ends), elements=proj_elements),
        Pass("step", ones, 1, step="full"),
    ]


def replay(passes, like: CostMeter) -> CostMeter:
    """The batch meter of a log of passes, folded the way the engine's passes are (`Meters`)."""
    meters = Meters(None, 0, like=like)  # the batch's meter only: no row's is read
    for p in passes:
        meters.record(p)
    return meters.batch


def baseline_meter(meter: CostMeter, records, prompt_len: int, full_proj: list[int]) -> CostMeter:
    """The passes plain full-depth decoding of the same tokens runs, replayed (prefill excluded,
    as in the run). full_proj[k]: weight elements of the output projection full step k computes."""
    N = len(meter.layer_params)
    # step k >= 1 feeds new token k - 1 at position prompt_len + k - 1, so it sees prompt_len + k positions
    return replay(
        (p for k in range(1, len(records)) for p in full_step_passes({0: prompt_len + k}, N, full_proj[k])),
        meter,
    )


def batch_baseline_meter(meter: CostMeter, prompt_lens: list[int], lengths: list[int]) -> CostMeter:
    """The passes batched full-depth decoding of the same tokens runs, replayed: each step runs
    the rows that are still going (row r runs lengths[r] - 1 decode steps after its prefill)."""
    N, proj = len(meter.layer_params), meter.hidden * meter.vocab
    steps = (
        {r: P + s for r, (P, n) in enumerate(zip(prompt_lens, lengths, strict=True)) if n > s}
        for s in range(1, max(lengths, default=0))
    )
    return replay((p for ends in steps for p in full_step_passes(ends, N, proj)), meter)


def compare(meter: CostMeter, base: CostMeter, calibration: Calibration | None) -> tuple:
    """A run's passes against the baseline's: (weight-read speed-up, calibrated speed-up, calibrated
    seconds of the run, of the baseline); the calibrated figures are None without a calibration."""
    pred_mem = base.reads / meter.reads if meter.reads else None
    if calibration is None or not meter.reads:
        return pred_mem, None, None, None
    t, t_base = calibration.time(meter), calibration.time(base)
    return pred_mem, (t_base / t if t > 0 else None), t, t_base
