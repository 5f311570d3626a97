"""RunStats: the JSON keys users read, and derived figures that follow the fields they come from."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model
from sparkee import GenerationConfig, Interleave, generate, generate_batch, wrap_model
from sparkee.stats import RunStats

BB = wrap_model(tiny_model("llama", layers=4))
CFG = GenerationConfig(
    max_new_tokens=9, speech_policy="spar-k:FEE:2", interleave=Interleave(0, 1), verify=True, calibrate=False
)

# the `stats` object of the JSON output, as earlier versions wrote it (a dict): the keys stay
KEYS = [
    "num_layers",
    "new_tokens",
    "text_steps",
    "speech_steps",
    "avg_exit_layer_text",
    "avg_exit_layer_speech",
    "text_depth_reduction_pct",
    "speech_depth_reduction_pct",
    "early_steps",
    "early_speech_steps",
    "fallback_steps",
    "misplanned_steps",
    "speech_agreement",
    "text_agreement",
    "speech_acceptance",
    "text_acceptance",
    "accepted_per_refresh",
    "accepted_early_steps",
    "refreshes",
    "speech_vocab_changed",
    "speech_vocab_checked",
    "verify_rejections",
    "verify_wasted_steps",
    "prefill_s",
    "decode_s",
    "tokens_per_s",
    "flops",
    "flops_full_estimate",
    "flops_saved_pct",
    "weight_reads",
    "weight_reads_full_estimate",
    "predicted_speedup",
    "predicted_speedup_memory_bound",
    "predicted_speedup_calibrated",
    "predicted_s",
    "predicted_full_s",
    "cost_model",
    "prefill_flops",
    "prompt_len",
    "prompt_len_first_layer",
    "prompt_len_last_layer",
    "kv_bytes",
]
BATCH_KEYS = [
    "batch_size",
    "batch_new_tokens",
    "batch_tokens_per_s",
    "batch_predicted_speedup",
    "batch_predicted_speedup_memory_bound",
    "batch_predicted_speedup_calibrated",
    "batch_predicted_s",
    "batch_predicted_full_s",
]


def test_the_json_stats_keep_their_keys_and_read_like_the_dict_they_were():
    res = generate(BB, [3, 5, 7], CFG)
    assert isinstance(res.stats, RunStats)
    out = json.loads(json.dumps(res.as_json()))["stats"]
    assert set(KEYS) <= set(out) and not set(BATCH_KEYS) & set(out)
    assert res.stats["speech_steps"] == res.stats.speech_steps == out["speech_steps"] == 9
    assert res.stats.get("batch_size") is None and "decode_s" in res.stats
    with pytest.raises(KeyError):
        res.stats["speech_step"]
    batch = generate_batch(BB, [[3, 5, 7], [2, 4]], CFG)
    for r in batch:
        assert set(KEYS) | set(BATCH_KEYS) <= set(r.stats.as_json())
        assert r.stats["batch_size"] == 2 and r.stats["batch_new_tokens"] == 2 * 8


def test_derived_figures_follow_their_fields():
    st = generate(BB, [3, 5, 7], CFG).stats
    st.decode_s = 2.0
    assert st.tokens_per_s == pytest.approx((st.new_tokens - 1) / 2.0)
    assert st.speech_depth_reduction_pct == pytest.approx(100 * (1 - st.avg_exit_layer_speech / 4))
    assert st.predicted_speedup == st.predicted_speedup_memory_bound and st.cost_model == "memory-bound"
    st.predicted_speedup_calibrated = 1.7
    assert st.predicted_speedup == 1.7 and st.cost_model == "calibrated"
    assert st.accepted_per_refresh == pytest.approx(st.accepted_early_steps / st.refreshes)
    st.decode_s = 0.0
    assert st.tokens_per_s is None
