"""Training: a Trainer for one model, ensembles of K seeds, and the ``gpunn train`` job.

One training step is: gather a shuffled batch, warp it with the fused augmentation kernel,
``model(x)``, cross-entropy, ``model.backward``, one fused optimizer step, one schedule step.
Everything stays on the model's device; the host sees one number per epoch.

Reproducibility: batch order depends on (seed, epoch); augmentation draws sample i of the whole
run from Philox at counter ``epoch * N + i``; dropout layers carry their stream offsets; so a run
resumed from a checkpoint repeats the uninterrupted run's steps exactly.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import itertools
import json
import math
import os
import time

import numpy as np

from . import backend as _backend
from .backend import numba_threads
from . import checkpoint, ops
from .data import DataLoader, Dataset, load, stratified_split
from .nn import BatchNorm1d, CrossEntropyLoss, Dropout, Flatten, Linear, ReLU, Sequential
from .nn.arena import transfer
from .optim import AdamW
from .optim.lr_scheduler import CosineAnnealingLR, lr_range_test
from .train_config import AugmentConfig, TrainConfig, best_device

#: rows per forward pass when evaluating
EVAL_BATCH = 1024


def mlp(in_features: int, num_classes: int, width: int, depth: int, dropout: float,
        seed: int) -> Sequential:
    """Flatten, then ``depth`` x (Linear, BatchNorm1d, ReLU, Dropout), then Linear; weights
    drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    layers, features = [Flatten()], in_features
    for _ in range(depth):
        layers += [Linear(features, width, generator=rng), BatchNorm1d(width), ReLU()]
        if dropout > 0:
            layers.append(Dropout(dropout, generator=rng))
        features = width
    layers.append(Linear(features, num_classes, generator=rng))
    return Sequential(*layers)


def training_threads(device: str):
    """One Numba thread while a host model trains (a no-op context on the GPU); BLAS keeps
    its threads for the matrix products.

    Between two products OpenBLAS's idle threads keep spinning, and Numba's OpenMP threads
    after each kernel: alternating the two, each finds the cores taken. Measured on this 2-core
    machine, one epoch of a 784-1024-1024-10 MLP (batch 128): 4.0-4.5 s with one BLAS thread
    and two Numba threads, 1.85 s with two BLAS threads and one Numba thread; the digits MLP:
    0.08 s either way (1.17 s with both pools at two threads)."""
    return contextlib.nullcontext() if device == "cuda" else numba_threads(1)


def architecture(model) -> list:
    """[name, shape] of every entry of the state dict: what a checkpoint must match."""
    return [[name, list(a.shape)] for name, a in model.state_dict().items()]


