"""The trainer and `gpunn train`: the default job's accuracy, resume = uninterrupted run,
checkpoints of another architecture, ensembles, the lr range test, the CLI end to end, the
run folder (refused, resumed, overwritten), Ctrl-C, the curves figure."""

import gzip
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gpunn import checkpoint, cli
from gpunn.train import build, curves_figure, datasets, train
from gpunn.train_config import AugmentConfig, TrainConfig
from gpunn.trainer import Trainer, scores

ROOT = Path(__file__).resolve().parents[1]

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
    import gpunn.trainer as training

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
    assert "argument --data:" in capsys.readouterr().err
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    rc = cli.main(["train", "--epochs", "1", "--data", str(tmp_path / "broken.npz"),
                   "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 1
    assert "argument --data:" in capsys.readouterr().err
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


def test_cli_data_messages_say_what_the_path_is(tmp_path, capsys):
    """The path is joined with a separator, and the message says what the path is."""
    run = ["--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--backend", "numpy"]
    missing = tmp_path / "nothing"
    assert cli.main(["train", "--data", str(missing), *run]) == 1
    err = capsys.readouterr().err
    assert "argument --data:" in err and "does not exist" in err
    assert "nothingtrain-images" not in err
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["train", "--data", str(tmp_path / "notes.txt"), *run]) == 1
    assert "neither an .npz file nor a folder of MNIST-style IDX files" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--data", str(tmp_path / "empty"), *run]) == 1
    err = capsys.readouterr().err
    assert "a folder without MNIST-style IDX files" in err
    assert str(tmp_path / "empty" / "train-images-idx3-ubyte") in err
    assert not (tmp_path / "run").exists()


# --- a run's folder: refuse, resume, overwrite, Ctrl-C ----------------------------------------

QUICK_RUN = ["--epochs", "3", "--width", "8", "--batch-size", "256", "--no-augment",
             "--backend", "numpy", "--quiet"]


def _interrupt_in_epoch(monkeypatch, epoch: int):
    """Ctrl-C at the start of ``epoch`` (1-based) of every member trained from now on."""
    real = Trainer.train_epoch

    def train_epoch(self):
        if self.epoch + 1 == epoch:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK_RUN, "--out", str(out)]
    _interrupt_in_epoch(monkeypatch, 3)
    assert cli.main(argv) == 130
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert f"last checkpoint {out / 'checkpoint-0.npz'} (epoch 2 of 3)" in lines[0]
    assert lines[0].endswith("resume with: " + shlex.join(["gpunn", *argv, "--resume"]))
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert f"model: resuming from epoch 2 of 3 (checkpoint {out / 'checkpoint-0.npz'})" in text
    assert len(json.loads((out / "metrics.json").read_text())["members"][0]["history"]) == 3


