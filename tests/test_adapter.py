"""Adapter heads (one decoder layer over layer L's states, with a KV cache of its own): exactness of
verified decoding with them, the cache the decode loop keeps for them, files, training, refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from sparkee import (
    ExitHeads,
    GenerationConfig,
    Interleave,
    SparkeeError,
    generate,
    generate_batch,
    hf,
    load_heads,
    wrap_model,
)
from sparkee.cache import LayeredKVCache
from sparkee.config import PoolSpec
from sparkee.generate import Generation
from sparkee.labels import adapter_logits_of, collect_labels, layer_metrics
from sparkee.sources import PromptItem
from sparkee.train_heads import distill
from test_batch import assert_row_cache_complete

MODEL = tiny_model("qwen2", layers=5)
BB = wrap_model(MODEL)
PROMPT = [5, 7, 9, 11, 3]


def adapter(layers=(2, 3), seed=1, scale=0.05) -> ExitHeads:
    """Adapter heads nudged away from layer L's copy, so their proposals are neither perfect nor
    constant (verification then both accepts and rejects)."""
    heads = ExitHeads(BB, "adapter", list(layers))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.per_layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return heads.eval()


HEADS = adapter()


def run(prompt, cfg, heads=HEADS):
    g = Generation(BB, heads, prompt, cfg)
    list(g)
    return g.result()


def adapter_kv_reference(heads: ExitHeads, layer: int, seq: list[int]):
    """The adapter's keys and values over the whole sequence in one teacher-forced pass."""
    with torch.inference_mode():
        h = hf.all_hidden_states(MODEL, torch.tensor([seq]))[layer]
        k = heads.layers.index(layer)
        cache = LayeredKVCache(
            len(heads.layers), len(seq), BB.num_kv_heads, BB.head_dim, BB.dtype, [BB.device] * 2
        )
        pids = torch.arange(len(seq))[None]
        cache.begin_pass([0], [len(seq)], [0])
        heads.adapter_layer(layer, h, None, pids, BB.rope(h, pids), cache)
    return cache.keys[k][:, :, : len(seq)], cache.values[k][:, :, : len(seq)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(["FE", "FEE", "FEEE", "EEF", "FEEEEEEE"]),
    layer=st.sampled_from([2, 3]),
    n=st.integers(2, 24),
    ratio=st.sampled_from([(0, 1), (2, 5)]),
)
def test_verified_with_an_adapter_is_full_depth_greedy(pattern, layer, n, ratio):
    cfg = GenerationConfig(
        max_new_tokens=n,
        speech_policy=f"spar-k:{pattern}:{layer}",
        interleave=Interleave(*ratio),
        verify=True,
    )
    full = generate(BB, PROMPT, GenerationConfig(max_new_tokens=n))
    res = run(PROMPT, cfg)
    assert res.tokens == full.tokens
    assert_row_cache_complete(MODEL, res)


