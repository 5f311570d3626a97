"""GPU check at the real models' shapes, in one run of a few minutes (bench/gpu_check.sh runs it).

Three parts, each in a child process with its own time budget (a crash, a hang or an
out-of-memory in one part costs only that part; a part that runs past its budget is killed and
what it finished is kept), results as JSON and a Markdown table under `--out`:

1. exactness on the device in float32 and bfloat16, tiny random Qwen2 and Glm models: sparkee
   `full` equals transformers' greedy `generate`; verified SPAR-K (exact rule) equals `full`
   token for token; after a schedule every layer's KV equals one full-depth forward over the same
   tokens; each row of `generate_batch` equals its prompt decoded alone. Two greedy decodes in
   bfloat16 may part at a near-tie that rounding decides, so a difference passes only where the
   first differing step is such a tie: the two tokens' logits, computed in float32 from the
   same prefix, differ by at most twice the bfloat16 forward's own error there. KV tolerances
   (relative Frobenius error) come with a control: the same check against another sequence's KV
   must fail it by far.
2. and 3. Step-Audio-2-mini's backbone (Qwen2, 28 x 3584, FFN 18944, 28 heads, 4 KV heads, vocab
   158720) and GLM-4-Voice's (Glm, 40 x 4096, FFN 13696, 32 heads, 2 KV groups, head dim 128,
   partial rotary 0.5, vocab 168960) with random bfloat16 weights built on the device (speed does
   not depend on the weights' values), every step a speech step (interleave 0:1), at batch 1
   and 8, round-robin, medians:
   - eager: tokens/s of transformers `generate` (default cache) and of sparkee `full`, and each
     of the paper's schedules (S4-S6: spar-k even/odd/triple at 22; G4-G6: even 36, odd 36,
     triple 37) as a speed-up over `full` beside the calibrated cost model's prediction
     (calibrated here with a short budget) and the weight-read prediction;
   - sparkee `--compile` (static cache, torch.compile; CUDA graphs on CUDA) against eager `full`;
   - transformers `generate` with the static cache and torch.compile against sparkee `full`,
     eager and compiled.
   Sections run in that order while their estimate fits the part's budget; what does not fit,
   fails (torch.compile failures fall back and say so) or runs out of memory is recorded with why.

    python bench/gpu_check.py [--out bench/results/gpu] [--budget-s 420] [--tokens 64] [--repeats 3]
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke   # tiny shapes, same code, on CPU (float32 speed parts)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

PARTS = ("exactness", "step-audio-2-mini", "glm-4-voice")
# the paper's schedules (Table 2): Step-Audio-2 S4-S6, GLM-4-Voice G4-G6
MODELS = {
    "step-audio-2-mini": {
        "arch": "Qwen2ForCausalLM",
        "fields": dict(
            vocab_size=158720,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
        "schedules": {"S4": "spar-k:even:22", "S5": "spar-k:odd:22", "S6": "spar-k:triple:22"},
    },
    "glm-4-voice": {
        "arch": "GlmForCausalLM",
        "fields": dict(
            vocab_size=168960,
            hidden_size=4096,
            intermediate_size=13696,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=2,
            head_dim=128,
            attention_bias=True,
            rms_norm_eps=1.5625e-07,
        ),
        "schedules": {"G4": "spar-k:even:36", "G5": "spar-k:odd:36", "G6": "spar-k:triple:37"},
    },
}
# --cpu-smoke: tiny widths, a quarter of the layers (exit layers scaled alike)
SMOKE_WIDTH = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
)
SMOKE_DEPTH = 4


def schedules_for(spec: dict, layers: int) -> dict[str, str]:
    """The part's schedules with exit layers scaled to `layers` (the same ones at the real depth)."""
    n = spec["fields"]["num_hidden_layers"]
    out = {}
    for tag, pol in spec["schedules"].items():
        kind, pattern, layer = pol.split(":")
        out[tag] = f"{kind}:{pattern}:{max(1, min(layers - 1, round(int(layer) * layers / n)))}"
    return out


