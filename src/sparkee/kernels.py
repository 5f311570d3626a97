"""Fast paths for CPU linear layers, each chosen by measurement on the machine at hand.

Decoding one sequence runs every linear layer over 1 row (a step) or a few rows (a refresh over k
pending positions plus its own). How much a k-row product costs against a 1-row product depends
on the CPU and the BLAS: on some machines a 2-row GEMM costs twice a GEMV because the library
repacks the weight on every call, which is what makes SPAR-K's deferred deep fill expensive. So
for every linear weight shape of the model, and for every row count from 1 to 8, sparkee times:

- `plain`: torch.nn.functional.linear (MKL / OpenBLAS);
- `packed`: oneDNN with the weight packed once for this machine's instruction set
  (`torch.ops.mkldnn._linear_pointwise`, the path torch inductor's weight freezing takes on CPU);
- `rowwise`: one 1-row product per row with the better 1-row kernel;
- `left`: the weight as the left operand, `(W @ x^T)^T`, the same product as a GEMM with r
  columns, which MKL runs through another code path (on an AVX2-only EPYC, 2 rows at about the
  cost of 1, where `linear` costs 1.5-1.6x);

in context (cycling through every layer's weight of that shape, so weights come from memory as
they do in decoding) and keeps the fastest per row count, where a row count may also run as a
larger one over zero rows (label `kind@R`: on the EPYC, `left` runs 4 rows faster than 3, and for
some shapes faster than 1), the padding's own cost measured and added. `FastLinear` replaces the model's
`nn.Linear` modules (same parameters, so state dicts, tied weights and fingerprints are
untouched; autograd falls back to the plain product). The choice is cached per machine, shapes,
dtype and torch version beside the calibration (store.py).

bfloat16 on a CPU without native bfloat16 instructions is emulated and often slower than float32;
when measurement says so, the model is computed in float32 instead, with one line saying so.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from . import hf, store

KERNELS = ("plain", "packed", "rowwise", "left")
MEASURED_ROWS = tuple(range(1, 9))  # more rows than the last: that row count's kernel
# 2: kinds timed round-robin, a choice must win in both halves; 3: rowwise timed; 4: left;
# 5: every row count 1-8, and a kernel may run over zero rows padded up to a cheaper row count
KERNELS_VERSION = 5
WIN = 0.9  # a kernel replaces the plain product only when at least 10% faster


def packed_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def parse_label(label: str) -> tuple[str, int]:
    """A choice label, "kind" or "kind@R" (run over zero rows padded up to R rows): (kind, R or 0)."""
    kind, _, to = label.partition("@")
    if kind not in KERNELS or (to and not (to.isdigit() and int(to) > 1)) or (to and kind == "rowwise"):
        raise ValueError(f"not a kernel choice: {label!r}")
    return kind, int(to or 0)


class FastLinear(torch.nn.Linear):
    """An nn.Linear whose product, per number of rows, runs the kernel measured fastest here.

    `choice[i]` is the label for i + 1 rows; more rows than the choice has take its last entry."""

    def __init__(self, weight: torch.nn.Parameter | torch.Tensor, bias, choice: tuple[str, ...]) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        self.bias = bias
        self.choice = tuple(choice)
        self._plan = [parse_label(c) for c in self.choice]  # (kind, pad-to rows) per row count
        self._packed = None
        if any(kind == "packed" for kind, _ in self._plan):  # rowwise runs choice[0], in the plan too
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = max(1, x.numel() // self.in_features)
        kind, to = self._plan[min(rows, len(self._plan)) - 1]
        b = None if self.bias is None else self.bias.detach()  # forward sends autograd to F.linear
        if kind == "rowwise" and rows > 1:
            flat = x.reshape(rows, 1, self.in_features)
            (k1, to1), w, p = self._plan[0], self.weight, self._packed
            return torch.cat([run_kernel(k1, flat[j], to1, w, b, p) for j in range(rows)]).reshape(
                *x.shape[:-1], self.out_features
            )
        return run_kernel(kind, x, to, self.weight, b, self._packed)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernels={'/'.join(self.choice)}"


def left_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (weight @ x^T)^T; x: (..., in) -> (..., out), contiguous."""
    flat = x.reshape(-1, weight.shape[1]).t()  # (in, rows), a transposed view: no copy
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat)
    # (out, rows) -> (rows, out) in row-major order: a transposed view would carry its column-major
    # strides into every later elementwise op and product of the layer (1.4-2x slower there)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def run_kernel(kind: str, x: torch.Tensor, to: int, weight: torch.Tensor, bias, packed) -> torch.Tensor:
    """One product by `kind`; with `to` > x's rows, over x and zero rows up to `to` rows (some
    BLAS paths run 4 rows faster than 3), of which x's rows come back. x: (..., in) -> (..., out)."""
    rows = x.numel() // weight.shape[1]
    if to > rows:
        flat = x.reshape(rows, weight.shape[1])
        y = run_kernel(
            kind, torch.cat([flat, flat.new_zeros(to - rows, flat.shape[1])]), 0, weight, bias, packed
        )
        return y[:rows].view(*x.shape[:-1], weight.shape[0])  # the first rows: still contiguous
    if kind == "packed":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if kind == "left":
        return left_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# measuring


