"""SGD with momentum, dampening and Nesterov (torch.optim.SGD).

With g the gradient after the common prologue (gpunn.optim.prologue) and t the step count:

    b <- g at t = 1, else momentum * b + (1 - dampening) * g      (if momentum != 0)
    g <- g + momentum * b if nesterov else b
    p <- p - lr * g

State: 'momentum_buffer' b (only with momentum). Bytes per parameter, float32: read p, g, b
(12), write p, b (8); without momentum read p, g, write p (12).
"""

from __future__ import annotations

from dataclasses import dataclass

from numba import njit

from ..fused import step_lists
from ..hyper import Algorithm, Hyper, checked, gpunn_options, nonneg, number
from ..walker import cpu_step

STATES = ("momentum_buffer",)


@dataclass(frozen=True, kw_only=True)
class SGDHyper(Hyper):
    momentum: float
    dampening: float
    nesterov: bool


def hyper(g: dict, common: dict) -> SGDHyper:
    momentum = nonneg("momentum", g["momentum"])
    dampening, nesterov = number("dampening", g["dampening"]), g.get("nesterov", False)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0")
    return SGDHyper(momentum=momentum, dampening=dampening, nesterov=bool(nesterov),
                    decoupled=False, slots=STATES if momentum != 0.0 else (), **common)


def reference(xp, p, g, s: dict, t: float, h: SGDHyper) -> None:
    dt = p.dtype.type
    if h.momentum != 0.0:
        b = s["momentum_buffer"]
        b[...] = g if t == 1 else b * dt(h.momentum) + dt(1 - h.dampening) * g
        g = g + dt(h.momentum) * b if h.nesterov else b
    p -= dt(h.lr) * g


# --- CPU: the walker's loop over this update ---------------------------------------------------
#: Variants: 0 no momentum, 1 momentum, 2 Nesterov, 3 the first step with momentum (b = g).

def scalars(h: SGDHyper) -> tuple:
    return h.momentum, 1.0 - h.dampening, 1.0 if h.nesterov else 0.0


def variant(h: SGDHyper) -> int:
    return 0 if h.momentum == 0.0 else 2 if h.nesterov else 1


@njit(inline="always")
def _row(k, k64, t):
    return k


@njit(inline="always")
def _row_variant(variant, t):
    return 3 if variant != 0 and t == 1.0 else variant


@njit(inline="always")
def _update(i, g, p_i, p, b, s1, s2, k, variant):
    lr, momentum, one_minus_dampening, nesterov = k
    if variant == 0:
        p[i] = p_i - lr * g
    elif variant == 3:  # the first step: b = g
        b[i] = g
        p[i] = p_i - lr * (g + momentum * g if nesterov != 0 else g)
    else:
        bi = b[i] * momentum + one_minus_dampening * g
        b[i] = bi
        p[i] = p_i - lr * (g + momentum * bi if variant == 2 else bi)


# --- Options and the functional step -----------------------------------------------------------

class SGDOptions:
    """Stochastic gradient descent with momentum, dampening and Nesterov (torch.optim.SGD)."""

    algorithm = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, l1=0.0, max_grad_norm=None, skip_nonfinite=False,
                 master_weights=False, backend=None):
        self._setup(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused, **gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights,
                                         backend)))


def sgd(params, grads, momentum_buffers, state_steps, *, lr, momentum=0.0, dampening=0.0,
        nesterov=False, weight_decay=0.0, maximize=False, l1=0.0, max_grad_norm=None,
        skip_nonfinite=False, grad_scale=None, found_inf=None, master_params=None,
        backend=None) -> bool:
    """One fused SGD step over lists of arrays, in place. ``state_steps`` are 0-d float32
    arrays (the momentum buffer is initialised from g at step 1). Returns True if skipped."""
    group = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 weight_decay=weight_decay, maximize=maximize, l1=l1,
                 max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
    states = {"momentum_buffer": momentum_buffers} if momentum else {}
    return step_lists(checked(SGD, group), params, grads, states, state_steps, master_params,
                      grad_scale, found_inf, backend)


SGD = Algorithm(
    name="sgd", title="SGD", states=STATES,
    required=("lr", "momentum", "dampening", "weight_decay"), hyper=hyper,
    reference=reference, scalars=scalars, variant=variant,
    cpu_step=cpu_step(__name__, _row, _update, variants=4, row_variant=_row_variant),
    functor="SGD",
    options=SGDOptions, functional=sgd, torch_steps_in_state=False)
