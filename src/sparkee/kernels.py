"""Fast paths for CPU linear layers, each chosen by measurement on the machine at hand.

Decoding one sequence runs every linear layer over 1 row (a step) or a few rows (a refresh over k
pending positions plus its own). How much a k-row product costs against a 1-row product depends
on the CPU and the BLAS: on some machines a 2-row GEMM costs twice a GEMV because the library
repacks the weight on every call, which is what makes SPAR-K's deferred deep fill expensive. So
for every linear weight shape of the model, and for 1, 2, 4 and 8 rows, sparkee times:

- `plain`: torch.nn.functional.linear (MKL / OpenBLAS);
- `packed`: oneDNN with the weight packed once for this machine's instruction set
  (`torch.ops.mkldnn._linear_pointwise`, the path torch inductor's weight freezing takes on CPU);
- `rowwise`: one 1-row product per row with the better 1-row kernel;
- `left`: the weight as the left operand, `(W @ x^T)^T`, the same product as a GEMM with r
  columns, which MKL runs through another code path (on an AVX2-only EPYC, 2 rows at about the
  cost of 1, where `linear` costs 1.5-1.6x);

in context (cycling through every layer's weight of that shape, so weights come from memory as
they do in decoding) and keeps the fastest per row count. `FastLinear` replaces the model's
`nn.Linear` modules (same parameters, so state dicts, tied weights and fingerprints are
untouched; autograd falls back to the plain product). The choice is cached per machine, shapes,
dtype and torch version beside the calibration (store.py).

bfloat16 on a CPU without native bfloat16 instructions is emulated and often slower than float32;
when measurement says so, the model is computed in float32 instead, with one line saying so.
"""

from __future__ import annotations

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
MEASURED_ROWS = (1, 2, 4, 8)
# 2: kinds timed round-robin, a choice must win in both halves; 3: rowwise timed; 4: left
KERNELS_VERSION = 4
WIN = 0.9  # a kernel replaces the plain product only when at least 10% faster


def packed_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _bucket(rows: int) -> int:
    return 0 if rows < 2 else 1 if rows < 4 else 2 if rows < 8 else 3


class FastLinear(torch.nn.Linear):
    """An nn.Linear whose product, per number of rows, runs the kernel measured fastest here."""

    def __init__(self, weight: torch.nn.Parameter | torch.Tensor, bias, choice: tuple[str, ...]) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        self.bias = bias
        self.choice = tuple(choice)
        self._packed = None
        if "packed" in choice:  # rowwise runs choice[0], which is then in choice too
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        kind = self.choice[_bucket(rows)]
        if kind == "rowwise" and rows > 1:
            flat = x.reshape(rows, 1, self.in_features)
            one = self._one(self.choice[0])
            return torch.cat([one(flat[j]) for j in range(rows)]).reshape(*x.shape[:-1], self.out_features)
        return self._one(kind)(x)

    def _one(self, kind: str):
        b = None if self.bias is None else self.bias.detach()  # forward sends autograd to F.linear
        return _kernel_fn(kind, self.weight, b, self._packed)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernels={'/'.join(self.choice)}"


def left_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed as (weight @ x^T)^T; x: (..., in) -> (..., out), contiguous."""
    flat = x.reshape(-1, weight.shape[1]).t()  # (in, rows), a transposed view: no copy
    out = torch.mm(weight, flat) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat)
    # (out, rows) -> (rows, out) in row-major order: a transposed view would carry its column-major
    # strides into every later elementwise op and product of the layer (1.4-2x slower there)
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# measuring


def _kernel_fn(kind: str, weight: torch.Tensor, bias, packed):
    if kind == "packed":
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if kind == "left":
        return lambda x: left_linear(x, weight, bias)
    return lambda x: F.linear(x, weight, bias)


def measure_shape(
    weights: list[tuple[torch.Tensor, torch.Tensor | None]], repeats: int = 5
) -> tuple[str, ...]:
    """The fastest kernel for 1, 2, 4 and 8 rows over these weights of one shape (timed in turn)."""
    w0 = weights[0][0]
    cands = ["plain", "left"] + (["packed"] if packed_available() and w0.device.type == "cpu" else [])
    fns = {}
    for kind in cands:
        try:
            fns[kind] = [
                _kernel_fn(
                    kind, w, b, torch.ops.mkldnn._reorder_linear_weight(w, 1) if kind == "packed" else None
                )
                for w, b in weights
            ]
            fns[kind][0](torch.zeros(1, 1, w0.shape[1], dtype=w0.dtype, device=w0.device))
        except (RuntimeError, NotImplementedError):  # this build or dtype has no such kernel
            fns.pop(kind, None)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # kinds are timed round-robin, each repeat in turn, so a change of load on the machine hits
    # every kind alike; each half of the repeats keeps its own median, and a kernel must win in
    # both halves (a choice that one half contradicts is noise, and costs 2x where it is wrong)
    halves: dict[str, list[tuple[float, float]]] = {kind: [] for kind in fns}
    for r in MEASURED_ROWS:
        x = torch.randn(1, r, w0.shape[1], generator=gen).to(w0.device, w0.dtype)
        if r == 2:  # rowwise: r 1-row products of the best 1-row kernel, timed as FastLinear runs
            # them (one weight r times in a row, so the later ones find it in cache)
            best1 = _best(halves, 0)
            fns["rowwise"] = [_rowwise(f) for f in fns[best1]]
            halves["rowwise"] = [(math.inf, math.inf)]  # (no 1-row entry)
        ts: dict[str, list[float]] = {kind: [] for kind in fns}
        for calls in fns.values():  # warm
            for f in calls:
                f(x)
        for _ in range(2 * repeats):
            for kind, calls in fns.items():
                t0 = time.perf_counter()
                for f in calls:
                    f(x)
                ts[kind].append((time.perf_counter() - t0) / len(calls))
        for kind, t in ts.items():
            halves[kind].append((statistics.median(t[:repeats]), statistics.median(t[repeats:])))
    return choose_kernels(halves)


def _rowwise(one):
    return lambda x: torch.cat([one(x[:, j : j + 1]) for j in range(x.shape[1])], dim=1)


def _pick(opts: dict[str, tuple[float, float]]) -> str:
    # another kernel must beat the plain product clearly, in both halves: a few percent, or a win
    # one half contradicts, is timing noise
    plain = opts["plain"]
    wins = {
        k: t
        for k, t in opts.items()
        if k != "plain" and all(a < WIN * p for a, p in zip(t, plain, strict=True))
    }
    return min(wins, key=lambda k: sum(wins[k])) if wins else "plain"


def _best(halves: dict[str, list[tuple[float, float]]], n: int) -> str:
    return _pick({k: h[n] for k, h in halves.items() if len(h) > n})


def choose_kernels(halves: dict[str, list[tuple[float, float]]]) -> tuple[str, ...]:
    """The kernel per MEASURED_ROWS entry from each kind's (first-half, second-half) median times.
    `rowwise` is its measured time when given, else r times the best 1-row kernel's."""
    best1 = _best(halves, 0)
    choice = [best1]  # rowwise runs the best 1-row kernel, so it comes first
    for n, r in enumerate(MEASURED_ROWS[1:], 1):
        opts = {k: h[n] for k, h in halves.items()}
        if "rowwise" not in opts:
            opts["rowwise"] = (r * halves[best1][0][0], r * halves[best1][0][1])
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
    if cached is not None:
        choice = {k: tuple(v) for k, v in cached["choice"].items()}
    else:
        if progress:
            print("sparkee: choosing linear kernels for this machine (once)...", file=sys.stderr, flush=True)
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