COMMON = dict(max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
# seconds a section is expected to take at least before it is started (GPU; smoke: a tenth)
ESTIMATE = {"build": 20, "calibration": 25, "eager": 40, "sparkee_compile": 60, "hf_compile": 60}


# ---------------------------------------------------------------------------------------------
# plumbing: time budgets, sections, partial results


class Part:
    """One part's results, written to its file after every section (a kill keeps what finished)."""

    def __init__(self, name: str, path: Path, budget_s: float, smoke: bool):
        self.name, self.path, self.smoke = name, path, smoke
        self.deadline = time.monotonic() + budget_s
        self.data: dict = {"part": name, "budget_s": budget_s, "sections": {}}
        self.write()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def section(self, name: str, fn, estimate_s: float | None = None):
        """Run fn() as a section unless its estimate does not fit; record status, seconds, result."""
        import torch

        est = ESTIMATE.get(name, 10) if estimate_s is None else estimate_s
        est = est / 10 if self.smoke and estimate_s is None else est
        rec = self.data["sections"].setdefault(name, {})
        if self.left() < est:
            rec.update(
                status="skipped",
                why=f"needs about {est:.0f} s, {max(self.left(), 0):.0f} s of the budget left",
            )
            self.write()
            return None
        rec.update(status="running", started_left_s=round(self.left(), 1))
        self.write()
        t0 = time.monotonic()
        try:
            out = fn()
            rec.update(status="ok")
            return out
        except torch.cuda.OutOfMemoryError as e:
            rec.update(status="oom", error=str(e).splitlines()[0][:300])
        except Exception as e:  # noqa: BLE001 - one failing section must not end the check
            rec.update(
                status="error",
                error=f"{type(e).__name__}: {str(e)[:500]}",
                traceback=traceback.format_exc()[-2000:],
            )
        finally:
            rec["seconds"] = round(time.monotonic() - t0, 2)
            self.write()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return None


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_of(samples: list[dict], key: str) -> float | None:
    xs = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(xs) if xs else None


def round_robin(runs: dict, repeats: int, part: Part, reserve_s: float = 0.0) -> dict[str, list[dict]]:
    """Each run once per round, rounds repeated; a round starts only if it fits the budget."""
    samples: dict[str, list[dict]] = {k: [] for k in runs}
    per_round = None
    for r in range(repeats):
        if r and per_round is not None and part.left() - reserve_s < per_round:
            break
        t0 = time.monotonic()
        for key, fn in runs.items():
            samples[key].append(fn())
        per_round = time.monotonic() - t0
    return samples


# ---------------------------------------------------------------------------------------------
# models


def build(arch: str, fields: dict, device, dtype):
    """A random causal LM built directly on `device` in `dtype` (no checkpoint)."""
    import torch

    from sparkee import hf

    cfg = hf.make_config(arch, **{**COMMON, **fields})  # fields win over COMMON
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = hf.model_from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


def hf_generate(model, prompts, n: int, device, **kw) -> dict:
    import torch

    ids = torch.tensor(prompts, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **kw,
        )
    sync(device)
    wall = time.perf_counter() - t0
    assert out.shape == (len(prompts), len(prompts[0]) + n), out.shape
    return {
        "tokens_per_s": len(prompts) * n / wall,
        "wall_s": wall,
        "tokens": out[:, len(prompts[0]) :].tolist(),
    }


def sparkee_run(bb, prompts, n: int, policy: str, calibrated: bool) -> dict:
    from sparkee import GenerationConfig, Interleave, generate, generate_batch

    cfg = GenerationConfig(
        max_new_tokens=n, speech_policy=policy, interleave=Interleave(0, 1), calibrate=calibrated
    )
    sync(bb.device)
    t0 = time.perf_counter()
    res = generate_batch(bb, prompts, cfg) if len(prompts) > 1 else [generate(bb, prompts[0], cfg)]
    sync(bb.device)
    wall = time.perf_counter() - t0
    st = res[0].stats
    b = len(prompts)
    assert all(len(r.tokens) == n for r in res)
    return {
        "tokens_per_s": b * n / wall,  # the whole call, prefill included (as transformers' generate)
        "decode_tokens_per_s": b * (n - 1) / st["decode_s"],  # schedules compare decode time
        "wall_s": wall,
        "stats": {k: v for k, v in st.items() if isinstance(v, (int, float, str, type(None)))},
        "tokens": [r.tokens for r in res],
    }


# ---------------------------------------------------------------------------------------------
# part 1: exactness


def compare_greedy(a: list[int], b: list[int], prompt: list[int], model, model32, device) -> dict:
    """Equal, or first differing at a near-tie of the float32 logits within the low-precision
    forward's own error there."""
    import torch

    if a == b:
        return {"equal": True, "ok": True}
    j = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y) if len(a) == len(b) else None
    if j is None:
        return {"equal": False, "ok": False, "why": "different lengths"}
    ids = torch.tensor([prompt + a[:j]], device=device)
    with torch.inference_mode():
        lo = model(ids).logits[0, -1].float()
        hi = model32(ids).logits[0, -1].float()
    noise = (lo - hi).abs().max().item()
    gap = (hi[a[j]] - hi[b[j]]).abs().item()
    return {
        "equal": False,
        "first_difference": j,
        "logit_gap": gap,
        "rounding_error": noise,
        # float32: the same precision on both sides, so only kernel-order differences (about 1e-6
        # relative) may decide
        "ok": gap <= 2 * noise + 1e-5 * max(1.0, hi.abs().max().item()),
    }


