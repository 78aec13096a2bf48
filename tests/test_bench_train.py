"""The training-epoch benchmark suite (gpunn.bench.train), quick, on the tiny model."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gpunn.bench import harness  # noqa: E402
from gpunn.bench import train as bt  # noqa: E402

QUICK = dict(quick=True, models=["tiny"], progress=False, torch_threads=[1])
FIELDS = ("median_s", "min_s", "reps", "ratio_vs_torch", "speedup_vs_torch",
          "speedup_vs_numpy", "loss", "error", "target_ratio", "augment", "samples",
          "batch_size", "width", "depth", "steps", "threads")


@pytest.fixture(scope="module")
def records():
    return bt.run(bt.Options(**QUICK))


def _by_case(records):
    cases = {}
    for r in records:
        cases.setdefault(r.key(), {})[r.impl] = r
    return cases


def test_records_have_the_documented_fields(records):
    cases = _by_case(records)
    assert {(k[2], k[3]) for k in cases} == {("tiny", "augment"), ("tiny", "plain")}
    model = bt.MODELS["tiny"]
    for key, case in cases.items():
        assert set(case) == {"gpunn cpu", "gpunn numpy", "torch", "torch fused"}, key
        torch_runs = [case["torch"], case["torch fused"]]
        best = min(torch_runs, key=lambda r: r.median_s)
        assert best.role == "torch"
        assert case["gpunn cpu"].role == "gpunn"
        for name, r in case.items():
            d = r.to_dict()
            for field in FIELDS:
                assert field in d, (name, field)
            assert r.suite == "train" and r.device == "cpu" and r.status == "ok", (name, r.note)
            assert r.reps == 3 and 0 < r.min_s <= r.median_s
            assert r.ratio_vs_torch == pytest.approx(r.median_s / best.median_s)
            assert r.speedup_vs_torch == pytest.approx(1 / r.ratio_vs_torch)
            assert r.speedup_vs_numpy == pytest.approx(
                case["gpunn numpy"].median_s / r.median_s)
            assert r.gbps is None and r.target_ratio == 1.2
            assert r.augment == (key[3] == "augment")
            assert r.samples == model.samples and r.batch_size == model.batch_size
            assert r.steps == math.ceil(model.samples / model.batch_size)
            assert r.width == model.width and r.depth == model.depth
            # the check epoch: every contender's loss agrees with torch's
            assert r.error is not None and r.error <= bt.CHECK_RTOL
            assert r.loss == pytest.approx(case["torch"].loss, rel=bt.CHECK_RTOL)
        assert case["torch"].threads == 1


def test_gpunn_epoch_is_the_trainer_and_matches_torch_with_dropout_off():
    """The two sides train alike over two epochs (batch order, schedule, smoothing)."""
    model = bt.MODELS["tiny"]
    data = bt.dataset(model, seed=3)
    trainer = bt.gpunn_trainer(model, data, "cpu", augment=False, dropout=False, seed=3)
    mirror = bt.TorchEpoch(trainer)
    for _ in range(2):
        ours, theirs = trainer.train_epoch()["train_loss"], mirror()
        assert ours == pytest.approx(theirs, rel=1e-5)
    got = {k: np.asarray(v) for k, v in trainer.model.state_dict().items()}
    # a bias right before BatchNorm has no gradient but rounding noise, which Adam scales up
    # to full steps: it drifts apart freely (and with it the running mean of the BatchNorm
    # after it) and changes nothing downstream
    free = set()
    for i, layer in enumerate(trainer.model.layers[:-1]):
        if (type(layer).__name__ == "Linear"
                and type(trainer.model.layers[i + 1]).__name__ == "BatchNorm1d"):
            free |= {f"{i}.bias", f"{i + 1}.running_mean"}
    assert free == {"1.bias", "2.running_mean"}
    for k, v in mirror.model.state_dict().items():
        if k in free:
            continue
        assert harness.rel_err(got[k].astype(np.float64), v.numpy().astype(np.float64)) < 1e-4, k
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        mirror.optimizer.param_groups[0]["lr"], rel=1e-12)


def test_torch_warp_matches_gpunn_augment():
    model = bt.MODELS["tiny"]
    assert bt._warp_error(model, bt.dataset(model), "cpu", seed=0) < 1e-5


def test_a_different_torch_model_is_flagged_and_not_timed():
    def perturb(m):
        with torch.no_grad():
            m[-1].weight.mul_(1.5)  # (a first-layer scale would vanish in BatchNorm)

    records = bt.run(bt.Options(**QUICK, augment=["plain"]), torch_hook=perturb)
    by_impl = {r.impl: r for r in records}
    for name in ("gpunn cpu", "gpunn numpy"):
        r = by_impl[name]
        assert r.status == "wrong" and r.note.startswith("mismatch"), (name, r.note)
        assert r.error > bt.CHECK_RTOL and r.median_s is None
    for name in ("torch", "torch fused"):  # they agree with each other: not flagged, not timed
        assert by_impl[name].status == "skipped" and by_impl[name].median_s is None
        assert "mismatch" in by_impl[name].note


def test_json_written(records, tmp_path):
    path = harness.write_json(records, "train", "cpu", tmp_path, options=QUICK)
    assert path.name.startswith("train-cpu-") and path.suffix == ".json"
    payload = json.loads(path.read_text())
    assert payload["suite"] == "train" and len(payload["records"]) == len(records)
    r = next(d for d in payload["records"] if d["impl"] == "gpunn cpu")
    assert r["ratio_vs_torch"] > 0 and r["speedup_vs_numpy"] > 0 and r["loss"] > 0


def test_table_prints(records):
    from rich.console import Console

    console = Console(record=True, width=150)
    harness.print_table(records, console=console)
    text = console.export_text()
    for word in ("tiny", "augment", "plain", "gpunn cpu", "torch fused"):
        assert word in text


def test_options():
    import argparse

    parser = argparse.ArgumentParser()
    bt.add_arguments(parser)
    args = parser.parse_args(["--models", "tiny,digits", "--augment", "plain",
                              "--torch-threads", "1,2"])
    assert args.models == ["tiny", "digits"] and args.augment == ["plain"]
    assert args.torch_threads == [1, 2]
    for bad in (["--models", "resnet"], ["--torch-threads", "0"], ["--augment", "sometimes"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    names = [s.name for s in bt.cpu_sides([1, 2])]
    assert names == ["gpunn cpu", "gpunn numpy", "torch 1t", "torch fused 1t", "torch 2t",
                     "torch fused 2t"]
    assert bt.reference(bt.cpu_sides([1, 2])).name == "torch 1t"


def test_time_budget_skips_cases():
    records = bt.run(bt.Options(**QUICK, time_budget=1e-9))
    assert records and all(r.status == "skipped" for r in records)
    assert all(r.note == "time budget spent" for r in records)


@pytest.mark.gpu
def test_suite_on_the_gpu_quick():
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    records = bt.run(bt.Options(quick=True, models=["tiny"], progress=False, device="cuda"))
    cases = _by_case(records)
    assert {(k[1], k[2], k[3]) for k in cases} == {("cuda", "tiny", "augment"),
                                                    ("cuda", "tiny", "plain")}
    for key, case in cases.items():
        assert set(case) == {"gpunn cuda", "torch cuda", "torch cuda fused"}, key
        for name, r in case.items():
            assert r.status == "ok", (key, name, r.note)
            assert r.median_s > 0 and r.error <= bt.CHECK_RTOL
            assert r.target_ratio == 1.0 and r.ratio_vs_torch > 0
            assert r.speedup_vs_numpy is None
