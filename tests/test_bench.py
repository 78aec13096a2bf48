"""The benchmark harness and the activations suite, in quick mode on tiny sizes (CPU)."""

import json
import math

import numpy as np
import pytest

from gpunn.bench import activations, harness
from gpunn.bench.harness import Contender, Record

QUICK = dict(quick=True, sizes=[1024], softmax_cols=[256], softmax_total=1024,
             ops=["sigmoid", "relu", "softmax"], progress=False)


def _wrong(case):
    """A contender that returns x itself for sigmoid forward (any device)."""
    if case.spec.name != "sigmoid" or case.direction != "forward" or case.inputs[0] is None:
        return None
    bad = case.inputs[0].copy()
    return Contender("wrong", "baseline", lambda: (lambda: bad),
                     clock="cpu" if case.device == "cpu" else "cupy")


def _broken(case):
    """A contender whose set-up raises, for relu backward."""
    if case.spec.name != "relu" or case.direction != "backward":
        return None

    def make():
        raise RuntimeError("deliberately broken")

    return Contender("broken", "baseline", make)


@pytest.fixture(scope="module")
def records():
    return activations.run(activations.Options(**QUICK), extra_contenders=[_wrong, _broken])


def test_sizes_parse_and_format():
    assert harness.parse_size("1K") == 1024
    assert harness.parse_size("16M") == 16 << 20
    assert harness.parse_size(" 1000 ") == 1000
    for bad in ("", "1.5M", "-3", "0", "M", "12Q"):
        with pytest.raises(ValueError):
            harness.parse_size(bad)
    assert harness.format_size(16 << 20) == "16M"
    assert harness.format_size(1000) == "1000"
    assert harness.format_shape((4, 256)) == "4x256"


def test_policy_reps():
    p = harness.Policy(target_s=0.25, min_reps=5, max_reps=200, warmup=1, slow_s=0.5)
    assert p.reps(1e-6) == 200
    assert p.reps(0.01) == 25
    assert p.reps(0.2) == 5
    assert p.reps(0.6) == 3  # slow: at most 3, and what fits in max_time_s
    assert p.reps(0.9) == 2
    assert p.reps(5.0) == 1
    assert harness.QUICK_POLICY.reps(1e-9) == 3


