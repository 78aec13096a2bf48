"""The ``gpunn train`` job: ensembles of K seeds of :func:`gpunn.trainer.mlp` trained by
:class:`gpunn.trainer.Trainer` on the bundled or given data, checkpoints and resume, the report
(metrics.json, curves.png), and the learning-rate range test."""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import math
import os
import time

import numpy as np

from .data import Dataset, load, stratified_split
from .optim import AdamW
from .optim.lr_scheduler import CosineAnnealingLR, lr_range_test
from .train_compile import backward_compiler, compile_notice
from .train_config import TrainConfig
from .trainer import Trainer, mlp, scores, training_threads

# --- the job ------------------------------------------------------------------------------------

#: What a run writes into its output folder: the files that make it a run.
CONFIG_FILE, METRICS_FILE, CURVES_FILE = "config.json", "metrics.json", "curves.png"


class RunExists(FileExistsError):
    """The output folder holds a run already, and neither resume nor overwrite was asked."""

    def __init__(self, folder: str, files: list[str]):
        self.folder, self.files = folder, files
        super().__init__(f"{folder} already holds a run ({', '.join(files)}): resume it or "
                         f"overwrite it")


class NothingToResume(FileNotFoundError):
    """Resume was asked, and the output folder holds no checkpoint."""

    def __init__(self, folder: str):
        self.folder = folder
        super().__init__(f"no checkpoint to resume in {folder} (looked for "
                         f"{checkpoint_path(folder, 0)})")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: where the run stands. ``member`` (of ``members``) was
    training, in its ``epoch`` (1-based); ``checkpoint`` is the newest checkpoint written
    (None: nothing saved yet), of ``saved_member`` after its ``saved_epoch``."""

    def __init__(self, member: int, members: int, epoch: int, epochs: int,
                 checkpoint: str | None, saved_member: int | None, saved_epoch: int | None):
        self.member, self.members, self.epoch, self.epochs = member, members, epoch, epochs
        self.checkpoint, self.saved_member, self.saved_epoch = (checkpoint, saved_member,
                                                                saved_epoch)
        super().__init__(self.where())

    def where(self) -> str:
        who = f"member {self.member} " if self.members > 1 else ""
        text = f"{who}interrupted in epoch {self.epoch} of {self.epochs}"
        if self.checkpoint is None:
            return f"{text}, before any checkpoint"
        return (f"{text}; last checkpoint {self.checkpoint} (epoch {self.saved_epoch} of "
                f"{self.epochs})")


def checkpoint_path(folder: str, member: int) -> str:
    return os.path.join(folder, f"checkpoint-{member}.npz")


def run_files(folder) -> list[str]:
    """The results of a run in ``folder`` (checkpoints, metrics.json), by name; [] for none."""
    folder = os.fspath(folder)
    found = sorted(os.path.basename(p) for p in glob.glob(checkpoint_path(glob.escape(folder),
                                                                          "*")))
    return found + [METRICS_FILE] * os.path.isfile(os.path.join(folder, METRICS_FILE))


def check_output(out_dir, config: TrainConfig, *, resume: bool = False,
                 overwrite: bool = False) -> None:
    """Refuse before any work: with ``resume``, a folder without a checkpoint
    (NothingToResume) or whose run was started with another configuration (ValueError naming
    the fields); without, a folder that holds a run (RunExists) unless ``overwrite``."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    folder = os.fspath(out_dir)
    if resume:
        if not os.path.isfile(checkpoint_path(folder, 0)):
            raise NothingToResume(folder)
        saved = _saved_config(folder)
        ours = _comparable(config.to_dict())
        if saved is not None and saved != ours:
            fields = [k for k in ours if saved.get(k) != ours[k]]
            raise ValueError(
                f"the run in {folder} was started with "
                f"{', '.join(f'{k}={saved.get(k)!r}' for k in fields)}, not "
                f"{', '.join(f'{k}={ours[k]!r}' for k in fields)}")
    elif not overwrite and run_files(folder):
        raise RunExists(folder, run_files(folder))


def _comparable(config: dict) -> dict:
    """The fields a resumed run must share with the run it continues (all but the device)."""
    return {k: v for k, v in config.items() if k != "device"}


