"""The calibrated cost model and the measured fast paths (never a wall-clock assertion here)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import tiny_model
from sparkee import (
    GenerationConfig,
    Interleave,
    calibrate,
    cost,
    generate,
    generate_batch,
    kernels,
    store,
    wrap_model,
)
from sparkee.kernels import FastLinear
from sparkee.stats import batch_stats

PROMPT = [5, 7, 9, 11, 3]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKEE_CACHE", str(tmp_path))
    return tmp_path


def test_calibration_is_written_read_and_keyed(cache_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "split_half_drift", lambda series: 0.0)  # a busy CI machine caches nothing
    bb = wrap_model(tiny_model("qwen2", layers=3))
    cal = calibrate.load_or_calibrate(bb, progress=False)
    files = list((cache_dir / "calibration").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"] == calibrate.calibration_key(bb)
    assert data["key"]["layers"] == 3 and data["key"]["torch"] == torch.__version__
    assert len(cal.layer_a) == len(calibrate.ROWS) and all(t >= 0 for t in cal.overhead.values())

    def no_measuring(*a, **k):
        raise AssertionError("a cached calibration must be read, not measured again")

    monkeypatch.setattr(calibrate, "calibrate", no_measuring)
    again = calibrate.load_or_calibrate(bb, progress=False)
    assert again.to_json() == cal.to_json()
    # another model shape has its own key and file
    other = wrap_model(tiny_model("qwen2", layers=4))
    assert calibrate.cached_calibration(other) is None


def test_stale_or_foreign_calibration_is_refused(cache_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "split_half_drift", lambda series: 0.0)  # a busy CI machine caches nothing
    model = tiny_model("llama", layers=2)
    calibrate.load_or_calibrate(wrap_model(model), progress=False)
    bb = wrap_model(model)  # a newly loaded model reads the file
    path = store.key_path("calibration", calibrate.calibration_key(bb))
    data = json.loads(path.read_text())
    data["key"]["torch"] = "1.0.0"  # made under another torch: must not be used
    path.write_text(json.dumps(data))
    assert calibrate.cached_calibration(bb) is None
    path.write_text("{not json")
    assert calibrate.cached_calibration(bb) is None
    # a new measurement replaces it
    fresh = calibrate.load_or_calibrate(bb, progress=False)
    assert json.loads(path.read_text())["key"] == fresh.key == calibrate.calibration_key(bb)
    # the key names the machine and the threads: timings from elsewhere never apply here
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert calibrate.cached_calibration(bb) is None


def test_predictions_use_the_calibration_when_asked(cache_dir):
    bb = wrap_model(tiny_model("qwen2", layers=4))
    cfg = GenerationConfig(max_new_tokens=20, speech_policy="spar-k:even:2", interleave=Interleave(0, 1))
    mem = generate(bb, PROMPT, GenerationConfig(**{**cfg.__dict__, "calibrate": False})).stats
    assert mem["cost_model"] == "memory-bound" and mem["predicted_speedup_calibrated"] is None
    cal = generate(bb, PROMPT, GenerationConfig(**{**cfg.__dict__, "calibrate": True})).stats
    assert cal["cost_model"] == "calibrated"
    # even at 2 of 4 layers runs 3/4 of the layers, and no step kind is cheaper than its layers:
    # the prediction can never beat 4/3 (and a sane one is not below half)
    assert 0.5 < cal["predicted_speedup"] == cal["predicted_speedup_calibrated"] <= 4 / 3
    assert cal["predicted_speedup_memory_bound"] == pytest.approx(mem["predicted_speedup"])
    batch = generate_batch(bb, [PROMPT, PROMPT[:2]], GenerationConfig(**{**cfg.__dict__, "calibrate": True}))
    assert 0.5 < batch[0].stats["batch_predicted_speedup_calibrated"] <= 4 / 3


def test_calibrated_time_adds_up_the_passes():
    cal = cost.Calibration(
        key={},
        rows=[1, 2, 4],
        layer_a=[1.0, 1.5, 2.5],
        layer_c=[0.01, 0.02, 0.04],
        mat_sizes=[100, 1000],
        mat_rows=[1, 2],
        mat_s=[[0.1, 0.15], [1.0, 1.2]],
        overhead={"full": 0.5, "early": 0.25},
    )
    m = cost.CostMeter([10, 10], [4, 4], 8, 10, 100)
    m.layer(0, 1, 100)  # 1.0 + 0.01 * 100
    m.layer(1, 3, 10)  # rows 3: halfway between 2 and 4 -> 2.0 + 0.03 * 10
    m.matrix(1000, 2, "proj")  # 1.2
    m.matrix(550, 1, "head")  # halfway in size -> 0.55
    m.step("full")
    m.step("early")
    assert cal.time(m) == pytest.approx(2.0 + 2.3 + 1.2 + 0.55 + 0.75)
    assert cal.layer_time(8, 0) == pytest.approx(4.5)  # extended linearly beyond the last point


def test_batch_meter_counts_a_steps_fixed_work_once_per_batch_step():
    """A step's fixed work is shared by the rows of a batch: the batch meter (and the all-full
    baseline of `batch_predicted_speedup`) count it once per step, not once per row."""
    from sparkee.generate import BatchGeneration
    from sparkee.heads import ExitHeads

    bb = wrap_model(tiny_model("qwen2", layers=4))
    cfg = GenerationConfig(max_new_tokens=9, speech_policy="spar-k:even:2", interleave=Interleave(0, 1))
    gen = BatchGeneration(bb, ExitHeads(bb, "logit-lens"), [PROMPT] * 3, cfg)
    res = gen.results()
    steps = gen._run.batch_meter.steps
    # 8 decode steps in lock-step (the first token comes from prefill): 4 early, 4 full
    assert steps["early"] == 4 and steps["full"] == 4
    per_row = res[0].meter.steps
    assert per_row["early"] == 4 and per_row["full"] == 4
    # a row's checks are its own work: 4 refreshes x 1 pending early token x 3 rows
    assert steps["check"] == 12
    # the baseline charges the same fixed work per step: with passes free and only fixed work
    # priced, the batch prediction is the per-step ratio whatever the batch size
    cal = cost.Calibration(
        key={}, rows=[1, 64], layer_a=[0.0, 0.0], layer_c=[0.0, 0.0], mat_sizes=[1, 10**9],
        mat_rows=[1, 64], mat_s=[[0.0, 0.0], [0.0, 0.0]], overhead={"full": 1.0, "early": 0.5, "check": 0.0},
    )  # fmt: skip
    stats = batch_stats(gen._run.batch_meter, gen._run.traces, 1.0, cal)
    assert stats["batch_predicted_speedup_calibrated"] == pytest.approx(8 / (4 + 2))


@pytest.mark.parametrize(
    "choice",
    [
        ("packed",) * 4,
        ("plain", "rowwise", "rowwise", "rowwise"),
        ("packed", "rowwise", "packed", "plain"),
        ("plain", "left", "left", "left"),
        ("left", "rowwise", "left", "packed"),
        # entry i is for i + 1 rows; kind@R pads with zero rows up to R (one row to 4, 3 to 4, 5 to 8)
        ("left@4", "rowwise", "packed@4", "plain", "left@8", "plain@8", "packed@8", "left"),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fast_linear_matches_the_module(choice, bias):
    if any(c.startswith("packed") for c in choice) and not kernels.packed_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=bias)
    fast = FastLinear(lin.weight, lin.bias, choice)
    with torch.inference_mode():
        for rows in (1, 2, 3, 5, 7, 9):
            x = torch.randn(1, rows, 48)
            y = fast(x)
            torch.testing.assert_close(y, lin(x), atol=1e-5, rtol=1e-5)
            # row-major like nn.Linear's: a transposed result slows every later op of the layer
            assert y.shape == (1, rows, 40) and y.is_contiguous()
    # training goes through the plain product (autograd)
    x = torch.randn(2, 48, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None


def _force(bb, choice):
    groups = kernels._linear_groups(bb)
    for mods in groups.values():
        for parent, name, child in mods:
            setattr(parent, name, FastLinear(child.weight, child.bias, choice))
    bb.refresh_modules()
    bb.set_kernel_choice({"forced": list(choice)})


@pytest.mark.parametrize(
    "choice", [("packed",) * 4, ("plain", "rowwise", "rowwise", "rowwise"), ("plain", "left", "left", "left")]
)
def test_every_fast_path_gives_the_plain_paths_tokens(choice):
    if "packed" in choice and not kernels.packed_available():
        pytest.skip("this torch build has no oneDNN")
    model = tiny_model("qwen2", layers=5)
    plain = wrap_model(model)
    fast = wrap_model(copy.deepcopy(model))
    _force(fast, choice)
    assert fast.fingerprint() == plain.fingerprint()  # same weights, other kernels
    for pol, verify in (
        ("full", False),
        ("spar-k:triple:2", False),
        ("spar-k:FEEE:1", True),
        ("fixed:3", False),
    ):
        cfg = GenerationConfig(
            max_new_tokens=24, speech_policy=pol, interleave=Interleave(1, 5), verify=verify
        )
        a, b = generate(plain, PROMPT, cfg), generate(fast, PROMPT, cfg)
        assert a.tokens == b.tokens and a.exit_layers == b.exit_layers


def test_kernel_choice_is_measured_once_and_cached(cache_dir, monkeypatch):
    model = tiny_model("llama", layers=3)
    bb = wrap_model(copy.deepcopy(model))
    choice = kernels.optimize(bb, progress=False)
    assert choice and all(len(v) == len(kernels.MEASURED_ROWS) for v in choice.values())
    for labels in choice.values():
        for n, label in enumerate(labels):
            kind, to = kernels.parse_label(label)
            assert kind in kernels.KERNELS and (to == 0 or to > kernels.MEASURED_ROWS[n])
    assert len(list((cache_dir / "kernels").glob("*.json"))) == 1

    def no_measuring(*a, **k):
        raise AssertionError("the cached choice must be reused")

    monkeypatch.setattr(kernels, "measure_shape", no_measuring)
    again = wrap_model(copy.deepcopy(model))
    assert kernels.optimize(again, progress=False) == choice
    # and the optimized model decodes what the plain one does
    cfg = GenerationConfig(max_new_tokens=16, speech_policy="spar-k:even:2", interleave=Interleave(0, 1))
    assert generate(again, PROMPT, cfg).tokens == generate(wrap_model(model), PROMPT, cfg).tokens


@pytest.mark.parametrize(
    "damage", [lambda c: "left@x", lambda c: "lft", lambda c: 3, lambda c: "left@1", lambda c: None]
)
def test_a_damaged_kernel_cache_is_measured_again_not_trusted(cache_dir, capsys, damage):
    model = tiny_model("llama", layers=2)
    choice = kernels.optimize(wrap_model(copy.deepcopy(model)), progress=False)
    (path,) = (cache_dir / "kernels").glob("*.json")
    data = json.loads(path.read_text())
    gkey = next(iter(data["choice"]))
    if damage(None) is None:
        del data["choice"][gkey]  # a group missing
    else:
        data["choice"][gkey][0] = damage(None)
    path.write_text(json.dumps(data))
    again = kernels.optimize(wrap_model(copy.deepcopy(model)), progress=True)
    assert "measuring again" in capsys.readouterr().err
    assert set(again) == set(choice)
    fixed = json.loads(path.read_text())["choice"]  # rewritten with a choice that reads
    assert kernels._cached_choice({"choice": fixed}, {k: None for k in fixed}) is not None


def test_overhead_fit_is_nonnegative_least_squares():
    # exact data is recovered
    rows = [
        (16 * 2e-3 + 0 * 5e-4, 16.0, 0.0),
        (16 * 2e-3 + 8 * 5e-4, 16.0, 8.0),
        (16 * 2e-3 + 12 * 5e-4, 16.0, 12.0),
    ]
    x, y = calibrate._nnls2(rows)
    assert x == pytest.approx(2e-3) and y == pytest.approx(5e-4)
    # a negative unconstrained optimum lands on the boundary, never below zero, and no
    # non-negative pair on a grid fits better
    rows = [(0.03, 16.0, 0.0), (0.01, 16.0, 8.0), (0.0, 16.0, 12.0)]
    x, y = calibrate._nnls2(rows)
    assert x >= 0 and y == 0.0
    sse = lambda a, b: sum((r - a * u - b * v) ** 2 for r, u, v in rows)  # noqa: E731
    grid = [i * 1e-4 for i in range(40)]
    assert sse(x, y) <= min(sse(a, b) for a in grid for b in grid) + 1e-15
    # the step kinds share one figure; checks have their own
    cal = cost.Calibration(
        key={}, rows=[1, 2], layer_a=[0.0, 0.0], layer_c=[0.0, 0.0], mat_sizes=[1, 2], mat_rows=[1],
        mat_s=[[0.0], [0.0]], overhead={},
    )  # fmt: skip

    def gen(full, early, check):
        m = cost.CostMeter([1], [1], 1, 1, 1)
        m.step("full", full)
        m.step("early", early)
        m.step("check", check)
        return [(2e-3 * (full + early) + 5e-4 * check, m)]

    fit = calibrate._fit_overhead(cal, {"full": gen(16, 0, 0), "even": gen(8, 8, 8), "feee": gen(4, 12, 12)})
    assert fit["full"] == fit["early"] == fit["fallback"] == pytest.approx(2e-3)
    assert fit["check"] == pytest.approx(5e-4)


def test_split_half_drift_flags_a_machine_that_changed_speed(cache_dir, monkeypatch, capsys):
    steady = [[1.0, 1.02, 0.99, 1.01, 1.0, 0.98, 1.01, 1.0]]
    assert calibrate.split_half_drift(steady) < 0.05
    # the second half of the rounds ran 40% slower on one point: that is what is reported
    busy = [*steady, [1.0, 1.0, 1.01, 0.99, 1.4, 1.41, 1.39, 1.4]]
    assert calibrate.split_half_drift(busy) == pytest.approx(0.4, abs=0.02)
    assert calibrate.split_half_drift([[1.0, 2.0]]) == 0.0  # too short to say
    # calibrate judges the rounds' totals: two points whose single calls jitter by 30% in
    # opposite halves are a steady machine; every point 30% slower in the second half is not
    jitter = [[1.0, 1.0, 1.0, 1.3, 1.3, 1.3], [1.3, 1.3, 1.3, 1.0, 1.0, 1.0]]
    assert calibrate.split_half_drift(jitter) == pytest.approx(0.3)
    assert calibrate.split_half_drift([calibrate.round_totals(jitter)]) == 0.0
    slowed = [[1.0, 1.0, 1.0, 1.3, 1.3, 1.3], [2.0, 2.0, 2.0, 2.6, 2.6, 2.6]]
    assert calibrate.split_half_drift([calibrate.round_totals(slowed)]) == pytest.approx(0.3)
    # a calibration that drifted is measured once more; drifting again, it is used, said once on
    # stderr and never cached
    bb = wrap_model(tiny_model("qwen2", layers=2))
    drifts = iter([0.4, 0.3])
    monkeypatch.setattr(calibrate, "split_half_drift", lambda series: next(drifts))
    cal = calibrate.load_or_calibrate(bb, progress=True)
    assert cal.drift == 0.3  # the steadier of the two
    err = capsys.readouterr().err
    assert "moved by 30% while calibrating, twice" in err and "not cached" in err
    assert calibrate.cached_calibration(bb) is None
    assert not store.key_path("calibration", cal.key).exists()
    # steady the second time: that one is cached, with its drift in the file
    bb = wrap_model(tiny_model("qwen2", layers=2))
    drifts = iter([0.4, 0.1])
    cal = calibrate.load_or_calibrate(bb, progress=True)
    assert cal.drift == 0.1 and "moved by" not in capsys.readouterr().err
    data = json.loads(store.key_path("calibration", cal.key).read_text())
    assert data["drift"] == 0.1
    # a file from before this field still loads (drift unknown: 0)
    del data["drift"]
    assert cost.Calibration.from_json(data).drift == 0.0
    # an unsteady calibration cached before such files stopped being written is refused (rebuilt)
    path = store.key_path("calibration", cal.key)
    path.write_text(json.dumps({**data, "drift": 0.4}))
    assert calibrate.cached_calibration(wrap_model(tiny_model("qwen2", layers=2))) is None
    path.write_text(json.dumps({**data, "drift": 0.1}))
    assert calibrate.cached_calibration(wrap_model(tiny_model("qwen2", layers=2))).drift == 0.1


def test_a_kernel_must_win_in_both_halves_of_its_timing():
    """Round-robin timing, split in halves: a kernel replaces the plain product only when it is
    10% faster in each half; a win that one half contradicts (a load change) is noise."""
    n = len(kernels.MEASURED_ROWS)
    assert tuple(range(1, n + 1)) == kernels.MEASURED_ROWS
    rising = {"plain": [(10.0 * r, 10.0 * r) for r in kernels.MEASURED_ROWS]}  # 1 row: 10, r rows: 10r
    clear = dict(rising, packed=[(5.0, 5.0), (5.0, 5.0), (12.0, 12.0), *[(500.0, 500.0)] * (n - 3)])
    assert kernels.choose_kernels(clear)[:3] == ("packed", "packed", "packed")
    noisy = dict(rising, packed=[(5.0, 12.0), (18.5, 18.5), (25.0, 25.0), *[(500.0, 500.0)] * (n - 3)])
    assert kernels.choose_kernels(noisy)[:3] == ("plain", "plain", "packed")
    # rowwise runs r 1-row products of the best 1-row choice: it wins where that is cheaper
    rowwise = {"plain": [(10.0, 10.0), (30.0, 30.0), *[(1000.0, 1000.0)] * (n - 2)]}
    assert kernels.choose_kernels(rowwise)[:3] == ("plain", "rowwise", "rowwise")
    # measured rowwise times (the same weight r times, warm in cache) win over the estimate
    warm = dict(rowwise, rowwise=[(math.inf, math.inf), (15.0, 15.0), *[(25.0, 25.0)] * (n - 2)])
    assert kernels.choose_kernels(warm)[:3] == ("plain", "rowwise", "rowwise")


def test_a_row_count_runs_padded_to_a_cheaper_one_when_measured_faster():
    """Some BLAS paths run 4 rows faster than 3: then 3 rows run as 4 (one zero row), the padding's
    measured cost included; a padded option must win by the same 10% in both halves."""
    n = len(kernels.MEASURED_ROWS)
    times = {1: 10.0, 2: 12.0, 3: 20.0, 4: 13.0, 5: 30.0, 6: 30.0, 7: 30.0, 8: 30.0}
    halves = {
        "plain": [(20.0 * r, 20.0 * r) for r in range(1, n + 1)],
        "left": [(t, t) for t in times.values()],
    }
    free = [(0.0, 0.0)] * n
    assert kernels.choose_kernels(halves, free)[:4] == ("left", "left", "left@4", "left")
    # a padding that costs what it saves is not worth it (13 + 6 is not 10% under 20)
    assert kernels.choose_kernels(halves, [(6.0, 6.0)] * n)[2] == "left"
    # nor one that only one half of the timing supports
    split = dict(halves, left=[(t, t) if r != 4 else (13.0, 19.0) for r, t in times.items()])
    assert kernels.choose_kernels(split, free)[2] == "left"
    # labels round-trip, and nonsense is refused
    assert kernels.parse_label("left@4") == ("left", 4) and kernels.parse_label("plain") == ("plain", 0)
    for bad in ("rowwise@4", "left@1", "left@x", "fast"):
        with pytest.raises(ValueError, match="not a kernel choice"):
            kernels.parse_label(bad)


def test_schedule_predictions_are_what_a_run_of_the_schedule_reports():
    """`sparkee calibrate`'s table prices the passes the engine runs (no second simulator): each
    prediction equals the calibrated speed-up a run of that schedule reports for itself."""
    from sparkee.engine import Engine

    bb = wrap_model(tiny_model("qwen2", layers=4))
    cal = cost.Calibration(
        key={}, rows=[1, 2, 64], layer_a=[1e-4, 1.5e-4, 2e-3], layer_c=[1e-7, 1e-7, 1e-6], mat_sizes=[1, 10**9],
        mat_rows=[1, 8], mat_s=[[1e-6, 2e-6], [1e-1, 2e-1]], overhead={"full": 1e-4, "early": 1e-4, "check": 1e-5},
    )  # fmt: skip
    pred = calibrate.predict_schedules(bb, cal, new_tokens=20, context=30)
    assert set(pred) == {
        f"{p}:{L}" for L in (2, 3) for p in ("spar-k:even", "spar-k:triple", "spar-k:FEEE", "fixed")
    }
    prompt = torch.randint(0, bb.vocab_size, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    for spec, x in pred.items():
        cfg = GenerationConfig(
            max_new_tokens=20, speech_policy=spec, interleave=Interleave(0, 1), calibrate=True
        )
        eng = Engine(bb, None, cfg, calibration=cal)
        row = eng.add(prompt)
        while eng.active():
            eng.step()
        assert eng.result(row).stats.predicted_speedup_calibrated == pytest.approx(x, rel=1e-12), spec
    assert pred["fixed:2"] > pred["spar-k:FEEE:2"] > pred["spar-k:even:2"] > 1  # fewer deep passes, faster


def test_the_meters_are_a_replay_of_the_engines_pass_records():
    """Every cost the engine counts goes through one record per pass: replaying the records of a
    batched verified run into fresh meters gives the same row and batch meters."""
    from sparkee.engine import Engine

    bb = wrap_model(tiny_model("qwen2", layers=4))
    cfg = GenerationConfig(
        max_new_tokens=12, speech_policy="spar-k:FEE:2", interleave=Interleave(1, 2), verify=True
    )
    eng = Engine(bb, None, cfg, max_batch_size=3, calibration=None)
    rows = [eng.add(p) for p in ([3, 5, 7], [2, 4], [9, 8, 7, 6])]
    eng.reset_batch_meter()  # the row meters count decode only (add resets them): so does this
    eng._run.costs.log = log = []
    while eng.active():
        eng.step()
    assert {p.kind for p in log} == {"layers", "proj", "head", "step"}
    again = cost.Meters(bb, 3)
    for p in log:
        again.record(p)
    for mine, theirs in [(again.batch, eng._run.batch_meter)] + [
        (again.rows[b], eng._run.meters[b]) for b in rows
    ]:
        _same_meter(mine, theirs)
    assert sum(eng.result(b).stats.verify_rejections for b in rows) > 0  # rollbacks were replayed too


def _same_meter(mine: cost.CostMeter, theirs: cost.CostMeter) -> None:
    assert (mine.macs, mine.reads, mine.passes) == (theirs.macs, theirs.reads, theirs.passes)
    assert (mine.layer_rows, mine.layer_ctx, mine.mats, mine.steps) == (
        theirs.layer_rows, theirs.layer_ctx, theirs.mats, theirs.steps,
    )  # fmt: skip


def test_the_full_depth_baselines_are_the_meters_of_a_full_depth_run():
    """The baselines of the predicted speed-ups (a row alone, the batch) replay the passes plain
    full-depth decoding runs: they equal the meters of a real full-depth run of the same tokens."""
    from sparkee.engine import Engine

    bb = wrap_model(tiny_model("qwen2", layers=4))
    prompts = ([3, 5, 7], [2, 4], [9, 8, 7, 6, 5])
    cfg = GenerationConfig(max_new_tokens=10, interleave=Interleave(1, 2), stop_ids=[])
    eng = Engine(bb, None, cfg, max_batch_size=3, calibration=None)
    # rows of different lengths: the batch baseline drops a row once it has finished
    rows = [eng.add(p, replace(cfg, max_new_tokens=n)) for p, n in zip(prompts, (10, 4, 7), strict=True)]
    eng.reset_batch_meter()
    while eng.active():
        eng.step()
    traces = [eng._run.traces[b] for b in rows]
    proj = bb.hidden_size * bb.vocab_size
    for b, tr in zip(rows, traces, strict=True):
        base = cost.baseline_meter(eng._run.meters[b], tr.records, tr.prompt_len, [proj] * len(tr.records))
        _same_meter(base, eng._run.meters[b])
    lengths = [len(t.records) for t in traces]
    assert lengths == [10, 4, 7]
    base = cost.batch_baseline_meter(eng._run.batch_meter, [t.prompt_len for t in traces], lengths)
    _same_meter(base, eng._run.batch_meter)


def test_a_capped_instruction_set_is_another_machine(monkeypatch):
    """Capping a library's instruction set (ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU, to measure
    an AVX2 machine's kernels) runs other kernels: its calibrations and kernel choices are cached
    apart, never mixed with the uncapped ones."""
    import torch

    bb = wrap_model(tiny_model("qwen2", layers=2))
    plain = calibrate.calibration_key(bb)
    assert torch.backends.cpu.get_cpu_capability() in store.machine_id()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = calibrate.calibration_key(bb)
    assert capped["machine"].endswith("ONEDNN_MAX_CPU_ISA=AVX2") and capped != plain
    assert store.key_path("calibration", capped) != store.key_path("calibration", plain)


def test_a_new_kernels_version_gives_calibrations_a_new_key():
    bb = wrap_model(tiny_model("qwen2", layers=2))
    choice = {"(64, 64, False)": ["plain", "left", "left", "plain"]}
    bb.set_kernel_choice(choice, 3)
    before = calibrate.calibration_key(bb)
    bb.set_kernel_choice(choice, kernels.KERNELS_VERSION)
    assert calibrate.calibration_key(bb)["kernels"] != before["kernels"]
    bb.set_kernel_choice({}, kernels.KERNELS_VERSION)
    assert calibrate.calibration_key(bb)["kernels"] == "plain"