class FakeClock:
    """A host clock that only moves when a timed call says so: timing tests never depend on
    the machine's speed."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def call_taking(self, seconds: float, calls: list):
        def fn():
            calls.append(1)
            self.now += seconds
        return fn


def test_slow_calls_keep_their_warm_up_as_a_sample():
    policy = harness.Policy(slow_s=0.01, max_time_s=0.025)
    clock, calls = FakeClock(), []
    t = harness.time_cpu(clock.call_taking(2**-6, calls), policy, clock=clock)  # 15.6 ms
    assert t.reps == 1 and len(calls) == 1  # the warm-up is the one sample that fits
    clock, calls = FakeClock(), []
    policy = harness.Policy(slow_s=0.01, max_time_s=0.04)
    t = harness.time_cpu(clock.call_taking(2**-6, calls), policy, clock=clock)
    assert t.reps == 2 and len(calls) == 2  # the warm-up counts, then one more
    assert t.min == t.median == 2**-6


def test_fast_calls_get_the_target_time_of_repetitions():
    policy = harness.Policy(target_s=0.25, min_reps=5, max_reps=200, warmup=2, slow_s=0.5)
    clock, calls = FakeClock(), []
    t = harness.time_cpu(clock.call_taking(2**-7, calls), policy, clock=clock)  # exact sums
    assert t.reps == 32 and len(calls) == 2 + 32  # two warm-ups, not counted
    assert t.median == t.min == 2**-7


def test_time_cpu_and_timing_stats():
    calls = []
    t = harness.time_cpu(lambda: calls.append(1), harness.QUICK_POLICY)
    assert t.reps == 3 and len(calls) == 1 + 3  # one warm-up, three timed
    assert 0 <= t.min <= t.q1 <= t.median <= t.q3 and t.iqr >= 0
    s = harness.Timing.of([3.0, 1.0, 2.0, 4.0])
    assert s.median == 2.5 and s.min == 1.0 and s.reps == 4


def test_rel_err():
    a = np.arange(1, 5000, dtype=np.float32)
    assert harness.rel_err(a, a) == 0
    assert math.isclose(harness.rel_err(2 * a, a, chunk=100), 1.0, rel_tol=1e-12)
    b = a.copy()
    b[7] = np.nan
    assert not harness.passes(harness.rel_err(b, a), 1e-3)
    assert not harness.passes(None, 1e-3)


def test_records_well_formed(records):
    groups = {}
    for r in records:
        assert isinstance(r, Record)
        assert r.suite == "activations" and r.device == "cpu" and r.dtype == "float32"
        assert r.role in harness.ROLES
        groups.setdefault(r.key(), []).append(r)
    # 3 ops x 2 directions
    assert len(groups) == 6
    cases = {(k[2], k[3]) for k in groups}
    assert cases == {(op, d) for op in ("sigmoid", "relu", "softmax")
                     for d in ("forward", "backward")}
    for key, group in groups.items():
        by_impl = {r.impl: r for r in group}
        assert {"gpunn cpu", "numpy", "torch", "limit"} <= set(by_impl), key
        for name in ("gpunn cpu", "numpy", "torch", "limit"):
            r = by_impl[name]
            assert r.status == "ok", (key, name, r.note)
            assert r.median_s > 0 and r.min_s <= r.median_s and r.reps == 3
            assert r.gbps == pytest.approx(r.bytes / r.median_s / 1e9)
            assert r.frac_of_limit == pytest.approx(r.gbps / by_impl["limit"].gbps)
            if name != "limit":
                assert r.error is not None and r.error < 1e-3
                assert r.speedup_vs_torch == pytest.approx(
                    by_impl["torch"].median_s / r.median_s)
        n = math.prod(group[0].shape)
        assert group[0].bytes == (2 if key[3] == "forward" else 3) * n * 4
    assert {tuple(k[4]) for k in groups} == {(1024,), (4, 256)}


def test_wrong_contender_is_flagged(records):
    wrong = [r for r in records if r.impl == "wrong"]
    assert len(wrong) == 1
    assert wrong[0].status == "wrong" and wrong[0].error > 0.1
    assert wrong[0].median_s is not None  # flagged, and still timed
    broken = [r for r in records if r.impl == "broken"]
    assert len(broken) == 1 and broken[0].status == "error"
    assert "deliberately broken" in broken[0].note


def test_torch_out_overloads_exist():
    """Each torch contender writes into a preallocated output (no fallback note)."""
    torch = pytest.importorskip("torch")
    for spec in activations.OPS.values():
        for direction in activations.DIRECTIONS:
            _, note = activations._torch_call(spec, direction, torch.float32)
            assert note == "", (spec.name, direction, note)


def test_json_written(records, tmp_path):
    path = harness.write_json(records, "activations", "cpu", tmp_path, options={"quick": True})
    assert path.parent == tmp_path and path.name.startswith("activations-cpu-")
    assert path.suffix == ".json"
    data = json.loads(path.read_text())
    for key in ("suite", "device", "created_utc", "git_commit", "machine", "versions",
                "options", "records"):
        assert key in data
    assert data["suite"] == "activations" and data["device"] == "cpu"
    for key in ("platform", "cpu_model", "cpu_count"):
        assert data["machine"][key]
    for key in ("python", "numpy", "numba", "gpunn"):
        assert data["versions"][key]
    assert "torch" in data["versions"] and "cupy" in data["versions"]
    assert len(data["records"]) == len(records)
    for rec in data["records"]:
        for key in ("op", "direction", "size", "shape", "dtype", "impl", "median_s", "gbps",
                    "frac_of_limit", "speedup_vs_torch", "status", "bytes", "iqr_s"):
            assert key in rec
    # a second write in the same second gets its own file
    again = harness.write_json(records, "activations", "cpu", tmp_path)
    assert again != path and again.exists() and path.exists()


def test_default_results_dir():
    """./gpunn-bench-results/ (never the package's own folder); bench/results/ of the checkout
    only when asked (checkout_results_dir, ``--repo-results``)."""
    from pathlib import Path

    assert harness.default_results_dir() == Path.cwd() / "gpunn-bench-results"
    root = harness.checkout_root()
    if root is None:
        assert harness.checkout_results_dir() is None
    else:
        assert (root / "gpunn" / "bench" / "harness" / "__init__.py").is_file()
        assert harness.checkout_results_dir() == root / "bench" / "results"


def test_table_flags(records):
    from rich.console import Console

    console = Console(record=True, width=160)
    harness.print_table(records, title="t", console=console)
    text = console.export_text()
    for word in ("sigmoid", "softmax", "gpunn cpu", "torch", "limit", "WRONG", "ERROR",
                 "deliberately broken", "4x256"):
        assert word in text


def _case(i: int) -> dict:
    return dict(suite="t", device="cpu", op=f"op{i}", direction="forward", shape=[8],
                dtype="float32", bytes=64)


def test_time_budget_stops_new_cases_and_cuts_the_last_one_short():
    """With an injected clock: cases of two contenders, each call 0.1 s (1.4 s a case at
    CPU_POLICY: a checking call, a warm-up and five timed calls each); budget 3 s. The third
    case starts before the deadline (at 2.8 s) and its rounds stop at it once each contender
    has one timed call; the rest are skipped."""
    clock, calls = FakeClock(), []
    runner = harness.Runner(harness.Options(time_budget=3.0, progress=False), clock=clock)
    contenders = [Contender(name, "gpunn", lambda: clock.call_taking(0.1, calls), check=False)
                  for name in ("a", "b")]
    for i in range(6):
        runner.run_case(_case(i), contenders, None, harness.CPU_POLICY)
    ran = [r for r in runner.records if r.status == "ok"]
    skipped = [r for r in runner.records if r.status == "skipped"]
    assert [r.op for r in ran] == ["op0", "op0", "op1", "op1", "op2", "op2"]
    assert [r.op for r in skipped] == ["op3", "op4", "op5"]
    assert all("time budget" in r.note for r in skipped)
    assert [r.reps for r in ran] == [5, 5, 5, 5, 1, 1]
    assert all("the time budget ran out" in r.note for r in ran[4:])
    assert not any("budget" in r.note for r in ran[:4])
    assert clock.now == pytest.approx(3.4)  # 2 whole cases, then check, warm-up, one round


def test_time_budget_of_a_suite_with_an_injected_clock(monkeypatch):
    """The activations suite under a clock that advances 1 s at each reading: the budget
    (30 s of that clock) ends the run early whatever the machine's speed, and every case
    not started is recorded as skipped."""
    ticks = iter(range(10**9))
    monkeypatch.setattr(harness.timing, "default_clock", lambda: float(next(ticks)))
    opts = activations.Options(**{**QUICK, "ops": ["sigmoid", "relu", "tanh"]}, time_budget=30)
    recs = activations.run(opts)
    ran = {(r.op, r.direction) for r in recs if r.status != "skipped"}
    skipped = {(r.op, r.direction) for r in recs if r.status == "skipped"}
    assert ran and skipped and not ran & skipped
    assert len(ran | skipped) == 3 * 2 * 1  # every case is accounted for
    assert all("time budget" in r.note for r in recs if r.status == "skipped")


def test_spread_is_recorded_and_wide_ones_are_flagged():
    base = dict(_case(0), impl="x", role="gpunn")
    steady, noisy, limit = (Record(**base) for _ in range(3))
    noisy.impl, limit.impl, limit.role = "noisy", "limit", "limit"
    steady.set_timing(harness.Timing.of([1.0, 1.1, 1.05]))
    noisy.set_timing(harness.Timing.of([1.0, 2.0, 1.1]))
    limit.set_timing(harness.Timing.of([4.0, 4.1, 4.2]))
    harness.finalize([steady, noisy, limit])
    assert steady.max_s == 1.1 and steady.spread == pytest.approx(0.1 / 1.05)
    assert "spread 91% of the median (min 1000 ms, max 2000 ms)" in noisy.distrust
    assert "of the limit" in steady.distrust  # 4x faster than the limit: the limit was off
    assert limit.distrust == ""
    assert steady.to_dict()["spread"] == steady.spread and "max_s" in steady.to_dict()
    from rich.console import Console

    console = Console(record=True, width=200)
    harness.print_table([steady, noisy, limit], console=console)
    text = console.export_text()
    assert "1050.000!" in text and "1000.000-1100.000" in text
    assert "warning: 2 timing(s) marked ! are not to be trusted" in text


def test_time_budget_skips_cases():
    opts = activations.Options(**{**QUICK, "ops": ["relu"]}, time_budget=1e-9)
    recs = activations.run(opts)
    assert recs and all(r.status == "skipped" for r in recs)
    assert all("time budget" in r.note for r in recs)


def test_gpu_request_without_gpu_raises():
    from gpunn import backend

    if backend.cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="--device cuda"):
        activations.run(activations.Options(**{**QUICK, "device": "cuda"}))


@pytest.mark.gpu
def test_suite_on_the_gpu_quick():
    """Every GPU contender runs and agrees with the reference, float32 and bfloat16."""
    opts = activations.Options(device="cuda", quick=True, sizes=[(1 << 16) + 3],
                               softmax_cols=[256, 4096], softmax_total=1 << 16,
                               dtypes=["float32", "bfloat16"], progress=False)
    recs = activations.run(opts, extra_contenders=[_wrong])
    assert recs and all(r.device == "cuda" for r in recs)
    problems = [(r.op, r.direction, r.dtype, r.impl, r.status, r.note) for r in recs
                if r.status != "ok" and r.impl != "wrong"]
    assert not problems, problems
    groups = {}
    for r in recs:
        groups.setdefault(r.key(), {})[r.impl] = r
    assert len(groups) == 2 * (8 * 2 + 2 * 2 * 2)  # dtypes x (8 elementwise x 2 dirs + softmax)
    for key, by_impl in groups.items():
        expected = {"gpunn cuda", "torch cuda", "copy limit"}
        if key[5] == "float32":
            expected.add("cupy unfused")
        assert expected <= set(by_impl), key
        for name in expected:
            assert by_impl[name].median_s > 0 and by_impl[name].gbps > 0
        assert by_impl["gpunn cuda"].speedup_vs_torch > 0
        assert by_impl["gpunn cuda"].frac_of_limit > 0
    wrong = [r for r in recs if r.impl == "wrong"]
    assert wrong and all(r.status == "wrong" for r in wrong)


def test_time_cpu_interleaved_rounds_and_errors():
    order = []

    def boom():
        order.append("b")
        if len([o for o in order if o == "b"]) > 2:
            raise ValueError("third call fails")

    fns = [lambda: order.append("x"), boom, lambda: order.append("z")]
    out = harness.time_cpu_interleaved(fns, harness.QUICK_POLICY)
    assert isinstance(out[0], harness.Timing) and out[0].reps == 3
    assert isinstance(out[1], ValueError)
    assert isinstance(out[2], harness.Timing) and out[2].reps == 3
    # warm-ups (x b z), then rounds: x b z / x b(fails) z / x z
    assert order == ["x", "b", "z", "x", "b", "z", "x", "b", "z", "x", "z"]


def test_optim_overhead_case():
    """The optimizer suite's overhead case (200 tensors of 8 elements): every contender checked
    against torch's step and timed, no limit; ``overhead=False`` leaves it out."""
    from gpunn.bench import optim

    recs = optim.run(optim.Options(quick=True, sizes=[1024], algorithms=["adam"],
                                   progress=False))
    overhead = {r.impl: r for r in recs if r.direction == "overhead"}
    assert {"gpunn cpu", "gpunn.optim cpu", "gpunn numpy", "torch foreach",
            "torch for-loop"} <= set(overhead)
    for name, r in overhead.items():
        assert r.op == "adam" and r.shape == [1600, 200] and r.role != "limit", name
        assert r.status == "ok" and r.error < 1e-3 and r.median_s > 0, (name, r.note)
    assert overhead["gpunn cpu"].speedup_vs_torch > 0
    assert {r.direction for r in recs} == {"step", "overhead"}
    recs = optim.run(optim.Options(quick=True, sizes=[1024], algorithms=["sgd"],
                                   overhead=False, progress=False))
    assert recs and {r.direction for r in recs} == {"step"}