def _kernel_fn(kind: str, weight: torch.Tensor, bias, packed, to: int = 0):
    return lambda x: run_kernel(kind, x, to, weight, bias, packed)


def measure_shape(
    weights: list[tuple[torch.Tensor, torch.Tensor | None]], repeats: int = 5
) -> tuple[str, ...]:
    """The fastest kernel for each of MEASURED_ROWS rows over these weights of one shape (timed in
    turn), as labels for FastLinear."""
    w0 = weights[0][0]
    packs = [None] * len(weights)
    if packed_available() and w0.device.type == "cpu":
        # this build or dtype may have no such kernel
        with contextlib.suppress(RuntimeError, NotImplementedError):
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w, _ in weights]
    fns = {}
    for kind in ["plain", "left"] + (["packed"] if packs[0] is not None else []):
        try:
            fns[kind] = [_kernel_fn(kind, w, b, p) for (w, b), p in zip(weights, packs, strict=True)]
            fns[kind][0](torch.zeros(1, 1, w0.shape[1], dtype=w0.dtype, device=w0.device))
        except (RuntimeError, NotImplementedError):
            fns.pop(kind, None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # kinds are timed round-robin, each repeat in turn, so a change of load on the machine hits
    # every kind alike; each half of the repeats keeps its own median, and a kernel must win in
    # both halves (a choice that one half contradicts is noise, and costs 2x where it is wrong)
    halves: dict[str, list[tuple[float, float]]] = {kind: [] for kind in fns}
    pad: list[tuple[float, float]] = []  # what padding r rows by one row adds (r below the last)
    for r in MEASURED_ROWS:
        x = torch.randn(1, r, w0.shape[1], generator=gen).to(w0.device, w0.dtype)
        if r == 2:  # rowwise: r 1-row products of the best 1-row choice, timed as FastLinear runs
            # them (one weight r times in a row, so the later ones find it in cache)
            kind1, to1 = parse_label(_best(halves, pad, 0))
            fns["rowwise"] = [
                _rowwise(_kernel_fn(kind1, w, b, p, to1)) for (w, b), p in zip(weights, packs, strict=True)
            ]
            halves["rowwise"] = [(math.inf, math.inf)]  # (no 1-row entry)
        timed = list(fns.items())
        if r < MEASURED_ROWS[-1]:  # the padding's cost: only a row count below the last is padded
            timed.append(("pad", [_pad_only] * len(weights)))
        ts: dict[str, list[float]] = {kind: [] for kind, _ in timed}
        for _, calls in timed:  # warm
            for f in calls:
                f(x)
        for _ in range(2 * repeats):
            for kind, calls in timed:
                t0 = time.perf_counter()
                for f in calls:
                    f(x)
                ts[kind].append((time.perf_counter() - t0) / len(calls))
        for kind, t in ts.items():
            (pad if kind == "pad" else halves[kind]).append(
                (statistics.median(t[:repeats]), statistics.median(t[repeats:]))
            )
    return choose_kernels(halves, pad)


def _rowwise(one):
    return lambda x: torch.cat([one(x[:, j : j + 1]) for j in range(x.shape[1])], dim=1)


def _pad_only(x: torch.Tensor) -> torch.Tensor:
    # what run_kernel adds around a product it pads by one row (the zero rows, the copy, the slice)
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[: flat.shape[0]].view(x.shape)


def _pick(opts: dict[str, tuple[float, float]]) -> str:
    # another kernel must beat the plain product clearly, in both halves: a few percent, or a win
    # one half contradicts, is timing noise; and a padded one must beat that choice so
    def beating(ref: str, keep) -> str:
        wins = {
            k: t
            for k, t in opts.items()
            if k != ref and keep(k) and all(a < WIN * p for a, p in zip(t, opts[ref], strict=True))
        }
        return min(wins, key=lambda k: sum(wins[k])) if wins else ref

    unpadded = beating("plain", lambda k: "@" not in k)
    return beating(unpadded, lambda k: "@" in k)


def _options(halves: dict[str, list[tuple[float, float]]], pad: list[tuple[float, float]], n: int) -> dict:
    """Each way to run MEASURED_ROWS[n] rows and its (first-half, second-half) time: a kernel at
    that row count, or over zero rows padded up to a later row count (its time there plus the
    padding's; not rowwise)."""
    opts = {k: h[n] for k, h in halves.items() if len(h) > n}
    p = pad[n] if len(pad) > n else (0.0, 0.0)
    for m in range(n + 1, len(MEASURED_ROWS)):
        for k, h in halves.items():
            if k != "rowwise" and len(h) > m:
                opts[f"{k}@{MEASURED_ROWS[m]}"] = (h[m][0] + p[0], h[m][1] + p[1])
    return opts


def _best(halves: dict[str, list[tuple[float, float]]], pad: list[tuple[float, float]], n: int) -> str:
    return _pick(_options(halves, pad, n))


def choose_kernels(
    halves: dict[str, list[tuple[float, float]]], pad: list[tuple[float, float]] | None = None
) -> tuple[str, ...]:
    """The label per MEASURED_ROWS entry from each kind's (first-half, second-half) median times
    per row count (`pad`: what padding that row count by one row adds; none: free). `rowwise` is
    its measured time when given, else r times the best 1-row choice's."""
    pad = pad or []
    opts1 = _options(halves, pad, 0)
    best1 = _pick(opts1)
    t1 = opts1[best1]
    choice = [best1]  # rowwise runs the best 1-row choice, so it comes first
    for n, r in enumerate(MEASURED_ROWS[1:], 1):
        opts = _options(halves, pad, n)
        if "rowwise" not in opts:
            opts["rowwise"] = (r * t1[0], r * t1[1])
        choice.append(_pick(opts))
    return tuple(choice)


def _linear_groups(bb) -> dict[tuple, list[tuple[torch.nn.Module, str, torch.nn.Linear]]]:
    """The model's linear layers (decoder layers and output projection) grouped by weight shape."""
    groups = defaultdict(list)
    for parent, name, child, is_head in hf.linear_slots(bb.model):
        key = (*child.weight.shape, child.bias is not None) + (("lm_head",) if is_head else ())
        groups[key].append((parent, name, child))
    return groups


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX); False when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def kernels_key(bb) -> dict:
    return {
        "version": KERNELS_VERSION,
        "machine": store.machine_id(),
        "dtype": str(bb.dtype).replace("torch.", ""),
        "device": torch.device(bb.device).type,
        "torch": torch.__version__,
        "shapes": sorted(str(k) for k in _linear_groups(bb)),
    }


