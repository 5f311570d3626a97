"""bench/serve_load.py's report: rounds of runs become medians, pooled percentiles and per-round
target ratios (the load test itself is never a test: it times servers)."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"


@pytest.fixture(scope="module")
def sl():
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(server, policy, c, rnd, tps, ttfts):
    return {
        "model": "m",
        "server": server,
        "policy": policy,
        "concurrency": c,
        "round": rnd,
        "requests": len(ttfts),
        "throughput_tok_s": tps,
        "ttft_s": ttfts,
        "ttfa_s": [None] * len(ttfts),
        "load_avg_1min_after": 0.5 + rnd,
    }


def test_ratios_are_taken_within_a_round_and_percentiles_over_all_requests(sl):
    """Round 1 ran on a machine twice as slow for both servers: the within-round ratios stay 4x,
    while the ratio of the rounds' median throughputs would not (10/3 against 40/10)."""
    B, S, V = sl.BASELINE, sl.OURS, sl.VERIFIED
    speed = [1.0, 0.5, 1.0]  # the machine's speed in each round
    runs = []
    for n, k in enumerate(speed):
        runs += [
            run(B, "full", 8, n, 10 * k, [1.0, 2.0]),
            run(S, "full", 8, n, 40 * k, [0.1, 0.2 + n]),
            run(S, "full", 1, n, 12 * k, [0.05, 0.06]),
            run(S, V, 1, n, 12 * k * 1.2, [0.05]),
            run(S, V, 8, n, 40 * k * (0.9 if n else 1.1), [0.1]),
            run(sl.OURS_TEXT, sl.VERIFIED_TEXT, 1, n, 12 * k * 1.1, [0.05]),  # another server
            run(sl.OURS_TEXT, sl.VERIFIED_TEXT, 8, n, 40 * k * 1.05, [0.1]),
            run(sl.OURS_ADAPTER, sl.VERIFIED_ADAPTER, 1, n, 12 * k * 1.5, [0.05]),
            run(sl.OURS_ADAPTER, sl.VERIFIED_ADAPTER, 8, n, 40 * k * 1.25, [0.1]),
        ]
    runs.append(run(B, "full", 8, 3, 3.0, [1.0]))  # a round with no sparkee run at 8: no ratio
    t = sl.targets(runs)["m"]
    assert t["throughput_ratio_c8_per_round"] == pytest.approx([4, 4, 4])
    assert t["throughput_ratio_c8_vs_baseline"] == pytest.approx(4) and t["throughput_target_3x_met"]
    assert t["verified_gain_c1_per_round"] == pytest.approx([1.2] * 3)
    assert t["verified_gain_c8"] == pytest.approx(statistics.median([1.1, 0.9, 0.9]))
    assert not t["verified_gain_kept_within_10pct"]  # 0.9 < 0.9 * 1.2
    # a verified row of another sparkee server is measured against sparkee's full depth
    assert t["verified_text_gain_c1"] == pytest.approx(1.1) and t["verified_text_gain_c8"] == pytest.approx(
        1.05
    )
    assert t["verified_text_gain_kept_within_10pct"]
    assert t["verified_adapter_gain_c1"] == pytest.approx(1.5)
    assert t["verified_adapter_gain_c8"] == pytest.approx(1.25)
    assert not t["verified_adapter_gain_kept_within_10pct"]  # 1.25 < 0.9 * 1.5
    rows = {(r["server"], r["policy"], r["concurrency"]): r for r in sl.aggregate(runs)}
    s8 = rows[(S, "full", 8)]
    assert s8["rounds"] == 3 and s8["requests"] == 6 and s8["throughput_tok_s"] == 40
    assert s8["throughput_range"] == [20, 40] and s8["load_avg_1min_max"] == 2.5
    assert s8["ttft_p99_s"] == 2.2  # the slowest request of any round, not a median of rounds
    assert t["ttft_p99_c8_over_c1_p99"] == pytest.approx(2.2 / 0.06) and not t["ttft_target_2x_met"]
    assert rows[(B, "full", 8)]["rounds"] == 4
    md = sl.markdown({"command": "x", "machine": MACHINE, "started": "now", "runs": runs, "targets": t})
    assert "| m | sparkee serve | full | 8 | 3 | 6 | 40.0 [20.0-40.0] | 100 ms | 2200 ms |" in md


MACHINE = {"cpu": "cpu", "threads": 2, "torch": "t", "server_torch_threads": 1, "python": "3"}