def test_ctrl_c_after_the_last_epoch_still_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK_RUN, "--out", str(out)]

    def interrupted(result, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr("gpunn.train.write_report", interrupted)  # writing the report
    assert cli.main(argv) == 130
    line = capsys.readouterr().err.strip()
    assert f"last checkpoint {out / 'checkpoint-0.npz'} (epoch 3 of 3)" in line
    assert line.endswith("--resume")


def test_ctrl_c_before_any_checkpoint_says_start_again(tmp_path, monkeypatch, capsys):
    argv = ["train", *QUICK_RUN, "--out", str(tmp_path / "run"), "--overwrite"]
    _interrupt_in_epoch(monkeypatch, 1)
    assert cli.main(argv) == 130
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "before any checkpoint" in line
    assert line.endswith("start again with: " + shlex.join(["gpunn", *argv[:-1]]))
    monkeypatch.undo()
    assert cli.main(argv[:-1]) == 0  # nothing was saved: the same command starts it


def test_ctrl_c_of_a_second_member_names_the_first_members_checkpoint(tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK_RUN, "--ensemble", "2", "--out", str(out)]
    real = Trainer.train_epoch

    def train_epoch(self):
        if self.name == "member 1":
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    assert cli.main(argv) == 130
    line = capsys.readouterr().err.strip()
    assert f"member 1 interrupted in epoch 1 of 3; last checkpoint {out / 'checkpoint-0.npz'}" \
           f" (epoch 3 of 3)" in line and line.endswith("--resume")
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "member 0: already finished (3 of 3 epochs" in text
    assert f"member 1: no checkpoint yet ({out / 'checkpoint-1.npz'}), starting it" in text


def test_ctrl_c_in_a_subprocess_exits_130_with_one_line(tmp_path):
    """A real SIGINT once training runs (the second epoch line: a checkpoint exists), then
    the printed command resumes it (its first line says from which epoch)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    argv = ["train", "--epochs", "100000", "--width", "8", "--no-augment", "--backend",
            "numpy", "--out", str(tmp_path / "run")]

    def interrupt_after(command, marker):
        # SIGINT as at a terminal: a shell starts background jobs with SIGINT ignored, and an
        # ignored signal stays ignored across exec (CI launched that way never interrupts)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        watchdog = threading.Timer(600, proc.kill)
        watchdog.start()
        try:
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if marker(line):
                    break
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate()
        finally:
            watchdog.cancel()
        return proc.returncode, "".join(seen) + rest, err

    python = [sys.executable, "-m", "gpunn.cli"]
    rc, out, err = interrupt_after([*python, *argv], lambda l: l.startswith("model epoch   2/"))
    assert rc == 130, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "checkpoint-0.npz (epoch" in err
    command = shlex.split(err.split("resume with: ")[1])
    assert command[0] == "gpunn" and command[1:] == [*argv, "--resume"]
    rc, out, err = interrupt_after([*python, *command[1:]],
                                   lambda l: "resuming from epoch" in l)
    assert rc == 130, err
    assert re.search(r"model: resuming from epoch [1-9][0-9]* of 100000", out), out


def test_an_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *QUICK_RUN, "--ensemble", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out:" in err and "already holds a run" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "metrics.json").read_bytes() == before
    # --overwrite starts anew: the second member's checkpoint of the old run goes too
    assert cli.main(["train", *QUICK_RUN, "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*.npz")) == ["checkpoint-0.npz"]
    assert len(json.loads((out / "metrics.json").read_text())["members"]) == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *QUICK_RUN, "--out", str(out), "--overwrite", "--resume"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_resume_refuses_a_folder_without_checkpoints_or_other_options(tmp_path, capsys):
    """--resume without a checkpoint is refused (a typo in --out would otherwise start a new
    run silently); so is resuming with options the run was not started with."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *QUICK_RUN, "--out", str(out), "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --resume: no checkpoint to resume in" in err
    assert str(out / "checkpoint-0.npz") in err and not out.exists()
    assert cli.main(["train", *QUICK_RUN, "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *QUICK_RUN, "--lr", "0.01", "--out", str(out), "--resume"])
    assert e.value.code == 2
    assert "lr=0.003, not lr=0.01" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *QUICK_RUN, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert cli.main(["train", *QUICK_RUN, "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "model: already finished (3 of 3 epochs" in text
    assert "time: already finished, nothing left to train" in text
    assert first.splitlines()[1] in text.splitlines()  # the same accuracy


def test_curves_figure(tmp_path):
    """Integer epoch ticks, the legend clear of the plots, the ensemble named in the title."""
    def member(seed, shift):
        return {"seed": seed, "history": [
            {"epoch": e, "train_loss": 2.0 / e + shift, "test_loss": 2.2 / e + shift,
             "train_accuracy": 0.5 + 0.1 * e, "test_accuracy": 0.45 + 0.1 * e}
            for e in (1, 2, 3)]}

    result = {"members": [member(s, 0.01 * s) for s in range(3)], "test_accuracy": 0.8}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = curves_figure(result)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = fig.axes
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "member 2 (seed 2)" in labels and len(labels) == 3 + 3
    assert fig._suptitle.get_text().startswith("ensemble of 3")
    one = curves_figure({"members": [member(0, 0)], "test_accuracy": 0.8})
    assert not one._suptitle.get_text().startswith("ensemble")
    assert len(one.legends[0].get_texts()) == 2


def test_the_second_compiler_covers_the_backward_half_of_a_step():
    """compile_backward_kernels (run in a second process on a cold cache) compiles the very
    overloads a training step then uses: the step adds no signature to those kernels."""
    import importlib

    from gpunn.cpu_jit import serial
    from gpunn.train_compile import compile_backward_kernels
    from gpunn.trainer import training_threads

    batchnorm, dropout, adam, walker = (importlib.import_module(f"gpunn.{name}") for name in (
        "ops.batchnorm.cpu", "ops.dropout", "optim.algorithms.adam", "optim.walker"))
    config = TrainConfig(**SMALL, device="cpu")
    train_set, test_set = datasets(config)
    compile_backward_kernels(int(np.prod(train_set.sample_shape)), train_set.num_classes,
                             config.width, config.depth, config.dropout, config.lr,
                             config.weight_decay)
    kernels = [serial(batchnorm._cpu_backward_flat), serial(dropout._cpu_dropout),
               serial(adam.ADAM.cpu_step), walker._cpu_advance]
    before = {k: set(k.signatures) for k in kernels}
    assert all(before.values())
    trainer = build(config, train_set, test_set, progress=False)
    with training_threads("cpu"):
        trainer.train_step(*next(trainer.batches(0)))
    assert {k: set(k.signatures) for k in kernels} == before


def test_the_second_compilers_command_runs_this_gpunn(tmp_path):
    from gpunn.train_compile import backward_compiler_command

    command = backward_compiler_command([64, 10, 16, 1, 0.2, 3e-3, 1e-2])
    command[-1] += "import gpunn; print(gpunn.__file__)\n"
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "gpunn" / "__init__.py")


def test_compile_notice_says_what_compiles():
    from numba import njit

    from gpunn.train_compile import compile_notice

    lines, firsts = [], []

    def first():
        firsts.append(1)
        return "  (a note)"

    @njit
    def fresh(x):
        return x + 1

    with compile_notice(lines.append, on_first=first):
        fresh(1)
        fresh(2)  # compiled already: nothing more
        fresh(1.5)
    assert firsts == [1]
    assert lines[0] == "compiling CPU kernels (first run only: Numba caches them on disk)"
    assert lines[1] == "  (a note)"
    assert [line.split(" ")[3] for line in lines[2:4]] == [
        "test_train.test_compile_notice_says_what_compiles.<locals>.fresh"] * 2
    assert lines[4].startswith("compiled 2 CPU kernels in ") and len(lines) == 5
    with compile_notice(lines.append):
        fresh(3)
    assert len(lines) == 5  # nothing compiled: nothing said
