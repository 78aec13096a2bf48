"""Training epochs: gpunn's Trainer against the same model, data and batches in PyTorch.

What is timed: ONE training epoch (every batch: gather, augment, forward, loss, backward,
AdamW step, per-batch lr schedule step; the epoch's loss read back at the end, which also
synchronizes a GPU). The median of several epochs after a warm-up epoch; contenders are timed
in rounds (A B C D A B C D ...) so machine noise hits them alike.

Models (``--models``)
    digits       the default ``gpunn train`` job: scikit-learn's digits (1347 training samples
                 after the 25% hold-out), TrainConfig() defaults: width 256, depth 2, dropout
                 0.2, batch 64.
    mnist-like   8192 synthetic samples shaped (1, 28, 28), 10 classes; width 1024, depth 2,
                 dropout 0.2, batch 128 (bigger matrix products).
    tiny         256 synthetic (1, 8, 8) samples, width 32, depth 1, batch 32 (for tests).
Each model runs twice: with the default random affine augmentation ("augment") and without
("plain"). Learning rate, weight decay, label smoothing and the warm-up + cosine schedule
are TrainConfig()'s, the schedule sized for its 40 epochs.

Contenders
    CPU   gpunn cpu (``Trainer.train_epoch`` of :func:`gpunn.train.build`: the Numba kernels,
          one BLAS thread inside the epoch as the job runs), gpunn numpy (the same on the
          NumPy reference backend, for information), torch and torch fused (torch.nn
          .Sequential of the same layers, CrossEntropyLoss with the same label smoothing,
          torch.optim.AdamW default / fused=True, SequentialLR(LinearLR, CosineAnnealingLR)
          stepped per batch; torch's own thread pool with as many threads as usable cores,
          or each count of ``--torch-threads`` as its own pair of contenders, "torch 1t"...).
          The faster torch contender of a case is the baseline. On a machine that other
          work keeps busy, torch's multi-threaded regions wait for descheduled threads:
          measured on a loaded 2-core machine, 8 steps of the tiny model took 400 ms on two
          torch threads and 20 ms on one (``--torch-threads 1,2`` shows both).
    GPU   gpunn cuda, torch cuda (foreach AdamW, torch's default on CUDA), torch cuda fused;
          the data on the device for both, batches gathered there.
Augmentation in torch: ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zero padding,
align_corners=False) with the matrices gpunn's kernel draws (``gpunn.ops.random_affine``),
drawn once beforehand and not timed (gpunn draws its own inside the epoch); its warp time
counts in torch's epoch as ours does in gpunn's.

Same model, same data, same batches: torch's layers are built from gpunn's model and start
from a copy of its state dict; both visit the samples in ``gpunn.data.order(n, seed, epoch)``.
Check before timing (per model and device): one epoch without dropout and augmentation from
the same weights; each contender's mean training loss must match torch's (default AdamW)
within 1e-4 relative, and torch's warp of a batch must match gpunn's. A contender that does
not match is flagged (status 'wrong', note 'mismatch: ...') and the model's cases are not
timed.

Records (one per case and contender, :class:`TrainRecord`): median_s is seconds per epoch;
ratio_vs_torch = seconds / the faster torch variant's (role 'torch'; the target is <= 1.2 on
the CPU and <= 1.0 on the GPU, ``target_ratio``), speedup_vs_torch its inverse,
speedup_vs_numpy = gpunn numpy's seconds / seconds; error is the check's relative loss
difference and loss the check epoch's loss.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import harness
from .harness import Record

SUITE = "train"
#: gpunn's epoch over torch's: the most the issue's target allows, by device.
TARGET_RATIO = {"cpu": 1.2, "cuda": 1.0}
#: relative difference of the check epoch's mean loss that counts as the same training
CHECK_RTOL = 1e-4
#: seconds per epoch: a warm-up epoch, then at least 5 timed ones (more for fast epochs)
EPOCH_POLICY = harness.Policy(target_s=1.0, min_reps=5, max_reps=15, warmup=1,
                              slow_s=math.inf)
GPU_EPOCH_POLICY = harness.Policy(target_s=0.5, min_reps=5, max_reps=20, warmup=2,
                                  slow_s=math.inf)


@dataclass(frozen=True)
class Model:
    """One case's model and data. ``samples`` and ``sample_shape`` are for synthetic data
    (``data='synthetic'``); digits takes its own."""

    name: str
    data: str  # 'digits' | 'synthetic'
    width: int
    depth: int
    batch_size: int
    dropout: float = 0.2
    samples: int = 0
    sample_shape: tuple = ()
    classes: int = 10


def _digits_model() -> Model:
    from ..train_config import TrainConfig

    c = TrainConfig()
    return Model("digits", "digits", c.width, c.depth, c.batch_size, c.dropout)


MODELS = {
    "digits": _digits_model(),
    "mnist-like": Model("mnist-like", "synthetic", 1024, 2, 128, 0.2, 8192, (1, 28, 28), 10),
    "tiny": Model("tiny", "synthetic", 32, 1, 32, 0.2, 256, (1, 8, 8), 4),
}
DEFAULT_MODELS = ("digits", "mnist-like")
AUGMENT = ("augment", "plain")


@dataclass
class Options(harness.Options):
    """What to run."""

    models: list[str] | None = None
    augment: list[str] | None = None
    torch_threads: list[int] | None = None


def add_arguments(parser) -> None:
    parser.add_argument("--models", type=harness.names_type(tuple(MODELS), "model(s)"),
                        metavar="NAME[,NAME...]",
                        help=f"any of {', '.join(MODELS)} (default {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--augment", type=harness.names_type(AUGMENT, "augment mode(s)"),
                        metavar="MODE[,MODE]",
                        help="augment (the default random affine warp), plain, or both "
                             "(default)")
    parser.add_argument("--torch-threads", type=_thread_counts, metavar="N[,N...]",
                        help="torch's intra-op thread counts to time (each a pair of torch "
                             "contenders; default: the usable cores)")


def _thread_counts(text: str) -> list[int]:
    import argparse

    try:
        counts = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be integers >= 1, got {text!r}")
    return counts


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass
class TrainRecord(Record):
    """A Record with the training case's own fields (see the module docstring)."""

    augment: bool = False
    samples: int = 0
    batch_size: int = 0
    width: int = 0
    depth: int = 0
    steps: int = 0  # batches per epoch
    threads: int | None = None  # torch's intra-op threads, or gpunn's BLAS threads
    loss: float | None = None  # the check epoch's mean training loss
    ratio_vs_torch: float | None = None
    speedup_vs_numpy: float | None = None
    target_ratio: float | None = None