def kv_error(res, model, seq, device) -> float:
    """Largest relative (Frobenius) error over layers of the run's KV against one forward of seq."""
    import torch

    from sparkee import hf

    with torch.inference_mode():
        ref = hf.dynamic_cache_kv(model(torch.tensor([seq], device=device), use_cache=True).past_key_values)
    worst = 0.0
    for i, (k, v) in enumerate(ref):
        ck, cv = res.cache.layer_kv(i)
        for got, want in ((ck, k), (cv, v)):
            if got.shape != want.shape:
                return float("inf")
            err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)
            worst = max(worst, err.item())
    return worst


KV_TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def exactness_part(part: Part, device, n: int) -> None:
    import torch

    from sparkee import GenerationConfig, Interleave, generate, generate_batch, wrap_model

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tiny = dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.05,
    )
    archs = {"qwen2": ("Qwen2ForCausalLM", {}), "glm": ("GlmForCausalLM", {"head_dim": 32})}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 1024, (7,), generator=gen).tolist()
    prompts = [torch.randint(2, 1024, (k,), generator=gen).tolist() for k in (3, 5, 8)]
    cases = part.data.setdefault("cases", [])

    def add(kind, arch, dtype, what, **info):  # info holds "ok"
        cases.append(
            {"check": kind, "arch": arch, "dtype": dtype, "what": what, **info, "ok": bool(info["ok"])}
        )

    def one(arch: str, dname: str) -> None:
        dtype = getattr(torch, dname)
        cls, extra = archs[arch]
        torch.manual_seed(0)
        model = build(cls, {**tiny, **extra}, device, dtype)
        model32 = copy.deepcopy(model).float()
        bb = wrap_model(model)
        tol = KV_TOL[dname]

        def cmp(a, b, p):
            return compare_greedy(a, b, p, model, model32, device)

        ref = hf_generate(model, [prompt], n, device)["tokens"][0]
        full = generate(bb, prompt, GenerationConfig(max_new_tokens=n, interleave=Interleave(0, 1))).tokens
        r = cmp(full, ref, prompt)
        add("full == transformers greedy", arch, dname, "full", **r)
        for il, pol in (((0, 1), "spar-k:even:3"), ((0, 1), "spar-k:triple:3"), ((0, 1), "spar-k:FEEE:2"),
                        ((2, 4), "spar-k:even:2")):  # fmt: skip
            cfg = GenerationConfig(max_new_tokens=n, speech_policy=pol, interleave=Interleave(*il))
            res = generate(bb, prompt, cfg)
            err = kv_error(res, model, prompt + res.tokens[:-1], device)
            control = kv_error(res, model, [prompt[0] + 1] + prompt[1:] + res.tokens[:-1], device)
            add("KV == one full forward", arch, dname, f"{pol} interleave {il[0]}:{il[1]}", ok=err <= tol < control / 10,
                rel_error=err, tolerance=tol, control_rel_error=control)  # fmt: skip
            cfg.verify = True
            ver = generate(bb, prompt, cfg)
            full_il = generate(
                bb, prompt, GenerationConfig(max_new_tokens=n, interleave=Interleave(*il))
            ).tokens
            r = cmp(ver.tokens, full_il, prompt)
            add("verified == full greedy", arch, dname, f"{pol}+verify interleave {il[0]}:{il[1]}", **r)
            err = kv_error(ver, model, prompt + ver.tokens[:-1], device)
            add(
                "KV == one full forward",
                arch,
                dname,
                f"{pol}+verify",
                ok=err <= tol,
                rel_error=err,
                tolerance=tol,
            )
        for pol, verify in (("full", False), ("spar-k:even:3", False), ("spar-k:FEEE:3", True)):
            cfg = GenerationConfig(
                max_new_tokens=n, speech_policy=pol, interleave=Interleave(2, 4), verify=verify
            )
            rows = generate_batch(bb, prompts, cfg)
            for k, (p, row) in enumerate(zip(prompts, rows, strict=True)):
                alone = generate(bb, p, cfg)
                r = cmp(row.tokens, alone.tokens, p)
                name = f"{pol}{'+verify' if verify else ''} row {k} (prompt of {len(p)})"
                add("batch row == alone", arch, dname, name, **r)
                err = kv_error(row, model, p + row.tokens[:-1], device)
                add(
                    "KV == one full forward",
                    arch,
                    dname,
                    f"batch {name}",
                    ok=err <= tol,
                    rel_error=err,
                    tolerance=tol,
                )

    for arch in archs:
        for dname in ("float32", "bfloat16"):
            part.section(f"{arch}-{dname}", lambda a=arch, d=dname: one(a, d), estimate_s=2)
    part.data["all_ok"] = bool(cases) and all(c["ok"] for c in cases)
    part.data["ties"] = sum(1 for c in cases if c.get("equal") is False and c["ok"])
    part.write()