def _saved_config(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            return _comparable(json.load(f))
    except (OSError, ValueError):
        return None


def datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and test sets: the data's own test split, else a stratified hold-out."""
    train, test = load(config.data)
    if test is None:
        train, test = stratified_split(train, config.test_fraction, config.split_seed)
    return train, test


def build(config: TrainConfig, train: Dataset, test: Dataset, member: int = 0,
          progress: bool = True) -> Trainer:
    """The model, AdamW, warm-up + cosine schedule and Trainer of one ensemble member."""
    seed = config.seed + member
    device = config.resolved_device()
    model = mlp(int(np.prod(train.sample_shape)), train.num_classes, config.width,
                config.depth, config.dropout, seed).to(device)
    optimizer = AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train) // config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total - 1)
    scheduler = CosineAnnealingLR(optimizer, T_max=total, warmup_steps=warmup)
    return Trainer(model, optimizer, train, test, epochs=config.epochs,
                   batch_size=config.batch_size, scheduler=scheduler, augment=config.augment,
                   seed=seed, label_smoothing=config.label_smoothing, progress=progress,
                   name=f"member {member}" if config.ensemble > 1 else "model")


def train(config: TrainConfig, out_dir=None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, log=None, data=None) -> dict:
    """Train ``config.ensemble`` members (seeds seed, seed+1, ...), average their softmax
    outputs, and return the metrics.

    With ``out_dir``, write config.json, a checkpoint per member after each epoch,
    metrics.json and curves.png there. A folder that holds a run is refused (RunExists)
    unless ``resume`` (continue from its checkpoints; NothingToResume when it has none) or
    ``overwrite`` (its results are deleted first). ``log``: where messages go (resuming,
    already finished, kernels compiling; default print, nothing when not ``progress``).
    ``data``: the (train, test) datasets, when already loaded. Ctrl-C raises
    :class:`Interrupted` (a KeyboardInterrupt) naming the last checkpoint."""
    say = log if log is not None else (print if progress else (lambda text: None))
    out = None
    if out_dir is not None:
        check_output(out_dir, config, resume=resume, overwrite=overwrite)
        out = _output_folder(out_dir)
        if not resume:
            for name in run_files(out) + [CURVES_FILE]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        _write_json(os.path.join(out, CONFIG_FILE), config.to_dict())
    train_set, test_set = data if data is not None else datasets(config)
    members, probs, trained = [], None, 0
    k, trainer, saved = 0, None, None  # saved: (path, member, epoch) of the last checkpoint
    start = time.perf_counter()
    try:
        with backward_compiler(config, train_set) as compile_backward, \
                compile_notice(say if progress else None, on_first=compile_backward):
            for k in range(config.ensemble):
                trainer = None
                trainer = build(config, train_set, test_set, k, progress)
                path = None if out is None else checkpoint_path(out, k)
                if resume and path is not None:
                    if os.path.exists(path):
                        trainer.load(path)
                        say(f"{trainer.name}: already finished ({trainer.epoch} of "
                            f"{trainer.epochs} epochs, checkpoint {path})"
                            if trainer.epoch >= trainer.epochs else
                            f"{trainer.name}: resuming from epoch {trainer.epoch} of "
                            f"{trainer.epochs} (checkpoint {path})")
                    else:
                        say(f"{trainer.name}: no checkpoint yet ({path}), starting it")
                done_before = trainer.epoch
                trainer.fit(path)
                trained += trainer.epoch - done_before
                if trainer.saved_epoch is not None:
                    saved = (path, k, trainer.saved_epoch)
                p = trainer.predict_proba(test_set)
                probs = p if probs is None else probs + p
                members.append({"seed": trainer.seed, **trainer.evaluate(test_set),
                                "history": trainer.history})
        ensemble = scores(probs / config.ensemble, test_set.y)
        epoch_times = [h["epoch_seconds"] for m in members for h in m["history"]]
        result = {
            "config": config.to_dict(), "device": config.resolved_device(),
            "data": {"name": train_set.name, "train": len(train_set), "test": len(test_set),
                     "classes": train_set.num_classes},
            "members": members,
            "ensemble": ensemble,
            "test_accuracy": ensemble["accuracy"],
            "seconds_per_epoch": float(np.median(epoch_times)) if epoch_times else math.nan,
            "epochs_trained": trained,
            "total_seconds": time.perf_counter() - start,
        }
        if out is not None:
            write_report(result, out)
    except KeyboardInterrupt:
        if trainer is not None and trainer.saved_epoch is not None and out is not None:
            saved = (checkpoint_path(out, k), k, trainer.saved_epoch)
        epoch = 1 if trainer is None else min(trainer.epoch + 1, config.epochs)
        raise Interrupted(k, config.ensemble, epoch, config.epochs,
                          *(saved or (None, None, None))) from None
    return result


