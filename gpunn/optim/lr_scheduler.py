r"""Learning-rate schedules and the learning-rate range test, for gpunn and torch optimizers.

Every scheduler here only reads and writes ``optimizer.param_groups``: a list of dicts each
holding a float ``'lr'``. gpunn's optimizers and every ``torch.optim.Optimizer`` have it, so one
scheduler class drives both, and nothing here imports torch. As ``torch.optim.lr_scheduler``
does, a scheduler stores each group's starting lr as ``group['initial_lr']`` (kept if already
there) and uses it as the group's base lr; a new scheduler sets the lrs for step 0 at once.

Usage is torch's: ``optimizer.step()`` once per batch (or epoch), then ``scheduler.step()``.

    StepLR              lr_t = base * gamma^floor(t / step_size)
    ExponentialLR       lr_t = base * gamma^t
    CosineAnnealingLR   lr_t = eta_min + (base - eta_min) (1 + cos(pi t / T_max)) / 2,
                        after an optional linear warm-up of ``warmup_steps`` steps

Values and semantics are those of torch's StepLR, ExponentialLR and CosineAnnealingLR
(CosineAnnealingLR with warm-up W equals torch's ``SequentialLR([LinearLR(opt, start_factor,
total_iters=W), CosineAnnealingLR(opt, T_max, eta_min)], milestones=[W])``), computed in closed
form from the step count t = ``last_epoch``. torch updates most lrs recursively (lr_t from
lr_{t-1}); in float64 the two agree to about 1e-14 relative over hundreds of steps (cosine:
1.6e-13 after 3000 steps with T_max=1000, measured with torch 2.13), since the recursion
accumulates one rounding per step. The closed form has no such drift, and also differs where
torch's recursion is not a schedule of t alone:

- an lr changed by hand (or by a second scheduler) between steps is overwritten at the next
  step by lr(t); torch multiplies the changed value on;
- built with ``last_epoch=k`` (resuming), the lrs become lr(k+1) at once; torch's (2.13)
  keep each group's current lr as the lr of step k+1 and go on recursively from it, so its
  resumed schedule depends on what the optimizer held (resume through ``load_state_dict``,
  which both handle alike);
- ``step()`` takes no ``epoch`` argument (deprecated in torch since 1.4), and the optimizer's
  ``step`` is not wrapped to warn about calling the two in the wrong order.

Past ``T_max`` the cosine keeps going, as torch's does: it rises back to base over the next
T_max steps (period 2 T_max); schedule ``T_max`` to the length of training to avoid that.

``state_dict()`` holds the same entries as torch's scheduler (``base_lrs``, ``last_epoch``,
``_step_count``, ``_last_lr`` and the hyperparameters), so a state saved by either loads into
the other's scheduler of the same kind (CosineAnnealingLR: without warm-up).

``lr_range_test`` runs the learning-rate range test (L. Smith, "Cyclical learning rates for
training neural networks", 2017; the fastai "lr finder"): train one batch per lr while the lr
grows geometrically from tiny to huge, stop when the loss blows up, and suggest the lr one
decade below the lowest (smoothed) loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..validation import integer, real

__all__ = [
    "LRScheduler",
    "StepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LRRangeTestResult",
    "lr_range_test",
]

# --- argument checks: each returns the value normalized, or raises naming the argument -------


def _positive_int(name, value):
    return integer(None, name, value, 1)


def _nonnegative_int(name, value):
    return integer(None, name, value, 0)


def _positive_real(name, value):
    return real(None, name, value, 0.0, lo_open=True)


def _nonnegative_real(name, value):
    return real(None, name, value, 0.0)


def _unit_interval(name, value):
    return real(None, name, value, 0.0, 1.0)


def _lr_value(value, name):
    """A group's lr as a float (it may be a float, a NumPy scalar or a 0-d tensor)."""
    try:
        lr = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number; got {value!r:.80}") from None
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {lr!r}")
    return lr