# --- data and the gpunn side -----------------------------------------------------------------


def dataset(model: Model, seed: int = 0):
    """The training set of a case: digits' training split, or seeded synthetic data."""
    from ..data import Dataset
    from ..train import TrainConfig, datasets

    if model.data == "digits":
        return datasets(TrainConfig())[0]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((model.samples,) + tuple(model.sample_shape), dtype=np.float32)
    y = rng.integers(0, model.classes, model.samples)
    return Dataset(x, y, model.classes, name=f"synthetic {model.name}")


def gpunn_trainer(model: Model, train, device: str, *, augment: bool, dropout: bool,
                  seed: int = 0):
    """The Trainer ``gpunn train`` builds for this model (TrainConfig's other defaults), with
    no test set and no progress bar."""
    from ..train import build
    from ..train_config import AugmentConfig, TrainConfig

    config = TrainConfig(width=model.width, depth=model.depth, batch_size=model.batch_size,
                         dropout=model.dropout if dropout else 0.0,
                         augment=AugmentConfig() if augment else None, seed=seed,
                         device=device)
    return build(config, train, None, progress=False)


# --- the torch side ----------------------------------------------------------------------------


def torch_layers(model, torch):
    """A torch.nn.Sequential of the same layers as gpunn's Sequential ``model``."""
    nn = torch.nn
    layers = []
    for i, layer in enumerate(model.layers):
        kind = type(layer).__name__
        if kind == "Flatten":
            layers.append(nn.Flatten(layer.start_dim, layer.end_dim))
        elif kind == "Linear":
            layers.append(nn.Linear(layer.in_features, layer.out_features,
                                    bias=layer.bias is not None))
        elif kind == "BatchNorm1d":
            layers.append(nn.BatchNorm1d(layer.num_features, eps=layer.eps,
                                         momentum=layer.momentum, affine=layer.affine,
                                         track_running_stats=layer.track_running_stats))
        elif kind == "ReLU":
            layers.append(nn.ReLU())
        elif kind == "Dropout":
            layers.append(nn.Dropout(layer.p))
        else:
            raise TypeError(f"torch_layers: layer {i} ({kind}) has no torch counterpart here")
    return nn.Sequential(*layers)