class Trainer:
    """Trains one classifier: epochs of shuffled batches, evaluation, history, checkpoints.

    model: a :class:`gpunn.nn.Module` on its device; optimizer and scheduler (stepped once per
    batch; may be None) over its parameters; ``augment``: an :class:`AugmentConfig` or None."""

    def __init__(self, model, optimizer, train: Dataset, test: Dataset | None = None, *,
                 epochs: int, batch_size: int, scheduler=None, augment=None, seed: int = 0,
                 label_smoothing: float = 0.0, progress: bool = True, name: str = "model"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_data, self.test_data = train, test
        self.epochs, self.seed, self.augment = epochs, seed, augment
        # labels were range-checked when the dataset was made: no per-step check (a GPU sync)
        self.criterion = CrossEntropyLoss(label_smoothing=label_smoothing, backend=model.device,
                                          check_labels=False)
        self.xp = model.xp
        self.loader = DataLoader(train, batch_size, shuffle=True, seed=seed, xp=self.xp,
                                 reuse_buffers=True)
        self.progress, self.name = progress, name
        self.epoch = 0  # epochs done
        self.saved_epoch: int | None = None  # the epoch of the last checkpoint saved or loaded
        self.history: list[dict] = []

    # --- one epoch ----------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        """One pass over the training data; returns its metrics (also appended to history)."""
        model, xp, e = self.model, self.xp, self.epoch
        model.train()
        total_loss, correct = xp.zeros((), np.float64), xp.zeros((), np.int64)
        seen = 0
        start = time.perf_counter()
        with _bar(self.progress, f"{self.name} epoch {e + 1}/{self.epochs}",
                  len(self.loader)) as advance, training_threads(model.device):
            for xb, yb, offset in self.batches(e):
                logits, loss = self.train_step(xb, yb, offset)
                if self.scheduler is not None:
                    self.scheduler.step()
                total_loss += loss * len(yb)
                correct += (logits.argmax(axis=1) == yb).sum()
                seen += len(yb)
                advance()
        metrics = {"epoch": e + 1, "train_loss": float(total_loss) / seen,
                   "train_accuracy": int(correct) / seen,
                   "lr": float(self.optimizer.param_groups[0]["lr"]),
                   "epoch_seconds": time.perf_counter() - start}
        if self.test_data is not None:
            result = self.evaluate(self.test_data)
            metrics.update(test_loss=result["loss"], test_accuracy=result["accuracy"])
        self.epoch += 1
        self.history.append(metrics)
        return metrics

    def batches(self, epoch: int):
        """(x, y, offset) of each batch of ``epoch``: offset = epoch * N + the batch's
        position, the augmentation stream index of its first sample."""
        offset = epoch * len(self.train_data)
        for xb, yb in self.loader.epoch(epoch):
            yield xb, yb, offset
            offset += len(yb)

    def train_step(self, xb, yb, offset: int):
        """Augment (sample i of the batch draws at ``offset + i``), forward, loss, backward,
        one optimizer step; returns (logits, loss) on the model's device."""
        model = self.model
        if self.augment is not None:
            xb = ops.augment(xb, self.seed, offset, backend=model.device,
                             **self.augment.kwargs())
        logits = model(xb)
        loss = self.criterion(logits, yb)
        model.zero_grad()
        model.backward(self.criterion.backward(), input_grad=False)
        self.optimizer.step()
        return logits, loss

    def fit(self, checkpoint_path=None) -> list[dict]:
        """Train the remaining epochs, saving a checkpoint after each when a path is given."""
        while self.epoch < self.epochs:
            metrics = self.train_epoch()
            if self.progress:
                print(format_metrics(self.name, metrics, self.epochs), flush=True)
            if checkpoint_path is not None:
                self.save(checkpoint_path)
        return self.history

    # --- evaluation ---------------------------------------------------------------------------

    def predict_proba(self, dataset: Dataset):
        """Softmax probabilities (N, classes) in eval mode, on the model's device."""
        self.model.eval()
        x = transfer(dataset.x, self.xp)
        with training_threads(self.model.device):
            probs = [ops.softmax(self.model(x[i:i + EVAL_BATCH]), backend=self.model.device)
                     for i in range(0, len(dataset), EVAL_BATCH)]
        self.model.train()
        return self.xp.concatenate(probs) if probs else self.xp.zeros((0, dataset.num_classes))

    def evaluate(self, dataset: Dataset) -> dict:
        return scores(self.predict_proba(dataset), dataset.y)

    # --- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything a resumed run needs (device arrays are copied to the host by
        :func:`gpunn.checkpoint.save`)."""
        return {"kind": "gpunn-trainer", "name": self.name, "epoch": self.epoch,
                "architecture": architecture(self.model), "model": self.model.state_dict(),
                "model_extra": self.model.extra_state(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "history": self.history}

    def save(self, path) -> None:
        """Write the checkpoint atomically (a temporary file renamed over ``path``)."""
        checkpoint.save(path, self.state())
        self.saved_epoch = self.epoch

    def load(self, path) -> None:
        """Continue from a checkpoint of this same architecture. Every field is checked first,
        the model's, optimizer's and scheduler's states by their own loaders on trial copies:
        a bad checkpoint is a ValueError naming the field and changes nothing."""
        state = checkpoint.load(path)
        if state.get("kind") != "gpunn-trainer":
            raise ValueError(f"{path}: not a gpunn training checkpoint")
        missing = [key for key in ("epoch", "architecture", "model", "model_extra",
                                   "optimizer", "scheduler", "history") if key not in state]
        if missing:
            raise ValueError(f"{path}: the training checkpoint lacks {missing}")
        try:
            saved = [[name, list(shape)] for name, shape in state["architecture"]]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: checkpoint field 'architecture' must be a list of "
                             f"[name, shape] pairs") from None
        ours = architecture(self.model)
        if saved != ours:
            diff = next(((a, b) for a, b in zip(saved, ours) if a != b),
                        (saved[len(ours):] or None, ours[len(saved):] or None))
            raise ValueError(f"{path}: checkpoint of another architecture: it has {diff[0]}, "
                             f"this model {diff[1]}")
        epoch, history = state["epoch"], state["history"]
        if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)) \
                or epoch < 0:
            raise ValueError(f"{path}: checkpoint field 'epoch' must be an integer >= 0, got "
                             f"{epoch!r:.80}")
        if not isinstance(history, list) or len(history) != epoch \
                or not all(isinstance(h, dict) for h in history):
            raise ValueError(f"{path}: checkpoint field 'history' must be a list of {epoch} "
                             f"dicts (one per epoch done), got {history!r:.80}")
        checks = {"model": lambda: self.model.checked_state_dict(state["model"]),
                  "model_extra": lambda: self.model.checked_extra_state(state["model_extra"]),
                  "optimizer": lambda: _trial(self.optimizer).load_state_dict(
                      state["optimizer"])}
        if self.scheduler is not None and state["scheduler"] is not None:
            checks["scheduler"] = lambda: _trial(self.scheduler).load_state_dict(
                state["scheduler"])
        for field, check in checks.items():
            try:
                check()
            except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
                raise ValueError(f"{path}: checkpoint field {field!r}: {e}") from None
        # everything passed: the same loads, now for real
        self.model.load_state_dict(state["model"])
        self.model.load_extra_state(state["model_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in checks:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = int(epoch), list(history)
        self.saved_epoch = self.epoch


def _trial(obj):
    """A copy of ``obj`` sharing its arrays but not its lists and dicts: loading a state into
    it runs every check of the real load and leaves ``obj`` untouched."""
    trial = copy.copy(obj)
    for name, value in list(vars(trial).items()):
        if isinstance(value, (list, dict)):
            setattr(trial, name, copy.copy(value))
    return trial


def scores(probs, labels) -> dict:
    """Mean negative log-likelihood and accuracy of class probabilities (N, C)."""
    xp = _backend.array_module(probs)
    labels = transfer(np.asarray(labels), xp)
    n = len(labels)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan}
    picked = probs[xp.arange(n), labels].astype(np.float64)
    loss = float(-xp.log(xp.maximum(picked, np.finfo(np.float64).tiny)).mean())
    return {"loss": loss, "accuracy": float((probs.argmax(axis=1) == labels).mean())}


def format_metrics(name: str, m: dict, epochs: int) -> str:
    line = (f"{name} epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.4f}  "
            f"train acc {100 * m['train_accuracy']:5.1f}%")
    if "test_accuracy" in m:
        line += f"  test loss {m['test_loss']:.4f}  test acc {100 * m['test_accuracy']:5.2f}%"
    return line + f"  lr {m['lr']:.2e}  {m['epoch_seconds']:.2f} s"


class _bar:
    """A rich progress bar over one epoch's batches, on a terminal only (it would leave a
    line per refresh in a log)."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.description, self.total = description, total
        self.bar = None
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                           TimeElapsedColumn)

                self.bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self):
        if self.bar is None:
            return lambda: None
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


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