def summary(result: dict) -> str:
    """The closing lines of ``gpunn train``: accuracy per member and of the ensemble, time."""
    data = result["data"]
    lines = [f"data: {data['name'].removesuffix(':train')} ({data['train']} train, "
             f"{data['test']} test, {data['classes']} classes) on {result['device']}"]
    members = result["members"]
    for k, m in enumerate(members):
        lines.append(f"member {k} (seed {m['seed']}): test accuracy {100 * m['accuracy']:.2f}%")
    label = f"ensemble of {len(members)}" if len(members) > 1 else "model"
    lines.append(f"{label}: test accuracy {100 * result['test_accuracy']:.2f}%, "
                 f"test loss {result['ensemble']['loss']:.4f}")
    if result.get("epochs_trained", 1) == 0:
        lines.append(f"time: already finished, nothing left to train (it took "
                     f"{result['seconds_per_epoch']:.3f} s per epoch, median)")
    else:
        lines.append(f"time: {result['seconds_per_epoch']:.3f} s per epoch (median), "
                     f"{result['total_seconds']:.1f} s in all")
    return "\n".join(lines)


def _output_folder(path) -> str:
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the output folder {path!r}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"the output folder {path!r} is not writable")
    return path


def _write_json(path: str, value) -> None:
    """Write ``value`` as JSON atomically (a temporary file renamed over ``path``)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def write_report(result: dict, out: str) -> None:
    """metrics.json and curves.png (see :func:`curves_figure`)."""
    _write_json(os.path.join(out, METRICS_FILE), result)
    curves_figure(result).savefig(os.path.join(out, CURVES_FILE), dpi=100)


def curves_figure(result: dict):
    """Loss and accuracy per epoch of every member (solid: train, dashed: test), integer
    epoch ticks, the legend below the plots; the title names the ensemble when there is one
    (its accuracy is a dotted line)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    members = result["members"]
    ensemble = len(members) > 1
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for k, member in enumerate(members):
        h = member["history"]
        epochs = [m["epoch"] for m in h]
        loss_ax.plot(epochs, [m["train_loss"] for m in h], color=f"C{k}")
        loss_ax.plot(epochs, [m["test_loss"] for m in h], color=f"C{k}", linestyle="--")
        acc_ax.plot(epochs, [100 * m["train_accuracy"] for m in h], color=f"C{k}")
        acc_ax.plot(epochs, [100 * m["test_accuracy"] for m in h], color=f"C{k}",
                    linestyle="--")
    config = result.get("config", {})
    how = [w for w, on in (("augmented", config.get("augment")),
                           ("smoothed labels", config.get("label_smoothing"))) if on]
    color = "k" if ensemble else "C0"
    handles = [Line2D([], [], color=color, label="train" + (f" ({', '.join(how)})" if how
                                                             else "")),
               Line2D([], [], color=color, linestyle="--", label="test")]
    if ensemble:
        acc_ax.axhline(100 * result["test_accuracy"], color="k", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="k", linestyle=":", label="ensemble, test"))
        handles += [Line2D([], [], color=f"C{k}", linewidth=4, label=f"member {k} (seed "
                           f"{m['seed']})") for k, m in enumerate(members)]
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    loss_ax.set(ylabel="cross-entropy", yscale="log", title="loss")
    acc_ax.set(ylabel="accuracy (%)", title="accuracy")
    ncols = len(handles) if len(handles) <= 6 else -(-len(handles) // 2)
    rows = -(-len(handles) // ncols)  # the legend fills columns first: give it rows in turn
    handles = [handles[r * ncols + c] for c in range(ncols) for r in range(rows)
               if r * ncols + c < len(handles)]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small",
               frameon=False)
    accuracy = f"test accuracy {100 * result['test_accuracy']:.2f}%"
    fig.suptitle(f"ensemble of {len(members)} (softmax averaged): {accuracy}; curves per member"
                 if ensemble else f"one model: {accuracy}")
    return fig


def find_lr(config: TrainConfig, out_dir=None, *, start_lr=1e-5, end_lr=10.0,
            num_steps=100, data=None):
    """The log-scale learning-rate range test on the configured model, data and training step
    (augmentation included; fresh weights, nothing is kept): one batch per lr. Returns the
    result and writes lr-range.png into ``out_dir`` when given. ``data``: the (train, test)
    datasets, when already loaded."""
    train_set, test_set = data if data is not None else datasets(config)
    trainer = build(config, train_set, test_set, progress=False)

    stream = (batch for epoch in itertools.count() for batch in trainer.batches(epoch))

    def step():
        with training_threads(trainer.model.device):
            return float(trainer.train_step(*next(stream))[1])

    result = lr_range_test(step, trainer.optimizer, start_lr, end_lr, num_steps)
    if out_dir is not None:
        result.plot(os.path.join(_output_folder(out_dir), "lr-range.png"))
    return result


__all__ = ["Interrupted", "NothingToResume", "RunExists", "build", "check_output",
           "curves_figure", "datasets", "find_lr", "run_files", "summary", "train",
           "write_report"]
