"""The step-able engine: rows join and leave a running batch, each with its own plan, and each row
still equals its prompt decoded alone; aborted slots are freed and reused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, SparkeeError, generate, hf, wrap_model
from sparkee.engine import Engine

MODEL = tiny_model("qwen2", layers=5)
BB = wrap_model(MODEL)
IL = Interleave(2, 3)
BASE = GenerationConfig(max_new_tokens=12, interleave=IL, speech_ids=(40, 96), stop_ids=[7])

ROWS = [
    ([5, 9, 11], replace(BASE, speech_policy="spar-k:even:3")),
    ([3, 4], replace(BASE, speech_policy="spar-k:FEEE:2", verify=True)),
    ([8, 8, 8, 9], replace(BASE, max_new_tokens=20)),
    ([12, 30], replace(BASE, speech_policy="spar-k:even:3", temperature=0.8, top_p=0.9, seed=4)),
    ([6], replace(BASE, speech_policy="confidence:2:1.0", text_policy="fixed:4")),
]


def solo(prompt, cfg):
    return generate(BB, prompt, cfg)


def drive(eng: Engine, schedule: dict[int, list[int]]) -> dict[int, list[int]]:
    """Step the engine; at step k add the rows schedule[k]; returns tokens streamed per request."""
    streamed: dict[int, list[int]] = {}
    row_of: dict[int, int] = {}
    k = 0
    while k <= max(schedule) or eng.active():
        for n in schedule.get(k, []):
            prompt, cfg = ROWS[n]
            row_of[eng.add(prompt, cfg, tag=n)] = n
        for ev in eng.step().events:
            streamed.setdefault(eng.tag(ev.row), []).append(ev.token)
        k += 1
    return streamed


def test_rows_joining_a_running_batch_equal_their_prompts_decoded_alone():
    eng = Engine(BB, None, BASE, max_batch_size=len(ROWS), max_len=64)
    streamed = drive(eng, {0: [0, 1], 2: [2], 5: [3, 4]})
    for n, (prompt, cfg) in enumerate(ROWS):
        assert streamed[n] == solo(prompt, cfg).tokens, f"row {n}"


def test_finished_rows_keep_a_complete_cache_until_released():
    eng = Engine(BB, None, BASE, max_batch_size=2, max_len=64)
    a = eng.add(*ROWS[0])
    b = eng.add(*ROWS[1])
    finished = []
    while eng.active():
        finished += eng.step().finished
    assert sorted(finished) == [a, b]
    for row, (prompt, cfg) in zip((a, b), ROWS[:2], strict=True):
        res = eng.result(row)
        assert res.tokens == solo(prompt, cfg).tokens
        seq = res.prompt + res.tokens[:-1]
        with torch.no_grad():
            ref = hf.dynamic_cache_kv(MODEL(torch.tensor([seq]), use_cache=True).past_key_values)
        assert res.cache.lens == [len(seq)] * len(ref)
        for i, (k, v) in enumerate(ref):
            ck, cv = res.cache.layer_kv(i)
            torch.testing.assert_close(ck, k, atol=1e-5, rtol=0)
            torch.testing.assert_close(cv, v, atol=1e-5, rtol=0)
        assert {"avg_exit_layer_speech", "speech_acceptance", "predicted_speedup"} <= set(res.stats)
    eng.release(a)
    assert eng.free_slots() == 1


def test_abort_frees_the_slot_at_once_and_a_reused_slot_decodes_like_a_fresh_one():
    eng = Engine(BB, None, BASE, max_batch_size=2, max_len=64)
    long_cfg = replace(BASE, max_new_tokens=30, stop_ids=[])
    a = eng.add([5, 6, 7], long_cfg)
    b = eng.add(*ROWS[2])
    for _ in range(4):
        eng.step()
    assert eng.free_slots() == 0
    with pytest.raises(SparkeeError, match="full"):
        eng.add(*ROWS[0])
    assert eng.abort(a) and not eng.abort(a)
    assert eng.free_slots() == 1 and eng.active() == [b]
    assert eng._run.cache.nbytes(a) == 0
    c = eng.add(*ROWS[1])
    assert c == a  # the freed slot, its old KV forgotten
    streamed = {b: [], c: []}
    for ev in eng.drain():
        streamed[ev.row].append(ev.token)
    while eng.active():
        for ev in eng.step().events:
            streamed[ev.row].append(ev.token)
    assert streamed[c] == solo(*ROWS[1]).tokens
    assert eng.result(b).tokens == solo(*ROWS[2]).tokens


def test_requests_the_engine_cannot_hold_are_refused():
    eng = Engine(BB, None, BASE, max_batch_size=1, max_len=16)
    with pytest.raises(SparkeeError, match="positions this engine holds"):
        eng.add([5] * 10, replace(BASE, max_new_tokens=10))
    with pytest.raises(SparkeeError, match="speech-vocabulary"):
        eng.add([5], replace(BASE, speech_vocab_only=True))
    with pytest.raises(SparkeeError, match="exit layer"):
        eng.add([5], replace(BASE, speech_policy="spar-k:even:9"))
    with pytest.raises(SparkeeError, match="empty"):
        eng.add([], BASE)
    assert eng.free_slots() == 1  # nothing was taken by the refusals


def test_prompts_prefilled_together_decode_as_each_alone():
    """add_many: one padded pass for prompts of different lengths, policies and sampling; each row
    then streams its solo tokens, also when the batch joins rows already decoding."""
    eng = Engine(BB, None, BASE, max_batch_size=len(ROWS), max_len=64)
    first = eng.add(*ROWS[2], tag=2)
    for _ in range(3):
        eng.step()
    picked = [0, 1, 3, 4]
    plans = [eng.plan_for(len(ROWS[n][0]), ROWS[n][1]) for n in picked]
    rows = eng.add_many([ROWS[n][0] for n in picked], plans, tags=picked)
    assert first not in rows and len(set(rows)) == len(picked)
    streamed: dict[int, list[int]] = {}
    for ev in eng.drain():
        streamed.setdefault(eng.tag(ev.row), []).append(ev.token)
    assert set(streamed) == set(picked)  # every first token is out before the next step
    while eng.active():
        for ev in eng.step().events:
            streamed.setdefault(eng.tag(ev.row), []).append(ev.token)
    for n in picked:
        assert streamed[n] == solo(*ROWS[n]).tokens, f"row {n}"
    assert eng.result(first).tokens == solo(*ROWS[2]).tokens


def test_a_padded_prefill_keeps_only_each_prompts_own_positions():
    prompts = [[5, 9, 11, 12, 13, 14, 15], [3, 4], [8]]
    eng = Engine(BB, None, BASE, max_batch_size=3, max_len=32)
    rows = eng.add_many(prompts, [eng.plan_for(len(p)) for p in prompts])
    cache = eng._run.cache
    for b, p in zip(rows, prompts, strict=True):
        assert [lens[b] for lens in cache.lens] == [len(p)] * BB.num_layers  # no padding slot counted
        with torch.no_grad():
            ref = hf.dynamic_cache_kv(MODEL(torch.tensor([p]), use_cache=True).past_key_values)
        for i, (k, v) in enumerate(ref):
            n = len(p)
            ck, cv = cache.keys[i][b : b + 1, :, :n], cache.values[i][b : b + 1, :, :n]
            torch.testing.assert_close(ck, k, atol=1e-5, rtol=0)
            torch.testing.assert_close(cv, v, atol=1e-5, rtol=0)


def test_add_many_refuses_without_taking_a_slot():
    eng = Engine(BB, None, BASE, max_batch_size=2, max_len=32)
    plan = eng.plan_for(2)
    with pytest.raises(SparkeeError, match="full: 0 of 2 rows are in use, 3 asked for"):
        eng.add_many([[5, 6]] * 3, [plan] * 3)
    with pytest.raises(SparkeeError, match="outside the vocabulary"):
        eng.add_many([[5, 6], [5, 10**6]], [plan] * 2)
    with pytest.raises(SparkeeError, match="one plan"):
        eng.add_many([[5, 6]], [plan] * 2)
    assert eng.free_slots() == 2
