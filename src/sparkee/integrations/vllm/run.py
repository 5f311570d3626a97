"""Run vLLM offline on token-id prompts: plain greedy and speculative engines one after another in
one process (each engine start costs about 25-35 s and 2-3 GB here), with the engine's own
speculative-decoding counters.

    python -m sparkee.integrations.vllm.run --model DIR --prompts prompts.json --out result.json \
        [--engine plain] [--engine '{"method": "draft_model", "model": "DRAFT", "num_speculative_tokens": 3}'] \
        [--max-tokens 64] [--stop-ids 2] [--repeat 1]

Every `--engine` is `plain` or a `speculative_config` as JSON; `prompts.json` is a list of token-id
lists. The result holds, per engine: the generated ids, start-up and generation seconds, tokens/s
and the spec-decode metrics (drafts, draft tokens, accepted tokens, per-position acceptance;
acceptance rate = accepted / draft tokens; tokens per verification pass = 1 + accepted / drafts,
the mean acceptance length vLLM logs). Must run as `__main__` (vLLM's workers spawn).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time


def cpu_env() -> None:
    """The settings vLLM's CPU build needs (kept if the caller set them); none where CUDA is seen,
    so the same runs go to the GPU with the official vLLM."""
    import torch

    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def spec_metrics(llm) -> dict:
    """vLLM's spec-decode counters (Prometheus metrics of the V1 engine), summed over engines."""
    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": None}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:spec_decode_")
        if name in out and name != "accepted_per_pos":
            out[name] += int(m.value)
        elif name == "num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            prev = out["accepted_per_pos"] or [0] * len(vals)
            out["accepted_per_pos"] = [a + b for a, b in zip(prev, vals, strict=True)]
    d, t, a = out["num_drafts"], out["num_draft_tokens"], out["num_accepted_tokens"]
    out["acceptance_rate"] = a / t if t else None
    out["tokens_per_pass"] = 1 + a / d if d else None
    return out


def run_engine(
    model: str,
    prompts: list[list[int]],
    speculative_config: dict | None = None,
    max_tokens: int = 64,
    stop_ids: list[int] | None = None,
    repeat: int = 1,
    max_model_len: int = 512,
    one_at_a_time: bool = False,
    **llm_kwargs,
) -> dict:
    """Start one engine, generate greedily `repeat` times (the first run is also a warm-up), stop it.

    one_at_a_time: each prompt alone (batch 1, the single-user latency case), else all together."""
    cpu_env()
    from vllm.inputs import TokensPrompt

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    kwargs = dict(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        disable_log_stats=False,
        max_model_len=max_model_len,
        seed=0,
    )
    kwargs.update(llm_kwargs)
    if speculative_config is not None:
        kwargs["speculative_config"] = speculative_config
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        stop_token_ids=list(stop_ids or []),
        ignore_eos=not stop_ids,
        detokenize=False,
    )
    inputs = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    runs = []
    tokens = None
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        if one_at_a_time:
            outs = [llm.generate([p], sp, use_tqdm=False)[0] for p in inputs]
        else:
            outs = llm.generate(inputs, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        got = [list(o.outputs[0].token_ids) for o in outs]
        if tokens is not None and got != tokens:
            raise RuntimeError("vLLM greedy output changed between repeats")
        tokens = got
        runs.append(dt)
    new = sum(len(t) for t in tokens)
    metrics = spec_metrics(llm) if speculative_config is not None else None
    del llm
    gc.collect()
    return {
        "model": model,
        "speculative_config": speculative_config,
        "tokens": tokens,
        "new_tokens": new,
        "startup_s": startup,
        "generate_s": runs,
        "tokens_per_s": [new / r for r in runs],
        "batch": 1 if one_at_a_time else len(prompts),
        "spec": metrics,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    ap.add_argument("--engine", action="append", default=[], help="'plain' or a speculative_config JSON")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stop-ids", default="", help="comma-separated stop token ids")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--one-at-a-time", action="store_true", help="generate prompt by prompt (batch 1)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with open(a.prompts) as f:
        prompts = json.load(f)
    stops = [int(s) for s in a.stop_ids.split(",") if s.strip()]
    results = []
    for spec in a.engine or ["plain"]:
        cfg = None if spec == "plain" else json.loads(spec)
        try:
            r = run_engine(
                a.model, prompts, cfg, a.max_tokens, stops, a.repeat, one_at_a_time=a.one_at_a_time
            )
        except Exception as e:  # noqa: BLE001 - recorded: a refused model is a result too
            r = {"model": a.model, "speculative_config": cfg, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        with open(a.out, "w") as f:  # written after every engine, so a later failure keeps the rest
            json.dump(results, f)


if __name__ == "__main__":
    main()