def optimize(bb, progress: bool = True) -> dict[str, list[str]]:
    """Give every linear layer of `bb` its measured-fastest kernels (CPU only); returns the choice."""
    if torch.device(bb.device).type != "cpu" or hf.has_device_map(bb.model):
        return {}
    if bb.dtype == torch.bfloat16 and not native_bf16():
        _maybe_upcast(bb, progress)
    groups = _linear_groups(bb)
    key = kernels_key(bb)
    cached = store.read_cached("kernels", key)
    choice = _cached_choice(cached, groups)
    if choice is None:
        if progress:
            why = "" if cached is None else " (the cached choice did not read as one; measuring again)"
            print(
                f"sparkee: choosing linear kernels for this machine (once){why}...",
                file=sys.stderr,
                flush=True,
            )
        choice = {}
        with torch.inference_mode():
            for gkey, mods in groups.items():
                ws = [(m.weight.detach(), None if m.bias is None else m.bias.detach()) for _, _, m in mods]
                choice[str(gkey)] = measure_shape(ws)
        store.write_cached("kernels", key, {"choice": {k: list(v) for k, v in choice.items()}})
    for gkey, mods in groups.items():
        ch = choice.get(str(gkey))
        if ch is None or all(c == "plain" for c in ch):
            continue
        for parent, name, child in mods:
            hf.replace_module(parent, name, FastLinear(child.weight, child.bias, ch))
    bb.refresh_modules()
    bb.set_kernel_choice({k: list(v) for k, v in choice.items()}, KERNELS_VERSION)
    return bb.kernel_choice


