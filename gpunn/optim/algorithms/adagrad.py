"""Adagrad with lr_decay and initial_accumulator_value (torch.optim.Adagrad).

With g the gradient after the common prologue (gpunn.optim.prologue) and t the step count:

    s <- s + g^2
    p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)

State: 'sum' s, made at construction (as torch's) at initial_accumulator_value. Bytes per
parameter, float32: read p, g, s (12), write p, s (8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from numba import njit

from ..fused import step_lists
from ..hyper import Algorithm, Hyper, checked, gpunn_options, nonneg
from ..walker import cpu_step

STATES = ("sum",)


@dataclass(frozen=True, kw_only=True)
class AdagradHyper(Hyper):
    lr_decay: float
    eps: float


def hyper(g: dict, common: dict) -> AdagradHyper:
    nonneg("initial_accumulator_value", g["initial_accumulator_value"])
    return AdagradHyper(lr_decay=nonneg("lr_decay", g["lr_decay"]), eps=nonneg("eps", g["eps"]),
                        decoupled=False, slots=STATES, **common)


def reference(xp, p, g, s: dict, t: float, h: AdagradHyper) -> None:
    dt = p.dtype.type
    s["sum"] += g * g
    p -= dt(h.lr / (1 + (t - 1) * h.lr_decay)) * (g / (xp.sqrt(s["sum"]) + dt(h.eps)))


# --- CPU: the walker's loop over this update ---------------------------------------------------

def scalars(h: AdagradHyper) -> tuple:
    return h.lr_decay, h.eps


def variant(h: AdagradHyper) -> int:
    return 0


@njit(inline="always")
def _row(k, k64, t):
    """(the decayed lr, eps)."""
    lr, lr_decay, eps = k64
    return (type(k[0])(lr / (1.0 + (t - 1.0) * lr_decay)), k[2])


@njit(inline="always")
def _update(i, g, p_i, p, s, s1, s2, k, variant):
    clr, eps = k
    si = s[i] + g * g
    s[i] = si
    p[i] = p_i - clr * (g / (math.sqrt(si) + eps))


# --- Options and the functional step -----------------------------------------------------------

class AdagradOptions:
    """Adagrad with lr_decay and initial_accumulator_value (torch.optim.Adagrad)."""

    algorithm = "adagrad"

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 l1=0.0, max_grad_norm=None, skip_nonfinite=False, master_weights=False,
                 backend=None):
        self._setup(params, dict(
            lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
            **gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights, backend)))
        self._make_states()  # as torch's Adagrad: every state made now


def adagrad(params, grads, state_sums, state_steps, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, l1=0.0, max_grad_norm=None, skip_nonfinite=False,
            grad_scale=None, found_inf=None, master_params=None, backend=None) -> bool:
    """One fused Adagrad step over lists of arrays, in place. Returns True if skipped."""
    group = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
                 initial_accumulator_value=0.0, l1=l1, max_grad_norm=max_grad_norm,
                 skip_nonfinite=skip_nonfinite)
    return step_lists(checked(ADAGRAD, group), params, grads, {"sum": state_sums},
                      state_steps, master_params, grad_scale, found_inf, backend)


ADAGRAD = Algorithm(
    name="adagrad", title="Adagrad", states=STATES,
    required=("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
    hyper=hyper, reference=reference, scalars=scalars, variant=variant,
    cpu_step=cpu_step(__name__, _row, _update, variants=1), functor="Adagrad",
    options=AdagradOptions, functional=adagrad,
    initial=lambda slot, group: float(group.get("initial_accumulator_value", 0.0)))
