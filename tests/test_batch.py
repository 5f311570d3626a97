"""Batched decoding: each row of a batch equals its prompt decoded alone, and its KV cache is complete."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, generate, generate_batch, hf, stream_batch, wrap_model

MODEL = tiny_model("qwen2", layers=5)
BB = wrap_model(MODEL)
GLM = tiny_model("glm", layers=4)
GLM_BB = wrap_model(GLM)


def full_forward_kv(model, seq):
    with torch.no_grad():
        out = model(torch.tensor([seq]), use_cache=True)
    return hf.dynamic_cache_kv(out.past_key_values)


def assert_row_cache_complete(model, res):
    seq = res.prompt + res.tokens[:-1]  # the last token was produced, never fed
    ref = full_forward_kv(model, seq)
    assert res.cache.lens == [len(seq)] * len(ref)
    for i, (k, v) in enumerate(ref):
        ck, cv = res.cache.layer_kv(i)
        torch.testing.assert_close(ck, k, atol=1e-5, rtol=0, msg=f"keys of layer {i}")
        torch.testing.assert_close(cv, v, atol=1e-5, rtol=0, msg=f"values of layer {i}")


POLICIES = [
    "full",
    "fixed:2",
    "confidence:3:1.5",
    "spar-k:even:3",
    "spar-k:triple:2",
    "spar-k:FEEEE:1",
    "spar-k:adaptive:2:4",
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=st.lists(st.lists(st.integers(3, 95), min_size=1, max_size=9), min_size=2, max_size=5),
    policy=st.sampled_from(POLICIES),
    text_policy=st.sampled_from(["full", "fixed:1", "spar-k:EF:4"]),
    fmt=st.sampled_from(["padded", "early-stop"]),
    verify=st.booleans(),
    accept=st.sampled_from(["exact", "topk:2", "typical:0.2"]),
    n=st.integers(1, 24),
    stop=st.sampled_from([[], [7], [7, 13, 21]]),
)
def test_each_row_equals_its_prompt_decoded_alone(prompts, policy, text_policy, fmt, verify, accept, n, stop):
    il = Interleave(2, 3, format=fmt, text_end_id=11 if fmt == "early-stop" else None)
    cfg = GenerationConfig(
        max_new_tokens=n,
        speech_policy=policy,
        text_policy=text_policy,
        interleave=il,
        stop_ids=stop,
        verify=verify,
        accept=accept,
    )
    batch = generate_batch(BB, prompts, cfg)
    assert len(batch) == len(prompts)
    # exact greedy verified rows refresh with their batch (same tokens, their own schedule)
    shares = verify and accept == "exact"
    for prompt, row in zip(prompts, batch, strict=True):
        alone = generate(BB, prompt, cfg)
        assert row.tokens == alone.tokens
        assert row.modalities == alone.modalities
        if not shares:
            assert row.exit_layers == alone.exit_layers
            assert row.stats["verify_rejections"] == alone.stats["verify_rejections"]
        assert_row_cache_complete(MODEL, row)


def test_glm_rows_with_different_lengths_and_verified_sampling_rows_are_independent():
    prompts = [[5, 7, 9], [3, 4, 5, 6, 7, 8, 9, 10], [42]]
    cfg = GenerationConfig(
        max_new_tokens=18,
        speech_policy="spar-k:FEE:2",
        interleave=Interleave(0, 1),
        temperature=0.9,
        top_p=0.95,
        seed=11,
        verify=True,
    )
    batch = generate_batch(GLM_BB, prompts, cfg)
    for n, (p, row) in enumerate(zip(prompts, batch, strict=True)):
        # row n samples with seed + n, whatever its batch-mates do
        alone = generate(GLM_BB, p, replace(cfg, seed=cfg.seed + n))
        assert row.tokens == alone.tokens
        assert_row_cache_complete(GLM, row)
    # and a different batch-mate changes nothing
    other = generate_batch(GLM_BB, [prompts[0], [9, 9, 9, 9]], cfg)
    assert other[0].tokens == batch[0].tokens


def test_stream_batch_events_carry_rows_and_finished_rows_stop_costing():
    prompts = [[5, 7, 9], [3, 4, 5, 6]]
    ref = generate(BB, prompts[0], GenerationConfig(max_new_tokens=12))
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=[ref.tokens[2]])
    gen = stream_batch(BB, prompts, cfg)
    events = list(gen)
    results = gen.results()
    for r, res in enumerate(results):
        assert [e.token for e in events if e.row == r] == res.tokens
    assert len(results[0].tokens) <= 3  # row 0 stopped at its stop token
    # the rows that kept going ran more layer passes than the row that stopped
    assert results[0].stats["weight_reads"] < results[1].stats["weight_reads"] or len(results[1].tokens) <= 3
    assert results[0].stats["batch_size"] == 2
    assert results[0].stats["batch_new_tokens"] == sum(len(r.tokens) - 1 for r in results)


def test_lock_step_batch_runs_one_pass_per_layer_range():
    """Equal prompts in the padded format: every row is at the same place, so a batch of 4 runs the
    same number of layer passes as one sequence."""
    prompt = [5, 7, 9, 11]
    cfg = GenerationConfig(max_new_tokens=14, speech_policy="spar-k:even:2", interleave=Interleave(2, 5))
    gen = stream_batch(BB, [prompt] * 4, cfg)
    batch = gen.results()
    alone = generate(BB, prompt, cfg)
    assert all(r.tokens == alone.tokens for r in batch)
    assert gen._run.batch_meter.passes["layer"] == alone.meter.passes["layer"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(["FE", "FEE", "FEEE", "EEF", "FFEE"]),
    layer=st.integers(1, 4),
    n=st.integers(4, 30),
)
def test_verified_rows_keep_the_batch_clock_after_rollbacks(pattern, layer, n):
    """Different prompts roll back at different steps, yet at every batch step all rows run the
    same kind: a pattern of one F in K steps runs on the clock of full passes (K - 1 early steps
    after each full pass, the prefill and a rollback's correcting pass included), so the batch runs
    a full pass every K-th step; other patterns follow the steps since the row began (its chunk
    index plus the steps it discarded), so the batch runs a full pass where the pattern says F."""
    prompts = [[5, 7, 9, 11, 3], [3, 4, 5], [9, 8, 7, 6, 5, 4], [2], [8, 8, 1]]
    cfg = GenerationConfig(
        max_new_tokens=n, speech_policy=f"spar-k:{pattern}:{layer}", interleave=Interleave(0, 1), verify=True
    )
    gen = stream_batch(BB, prompts, cfg)
    list(gen)
    results = gen.results()
    assert [r.tokens for r in results] == [
        generate(BB, p, GenerationConfig(max_new_tokens=n)).tokens for p in prompts
    ]
    steps = gen._run.batch_meter.steps
    T = steps["full"] + steps["early"]  # batch steps after the prefills
    if pattern.count("F") == 1:  # K - 1 early steps at most after each full pass, a rollback's included
        K = len(pattern)
        for r in results:
            run = 0
            for rec in r.steps:
                run = run + 1 if rec.action == "early" and not rec.corrected else 0
                assert run <= K - 1
    else:
        assert steps["full"] == sum(pattern[t % len(pattern)] == "F" for t in range(1, T + 1))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=st.sampled_from(["FE", "FEEE", "EEF"]), layer=st.integers(1, 4), n=st.integers(6, 30))
def test_exact_rows_refresh_when_the_batch_runs_deep_anyway(pattern, layer, n):
    """Text steps (full depth) land on different batch steps once rows roll back; an exact greedy
    verified row with pending early tokens then refreshes in that step's deep pass instead of
    staying early (its tokens are full depth's whatever its schedule). A tolerant row never moves,
    so every row still equals its answer alone."""
    from unittest import mock

    from sparkee import engine

    seen = []
    share = engine._share_refreshes

    def spy(run, plans):
        share(run, plans)
        seen.append(
            [
                (run.plans[rp.row].refreshes_with_batch, rp.action, rp.depth, rp.state.since_full)
                for rp in plans
            ]
        )

    prompts = [[5, 7, 9, 11, 3], [3, 4, 5], [9, 8, 7, 6, 5, 4], [2]]
    base = GenerationConfig(
        max_new_tokens=n, speech_policy=f"spar-k:{pattern}:{layer}", interleave=Interleave(1, 3), verify=True
    )
    with mock.patch.object(engine, "_share_refreshes", spy):
        exact = generate_batch(BB, prompts, base)
    full = [generate(BB, p, replace(base, verify=False, speech_policy="full")).tokens for p in prompts]
    assert [r.tokens for r in exact] == full
    deep = [step for step in seen if any(d == BB.num_layers for _, _, d, _ in step)]
    assert deep and all(
        not (mine and a == "exit" and since > 0) for step in deep for mine, a, _, since in step
    )
    tolerant = replace(base, accept="topk:2")
    assert [r.tokens for r in generate_batch(BB, prompts, tolerant)] == [
        generate(BB, p, tolerant).tokens for p in prompts
    ]


def test_empty_batch_and_bad_prompt_are_refused():
    from sparkee import SparkeeError

    with pytest.raises(SparkeeError, match="no prompts"):
        generate_batch(BB, [], GenerationConfig())
    with pytest.raises(SparkeeError, match="prompt 2 is empty"):
        generate_batch(BB, [[1, 2], []], GenerationConfig())
