"""What every optimizer algorithm shares: the common hyperparameters, their checks, and the
description of an algorithm that the multi-tensor walker, the classes and the functional API
work from (:class:`Algorithm`; one per module of :mod:`gpunn.optim.algorithms`).

A parameter group holds torch's option names; :func:`checked` turns one into the step's
hyperparameters, an algorithm's own :class:`Hyper` subclass with every value named
(``AdamHyper.beta1``, ``SGDHyper.dampening``...), after checking them all: ValueError
(TypeError for a value of the wrong type) naming the option, before anything runs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True, kw_only=True)
class Hyper:
    """One step's hyperparameters common to every algorithm (each adds its own).

    The gradient of every algorithm is g * gmul, negated to maximize, plus weight_decay * p
    (unless ``decoupled``: then p <- p (1 - lr weight_decay) before the update) and
    l1 * sign(p); see :mod:`gpunn.optim.prologue`."""

    algorithm: "Algorithm"
    lr: float
    weight_decay: float
    l1: float
    maximize: bool
    decoupled: bool
    max_grad_norm: float | None
    skip_nonfinite: bool
    slots: tuple  # the state slots this step uses (of ``algorithm.states``)


@dataclass(frozen=True)
class Algorithm:
    """One optimizer algorithm, everything the rest of gpunn needs of it.

    name        the functional API's name ('adam'), in error messages and the registry
    title       the class name in gpunn.optim and gpunn.torch ('Adam')
    states      its state slots, torch's keys, in the kernels' column order (S0, S1, S2)
    required    the options a parameter group must hold (torch fills in the others)
    hyper       (group, common) -> its Hyper: checks its own options; ``common`` holds the
                checked common ones
    reference   (xp, p, g, states, t, h): the NumPy reference, one parameter in place, with
                g already through the common gradient prologue
    scalars     h -> its kernel scalars (at most SCALARS floats, lr not included), in the
                order its CPU row function and its CUDA functor read them
    variant     h -> which of its loops (CPU) / branches (CUDA) the step runs
    cpu_step    its Numba step over a table (:func:`gpunn.optim.walker.cpu_step`)
    functor     its struct in kernels/optim.cu
    options     the mixin with its constructor (torch's signature and defaults)
    functional  its step over lists of arrays (gpunn.optim.functional.<name>)
    initial     (slot, group) -> the value a new state starts at
    forced      options a loaded parameter group is given (AdamW's decoupled_weight_decay)
    parent      the algorithm whose classes this one's subclass (AdamW: 'adam')
    torch_steps_in_state  False where torch's state has no 'step' (SGD): gpunn.torch keeps
                the step counts apart
    """

    name: str
    title: str
    states: tuple
    required: tuple
    hyper: Callable
    reference: Callable
    scalars: Callable
    variant: Callable
    cpu_step: Callable
    functor: str
    options: type
    functional: Callable
    initial: Callable = lambda slot, group: 0.0
    forced: dict = field(default_factory=dict)
    parent: str | None = None
    torch_steps_in_state: bool = True

    @property
    def doc(self) -> str:
        return self.options.__doc__


def checked(algorithm: Algorithm, group: dict) -> Hyper:
    """Check a parameter group's options (torch's names; numbers or one-element Tensors) and
    turn them into ``algorithm``'s Hyper. torch's ``foreach`` and ``fused`` change nothing
    (the step is always fused); ``capturable`` and ``differentiable`` are not supported."""
    g = group
    missing = [key for key in algorithm.required if key not in g]
    if missing:
        raise ValueError(f"the parameter group lacks {missing}, which {algorithm.name} needs")
    for name in ("capturable", "differentiable"):
        if g.get(name):
            raise ValueError(f"{name}=True is not supported: gpunn's fused step is neither "
                             "capturable nor differentiable")
    max_grad_norm = g.get("max_grad_norm")
    if max_grad_norm is not None and not number("max_grad_norm", max_grad_norm) > 0.0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    common = dict(algorithm=algorithm, lr=nonneg("lr", g["lr"]),
                  weight_decay=nonneg("weight_decay", g["weight_decay"]),
                  l1=nonneg("l1", g.get("l1", 0.0)),
                  max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
                  maximize=bool(g.get("maximize", False)),
                  skip_nonfinite=bool(g.get("skip_nonfinite", False)))
    return algorithm.hyper(g, common)


def gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights, backend) -> dict:
    """gpunn's options on top of torch's, in every optimizer's param groups."""
    return dict(l1=l1, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                master_weights=master_weights, backend=backend)


def plain_options(group: dict) -> bool:
    """Whether every option of the group (all but its parameters and their names) is a plain
    value: a number, string, None or a tuple of them, which cannot change in place (a Tensor
    lr can)."""
    for name, value in group.items():
        kind = type(value)
        if kind is tuple:
            if not all(type(v) in _PLAIN for v in value):
                return False
        elif kind not in _PLAIN and name not in ("params", "param_names"):
            return False
    return True


_PLAIN = frozenset({bool, int, float, str, type(None)})


# --- Number checks, as torch takes options: numbers or one-element Tensors -------------------


def elements(value) -> int | None:
    """The element count of an array or Tensor option (torch allows a Tensor lr); None for
    anything else."""
    if callable(getattr(value, "numel", None)):
        return int(value.numel())
    size = getattr(value, "size", None)
    return None if isinstance(value, numbers.Number) or not isinstance(size, int) else size


def host_scalar(value, name) -> float | None:
    """A number, or the value of a one-element array (read from the device if need be)."""
    if value is None or isinstance(value, (int, float)):
        return value
    if getattr(value, "size", None) == 1 or (callable(getattr(value, "numel", None))
                                              and value.numel() == 1):
        return float(value.reshape(()).item() if hasattr(value, "reshape") else value.item())
    raise TypeError(f"{name} must be a number or a one-element array, got {value!r}")


def number(name, value) -> float:
    """A number, or the value of a one-element array or Tensor, as torch takes them."""
    count = elements(value)
    if count is not None and count != 1:
        raise ValueError(f"Tensor {name} must be 1-element, got {count} elements")
    return float(host_scalar(value, name))


def nonneg(name, value) -> float:
    value = number(name, value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def unit(name, value) -> float:
    value = number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def betas(g) -> tuple[float, float]:
    """betas as torch takes them: a pair of numbers or of one-element Tensors, and with
    foreach=True (and capturable=False) neither they nor lr may be Tensors."""
    try:
        pair = tuple(g["betas"])
    except TypeError:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {g['betas']!r}") from None
    if len(pair) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {g['betas']!r}")
    tensors = [elements(b) is not None for b in pair]
    if tensors[0] != tensors[1]:
        raise ValueError(f"betas must be either both floats or both Tensors, got {pair!r}")
    if g.get("foreach") and not g.get("capturable"):
        for name, value in (("lr", g["lr"]), ("betas[0]", pair[0]), ("betas[1]", pair[1])):
            if elements(value) is not None:
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False "
                                 "and foreach=True")
    return unit("betas[0]", pair[0]), unit("betas[1]", pair[1])
