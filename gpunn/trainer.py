"""A Trainer for one classifier: epochs of shuffled batches (augmented, fused steps),
evaluation, history and checkpoints; and the job's model, the MLP of ``gpunn train``.

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
import math
import time

import numpy as np

from . import backend as _backend
from . import checkpoint, ops
from .backend import numba_threads
from .data import DataLoader, Dataset
from .nn import BatchNorm1d, CrossEntropyLoss, Dropout, Flatten, Linear, ReLU, Sequential
from .nn.arena import transfer

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