def test_the_adapter_cache_holds_every_position_once_in_order():
    """Incremental adapter KV (early steps, full steps, rollbacks) equals one teacher-forced pass."""
    cfg = GenerationConfig(
        max_new_tokens=30, speech_policy="spar-k:FEEE:2", interleave=Interleave(0, 1), verify=True
    )
    res = run(PROMPT, cfg)
    assert res.stats["verify_rejections"] > 0  # rollbacks happened, so truncation is exercised
    seq = res.prompt + res.tokens[:-1]
    # the adapter of the policy's layer holds the positions up to its last early step (later
    # ones wait for the next); the other layer's is never filled
    n, other = res.draft_cache.lens
    last_early = max(k for k, r in enumerate(res.steps) if r.action == "early")
    assert n == len(res.prompt) + last_early and other == 0
    k_ref, v_ref = adapter_kv_reference(HEADS, 2, seq)
    k, v = res.draft_cache.layer_kv(0)
    torch.testing.assert_close(k, k_ref[:, :, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(v, v_ref[:, :, :n], atol=1e-5, rtol=0)


def test_early_tokens_are_the_adapters_argmax_over_the_sequence():
    cfg = GenerationConfig(max_new_tokens=20, speech_policy="fixed:3", interleave=Interleave(0, 1))
    res = run(PROMPT, cfg)
    seq = res.prompt + res.tokens[:-1]
    with torch.inference_mode():
        h = hf.all_hidden_states(MODEL, torch.tensor([seq]))[3]
        ref = adapter_logits_of(BB, HEADS, 3, h)[0, len(res.prompt) - 1 :].argmax(-1).tolist()
    early = [k for k, r in enumerate(res.steps) if r.action == "early"]
    assert early and [res.tokens[k] for k in early] == [ref[k] for k in early]


def test_batch_rows_with_an_adapter_equal_each_row_alone():
    prompts = [PROMPT, [3, 4, 5], [9, 8, 7, 6, 5, 4], [2]]
    cfg = GenerationConfig(
        max_new_tokens=18, speech_policy="spar-k:FEE:3", interleave=Interleave(0, 1), verify=True
    )
    batch = generate_batch(BB, prompts, cfg, HEADS)
    for p, res in zip(prompts, batch, strict=True):
        alone = run(p, cfg)
        assert res.tokens == alone.tokens == generate(BB, p, GenerationConfig(max_new_tokens=18)).tokens
        # the adapter's own cache holds what a plain pass gives, as far as each run filled it (in a
        # batch an exact row's refreshes follow its batch-mates', so it may have filled more or less)
        k_ref, _ = adapter_kv_reference(HEADS, 3, res.prompt + res.tokens[:-1])
        for r in (res, alone):
            n = r.draft_cache.lens[1]
            assert n >= len(p)  # the prompt at least
            torch.testing.assert_close(r.draft_cache.layer_kv(1)[0], k_ref[:, :, :n], atol=1e-5, rtol=0)


def test_sampled_verification_with_an_adapter_is_seeded():
    cfg = GenerationConfig(
        max_new_tokens=16,
        speech_policy="spar-k:FEE:2",
        interleave=Interleave(0, 1),
        verify=True,
        temperature=0.8,
        seed=3,
    )
    assert run(PROMPT, cfg).tokens == run(PROMPT, cfg).tokens


def test_save_load_round_trip(tmp_path):
    path = HEADS.save(tmp_path / "a.safetensors")
    back = load_heads(path, BB)
    assert back.kind == "adapter" and back.layers == [2, 3] and back.attends
    h = torch.randn(1, 6, BB.hidden_size)
    with torch.inference_mode():
        for L in (2, 3):
            torch.testing.assert_close(
                adapter_logits_of(BB, back, L, h), adapter_logits_of(BB, HEADS, L, h), atol=1e-5, rtol=0
            )
    cfg = GenerationConfig(max_new_tokens=12, speech_policy="spar-k:FEE:2", interleave=Interleave(0, 1))
    assert run(PROMPT, cfg, back).tokens == run(PROMPT, cfg).tokens


def test_an_untrained_adapter_is_the_next_layer_of_the_model():
    """Initialised from layer L's weights: layer L's adapter + final norm + projection equals the
    model's layer L applied to layer L's states, then the logit lens (exactly, at init)."""
    heads = ExitHeads(BB, "adapter", [2])
    seq = PROMPT + [1, 2, 3]
    with torch.inference_mode():
        hs = hf.all_hidden_states(MODEL, torch.tensor([seq]))
        got = adapter_logits_of(BB, heads, 2, hs[2])
        want = BB.project(BB.final_norm(hs[3]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_refusals():
    with pytest.raises(SparkeeError, match="adapter heads attend"):
        HEADS(2, torch.zeros(1, BB.hidden_size))
    cfg = GenerationConfig(
        max_new_tokens=4,
        speech_policy="spar-k:FE:2",
        interleave=Interleave(0, 1),
        speech_ids=(10, 60),
        prefill_pool=PoolSpec(tau_in=0.9, tau_deep=0.9, layer=2),
    )
    with pytest.raises(SparkeeError, match="cannot follow --prefill-pool"):
        generate(BB, PROMPT, cfg, HEADS)
    with pytest.raises(SparkeeError, match="no head for exit layer 4"):
        generate(BB, PROMPT, replace(cfg, prefill_pool=None, speech_policy="fixed:4"), HEADS)


def test_training_an_adapter_brings_it_closer_to_the_last_layer():
    prompts = [PromptItem(ids=[3 + i, 9, 4 + i % 5, 7]) for i in range(12)]
    cfg = GenerationConfig(max_new_tokens=16)
    labels = collect_labels(BB, prompts, lambda _: cfg, [2], context=True)
    assert int(labels.targets().sum()) == 12 * 16 and len(labels) == 12 * (16 + 3)
    heads = ExitHeads(BB, "adapter", [2])
    before = layer_metrics(BB, heads, labels)[2]["kl_all"]
    assert distill(BB, heads, labels, steps=60, batch_size=4, lr=3e-3, seed=0)
    after = layer_metrics(BB, heads, labels)[2]["kl_all"]
    assert after < 0.7 * before
    assert layer_metrics(BB, heads, labels)[2]["n_all"] == 12 * 16  # scored on generated steps only


def test_layer_report_scores_an_adapter_over_whole_sequences(tmp_path):
    from sparkee.analysis import run_report

    prompts = [PromptItem(ids=[3 + i, 9, 4, 7]) for i in range(3)]
    report = run_report(BB, adapter((2,)), prompts, lambda _: GenerationConfig(max_new_tokens=8), tmp_path)
    assert report["heads_kind"] == "adapter" and report["rows"] == 3 * 8
    assert report["heads"]["2"]["n_all"] == 3 * 8 == report["logit_lens"]["2"]["n_all"]
    # an untrained adapter is layer 2 itself, so at layer 2 it agrees as the logit lens of layer 3
    untrained = run_report(
        BB, ExitHeads(BB, "adapter", [2]), prompts, lambda _: GenerationConfig(max_new_tokens=8), tmp_path
    )
    assert untrained["heads"]["2"]["agree_all"] == pytest.approx(untrained["logit_lens"]["3"]["agree_all"])


def test_prompts_prefilled_together_with_an_adapter_decode_as_each_alone():
    """add_many with an adapter: each row's kept layer-L states are its own prompt's (not the
    padding), so verified decoding equals full depth and the adapter's KV equals one pass."""
    from sparkee.engine import Engine

    cfg = GenerationConfig(
        max_new_tokens=20, speech_policy="spar-k:FEEE:2", interleave=Interleave(0, 1), verify=True
    )
    prompts = [PROMPT, [4, 6], [8, 9, 10, 12, 13, 14, 15, 2]]
    eng = Engine(BB, HEADS, cfg, max_batch_size=3, max_len=64)
    rows = eng.add_many(prompts, [eng.plan_for(len(p)) for p in prompts])
    while eng.active():
        eng.step()
    for b, p in zip(rows, prompts, strict=True):
        res = eng.result(b)
        assert res.tokens == generate(BB, p, GenerationConfig(max_new_tokens=20)).tokens
        n = res.draft_cache.lens[0]
        assert n > len(p)  # the adapter ran over the prompt and some early steps
        k_ref, v_ref = adapter_kv_reference(HEADS, 2, res.prompt + res.tokens[:-1])
        k, v = res.draft_cache.layer_kv(0)
        torch.testing.assert_close(k, k_ref[:, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(v, v_ref[:, :, :n], atol=1e-5, rtol=0)