@contextlib.contextmanager
def compile_notice(say=None, on_first=None):
    """While the block runs, tell when Numba compiles a kernel (its cache is cold: the first
    run, or after an upgrade): one line before the first, then one per kernel with its time,
    and the total; ``say=None``: silent. ``on_first()`` runs as the first compile starts (a
    text it returns is said too)."""
    if say is None and on_first is None:
        yield
        return
    from numba.core import event

    from .cpu_jit import SUFFIX

    say = say or (lambda text: None)

    class Notice(event.Listener):
        def __init__(self):
            self.depth, self.count, self.seconds, self.t0 = 0, 0, 0.0, 0.0

        def on_start(self, ev):
            if self.depth == 0:
                if self.count == 0:
                    say("compiling CPU kernels (first run only: Numba caches them on disk)")
                    note = on_first() if on_first is not None else None
                    if note:
                        say(note)
                self.t0 = time.perf_counter()
            self.depth += 1

        def on_end(self, ev):
            self.depth -= 1
            if self.depth == 0:
                dt = time.perf_counter() - self.t0
                self.count += 1
                self.seconds += dt
                f = ev.data["dispatcher"].py_func
                say(f"  [{self.count}] {f.__module__.removeprefix('gpunn.')}."
                    f"{f.__qualname__.removesuffix(SUFFIX)} {dt:.1f} s")

    notice = Notice()
    with event.install_listener("numba:compile", notice):
        yield
    if notice.count:
        say(f"compiled {notice.count} CPU kernels in {notice.seconds:.1f} s")