# ---------------------------------------------------------------------------------------------
# parts 2 and 3: speed at a real model's shape


def speed_part(part: Part, name: str, device, args) -> None:
    import torch

    from sparkee import calibrate, cost, store, wrap_model

    spec = MODELS[name]
    fields = {**spec["fields"], **(SMOKE_WIDTH if args.cpu_smoke else {})}
    if args.cpu_smoke:  # calibration's long context is half the model's: keep it short
        fields.update(
            max_position_embeddings=256, num_hidden_layers=fields["num_hidden_layers"] // SMOKE_DEPTH
        )
        fields.update({"head_dim": 16} if "head_dim" in fields else {})
    schedules = schedules_for(spec, fields["num_hidden_layers"])
    # the GPU run is bfloat16; the CPU smoke run float32: on a CPU without native bfloat16 (AVX2
    # EPYC) it is emulated, and inductor's fused kernels round at other points than eager's, so
    # compiled and eager greedy decodes of random weights parted at a near-tie (batch 1)
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    n, B, reps = args.tokens, args.batch, args.repeats
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(10, min(20000, fields["vocab_size"]), (args.prompt_len,), generator=gen).tolist()
        for _ in range(B)
    ]
    batches = (1, B)
    state: dict = {}
    d = part.data
    d["shape"] = {k: v for k, v in fields.items() if k != "rope_parameters"}
    d["schedules"] = schedules
    d.update(
        tokens=n,
        batches=list(batches),
        repeats=reps,
        prompt_len=args.prompt_len,
        dtype=str(dtype).replace("torch.", ""),
    )

    def do_build():
        torch.manual_seed(0)
        t0 = time.monotonic()
        model = build(spec["arch"], fields, device, dtype)
        state["model"], state["bb"] = model, wrap_model(model)
        d["params"] = sum(p.numel() for p in model.parameters())
        d["build_s"] = time.monotonic() - t0
        if torch.device(device).type == "cuda":
            d["gpu_memory_gib"] = torch.cuda.memory_allocated() / 2**30

    part.section("build", do_build)
    if "bb" not in state:
        return
    model, bb = state["model"], state["bb"]

    def do_calibrate():
        t0 = time.monotonic()
        if args.cpu_smoke:  # a made-up table with this model's key: the same prediction code, no measuring
            cal = cost.Calibration(
                key=calibrate.calibration_key(bb), rows=[1, 64], layer_a=[1e-4, 4e-4], layer_c=[1e-7, 1e-7],
                mat_sizes=[1, 10**9], mat_rows=[1, 8], mat_s=[[1e-5, 2e-5], [1e-3, 2e-3]],
                overhead={"full": 1e-4, "early": 1e-4},
            )  # fmt: skip
        else:  # batch 8 refreshes reach 24 rows: the default row counts (1..64)
            cal = calibrate.calibrate(bb, progress=False, budget_s=args.calibration_s)
        store.write_cached("calibration", cal.key, cal.to_json())
        assert calibrate.load_or_calibrate(bb, progress=False) is not None
        d["calibration"] = {"seconds": time.monotonic() - t0, "drift": cal.drift, "overhead": cal.overhead,
                            "synthetic": args.cpu_smoke}  # fmt: skip
        state["calibrated"] = True

    part.section("calibration", do_calibrate)
    calibrated = state.get("calibrated", False)

    # eager: transformers (default cache) and sparkee full and the schedules, batch 1 and B
    def do_eager():
        pols = {"full": "full", **schedules}
        runs = {}
        for b in batches:
            runs[f"hf-{b}"] = lambda b=b: hf_generate(model, prompts[:b], n, device)
            for tag, pol in pols.items():
                runs[f"{tag}-{b}"] = lambda b=b, pol=pol: sparkee_run(bb, prompts[:b], n, pol, calibrated)
        for b in batches:  # warm-up: allocator, kernels, the first call of each batch shape
            hf_generate(model, prompts[:b], 4, device)
            sparkee_run(bb, prompts[:b], 4, "full", calibrated)
        t0 = time.monotonic()
        first = {k: [fn()] for k, fn in runs.items()}  # round 1 (also the estimate of a round)
        per_round = time.monotonic() - t0
        rest = round_robin(runs, reps - 1, part, reserve_s=0) if part.left() > per_round else {}
        samples = {k: first[k] + rest.get(k, []) for k in runs}
        out = {"rounds": len(samples["full-1"]), "round_s": per_round, "rows": []}
        for b in batches:
            hf_tps = median_of(samples[f"hf-{b}"], "tokens_per_s")
            full_tps = median_of(samples[f"full-{b}"], "tokens_per_s")
            full_dec = median_of(samples[f"full-{b}"], "decode_tokens_per_s")
            fst = samples[f"full-{b}"][-1]["stats"]
            out[f"batch_{b}"] = {
                "hf_eager_tokens_per_s": hf_tps,
                "sparkee_full_tokens_per_s": full_tps,
                "sparkee_full_decode_tokens_per_s": full_dec,
                "sparkee_full_over_hf_eager": full_tps / hf_tps,
            }
            pre = "batch_" if b > 1 else ""
            for tag, pol in pols.items():
                st = samples[f"{tag}-{b}"][-1]["stats"]
                dec = median_of(samples[f"{tag}-{b}"], "decode_tokens_per_s")
                measured = dec / full_dec
                cal_run, cal_full = (
                    st.get(pre + "predicted_speedup_calibrated"),
                    fst.get(pre + "predicted_speedup_calibrated"),
                )
                predicted = cal_run / cal_full if cal_run and cal_full else None
                mem = st[pre + "predicted_speedup_memory_bound"] / fst[pre + "predicted_speedup_memory_bound"]
                out["rows"].append({
                    "batch": b,
                    "row": tag,
                    "policy": pol,
                    "decode_tokens_per_s": dec,
                    "measured_speedup": measured,
                    "predicted_speedup": predicted,
                    "measured_over_predicted": measured / predicted if predicted else None,
                    "predicted_speedup_memory_bound": mem,
                    "avg_exit_layer_speech": st.get("avg_exit_layer_speech"),
                })  # fmt: skip
        d["eager"] = out

    part.section("eager", do_eager)

    # sparkee --compile: static cache + torch.compile of each step kind, against eager full
    def do_sparkee_compile():
        from sparkee.compiled import enable_compile

        cbb = wrap_model(model)
        enable_compile(cbb, backend=args.compile_backend)
        out: dict = {
            "backend": args.compile_backend,
            "mode": "reduce-overhead (CUDA graphs)" if torch.device(device).type == "cuda" else "default",
        }
        d["sparkee_compile"] = out
        state["cbb"] = cbb
        for b in batches:
            if b > 1 and part.left() < 1.5 * out["batch_1"]["compile_s"] + 5:
                out[f"batch_{b}"] = {
                    "skipped": f"its compile (about {out['batch_1']['compile_s']:.0f} s) does not fit the budget"
                }
                continue
            t0 = time.monotonic()
            sparkee_run(cbb, prompts[:b], n, "full", calibrated)  # compiles (a full run: every kind it uses)
            compile_s = time.monotonic() - t0
            sparkee_run(cbb, prompts[:b], n, "full", calibrated)  # CUDA graphs are recorded on the second run
            runs = {
                "eager": lambda b=b: sparkee_run(bb, prompts[:b], n, "full", calibrated),
                "compiled": lambda b=b: sparkee_run(cbb, prompts[:b], n, "full", calibrated),
            }
            s = round_robin(runs, reps, part)
            eager, comp = median_of(s["eager"], "tokens_per_s"), median_of(s["compiled"], "tokens_per_s")
            same = s["compiled"][-1]["tokens"] == s["eager"][-1]["tokens"]
            out[f"batch_{b}"] = {
                "compile_s": compile_s,
                "eager_tokens_per_s": eager,
                "compiled_tokens_per_s": comp,
                "compiled_over_eager": comp / eager,
                "same_tokens_as_eager": same,
                "rounds": len(s["eager"]),
            }
            part.write()

    part.section("sparkee_compile", do_sparkee_compile)

    # transformers generate: static cache + torch.compile (its auto-compile on CUDA)
    def do_hf_compile():
        from transformers import CompileConfig

        cc = CompileConfig(
            backend=args.compile_backend,
            mode="reduce-overhead" if args.compile_backend == "inductor" else None,
        )
        if torch.device(device).type != "cuda":
            cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
        kw = {"cache_implementation": "static", "compile_config": cc}
        out: dict = {"backend": args.compile_backend}
        d["hf_compile"] = out
        cbb = state.get("cbb")
        for b in batches:
            if b > 1 and part.left() < 1.5 * out["batch_1"].get("compile_s", 0) + 5:
                out[f"batch_{b}"] = {"skipped": "its compile does not fit the budget"}
                continue
            t0 = time.monotonic()
            row: dict = {}
            try:
                hf_generate(model, prompts[:b], n, device, **kw)
            except Exception as e:  # noqa: BLE001 - record and measure the static cache without compile
                row["fallback"] = (
                    f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); static cache, eager"
                )
                kw = {"cache_implementation": "static", "disable_compile": True}
                hf_generate(model, prompts[:b], n, device, **kw)
            row["compile_s"] = time.monotonic() - t0
            hf_generate(model, prompts[:b], n, device, **kw)  # CUDA graphs recorded
            runs = {
                "hf": lambda b=b, kw=kw: hf_generate(model, prompts[:b], n, device, **kw),
                "eager": lambda b=b: sparkee_run(bb, prompts[:b], n, "full", calibrated),
            }
            if cbb is not None and "compile_s" in d.get("sparkee_compile", {}).get(f"batch_{b}", {}):
                runs["compiled"] = lambda b=b: sparkee_run(cbb, prompts[:b], n, "full", calibrated)
            s = round_robin(runs, reps, part)
            hf_tps = median_of(s["hf"], "tokens_per_s")
            row.update(
                hf_static_compiled_tokens_per_s=hf_tps,
                sparkee_full_eager_tokens_per_s=median_of(s["eager"], "tokens_per_s"),
                rounds=len(s["hf"]),
            )
            row["sparkee_eager_over_hf"] = row["sparkee_full_eager_tokens_per_s"] / hf_tps
            if "compiled" in s:
                row["sparkee_full_compiled_tokens_per_s"] = median_of(s["compiled"], "tokens_per_s")
                row["sparkee_compiled_over_hf"] = row["sparkee_full_compiled_tokens_per_s"] / hf_tps
            out[f"batch_{b}"] = row
            part.write()

    part.section("hf_compile", do_hf_compile)