def _cached_choice(cached: dict | None, groups: dict) -> dict[str, tuple[str, ...]] | None:
    """The cached choice when it names a label of MEASURED_ROWS row counts for every group of this
    model; None otherwise (an edited or damaged file is measured again and rewritten, not trusted)."""
    if cached is None or not isinstance(cached.get("choice"), dict):
        return None
    choice = cached["choice"]
    out = {}
    for gkey in map(str, groups):
        labels = choice.get(gkey)
        if not isinstance(labels, list) or len(labels) != len(MEASURED_ROWS):
            return None
        try:
            pads = [parse_label(label)[1] for label in labels]
        except (ValueError, TypeError, AttributeError):
            return None
        if any(to and to <= rows for to, rows in zip(pads, MEASURED_ROWS, strict=True)):
            return None  # padding runs over more rows than it has, never fewer
        out[gkey] = tuple(labels)
    return out


def _maybe_upcast(bb, progress: bool) -> None:
    """bf16 without native instructions: keep it only if it measures faster than fp32."""
    groups = _linear_groups(bb)
    t = {"bf16": 0.0, "fp32": 0.0}
    with torch.inference_mode():
        for mods in groups.values():
            sample = mods[: min(4, len(mods))]
            for tag, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                ws = [
                    (m.weight.detach().to(dt), None if m.bias is None else m.bias.detach().to(dt))
                    for _, _, m in sample
                ]
                ch = measure_shape(ws, repeats=3)
                x = torch.randn(1, 1, ws[0][0].shape[1], dtype=dt)
                f = FastLinear(ws[0][0], ws[0][1], ch)
                t0 = time.perf_counter()
                for _ in range(5):
                    f(x)
                t[tag] += (time.perf_counter() - t0) * len(mods)
    if t["fp32"] < 0.9 * t["bf16"]:
        print(
            "sparkee: this CPU has no native bfloat16 arithmetic and float32 measured "
            f"{t['bf16'] / t['fp32']:.1f}x faster, so the model computes in float32",
            file=sys.stderr,
        )
        bb.model.float()
        bb.refresh_modules()


def fast_linear(linear: torch.nn.Linear, bb, weight: torch.Tensor | None = None) -> torch.nn.Module:
    """A linear layer built after loading (exit-head translators, restricted output projections)
    with this machine's measured kernels for its shape; plain when the model is not optimized."""
    w = linear.weight.detach() if weight is None else weight
    if not getattr(bb, "kernel_choice", None) or torch.device(bb.device).type != "cpu":
        if weight is not None:
            linear.weight = torch.nn.Parameter(w, requires_grad=False)
        return linear
    key = str((*w.shape, "extra"))
    # a shape the model's layers have already measured (bias makes no difference to speed)
    ch = bb.kernel_choice.get(key) or next(
        (v for k, v in bb.kernel_choice.items() if k.startswith(f"({w.shape[0]}, {w.shape[1]},")), None
    )
    if ch is None:
        copies = max(1, min(16, (8 << 20) // max(w.numel() * w.element_size(), 1)))
        ws = [(w.clone(), None if linear.bias is None else linear.bias.detach()) for _ in range(copies)]
        with torch.inference_mode():
            ch = list(measure_shape(ws))
        bb.kernel_choice[key] = ch
    param = linear.weight if weight is None else torch.nn.Parameter(w, requires_grad=False)
    return FastLinear(param, linear.bias, tuple(ch))