def compile_backward_kernels(in_features: int, num_classes: int, width: int, depth: int,
                             dropout: float, lr: float, weight_decay: float) -> None:
    """Compile into Numba's disk cache the CPU kernels of the second half of a training step
    of the job's model (the backward of dropout and batch norm + ReLU, the AdamW step), as
    the trainer calls them (one thread). The forward runs on the NumPy reference, so that
    nothing of the first half compiles here: :func:`backward_compiler` runs this in a second
    process while the trainer compiles the first half."""
    model = mlp(in_features, num_classes, width, depth, dropout, 0).to("numpy")
    x = np.random.default_rng(0).standard_normal((8, in_features), dtype=np.float32)
    logits = model(x)
    model.to("cpu")
    with numba_threads(1):
        model.zero_grad()
        model.backward(np.full_like(logits, 1.0 / logits.size), input_grad=False)
        AdamW(model.parameters(), lr=lr, weight_decay=weight_decay).step()


def backward_compiler_command(args: list) -> list[str]:
    """The command running ``compile_backward_kernels(*args)`` with this very gpunn (loaded
    from its folder, not from whichever the second interpreter's path finds first)."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(package, "__init__.py")
    return [sys.executable, "-c", (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpunn', {init!r}, "
        f"submodule_search_locations=[{package!r}])\n"
        "sys.modules['gpunn'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from gpunn.train import compile_backward_kernels\n"
        f"compile_backward_kernels(*{args!r})\n")]


@contextlib.contextmanager
def backward_compiler(config: TrainConfig, train_set: Dataset):
    """Yields a function that starts :func:`compile_backward_kernels` for this job in a
    second process (once; on the host, with two or more CPUs) and returns a line saying so
    (None when it starts nothing); the process is stopped when the block ends. On a cold cache the trainer calls it as its first kernel compiles: the
    two halves of the step compile side by side (measured: the batch norm backward alone
    is ~10 s of the ~35 s of CPU the job's kernels take to compile)."""
    import subprocess

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    started = []

    def start():
        if started or config.resolved_device() != "cpu" or (cpus or 1) < 2:
            return None
        args = [int(np.prod(train_set.sample_shape)), train_set.num_classes, config.width,
                config.depth, config.dropout, config.lr, config.weight_decay]
        started.append(subprocess.Popen(
            backward_compiler_command(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        return "  (the backward pass's kernels compile in a second process meanwhile)"

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()


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


__all__ = ["AugmentConfig", "Interrupted", "NothingToResume", "RunExists", "TrainConfig",
           "Trainer", "best_device", "build", "check_output", "compile_notice",
           "curves_figure", "datasets", "find_lr", "mlp", "run_files", "scores", "summary",
           "train", "write_report"]
