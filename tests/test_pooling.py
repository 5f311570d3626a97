"""Affinity Pooling of speech prompts: grouping rule, parsing, and decoding after a pooled prefill."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, SparkeeError, generate, wrap_model
from sparkee.config import PoolSpec, parse_pool
from sparkee.pooling import affinity_groups, pool

BB = wrap_model(tiny_model("qwen2", layers=6))
# prompt: text, a run of speech ids (40..79) with repeats, text, speech, text
PROMPT = [3, 4, 41, 41, 41, 42, 42, 55, 55, 55, 55, 60, 5, 70, 70, 71, 6]
SPEECH = (40, 80)


def cfg(**kw):
    base = dict(max_new_tokens=16, interleave=Interleave(2, 4), speech_ids=SPEECH)
    return GenerationConfig(**(base | kw))


def test_parse_pool():
    assert parse_pool("in=0.8,deep=0.7@4") == PoolSpec(0.8, 0.7, 4)
    assert parse_pool("in=0.9,deep=0.8@3,window-in=2,window-deep=4,pos=mean") == PoolSpec(
        0.9, 0.8, 3, 2, 4, "mean"
    )
    assert parse_pool("in=0.9,deep=0.8@3").position == "first"
    for bad in (
        "in=0.8",
        "deep=0.7@4",
        "in=x,deep=0.7@4",
        "in=0.8,deep=0.7@4,pos=middle",
        "in=0.8,deep=0.7@4,foo=1",
    ):
        with pytest.raises(SparkeeError):
            parse_pool(bad)


def test_groups_merge_only_similar_contiguous_speech():
    h = torch.tensor([[1.0, 0], [1, 0], [1, 0.01], [0, 1], [0, 1], [0, 1]])
    speech = torch.tensor([True, True, True, True, False, True])
    assert affinity_groups(h, speech, 0.9, 1) == [[0, 1, 2], [3], [4], [5]]
    assert affinity_groups(h, speech, 1.01, 1) == [[i] for i in range(6)]
    assert affinity_groups(h, torch.zeros(6, dtype=torch.bool), 0.0, 1) == [[i] for i in range(6)]


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.floats(-1, 1), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_groups_partition_the_sequence_and_never_merge_text(speech, tau, window):
    torch.manual_seed(len(speech))
    h = torch.randn(len(speech), 8)
    groups = affinity_groups(h, torch.tensor(speech), tau, window)
    assert [i for g in groups for i in g] == list(range(len(speech)))
    for g in groups:
        assert g == list(range(g[0], g[-1] + 1))
        if len(g) > 1:
            assert all(speech[i] for i in g)


def test_pool_means_states_and_places_positions():
    h = torch.arange(12.0).view(1, 4, 3)
    pos = torch.arange(4.0)
    sp = torch.tensor([True, True, True, False])
    out, p, s = pool(h, pos, sp, [[0, 1, 2], [3]], "mean")
    torch.testing.assert_close(out[0, 0], h[0, :3].mean(0))
    assert p.tolist() == [1.0, 3.0] and s.tolist() == [True, False]
    assert pool(h, pos, sp, [[0, 1, 2], [3]], "first")[1].tolist() == [0.0, 3.0]


@pytest.mark.parametrize(
    "policy", ["full", "spar-k:even:3", "spar-k:triple:2", "fixed:4", "confidence:3:1.0"]
)
def test_thresholds_above_one_change_nothing(policy):
    plain = generate(BB, PROMPT, cfg(speech_policy=policy))
    pooled = generate(BB, PROMPT, cfg(speech_policy=policy, prefill_pool=PoolSpec(1.01, 1.01, 3)))
    assert pooled.tokens == plain.tokens
    assert pooled.stats["prompt_len_last_layer"] == len(PROMPT)


@pytest.mark.parametrize("rule", ["mean", "first"])
def test_pooled_prefill_shortens_deep_layers_and_keeps_decoding_consistent(rule):
    spec = PoolSpec(-1.0, -1.0, 3, position=rule)  # threshold -1: every speech run collapses to one state
    res = generate(BB, PROMPT, cfg(speech_policy="spar-k:even:2", prefill_pool=spec))
    runs = 2  # speech runs in PROMPT (ids 41..60 and 70..71)
    n_pooled = len(PROMPT) - sum(1 for t in PROMPT if 40 <= t < 80) + runs
    assert res.stats["prompt_len_first_layer"] == n_pooled
    assert res.stats["prompt_len_last_layer"] == n_pooled
    plain = generate(BB, PROMPT, cfg(speech_policy="spar-k:even:2"))
    assert res.stats["prefill_flops"] < plain.stats["prefill_flops"]
    assert res.stats["kv_bytes"] < plain.stats["kv_bytes"]
    # every layer holds pooled prompt + generated positions, and verified mode still reproduces
    # full-depth greedy decoding of the same pooled prompt
    new = len(res.tokens) - 1
    assert res.cache.lens == [n_pooled + new] * BB.num_layers
    full = generate(BB, PROMPT, cfg(prefill_pool=spec))
    ver = generate(BB, PROMPT, cfg(speech_policy="fixed:1", prefill_pool=spec, verify=True))
    assert ver.tokens == full.tokens


def test_deep_pooling_only_merges_at_the_deep_layer():
    res = generate(BB, PROMPT, cfg(prefill_pool=PoolSpec(1.01, -1.0, 2)))
    assert res.stats["prompt_len_first_layer"] == len(PROMPT)
    assert res.stats["prompt_len_last_layer"] < len(PROMPT)
    assert res.cache.lens[0] - res.cache.lens[-1] == len(PROMPT) - res.stats["prompt_len_last_layer"]


def test_pooling_needs_speech_ids_and_a_valid_layer():
    with pytest.raises(SparkeeError, match="needs the speech token range"):
        generate(BB, PROMPT, GenerationConfig(max_new_tokens=2, prefill_pool=PoolSpec(0.8, 0.7, 3)))
    with pytest.raises(SparkeeError, match="pooling layer 6 is out of range"):
        generate(BB, PROMPT, cfg(prefill_pool=PoolSpec(0.8, 0.7, 6)))


def test_a_pooled_row_prefilled_beside_others_is_prefilled_alone():
    from sparkee.engine import Engine

    pooled = cfg(speech_policy="spar-k:even:2", prefill_pool=PoolSpec(-1.0, -1.0, 3))
    plain = cfg(speech_policy="spar-k:even:2")
    eng = Engine(BB, None, plain, max_batch_size=3, max_len=64)
    prompts = [PROMPT, PROMPT[:9], PROMPT]
    cfgs = [plain, plain, pooled]
    rows = eng.add_many(prompts, [eng.plan_for(len(p), c) for p, c in zip(prompts, cfgs, strict=True)])
    while eng.active():
        eng.step()
    for b, p, c in zip(rows, prompts, cfgs, strict=True):
        assert eng.result(b).tokens == generate(BB, p, c).tokens
    assert eng.result(rows[2]).stats["prompt_len_last_layer"] < len(PROMPT)
