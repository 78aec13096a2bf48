"""RMSprop: eps after the square root, centered, momentum (torch.optim.RMSprop).

With g the gradient after the common prologue (gpunn.optim.prologue):

    v <- alpha v + (1 - alpha) g^2;   a <- a + (1 - alpha)(g - a)   (centered)
    d <- sqrt(v - a^2 if centered else v) + eps
    b <- momentum * b + g / d;  p <- p - lr * b   (momentum > 0), else p <- p - lr g / d

States: 'square_avg' v, 'momentum_buffer' b (momentum > 0), 'grad_avg' a (centered). Bytes
per parameter, float32: read p, g, v (12), write p, v (8); 4 + 4 more per extra state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from ..fused import step_lists
from ..hyper import Algorithm, Hyper, checked, gpunn_options, nonneg
from ..walker import cpu_step

STATES = ("square_avg", "momentum_buffer", "grad_avg")


@dataclass(frozen=True, kw_only=True)
class RMSpropHyper(Hyper):
    alpha: float
    eps: float
    momentum: float
    centered: bool


def hyper(g: dict, common: dict) -> RMSpropHyper:
    momentum, alpha = nonneg("momentum", g.get("momentum", 0)), nonneg("alpha", g["alpha"])
    centered = bool(g.get("centered", False))
    slots = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) + (
        ("grad_avg",) if centered else ())
    return RMSpropHyper(alpha=alpha, eps=nonneg("eps", g["eps"]), momentum=momentum,
                        centered=centered, decoupled=False, slots=slots, **common)


def reference(xp, p, g, s: dict, t: float, h: RMSpropHyper) -> None:
    dt = p.dtype.type
    v = s["square_avg"]
    v[...] = v * dt(h.alpha) + dt(1 - h.alpha) * g * g
    if h.centered:
        a = s["grad_avg"]
        a += dt(1 - h.alpha) * (g - a)
        d = xp.sqrt(v - a * a) + dt(h.eps)
    else:
        d = xp.sqrt(v) + dt(h.eps)
    if h.momentum > 0.0:
        b = s["momentum_buffer"]
        b[...] = b * dt(h.momentum) + g / d
        p -= dt(h.lr) * b
    else:
        p -= dt(h.lr) * (g / d)


# --- CPU: the walker's loop over this update ---------------------------------------------------
#: Variants: bit 0 centered, bit 1 momentum.

def scalars(h: RMSpropHyper) -> tuple:
    return h.alpha, 1.0 - h.alpha, h.eps, h.momentum


def variant(h: RMSpropHyper) -> int:
    return (1 if h.centered else 0) + (2 if h.momentum > 0.0 else 0)


@njit(inline="always")
def _row(k, k64, t):
    return k


@njit(inline="always")
def _update(i, g, p_i, p, v, b, a, k, variant):
    lr, alpha, one_minus_alpha, eps, momentum = k
    vi = v[i] * alpha + one_minus_alpha * g * g
    v[i] = vi
    if variant & 1:
        ai = a[i] + one_minus_alpha * (g - a[i])
        a[i] = ai
        d = math.sqrt(vi - ai * ai) + eps
    else:
        d = math.sqrt(vi) + eps
    if variant & 2:
        bi = b[i] * momentum + g / d
        b[i] = bi
        p[i] = p_i - lr * bi
    else:
        p[i] = p_i - lr * (g / d)


# --- Options and the functional step -----------------------------------------------------------

class RMSpropOptions:
    """RMSprop, eps after the square root, centered and momentum (torch.optim.RMSprop)."""

    algorithm = "rmsprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, l1=0.0, max_grad_norm=None, skip_nonfinite=False,
                 master_weights=False, backend=None):
        self._setup(params, dict(
            lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
            weight_decay=weight_decay, capturable=capturable, foreach=foreach,
            maximize=maximize, differentiable=differentiable,
            **gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights, backend)))


def rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, l1=0.0, max_grad_norm=None, skip_nonfinite=False, grad_scale=None,
            found_inf=None, master_params=None, backend=None) -> bool:
    """One fused RMSprop step over lists of arrays, in place (``grad_avgs`` used when
    centered, ``momentum_buffers`` when momentum > 0). Returns True if skipped."""
    group = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                 centered=centered, maximize=maximize, l1=l1, max_grad_norm=max_grad_norm,
                 skip_nonfinite=skip_nonfinite)
    states = {"square_avg": square_avgs}
    if momentum > 0:
        states["momentum_buffer"] = momentum_buffers
    if centered:
        states["grad_avg"] = grad_avgs
    return step_lists(checked(RMSPROP, group), params, grads, states, state_steps,
                      master_params, grad_scale, found_inf, backend)


RMSPROP = Algorithm(
    name="rmsprop", title="RMSprop", states=STATES,
    required=("lr", "alpha", "eps", "weight_decay"), hyper=hyper, reference=reference,
    scalars=scalars, variant=variant, cpu_step=cpu_step(__name__, _row, _update, variants=4),
    functor="RMSprop", options=RMSpropOptions, functional=rmsprop)
