"""Lion, evolved sign momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), with decoupled weight decay.

With g the gradient after the common prologue (gpunn.optim.prologue: weight decay is
decoupled, p <- p (1 - lr * weight_decay) first):

    c <- beta1 m + (1 - beta1) g
    p <- p - lr * sign(c)          (sign(0) = 0; a NaN stays NaN)
    m <- beta2 m + (1 - beta2) g

State: 'exp_avg' m. Defaults lr=1e-4, betas=(0.9, 0.99), weight_decay=0 (the paper's lr is 3x
to 10x below AdamW's, its weight decay as much above). Bytes per parameter, float32: read p,
g, m (12), write p, m (8).
"""

from __future__ import annotations

from dataclasses import dataclass

from numba import njit

from ..fused import step_lists
from ..hyper import Algorithm, Hyper, betas, checked, gpunn_options
from ..walker import cpu_step

STATES = ("exp_avg",)


@dataclass(frozen=True, kw_only=True)
class LionHyper(Hyper):
    beta1: float
    beta2: float


def hyper(g: dict, common: dict) -> LionHyper:
    beta1, beta2 = betas(g)
    return LionHyper(beta1=beta1, beta2=beta2, decoupled=True, slots=STATES, **common)


def reference(xp, p, g, s: dict, t: float, h: LionHyper) -> None:
    dt = p.dtype.type
    m = s["exp_avg"]
    c = m * dt(h.beta1) + dt(1 - h.beta1) * g
    p -= dt(h.lr) * xp.sign(c)
    m[...] = m * dt(h.beta2) + dt(1 - h.beta2) * g


# --- CPU: the walker's loop over this update ---------------------------------------------------

def scalars(h: LionHyper) -> tuple:
    return h.beta1, h.beta2


def variant(h: LionHyper) -> int:
    return 0


@njit(inline="always")
def _row(k, k64, t):
    """(lr, beta1, 1 - beta1, beta2, 1 - beta2)."""
    f = type(k[0])
    return k[0], k[1], f(1.0 - k64[1]), k[2], f(1.0 - k64[2])


@njit(inline="always")
def _update(i, g, p_i, p, m, s1, s2, k, variant):
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2 = k
    c = m[i] * beta1 + one_minus_beta1 * g
    p[i] = p_i - (lr if c > 0 else (-lr if c < 0 else c - c))  # lr sign(c), as selects
    m[i] = m[i] * beta2 + one_minus_beta2 * g


# --- Options and the functional step -----------------------------------------------------------

class LionOptions:
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight
    decay; torch.optim's conventions (``maximize``, ``foreach``/``fused`` accepted)."""

    algorithm = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 foreach=None, capturable=False, differentiable=False, fused=None, l1=0.0,
                 max_grad_norm=None, skip_nonfinite=False, master_weights=False, backend=None):
        self._setup(params, dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
            weight_decay=weight_decay, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
            **gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights, backend)))


def lion(params, grads, exp_avgs, state_steps, *, lr=1e-4, betas=(0.9, 0.99),
         weight_decay=0.0, maximize=False, l1=0.0, max_grad_norm=None, skip_nonfinite=False,
         grad_scale=None, found_inf=None, master_params=None, backend=None) -> bool:
    """One fused Lion step over lists of arrays, in place. Returns True if skipped."""
    group = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, l1=l1,
                 max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
    return step_lists(checked(LION, group), params, grads, {"exp_avg": exp_avgs}, state_steps,
                      master_params, grad_scale, found_inf, backend)


LION = Algorithm(
    name="lion", title="Lion", states=STATES, required=("lr", "betas", "weight_decay"),
    hyper=hyper, reference=reference, scalars=scalars, variant=variant,
    cpu_step=cpu_step(__name__, _row, _update, variants=1), functor="Lion",
    options=LionOptions, functional=lion)
