"""Schedules and the interleave tracker: worked numbers of METHOD.md section 2 and invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_model
from sparkee import (
    GenerationConfig,
    Interleave,
    SparkeeError,
    expected_depth,
    generate,
    parse_policy,
    wrap_model,
)
from sparkee.schedule import TrackerState, advance, chunk_index, next_modality


@pytest.mark.parametrize("name", ["even", "odd", "triple"])
def test_step_audio_2_worked_numbers(name):
    assert expected_depth(parse_policy(f"spar-k:{name}:22", 28), 28, 4) == 25.0


def test_glm_4_voice_worked_numbers():
    assert expected_depth(parse_policy("spar-k:even:36", 40), 40, 26) == 38.0
    assert expected_depth(parse_policy("spar-k:odd:36", 40), 40, 26) == 38.0
    assert round(expected_depth(parse_policy("spar-k:triple:37", 40), 40, 26), 2) == 38.04
    assert expected_depth(parse_policy("spar-k:even:33", 40), 40, 26) == 36.5


@pytest.mark.parametrize(
    ("layers", "ratio", "policy", "depth", "reduction"),
    [
        (28, (1, 4), "spar-k:even:22", 25.0, 10.714),
        (28, (1, 4), "spar-k:odd:22", 25.0, 10.714),
        (28, (1, 4), "spar-k:triple:22", 25.0, 10.714),
        (40, (13, 26), "spar-k:even:36", 38.0, 5.0),
        (40, (13, 26), "spar-k:triple:37", 38.038, 4.904),
    ],
)
def test_engine_reports_the_worked_average_depths(layers, ratio, policy, depth, reduction):
    bb = wrap_model(tiny_model("llama", layers=layers, hidden=16, vocab=64))
    n = 2 * sum(ratio)  # two whole text+speech cycles
    res = generate(
        bb, [3, 4, 5], GenerationConfig(max_new_tokens=n, speech_policy=policy, interleave=Interleave(*ratio))
    )
    assert res.stats["avg_exit_layer_speech"] == pytest.approx(depth, abs=1e-3)
    assert res.stats["speech_depth_reduction_pct"] == pytest.approx(reduction, abs=1e-3)
    assert res.stats["avg_exit_layer_text"] == layers
    assert res.stats["num_layers"] == layers


@given(st.text(alphabet="FE", min_size=1, max_size=8), st.integers(1, 60), st.integers(1, 39))
def test_pattern_repeats_with_a_shorter_last_group(pattern, chunk, layer):
    pol = parse_policy(f"spar-k:{pattern}:{layer}", 40)
    plans = [pol.plan(i) for i in range(1, chunk + 1)]
    for i, (action, lay) in enumerate(plans):
        assert action == ("exit" if pattern[i % len(pattern)] == "E" else "full")
        assert lay == (layer if action == "exit" else None)
    full = sum(a == "full" for a, _ in plans)
    assert expected_depth(pol, 40, chunk) == pytest.approx((full * 40 + (chunk - full) * layer) / chunk)


@given(st.integers(0, 6), st.integers(0, 6), st.integers(1, 80))
def test_tracker_keeps_the_ratio_in_padded_format(t, s, n):
    if t + s == 0:
        return
    il = Interleave(t, s)
    state, mods, idx = TrackerState(), [], []
    for _ in range(n):
        m = next_modality(il, state)
        mods.append(m)
        idx.append(chunk_index(m, state))
        state = advance(il, state, m, token=7)
    expect = [
        ("text" if (i % (t + s)) < t else "speech") if t and s else ("speech" if not t else "text")
        for i in range(n)
    ]
    assert mods == expect
    for i in range(n):  # chunk index restarts at every modality change
        assert idx[i] == (1 if i == 0 or mods[i] != mods[i - 1] else idx[i - 1] + 1)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 30))
def test_early_stop_is_all_speech_after_the_text_end_token(t, s, end_at):
    il = Interleave(t, s, format="early-stop", text_end_id=99)
    state, mods, ended = TrackerState(), [], None
    for i in range(40):
        m = next_modality(il, state)
        mods.append(m)
        tok = 99 if (m == "text" and i >= end_at and ended is None) else 1
        if tok == 99:
            ended = i
        state = advance(il, state, m, tok)
    assert ended is not None
    assert all(m == "speech" for m in mods[ended + 1 :])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "unknown policy 'bogus'"),
        ("fixed:0", "out of range"),
        ("fixed:40", "out of range"),
        ("fixed:x", "whole-number exit layer"),
        ("confidence:10:abc", "entropy threshold"),
        ("spar-k:FXE:10", "letters F and E"),
        ("spar-k::10", "letters F and E"),
        ("spar-k:even", "unknown policy"),
    ],
)
def test_bad_policy_strings_name_the_problem(spec, message):
    with pytest.raises(SparkeeError, match=message):
        parse_policy(spec, 40)


def test_bad_interleave_inputs():
    with pytest.raises(SparkeeError, match="early-stop needs the text-end token"):
        Interleave(1, 2, format="early-stop")
    with pytest.raises(SparkeeError, match="unknown format"):
        Interleave(1, 2, format="zigzag")
    with pytest.raises(SparkeeError, match="at least one step"):
        Interleave(0, 0)
