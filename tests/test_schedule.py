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


# ---------------------------------------------------------------------------------------------
# the auto format: the ratio predicts, the produced tokens correct


def _run_tracker(il, kinds):
    state, planned = TrackerState(), []
    for k in kinds:
        m = next_modality(il, state)
        planned.append(m)
        state = advance(il, state, m, token=500 if k == "speech" else 7, kind=k)
    return planned, state


@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 80))
def test_auto_equals_padded_when_the_model_keeps_the_ratio(t, s, n):
    padded, _ = _run_tracker(Interleave(t, s), ["text"] * n)  # kinds ignored by padded
    kinds = padded  # a model that emits exactly what the ratio says
    auto, _ = _run_tracker(Interleave(t, s, format="auto"), kinds)
    assert auto == padded


@given(
    st.integers(1, 5),
    st.integers(1, 8),
    st.lists(st.sampled_from(["text", "speech", "control"]), min_size=1, max_size=80),
)
def test_auto_corrects_the_plan_from_produced_tokens(t, s, kinds):
    il = Interleave(t, s, format="auto")
    planned, _ = _run_tracker(il, kinds)
    for i in range(len(kinds) - 1):
        if planned[i] == "text" and kinds[i] == "speech":
            # the text has ended: speech until the model produces text again
            j = i + 1
            while j < len(kinds) and kinds[j - 1] != "text":
                assert planned[j] == "speech"
                j += 1
        if planned[i] == "speech" and kinds[i] == "text":
            # re-synchronised: that step was the first text slot of a cycle
            assert planned[i + 1] == ("text" if t >= 2 else "speech")


@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 20), st.integers(1, 40))
def test_text_end_tokens_keep_the_slots_ratio(t, s, end_at, tail):
    """Step-Audio-2: after its text, the model fills text slots with <tts_pad>; the ratio goes on."""
    il = Interleave(t, s, format="auto", text_end_ids=(99,))
    state, planned = TrackerState(), []
    ended = False
    for i in range(end_at + tail):
        m = next_modality(il, state)
        planned.append(m)
        tok = 99 if m == "text" and (ended or i >= end_at) else (500 if m == "speech" else 7)
        ended |= tok == 99
        state = advance(il, state, m, tok, kind="text" if m == "text" else "speech")
    padded, _ = _run_tracker(Interleave(t, s), ["text"] * len(planned))
    assert planned == padded
    assert state.padding == ended


def test_auto_needs_the_speech_range():
    bb = wrap_model(tiny_model("llama", layers=2, hidden=16, vocab=64))
    with pytest.raises(SparkeeError, match="auto interleave format needs the speech token range"):
        generate(bb, [3, 4], GenerationConfig(interleave=Interleave(1, 2, format="auto")))


def test_scripted_model_irregular_chunks_each_format_misplans():
    """A model scripted to emit text 4 : speech 8 with irregular chunks, then speech only after its
    text ends: padded keeps planning text slots, auto follows what the model emits."""
    from sparkee.scripted import scripted_model

    text = iter(range(1, 40))
    speech = iter(range(40, 100))
    script = [next(text)]
    for n_text, n_speech in [(3, 8), (3, 9), (4, 8), (0, 20)]:  # irregular, then the text ends
        script += [next(text) for _ in range(n_text)] + [next(speech) for _ in range(n_speech)]
    script.append(0)  # stop
    bb = wrap_model(scripted_model(script, 100))
    misplanned = {}
    for fmt in ("padded", "early-stop", "auto"):
        # early-stop knows the last text token (11); GLM-4-Voice has no such token, auto needs none
        il = Interleave(4, 8, format=fmt, text_end_id=11 if fmt == "early-stop" else None)
        cfg = GenerationConfig(
            max_new_tokens=len(script),
            interleave=il,
            speech_ids=(40, 100),
            stop_ids=[0],
            speech_policy="spar-k:even:2",
        )
        res = generate(bb, script[:1], cfg)
        assert res.tokens == script[1:]  # the plan changes depths, never tokens (every layer agrees)
        misplanned[fmt] = res.stats["misplanned_steps"]
    assert misplanned["auto"] < misplanned["padded"]
    # padded: steps 3, 11, 14, 15, 23, 27, then 8 text slots after the text ended; auto: 3, 11, 14,
    # 23 and the first text slot after the end (worked by hand)
    assert misplanned == {"padded": 14, "early-stop": 5, "auto": 5}
