"""The trainer and `gpunn train`: the default job's accuracy, resume = uninterrupted run,
checkpoints of another architecture, ensembles, the lr range test, the CLI end to end."""

import gzip
import json
import struct

import numpy as np
import pytest

from gpunn import checkpoint, cli
from gpunn.train import AugmentConfig, TrainConfig, build, datasets, scores, train

SMALL = dict(epochs=2, width=32, batch_size=128)


def _weights(trainer):
    return {k: np.array(v) for k, v in trainer.model.state_dict().items()}


def test_default_job_reaches_98_percent():
    """The issue's target: default settings, digits, 25% stratified hold-out."""
    result = train(TrainConfig(device="cpu"), progress=False)
    assert result["data"] == {"name": "digits:train", "train": 1347, "test": 450, "classes": 10}
    assert result["test_accuracy"] >= 0.98, result["test_accuracy"]
    assert len(result["members"][0]["history"]) == 40


@pytest.mark.parametrize("device", ["cpu", "numpy"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, device):
    config = TrainConfig(epochs=4, width=32, batch_size=128, device=device)
    train_set, test_set = datasets(config)
    whole = build(config, train_set, test_set, progress=False)
    whole.fit()

    first = build(config, train_set, test_set, progress=False)
    first.epochs = 2
    first.fit(tmp_path / "ck.npz")
    resumed = build(config, train_set, test_set, progress=False)
    resumed.load(tmp_path / "ck.npz")
    assert resumed.epoch == 2
    resumed.fit()

    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    losses = [[h["train_loss"] for h in t.history] for t in (whole, resumed)]
    assert losses[0] == losses[1]


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    config = TrainConfig(**SMALL, device="cpu")
    train_set, test_set = datasets(config)
    trainer = build(config, train_set, test_set, progress=False)
    trainer.save(tmp_path / "ck.npz")
    wider = build(TrainConfig(**{**SMALL, "width": 48}, device="cpu"), train_set, test_set,
                  progress=False)
    before = _weights(wider)
    with pytest.raises(ValueError, match="another architecture.*48"):
        wider.load(tmp_path / "ck.npz")
    for k, v in _weights(wider).items():
        np.testing.assert_array_equal(v, before[k])
    checkpoint.save(tmp_path / "other.npz", {"kind": "something else"})
    with pytest.raises(ValueError, match="not a gpunn training checkpoint"):
        trainer.load(tmp_path / "other.npz")


def _trainer_state(trainer) -> dict:
    """Everything Trainer.load may change, as bytes (bit-identical comparisons)."""
    def raw(a):
        a = np.asarray(a)
        return (a.dtype.str, a.shape, a.tobytes())

    opt = trainer.optimizer.state_dict()
    return {"model": {k: raw(v) for k, v in trainer.model.state_dict().items()},
            "extra": trainer.model.extra_state(),
            "optimizer": {i: {k: raw(v) for k, v in s.items()} for i, s in opt["state"].items()},
            "groups": [dict(g) for g in opt["param_groups"]],
            "scheduler": trainer.scheduler.state_dict(),
            "epoch": trainer.epoch, "history": [dict(h) for h in trainer.history]}


def _bad(state, field):
    """A copy of a training checkpoint's state with one field made invalid (nested
    containers copied, arrays shared)."""
    import copy

    state = {**state, "optimizer": copy.deepcopy(state["optimizer"]),
             "scheduler": dict(state["scheduler"]), "model": dict(state["model"]),
             "model_extra": copy.deepcopy(state["model_extra"])}
    group = state["optimizer"]["param_groups"][0]
    path, value = field
    if path == "optimizer.lr":
        group["lr"] = -1.0
    elif path == "optimizer.betas":
        group["betas"] = (1.5, 0.999)
    elif path == "optimizer.exp_avg":
        state["optimizer"]["state"][3]["exp_avg"] = np.zeros(7, np.float32)
    elif path == "optimizer.groups":
        state["optimizer"]["param_groups"] = [group, group]
    elif path == "scheduler.last_epoch":
        state["scheduler"]["last_epoch"] = -3
    elif path == "scheduler.base_lrs":
        state["scheduler"]["base_lrs"] = [0.1, 0.2]
    elif path == "model_extra":
        state["model_extra"]["8"]["offset"] = "far"
    elif path == "model":
        state["model"]["9.bias"] = np.array(["x"] * len(state["model"]["9.bias"]))
    elif path == "missing":
        del state["scheduler"]
    else:
        state[path] = value
    return state


BAD_FIELDS = [("epoch", -1), ("epoch", 1.5), ("epoch", "1"), ("epoch", True),
              ("history", "none"), ("history", [1]), ("history", []),
              ("architecture", 7), ("optimizer.lr", None), ("optimizer.betas", None),
              ("optimizer.exp_avg", None), ("optimizer.groups", None), ("optimizer", [1]),
              ("scheduler.last_epoch", None), ("scheduler.base_lrs", None),
              ("scheduler", "x"), ("model_extra", None), ("model", None), ("missing", None)]
FIELD_NAMES = {"optimizer.lr": "optimizer", "optimizer.betas": "optimizer",
               "optimizer.exp_avg": "optimizer", "optimizer.groups": "optimizer",
               "scheduler.last_epoch": "scheduler", "scheduler.base_lrs": "scheduler",
               "missing": "lacks"}


def test_bad_checkpoint_fields_change_nothing(tmp_path):
    """Each bad field is refused naming it, and the model's weights and running stats, the
    dropout streams, the optimizer's and scheduler's state and the counters stay
    bit-identical (the checkpoint's model differs from the trainer's: another seed)."""
    config = TrainConfig(**SMALL, device="cpu")
    train_set, test_set = datasets(config)
    saved = build(config, train_set, test_set, progress=False)
    saved.train_epoch()
    saved.save(tmp_path / "good.npz")
    state = checkpoint.load(tmp_path / "good.npz")
    trainer = build(config, train_set, test_set, member=1, progress=False)
    trainer.train_epoch()
    trainer.train_epoch()
    before = _trainer_state(trainer)
    for k, field in enumerate(BAD_FIELDS):
        checkpoint.save(tmp_path / f"bad{k}.npz", _bad(state, field))
        name = FIELD_NAMES.get(field[0], field[0])
        with pytest.raises(ValueError, match=f"bad{k}.npz.*{name}"):
            trainer.load(tmp_path / f"bad{k}.npz")
        assert _trainer_state(trainer) == before, field
    trainer.load(tmp_path / "good.npz")
    assert _trainer_state(trainer) == _trainer_state(saved)


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    config = TrainConfig(**SMALL, device="cpu")
    train_set, test_set = datasets(config)
    trainer = build(config, train_set, test_set, progress=False)
    path = tmp_path / "ck.npz"
    trainer.train_epoch()
    trainer.save(path)
    saved = path.read_bytes()
    trainer.train_epoch()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert path.read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_ensemble_averages_member_probabilities():
    config = TrainConfig(**SMALL, ensemble=2, device="cpu", augment=None)
    result = train(config, progress=False)
    assert [m["seed"] for m in result["members"]] == [0, 1]
    _, test_set = datasets(config)
    probs = []
    for k in range(2):
        trainer = build(config, *datasets(config), member=k, progress=False)
        trainer.fit()
        probs.append(trainer.predict_proba(test_set))
        assert trainer.evaluate(test_set)["accuracy"] == result["members"][k]["accuracy"]
    assert scores((probs[0] + probs[1]) / 2, test_set.y) == result["ensemble"]


def test_augmentation_is_drawn_per_sample_of_the_run(monkeypatch):
    """Each batch is warped by ops.augment at offset epoch * N + position: no sample of the
    run shares its draw."""
    import gpunn.train as training

    calls = []
    real = training.ops.augment

    def spy(x, seed, offset, **kwargs):
        calls.append((seed, offset, len(x)))
        return real(x, seed, offset, **kwargs)

    monkeypatch.setattr(training.ops, "augment", spy)
    config = TrainConfig(**SMALL, device="cpu", seed=5)
    trainer = build(config, *datasets(config), progress=False)
    trainer.fit()
    n = len(trainer.train_data)
    offsets = [o for _, o, _ in calls]
    assert {s for s, _, _ in calls} == {5}
    assert offsets[0] == 0 and offsets[len(trainer.loader)] == n
    covered = sorted(i for _, o, k in calls for i in range(o, o + k))
    assert covered == list(range(2 * n))


def test_find_lr_sweeps_and_plots(tmp_path):
    from gpunn.train import find_lr

    result = find_lr(TrainConfig(width=32, device="cpu"), tmp_path, num_steps=30)
    assert len(result.lrs) >= 10
    assert np.all(np.diff(np.log(result.lrs)) > 0)
    assert (tmp_path / "lr-range.png").stat().st_size > 1000


# --- the command line ------------------------------------------------------------------------


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--epochs", "2", "--width", "32", "--ensemble", "2", "--out",
                   str(out), "--quiet", "--backend", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "member 1 (seed 1): test accuracy" in text
    assert "ensemble of 2: test accuracy" in text and "s per epoch" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 2 and len(metrics["members"]) == 2
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert (out / "curves.png").stat().st_size > 1000
    assert {p.name for p in out.glob("checkpoint-*.npz")} == {"checkpoint-0.npz",
                                                               "checkpoint-1.npz"}
    # --resume with every epoch done trains nothing more and reports the same accuracy
    rc = cli.main(["train", "--epochs", "2", "--width", "32", "--ensemble", "2", "--out",
                   str(out), "--quiet", "--backend", "cpu", "--resume"])
    assert rc == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["test_accuracy"] == metrics["test_accuracy"]


def _idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_cli_train_on_idx_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120).astype(np.uint8)
    images = (rng.random((120, 6, 6)) * 60).astype(np.uint8)
    images[np.arange(120), labels * 2, :] = 255  # a learnable stripe per class
    _idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x08)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 0x08)
    rc = cli.main(["train", "--data", str(tmp_path), "--epochs", "15", "--width", "16",
                   "--batch-size", "32", "--out", str(tmp_path / "run"), "--quiet",
                   "--backend", "cpu", "--no-augment"])
    assert rc == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["classes"] == 3 and metrics["data"]["test"] == 30
    assert metrics["test_accuracy"] > 0.8


def test_cli_train_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "file" / "sub"),
                   "--quiet"])
    assert rc == 1
    assert "cannot create the output folder" in capsys.readouterr().err
    rc = cli.main(["train", "--epochs", "1", "--data", str(tmp_path / "missing.npz"),
                   "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 1
    assert "missing.npz" in capsys.readouterr().err
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    rc = cli.main(["train", "--epochs", "1", "--data", str(tmp_path / "broken.npz"),
                   "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 1
    assert "broken.npz" in capsys.readouterr().err
    for bad in (["--epochs", "0"], ["--dropout", "1.5"], ["--lr", "-1"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *bad, "--out", str(tmp_path / "run")])
        assert e.value.code == 2


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="test_fraction"):
        TrainConfig(test_fraction=1.0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        TrainConfig(seed=-1)
    assert AugmentConfig().kwargs()["scale"] == (0.9, 1.1)