# ---------------------------------------------------------------------------------------------
# the parent: run the parts, merge, write JSON and Markdown


def child_main(args) -> None:
    import torch

    os.environ["SPARKEE_NO_CALIBRATE"] = "1"  # only runs that ask (calibrate=True) use a calibration
    path = Path(args.part_file)
    part = Part(args.child, path, args.child_budget_s, args.cpu_smoke)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        part.data["sections"]["device"] = {"status": "error", "error": "torch.cuda.is_available() is False"}
        part.write()
        return
    if args.child == "exactness":
        exactness_part(part, device, args.exact_tokens)
    else:
        speed_part(part, args.child, device, args)
    part.data["finished"] = True
    part.write()


def environment(smoke: bool) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not smoke else "cpu",
        "cpu_smoke": smoke,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(Exception):
        import accelerate

        env["accelerate"] = accelerate.__version__
    return env


def run_parts(args) -> dict:
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.budget_s
    parts = [p for p in PARTS if p in args.parts.split(",")]
    result: dict = {"environment": environment(args.cpu_smoke), "budget_s": args.budget_s, "parts": {}}
    for k, name in enumerate(parts):
        left = deadline - time.monotonic()
        if name == "exactness":
            budget = min(args.exactness_budget_s, left)
        else:  # the speed parts share what is left; a part that ends early leaves more to the next
            budget = left / sum(1 for p in parts[k:] if p != "exactness")
        path = out / "parts" / f"{name}.json"
        path.unlink(missing_ok=True)
        if budget < (5 if args.cpu_smoke else 30):
            result["parts"][name] = {
                "status": "skipped",
                "why": f"{max(left, 0):.0f} s of the whole budget left",
            }
            continue
        cmd = [sys.executable, __file__, "--child", name, "--part-file", str(path), "--child-budget-s",
               f"{budget - (1 if args.cpu_smoke else 10):.1f}", *args.passthrough]  # fmt: skip
        t0 = time.monotonic()
        status, tail = "ok", ""
        if args.isolate:
            # its own process group: a kill at the budget also ends compile workers it started
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
            try:
                tail = proc.communicate(timeout=budget)[0][-3000:]
                if proc.returncode != 0:
                    status = f"exited with status {proc.returncode}"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                tail = (proc.communicate()[0] or "")[-3000:]
                status = f"killed at its budget of {budget:.0f} s"
        else:
            try:
                child_main(parse_args(cmd[2:]))
            except Exception:  # noqa: BLE001
                status, tail = "error", traceback.format_exc()[-3000:]
        data = json.loads(path.read_text()) if path.is_file() else {"sections": {}}
        for sec in data.get("sections", {}).values():  # a section cut short by the kill
            if sec.get("status") == "running":
                sec.update(status="killed", why=status)
        data.update(status=status, seconds=round(time.monotonic() - t0, 1))
        if status != "ok" and tail:
            data["output_tail"] = tail
        result["parts"][name] = data
    result["seconds"] = round(time.monotonic() - start, 1)
    ex = result["parts"].get("exactness", {})
    result["exactness_ok"] = ex.get("all_ok")
    return result


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# GPU check" + (" (CPU smoke run: tiny shapes, numbers mean nothing)" if env["cpu_smoke"] else ""),
        "",
        f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"python {env['python']}; {result['seconds']} s of a {result['budget_s']} s budget. "
        "Every step a speech step (interleave 0:1), "
        + ("float32" if env["cpu_smoke"] else "bfloat16")
        + " random weights at the real shapes, "
        "medians of round-robin runs in one process.",
        "",
    ]
    ex = result["parts"].get("exactness")
    if ex:
        lines += ["## Exactness on the device", ""]
        cases = ex.get("cases", [])
        groups: dict = {}
        for c in cases:
            groups.setdefault((c["check"], c["dtype"]), []).append(c)
        lines += [
            "| check | dtype | passed | of which near-ties | worst KV rel. error (tolerance) |",
            "|---|---|---|---|---|",
        ]
        for (check, dt), cs in sorted(groups.items()):
            errs = [c["rel_error"] for c in cs if "rel_error" in c]
            kv = f"{max(errs):.2e} ({cs[0]['tolerance']:g})" if errs else "-"
            ties = sum(1 for c in cs if c.get("equal") is False and c["ok"])
            lines.append(f"| {check} | {dt} | {sum(c['ok'] for c in cs)}/{len(cs)} | {ties} | {kv} |")
        lines += ["", f"all passed: **{ex.get('all_ok')}**" + _status_note(ex), ""]
    for name in MODELS:
        p = result["parts"].get(name)
        if not p:
            continue
        lines += [
            f"## {name}" + (f" ({p.get('params', 0) / 1e9:.2f}B parameters)" if p.get("params") else ""),
            "",
        ]
        e = p.get("eager")
        if e:
            lines += [
                "| batch | row | policy | decode tok/s | measured speed-up | calibrated prediction | measured / predicted | weight-read prediction | avg exit speech |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in e["rows"]:
                lines.append(
                    f"| {r['batch']} | {r['row']} | `{r['policy']}` | {fmt(r['decode_tokens_per_s'], '.1f')} | "
                    f"{fmt(r['measured_speedup'])} | {fmt(r['predicted_speedup'])} | {fmt(r['measured_over_predicted'])} | "
                    f"{fmt(r['predicted_speedup_memory_bound'])} | {fmt(r['avg_exit_layer_speech'])} |"
                )
            lines.append("")
        lines += [
            "| batch | HF generate eager | HF static + compile | sparkee full eager | sparkee full --compile | sparkee eager / HF compiled | sparkee compiled / HF compiled |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in p.get("batches", []):
            eb = (e or {}).get(f"batch_{b}", {})
            hc = p.get("hf_compile", {}).get(f"batch_{b}", {})
            sc = p.get("sparkee_compile", {}).get(f"batch_{b}", {})
            lines.append(
                f"| {b} | {fmt(eb.get('hf_eager_tokens_per_s'), '.1f')} | {fmt(hc.get('hf_static_compiled_tokens_per_s'), '.1f')} | "
                f"{fmt(eb.get('sparkee_full_tokens_per_s'), '.1f')} | {fmt(sc.get('compiled_tokens_per_s'), '.1f')} | "
                f"{fmt(hc.get('sparkee_eager_over_hf'))} | {fmt(hc.get('sparkee_compiled_over_hf'))} |"
            )
        notes = [f"{s} {k}: {v}" for s in ("sparkee_compile", "hf_compile") for k, v in _notes(p.get(s, {}))]
        lines += [
            "",
            "; ".join(["tokens/s of whole calls, prefill included", *notes]) + "." + _status_note(p),
            "",
        ]
    return "\n".join(lines) + "\n"


def _notes(sec: dict):
    for key, v in sec.items():
        if isinstance(v, dict):
            for k in ("compile_s", "skipped", "fallback", "same_tokens_as_eager"):
                if k in v:
                    yield f"{key} {k}", (f"{v[k]:.0f} s" if k == "compile_s" else v[k])


def _status_note(p: dict) -> str:
    bad = [f"{k}: {v.get('status')}" + (f" ({v.get('why') or v.get('error')})" if v.get("why") or v.get("error") else "")
           for k, v in p.get("sections", {}).items() if v.get("status") != "ok"]  # fmt: skip
    if p.get("status") not in (None, "ok"):
        bad.insert(0, f"part {p['status']}")
    return (" Not done: " + "; ".join(bad) + ".") if bad else ""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/gpu")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny widths on the CPU (CI): the same code path"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default 420; smoke 150)")
    ap.add_argument("--exactness-budget-s", type=float, default=None, help="default 60 (smoke 40)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 64; smoke 6)")
    ap.add_argument("--exact-tokens", type=int, default=None, help="default 24 (smoke 10)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="round-robin rounds (default 3; smoke 1)")
    ap.add_argument(
        "--calibration-s", type=float, default=None, help="calibration budget (default 4; smoke 0.5)"
    )
    ap.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; smoke eager)"
    )
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each part in a child process (default: yes; smoke: no)")  # fmt: skip
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    s = args.cpu_smoke
    defaults = dict(budget_s=(150, 420), exactness_budget_s=(40, 60), tokens=(6, 64), exact_tokens=(10, 24),
                    repeats=(1, 3), calibration_s=(0.5, 4.0), compile_backend=("eager", "inductor"), isolate=(False, True))  # fmt: skip
    for k, (smoke, gpu) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if s else gpu)
    keep = (
        "cpu_smoke",
        "tokens",
        "exact_tokens",
        "prompt_len",
        "batch",
        "repeats",
        "calibration_s",
        "compile_backend",
    )
    args.passthrough = []
    for k in keep:
        v = getattr(args, k)
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.passthrough += [flag] if v else []
        else:
            args.passthrough += [flag, str(v)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.cpu_smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("SPARKEE_CACHE", str(Path(args.out) / ".cache"))  # calibrations of this run only
    result = run_parts(args)
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "gpu_check.md").write_text(md)
    print(md)
    print(f"wrote {out}/gpu_check.json and gpu_check.md")
    return 0 if result["exactness_ok"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