def _param_groups(optimizer):
    """``optimizer.param_groups`` after checking it is a non-empty list of dicts with an 'lr'."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, Sequence) or isinstance(groups, (str, bytes)) or not groups:
        raise TypeError(
            "optimizer must have `param_groups`, a non-empty list of dicts holding 'lr' (as "
            f"gpunn.optim and torch.optim optimizers do); got {type(optimizer).__name__}")
    for i, group in enumerate(groups):
        if not isinstance(group, MutableMapping) or "lr" not in group:
            raise TypeError(f"optimizer.param_groups[{i}] must be a dict holding 'lr'; "
                            f"got {group!r:.80}")
        _lr_value(group["lr"], f"optimizer.param_groups[{i}]['lr']")
    return groups


def _set_lr(group, lr):
    """Write ``lr`` into a group: in place where the lr is a tensor (torch's capturable
    optimizers keep it so, and share it with compiled steps), else as a Python float."""
    current = group["lr"]
    if hasattr(current, "fill_"):
        current.fill_(lr)
    else:
        group["lr"] = lr


# --- schedulers ----------------------------------------------------------------------------------

# Entries torch's schedulers keep in their state dicts that have no meaning here.
_TORCH_ONLY_KEYS = frozenset({"_get_lr_called_within_step", "_is_initial", "verbose"})


class LRScheduler:
    """Base class: sets every group's lr to ``lr_at(base_lr, t)`` at step t = ``last_epoch``.

    A subclass lists its hyperparameters with their checks in ``_hparams`` and defines
    ``lr_at``; construction, stepping, checks and the state dict live here.

    Attributes: ``optimizer``; ``base_lrs`` (each group's ``initial_lr``); ``last_epoch`` (the
    step the current lrs belong to: 0 after construction, +1 per ``step()``).
    """

    #: hyperparameter name -> check(name, value) returning the value normalized.
    _hparams: dict[str, Callable] = {}

    def __init__(self, optimizer, last_epoch=-1, **hparams):
        groups = _param_groups(optimizer)
        hparams = {name: self._hparams[name](name, value) for name, value in hparams.items()}
        last_epoch = integer(None, "last_epoch", last_epoch, -1)
        if last_epoch == -1:
            base_lrs = [_lr_value(g.get("initial_lr", g["lr"]),
                                  f"optimizer.param_groups[{i}]['initial_lr']")
                        for i, g in enumerate(groups)]
        else:
            missing = [i for i, g in enumerate(groups) if "initial_lr" not in g]
            if missing:
                raise KeyError(
                    f"last_epoch={last_epoch} resumes a schedule, which needs 'initial_lr' in "
                    f"every param group (restore the optimizer's state dict first); groups "
                    f"{missing} have none")
            base_lrs = [_lr_value(g["initial_lr"], f"optimizer.param_groups[{i}]['initial_lr']")
                        for i, g in enumerate(groups)]
        # Checked: from here on nothing raises.
        for group, base in zip(groups, base_lrs):
            group.setdefault("initial_lr", base)
        self.optimizer = optimizer
        self.__dict__.update(hparams)
        self.base_lrs = base_lrs
        self.last_epoch = last_epoch
        self._step_count = 0
        self.step()

    def lr_at(self, base_lr: float, t: int) -> float:
        """The lr at step ``t`` of a group whose base lr is ``base_lr``."""
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and set every group's lr (call after ``optimizer.step()``)."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.base_lrs):
            raise ValueError(
                f"optimizer has {len(groups)} param groups but this scheduler was built for "
                f"{len(self.base_lrs)}; create the scheduler after the last add_param_group")
        self._step_count += 1
        self.last_epoch += 1
        self._last_lr = [self.lr_at(base, self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(groups, self._last_lr):
            _set_lr(group, lr)

    def get_last_lr(self) -> list[float]:
        """The lrs set by the last ``step()`` (or construction), one per param group."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        """Everything but the optimizer, with the keys torch's schedulers use."""
        return {key: list(value) if isinstance(value, list) else value
                for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore a state from ``state_dict()`` (this class's or torch's scheduler of the same
        kind). As torch's, it leaves the optimizer's lrs alone: restore those with the
        optimizer's own state dict. Checks everything before changing anything."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict; got {type(state_dict).__name__}")
        own = self.state_dict()
        unknown = set(state_dict) - set(own) - _TORCH_ONLY_KEYS
        if unknown:
            raise ValueError(f"state_dict has entries {sorted(unknown)} that "
                             f"{type(self).__name__} does not have (another scheduler's state?)")
        missing = {"base_lrs", "last_epoch"} - set(state_dict)
        if missing:
            raise KeyError(f"state_dict lacks {sorted(missing)}")
        new = {key: state_dict[key] for key in own if key in state_dict}
        for name, check in self._hparams.items():
            if name in new:
                new[name] = check(f"state_dict[{name!r}]", new[name])
        n = len(self.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            if key in new:
                values = new[key]
                if not isinstance(values, Sequence) or len(values) != n:
                    raise ValueError(f"state_dict[{key!r}] must hold one lr per param group "
                                     f"({n}); got {values!r:.80}")
                new[key] = [_lr_value(v, f"state_dict[{key!r}][{i}]")
                            for i, v in enumerate(values)]
        new["last_epoch"] = _nonnegative_int("state_dict['last_epoch']", new["last_epoch"])
        if "_step_count" in new:
            new["_step_count"] = _nonnegative_int("state_dict['_step_count']",
                                                  new["_step_count"])
        self.__dict__.update(new)
        if "_last_lr" not in new:
            self._last_lr = [self.lr_at(base, self.last_epoch) for base in self.base_lrs]

    def __repr__(self):
        hparams = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._hparams)
        return f"{type(self).__name__}({hparams}, last_epoch={self.last_epoch})"


class StepLR(LRScheduler):
    """Multiply the lr by ``gamma`` every ``step_size`` steps (torch.optim.lr_scheduler.StepLR).

    Args: optimizer; step_size (int > 0); gamma (> 0, default 0.1); last_epoch (-1 to start).
    """

    _hparams = {"step_size": _positive_int, "gamma": _positive_real}

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        super().__init__(optimizer, last_epoch, step_size=step_size, gamma=gamma)

    def lr_at(self, base_lr, t):
        """lr_t = base * gamma^floor(t / step_size)."""
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(LRScheduler):
    """Multiply the lr by ``gamma`` every step (torch.optim.lr_scheduler.ExponentialLR).

    Args: optimizer; gamma (> 0); last_epoch (-1 to start).
    """

    _hparams = {"gamma": _positive_real}

    def __init__(self, optimizer, gamma, last_epoch=-1):
        super().__init__(optimizer, last_epoch, gamma=gamma)

    def lr_at(self, base_lr, t):
        """lr_t = base * gamma^t."""
        return base_lr * self.gamma**t


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the base lr to ``eta_min`` over ``T_max`` steps, optionally after
    a linear warm-up (torch's CosineAnnealingLR; with warm-up, torch's SequentialLR of LinearLR
    then CosineAnnealingLR).

    Args: optimizer; T_max (int > 0: steps of the cosine, after the warm-up); eta_min (>= 0,
    default 0); last_epoch (-1 to start); warmup_steps (int >= 0, default 0: no warm-up);
    warmup_start_factor (in [0, 1], default 1/3 as torch's LinearLR: the warm-up starts at
    this fraction of the base lr; 0 is allowed here, torch's LinearLR needs > 0).
    """

    _hparams = {"T_max": _positive_int, "eta_min": _nonnegative_real,
                "warmup_steps": _nonnegative_int, "warmup_start_factor": _unit_interval}

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1, warmup_steps=0,
                 warmup_start_factor=1.0 / 3):
        super().__init__(optimizer, last_epoch, T_max=T_max, eta_min=eta_min,
                         warmup_steps=warmup_steps, warmup_start_factor=warmup_start_factor)

    def lr_at(self, base_lr, t):
        """With W = warmup_steps and s = warmup_start_factor:

            t <  W:  lr_t = base * (s + (1 - s) t / W)
            t >= W:  lr_t = eta_min + (base - eta_min) (1 + cos(pi (t - W) / T_max)) / 2

        The cosine reaches eta_min at t = W + T_max, then rises again (period 2 T_max).
        """
        w, s = self.warmup_steps, self.warmup_start_factor
        if t < w:
            return base_lr * (s + (1.0 - s) * t / w)
        return self.eta_min + (base_lr - self.eta_min) * (
            1.0 + math.cos(math.pi * (t - w) / self.T_max)) / 2.0


# --- learning-rate range test --------------------------------------------------------------------

SUGGESTION_RULE = "one decade below the lr of the lowest smoothed loss"


@dataclass(frozen=True, eq=False)
class LRRangeTestResult:
    """What ``lr_range_test`` measured.

    lrs, losses, smoothed_losses: one entry per step run (float64 arrays); ``losses`` are the
    values ``train_step`` returned, ``smoothed_losses`` their bias-corrected exponential moving
    average. start_lr, end_lr, num_steps: the sweep asked for. stop_reason: None if every
    step ran, else why the sweep stopped ("diverged" or "non-finite loss"). suggested_lr: one
    decade below the lr of the lowest smoothed loss (``min_loss_lr / 10``); None when that
    lowest loss came at the first lr (the loss never fell: start lower).
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed_losses: np.ndarray
    start_lr: float
    end_lr: float
    num_steps: int
    diverge_factor: float
    stop_reason: str | None
    suggested_lr: float | None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None

    @property
    def min_loss_lr(self) -> float | None:
        """The lr with the lowest finite smoothed loss (None if there is none)."""
        finite = np.isfinite(self.smoothed_losses)
        if not finite.any():
            return None
        return float(self.lrs[np.flatnonzero(finite)[np.argmin(self.smoothed_losses[finite])]])

    def table(self) -> str:
        """A text report: the sweep, the suggestion, and the losses per decade of lr."""
        n = len(self.lrs)
        lines = [f"lr range test: {n} of {self.num_steps} steps, lr {self.start_lr:.3g} to "
                 f"{self.end_lr:.3g} on a log scale"]
        if self.stop_reason == "diverged":
            lines.append(f"stopped at lr {self.lrs[-1]:.3g}: smoothed loss above "
                         f"{self.diverge_factor:g} x its lowest")
        elif self.stop_reason is not None:
            lines.append(f"stopped at lr {self.lrs[-1]:.3g}: {self.stop_reason}")
        if self.suggested_lr is None:
            lines.append("suggested lr: none (the loss never fell: lower start_lr)")
        else:
            below = " (below the sweep: lower start_lr to check)" \
                if self.suggested_lr < self.start_lr else ""
            lines.append(f"suggested lr: {self.suggested_lr:.3g} ({SUGGESTION_RULE}){below}")
        lowest = self.min_loss_lr
        if lowest is not None:
            lines.append(f"lowest smoothed loss {np.nanmin(self.smoothed_losses):.6g} at lr "
                         f"{lowest:.3g}")
        if n:
            header = ("decade of lr", "steps", "first loss", "last loss", "last smoothed")
            rows = []
            decades = np.floor(np.log10(self.lrs) + 1e-9).astype(np.int64)
            for d in np.unique(decades):
                idx = np.flatnonzero(decades == d)
                rows.append((f"1e{d:+03d} .. 1e{d + 1:+03d}", str(idx.size),
                             f"{self.losses[idx[0]]:.6g}", f"{self.losses[idx[-1]]:.6g}",
                             f"{self.smoothed_losses[idx[-1]]:.6g}"))
            widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
            lines.append("")
            for row in [header, *rows]:
                lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        return "\n".join(lines)

    __str__ = table

    def plot(self, path=None):
        """Loss and smoothed loss against lr (log axis), the suggestion marked. Saves to
        ``path`` when given; returns the matplotlib Figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, color="0.7", linewidth=1, label="loss")
        ax.plot(self.lrs, self.smoothed_losses, color="C0", label="smoothed loss")
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color="C3", linestyle="--",
                       label=f"suggested lr {self.suggested_lr:.2g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        # Scale to the smoothed curve (and the lowest raw losses); the last point of a
        # diverged run would flatten everything else, so it stays off-scale.
        keep = slice(None, -1) if self.stopped_early else slice(None)
        smoothed, raw = self.smoothed_losses[keep], self.losses[keep]
        smoothed, raw = smoothed[np.isfinite(smoothed)], raw[np.isfinite(raw)]
        if smoothed.size > 1:
            low, high = min(smoothed.min(), raw.min()), smoothed.max()
            if high > low:
                ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.legend()
        ax.set_title("learning-rate range test")
        if path is not None:
            fig.savefig(path)
        return fig


def _suggest(smoothed, lrs):
    """One decade below the lr of the lowest smoothed loss; None if that is the first lr."""
    finite = np.flatnonzero(np.isfinite(smoothed))
    if finite.size == 0:
        return None
    lowest = finite[np.argmin(smoothed[finite])]
    return None if lowest == 0 else float(lrs[lowest]) / 10.0


def lr_range_test(train_step, optimizer, start_lr=1e-7, end_lr=10.0, num_steps=100, *,
                  smooth=0.98, diverge_factor=4.0, restore=None) -> LRRangeTestResult:
    r"""Sweep the lr on a log scale, one training batch per lr, and report the loss per lr.

    Step i (of ``num_steps``) sets every param group's lr to
    ``lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))`` (evenly spaced in
    log10(lr), ending exactly at end_lr), then calls ``train_step()``: the caller's one batch
    of forward, backward and ``optimizer.step()``, returning the loss (a float, NumPy scalar
    or one-element tensor). The losses are smoothed by a bias-corrected moving average,
    ``a_i = smooth a_{i-1} + (1 - smooth) loss_i``, ``s_i = a_i / (1 - smooth^{i+1})``.

    The sweep stops after the step whose smoothed loss exceeds ``diverge_factor`` times the
    lowest smoothed loss before it (a rule for losses >= 0; with a negative lowest loss only
    the next rule applies), or whose loss is not finite; that step is recorded.

    ``suggested_lr`` is one decade below the lr of the lowest smoothed loss (Smith's and
    fastai's classic reading: near the minimum the lr is already at the edge of stability, a
    decade lower still trains fast). The rule is robust to noise, unlike the steepest slope
    of the curve, which small noisy batches make jump; still, look at ``result.plot()`` or
    ``print(result)`` before trusting it. The moving average spans about
    ``1 / (1 - smooth)`` steps, so the smoothed curve, its minimum and the stop lag the raw
    losses by that much (measured on a quadratic with 20 lrs per decade: stop at 1.4 to 3.6
    times the lr where training turns unstable); more steps per decade shorten the lag.

    Every group's original lr is restored at the end, even when ``train_step`` raises. The
    model's weights and the optimizer's state (momentum, moments) are NOT restored: the sweep
    trains them to divergence. Pass ``restore``, a callable run at the end (also on error),
    to reload them, e.g. ``restore=lambda: (model.load_state_dict(w), opt.load_state_dict(o))``
    with ``w``, ``o`` deep copies of the two state dicts taken before; or rebuild both after.

    Args:
        train_step: callable taking no arguments, returning the batch loss.
        optimizer: any object with ``param_groups`` (gpunn or torch optimizer).
        start_lr, end_lr: the sweep's first and last lr (0 < start_lr < end_lr).
        num_steps: number of lrs (and batches), >= 2.
        smooth: moving-average factor in [0, 1) (0: no smoothing).
        diverge_factor: stop threshold, > 1 (``math.inf``: stop only on non-finite losses).
        restore: optional callable run after the sweep.
    Returns: an LRRangeTestResult.
    """
    if not callable(train_step):
        raise TypeError(f"train_step must be callable; got {type(train_step).__name__}")
    if restore is not None and not callable(restore):
        raise TypeError(f"restore must be callable or None; got {type(restore).__name__}")
    groups = _param_groups(optimizer)
    start_lr = _positive_real("start_lr", start_lr)
    end_lr = _positive_real("end_lr", end_lr)
    if end_lr <= start_lr:
        raise ValueError(f"end_lr must be greater than start_lr; got start_lr={start_lr!r}, "
                         f"end_lr={end_lr!r}")
    num_steps = integer(None, "num_steps", num_steps, 2)
    smooth = real(None, "smooth", smooth, 0.0, 1.0, hi_open=True)
    diverge_factor = real(None, "diverge_factor", diverge_factor, 1.0, lo_open=True,
                          finite=False)  # math.inf: never stop on growth

    sweep = np.geomspace(start_lr, end_lr, num_steps)
    original = [float(group["lr"]) for group in groups]
    losses, smoothed = [], []
    average, lowest, stop_reason = 0.0, math.inf, None
    try:
        for i, lr in enumerate(sweep):
            for group in groups:
                _set_lr(group, float(lr))
            value = train_step()
            try:  # .item(): a tensor's value without autograd's warning
                loss = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"train_step must return the loss as a number; got "
                                f"{value!r:.80}") from None
            average = smooth * average + (1.0 - smooth) * loss
            current = average / (1.0 - smooth ** (i + 1))
            losses.append(loss)
            smoothed.append(current)
            if not (math.isfinite(loss) and math.isfinite(current)):
                stop_reason = "non-finite loss"
                break
            if lowest >= 0 and current > diverge_factor * lowest:
                stop_reason = "diverged"
                break
            lowest = min(lowest, current)
    finally:
        for group, lr in zip(groups, original):
            _set_lr(group, lr)
        if restore is not None:
            restore()
    lrs = sweep[:len(losses)].copy()
    smoothed = np.array(smoothed, dtype=np.float64)
    return LRRangeTestResult(
        lrs=lrs, losses=np.array(losses, dtype=np.float64), smoothed_losses=smoothed,
        start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
        diverge_factor=float(diverge_factor), stop_reason=stop_reason,
        suggested_lr=_suggest(smoothed, lrs))