class TorchEpoch:
    """What ``trainer.train_epoch()`` does, in PyTorch, from the same start: the layers of
    ``trainer.model`` with a copy of its weights, AdamW with its hyperparameters (``fused``),
    the same warm-up + cosine schedule stepped per batch, the same label smoothing, batch
    size, sample order and (when the trainer augments) warp matrices. Calling it runs one
    epoch and returns the mean training loss (a float: the device is synchronized); with
    ``threads``, torch's intra-op threads are set to that count first.

    ``hook(torch_model)``, if given, runs after the weights are copied (tests use it to
    make a model that differs)."""

    def __init__(self, trainer, device: str = "cpu", fused: bool = False, hook=None,
                 threads: int | None = None):
        import torch

        from ..nn.arena import transfer
        from ..ops.augment import random_affine

        self.torch = torch
        self.threads = threads
        self.dev = torch.device(device)
        self.model = torch_layers(trainer.model, torch)
        state = {k: torch.from_numpy(np.array(transfer(v, np)))
                 for k, v in trainer.model.state_dict().items()}
        self.model.load_state_dict(state)
        self.model.to(self.dev)
        if hook is not None:
            hook(self.model)
        group = trainer.optimizer.param_groups[0]
        flags = dict(fused=True) if fused else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=group["lr"],
                                           betas=tuple(group["betas"]), eps=group["eps"],
                                           weight_decay=group["weight_decay"], **flags)
        # the gpunn scheduler already set the lr of step 0: start torch's from the base lr
        base = group.get("initial_lr", group["lr"])
        for g in self.optimizer.param_groups:
            g["lr"] = base
        self.scheduler = self._schedule(trainer.scheduler)
        self.criterion = torch.nn.CrossEntropyLoss(
            label_smoothing=trainer.criterion.label_smoothing)
        data = trainer.train_data
        self.x = torch.from_numpy(data.x).to(self.dev)
        self.y = torch.from_numpy(data.y).to(self.dev)
        self.n, self.batch_size = len(data), trainer.loader.batch_size
        self.seed, self.epoch = trainer.seed, 0
        self.thetas = None
        if trainer.augment is not None:
            h, w = data.x.shape[-2:]
            thetas = random_affine(self.n, trainer.seed, 0, aspect=w / h,
                                   **trainer.augment.kwargs())
            self.thetas = torch.from_numpy(thetas).to(self.dev)

    def _schedule(self, gpunn_scheduler):
        torch = self.torch
        lr = torch.optim.lr_scheduler
        if gpunn_scheduler is None:
            return None
        s = gpunn_scheduler
        cosine = lr.CosineAnnealingLR(self.optimizer, T_max=s.T_max, eta_min=s.eta_min)
        if not s.warmup_steps:
            return cosine
        # re-created after the warm-up's: each scheduler sets the lr when it is built
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warm = lr.LinearLR(self.optimizer, start_factor=s.warmup_start_factor,
                               end_factor=1.0, total_iters=s.warmup_steps)
            return lr.SequentialLR(self.optimizer, [warm, cosine],
                                   milestones=[s.warmup_steps])

    def warp(self, xb, thetas):
        """The augmentation of one batch: affine_grid + grid_sample with the given matrices."""
        F = self.torch.nn.functional
        x4 = xb if xb.dim() == 4 else xb.unsqueeze(1)
        grid = F.affine_grid(thetas, list(x4.shape), align_corners=False)
        out = F.grid_sample(x4, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        return out if xb.dim() == 4 else out.squeeze(1)

    def __call__(self) -> float:
        from ..data import order

        torch = self.torch
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        idx = torch.from_numpy(order(self.n, shuffle=True, seed=self.seed,
                                     epoch=self.epoch)).to(self.dev)
        model, opt, sched, crit = self.model, self.optimizer, self.scheduler, self.criterion
        model.train()
        total = torch.zeros((), dtype=torch.float64, device=self.dev)
        correct = torch.zeros((), dtype=torch.int64, device=self.dev)
        for start in range(0, self.n, self.batch_size):
            part = idx[start:start + self.batch_size]
            xb = self.x.index_select(0, part)
            yb = self.y.index_select(0, part)
            if self.thetas is not None:
                # the matrices of this position of the epoch (those of epoch 0: the draws
                # differ from epoch to epoch, the work does not)
                xb = self.warp(xb, self.thetas[start:start + len(part)])
            logits = model(xb)
            loss = crit(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += loss.detach() * len(part)
            correct += (logits.argmax(dim=1) == yb).sum()
        self.epoch += 1
        return float(total) / self.n  # reads the device: the epoch's end


# --- contenders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One contender: gpunn on a backend, or torch (``fused`` AdamW or not, on ``threads``
    intra-op threads where given) on a device."""

    name: str
    kind: str  # 'gpunn' | 'torch'
    device: str  # gpunn: cpu | numpy | cuda; torch: cpu | cuda
    fused: bool = False
    threads: int | None = None

    @property
    def role(self) -> str:
        return "gpunn" if self.name.startswith("gpunn") and self.device != "numpy" \
            else "baseline"


GPU_SIDES = (Side("gpunn cuda", "gpunn", "cuda"), Side("torch cuda", "torch", "cuda"),
             Side("torch cuda fused", "torch", "cuda", True))


def cpu_sides(torch_threads=None) -> tuple[Side, ...]:
    """gpunn cpu, gpunn numpy, then torch and torch fused for each thread count (default:
    the usable cores; names carry the count when there are several)."""
    counts = list(torch_threads or [usable_cores()])
    sides = [Side("gpunn cpu", "gpunn", "cpu"), Side("gpunn numpy", "gpunn", "numpy")]
    for n in counts:
        suffix = f" {n}t" if len(counts) > 1 else ""
        sides += [Side(f"torch{suffix}", "torch", "cpu", False, n),
                  Side(f"torch fused{suffix}", "torch", "cpu", True, n)]
    return tuple(sides)


def reference(sides) -> Side:
    """The check's reference: the first torch contender (default AdamW)."""
    return next(s for s in sides if s.kind == "torch")


def make_epoch(side: Side, model: Model, train, *, augment: bool, dropout: bool, seed: int,
               hook=None) -> Callable[[], float]:
    """A fresh contender (same initial weights for every side: gpunn's, seeded) whose call
    runs one epoch and returns its mean training loss."""
    backend = side.device if side.kind == "gpunn" else ("cuda" if side.device == "cuda"
                                                        else "cpu")
    trainer = gpunn_trainer(model, train, backend, augment=augment, dropout=dropout,
                            seed=seed)
    if side.kind == "gpunn":
        return lambda: trainer.train_epoch()["train_loss"]
    return TorchEpoch(trainer, side.device, side.fused, hook, side.threads)


def _warp_error(model: Model, train, device: str, seed: int) -> float:
    """Relative difference between gpunn's augmentation of the first batch and torch's warp
    of it with the matrices gpunn draws."""
    import torch

    from .. import ops
    from ..nn.arena import transfer

    trainer = gpunn_trainer(model, train, "cuda" if device == "cuda" else "cpu",
                            augment=True, dropout=False, seed=seed)
    xb, _ = next(iter(trainer.loader.epoch(0)))
    ours = transfer(ops.augment(xb, trainer.seed, 0, backend=trainer.model.device,
                                **trainer.augment.kwargs()), np)
    t = TorchEpoch(trainer, device)
    xt = torch.from_numpy(np.array(transfer(xb, np))).to(t.dev)
    theirs = t.warp(xt, t.thetas[:len(xb)]).cpu().numpy()
    return harness.rel_err(np.asarray(ours), theirs)


def check(model: Model, train, sides, device: str, seed: int, hook=None) -> dict:
    """One epoch without dropout or augmentation from the same weights, per contender:
    {name: (loss, relative difference from the reference's loss, mismatch note or '')};
    the key 'warp' holds the augmentation check (None, error, note)."""
    losses, out = {}, {}
    for side in sides:
        try:
            losses[side.name] = float(make_epoch(side, model, train, augment=False,
                                                 dropout=False, seed=seed, hook=hook)())
        except Exception as e:  # noqa: BLE001 - recorded as the contender's error
            losses[side.name] = e
    ref_name = reference(sides).name
    ref = losses.get(ref_name)
    for name, loss in losses.items():
        if isinstance(loss, Exception):
            out[name] = (None, None, f"error: {harness._short(loss)}")
            continue
        if not isinstance(ref, float):
            out[name] = (loss, None, "no reference loss")
            continue
        rel = abs(loss - ref) / max(abs(ref), 1e-30)
        ok = math.isfinite(loss) and rel <= CHECK_RTOL
        out[name] = (loss, rel, "" if ok else
                     f"mismatch: epoch loss {loss:.7g} vs {ref_name} {ref:.7g} "
                     f"(rel {rel:.1e} > {CHECK_RTOL:g})")
    try:
        err = _warp_error(model, train, device, seed)
        out["warp"] = (None, err, "" if err <= CHECK_RTOL else
                       f"mismatch: torch's warp differs from gpunn's augment (rel {err:.1e})")
    except Exception as e:  # noqa: BLE001
        out["warp"] = (None, None, f"mismatch: warp check failed: {harness._short(e)}")
    return out


# --- running ---------------------------------------------------------------------------------


def _threads(side: Side, torch) -> int | None:
    if side.kind == "torch":
        return side.threads or torch.get_num_threads() if side.device == "cpu" else None
    if side.device == "cuda":
        return None
    return usable_cores()  # BLAS's threads; the Numba kernels run on one (train.training_threads)


def _sync(device: str, side: Side):
    if device != "cuda":
        return lambda: None
    if side.kind == "torch":
        import torch

        return torch.cuda.synchronize
    import cupy

    return lambda: cupy.cuda.Device().synchronize()


def run_model(runner: harness.Runner, device: str, model: Model, hook=None) -> None:
    """The cases of one model on one device: check, then augment / plain timed."""
    import torch

    modes = harness.selected(runner.options, "augment", AUGMENT)
    sides = (cpu_sides(harness.option(runner.options, "torch_threads")) if device == "cpu"
             else GPU_SIDES)
    seed = runner.seed
    train = dataset(model, seed)
    features = int(np.prod(train.sample_shape))
    steps = -(-len(train) // model.batch_size)
    policy = (harness.QUICK_POLICY if harness.option(runner.options, "quick", False)
              else EPOCH_POLICY if device == "cpu" else GPU_EPOCH_POLICY)

    def base(mode: str) -> dict:
        return dict(suite=SUITE, device=device, op=model.name, direction=mode,
                    shape=[len(train), features], dtype="float32", bytes=0)

    checked = None
    for mode in modes:
        if not runner.admit(base(mode)):
            continue
        t0 = runner.clock()
        if checked is None:
            checked = check(model, train, sides, device, seed, hook)
            runner.say(f"  {model.name} ({device}) check: " + ", ".join(
                f"{k} {v[0]:.6g}" if v[0] is not None else f"{k} {v[2] or 'ok'}"
                for k, v in checked.items()))
        augment = mode == "augment"
        bad = {n: v[2] for n, v in checked.items()
               if v[2] and (n != "warp" or augment)}
        records = []
        for side in sides:
            loss, rel, note = checked[side.name]
            rec = TrainRecord(**base(mode), impl=side.name, role=side.role,
                              augment=augment, samples=len(train),
                              batch_size=model.batch_size, width=model.width,
                              depth=model.depth, steps=steps, threads=_threads(side, torch),
                              loss=loss, error=rel, target_ratio=TARGET_RATIO[device])
            if side.name in bad:
                rec.status, rec.note = "wrong", bad[side.name]
            elif bad:
                rec.status = "skipped"
                rec.note = "not timed: " + "; ".join(
                    f"{n}: {v}" for n, v in bad.items())[:200]
            records.append(rec)
        ready: list[tuple[TrainRecord, Callable[[], Any]]] = []
        if not bad:
            for side, rec in zip(sides, records):
                try:
                    epoch, sync = make_epoch(side, model, train, augment=augment,
                                             dropout=True, seed=seed, hook=hook), \
                        _sync(device, side)
                    ready.append((rec, lambda epoch=epoch, sync=sync: (epoch(), sync())))
                except Exception as e:  # noqa: BLE001
                    rec.status, rec.note = "error", harness._short(e)
            timings = harness.time_cpu_interleaved([call for _, call in ready], policy,
                                                   runner.clock, runner.deadline)
            for (rec, _), timing in zip(ready, timings):
                if isinstance(timing, Exception):
                    rec.status, rec.note = "error", harness._short(timing)
                else:
                    rec.set_timing(timing)
                    if timing.cut_short:
                        rec.note = f"{timing.reps} epoch(s) timed: the time budget ran out"
        runner.records.extend(records)
        runner.say(f"[{runner.count}] {model.name} {mode} ({device}): "
                   f"{runner.clock() - t0:.1f} s; " + ", ".join(
                       f"{r.impl} {r.median_s * 1e3:.1f} ms" if r.median_s else
                       f"{r.impl} {r.status}" for r in records))
        del ready
        if device == "cuda":
            harness.free_gpu_memory()


def _models(options) -> list[Model]:
    return [MODELS[name] for name in harness.option(options, "models", DEFAULT_MODELS)]


def _run_cpu(runner: harness.Runner, hook=None) -> None:
    import torch

    previous = torch.get_num_threads()
    try:
        for model in _models(runner.options):
            run_model(runner, "cpu", model, hook)
    finally:
        torch.set_num_threads(previous)


def _run_gpu(runner: harness.Runner, hook=None) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the train suite's GPU part needs torch with CUDA")
    for model in _models(runner.options):
        run_model(runner, "cuda", model, hook)


def summarize(records: list[Record]) -> list[Record]:
    """Per case: the faster torch variant becomes role 'torch'; ratio_vs_torch,
    speedup_vs_torch and speedup_vs_numpy of every timed record; no GB/s (not a bandwidth
    benchmark)."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        r.gbps = r.limit_gbps = r.frac_of_limit = None
        r.speedup_vs_torch = None
        groups.setdefault(r.key(), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r.status == "ok" and r.median_s]
        torch_runs = [r for r in timed if r.impl.startswith("torch")]
        numpy_run = next((r for r in timed if r.impl == "gpunn numpy"), None)
        best = min(torch_runs, key=lambda r: r.median_s) if torch_runs else None
        if best is not None:
            best.role = "torch"
        for r in timed:
            if best is not None:
                r.speedup_vs_torch = best.median_s / r.median_s
                if isinstance(r, TrainRecord):
                    r.ratio_vs_torch = r.median_s / best.median_s
            if numpy_run is not None and isinstance(r, TrainRecord):
                r.speedup_vs_numpy = numpy_run.median_s / r.median_s
    return records


def run(options=None, *, torch_hook=None) -> list[Record]:
    """Run the suite; returns the records (CPU first, then GPU). ``torch_hook(torch_model)``
    runs on every torch model after its weights are copied from gpunn's (for tests)."""
    options = options or Options()
    records = harness.run_suite(SUITE, options, lambda r: _run_cpu(r, torch_hook),
                                lambda r: _run_gpu(r, torch_hook))
    return summarize(records)
