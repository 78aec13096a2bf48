"""Adam and AdamW (torch.optim.Adam, torch.optim.AdamW): bias-corrected moments, eps added to
the bias-corrected sqrt(v), amsgrad.

With g the gradient after the common prologue (gpunn.optim.prologue; AdamW, or Adam with
``decoupled_weight_decay=True``, has already done p <- p (1 - lr * weight_decay)) and t the
step count:

    m <- m + (1 - beta1)(g - m);   v <- beta2 v + (1 - beta2) g^2
    v_max <- max(v_max, v) (amsgrad, used in place of v below)
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

computed as p - lr c / (1 - beta1^t) * m / (sqrt(v) + eps c), c = sqrt(1 - beta2^t): the same
value with one division per element instead of two.

States: 'exp_avg' m, 'exp_avg_sq' v, 'max_exp_avg_sq' v_max (amsgrad). Bytes per parameter of
a fused step, float32: read p, g, m, v (16), write p, m, v (12).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from numba import njit

from ..fused import step_lists
from ..hyper import Algorithm, Hyper, betas, checked, gpunn_options, nonneg
from ..walker import cpu_step

STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@dataclass(frozen=True, kw_only=True)
class AdamHyper(Hyper):
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool


def hyper(g: dict, common: dict) -> AdamHyper:
    beta1, beta2 = betas(g)
    amsgrad = bool(g.get("amsgrad", False))
    # torch's Adam reads decoupled_weight_decay from the group (AdamW sets it True)
    decoupled = g.get("decoupled_weight_decay", common["algorithm"].name == "adamw")
    return AdamHyper(beta1=beta1, beta2=beta2, eps=nonneg("eps", g["eps"]), amsgrad=amsgrad,
                     decoupled=bool(decoupled), slots=STATES if amsgrad else STATES[:2],
                     **common)


def reference(xp, p, g, s: dict, t: float, h: AdamHyper) -> None:
    dt = p.dtype.type
    m, v = s["exp_avg"], s["exp_avg_sq"]
    m += dt(1 - h.beta1) * (g - m)
    v[...] = v * dt(h.beta2) + dt(1 - h.beta2) * g * g
    if h.amsgrad:
        xp.maximum(s["max_exp_avg_sq"], v, out=s["max_exp_avg_sq"])
        v = s["max_exp_avg_sq"]
    # torch's lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), with one division per element:
    # lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2)), as the kernels compute it
    bc2_sqrt = math.sqrt(1 - h.beta2 ** t)
    p -= dt(h.lr / (1 - h.beta1 ** t) * bc2_sqrt) * (m / (xp.sqrt(v) + dt(h.eps * bc2_sqrt)))


# --- CPU: the walker's loop over this update ---------------------------------------------------
#: Variants: 0 Adam, 1 amsgrad.

def scalars(h: AdamHyper) -> tuple:
    return h.beta1, h.beta2, h.eps


def variant(h: AdamHyper) -> int:
    return 1 if h.amsgrad else 0


@njit(inline="always")
def _row(k, k64, t):
    """(1 - beta1, beta2, 1 - beta2, step size lr sqrt(bc2) / bc1, eps sqrt(bc2))."""
    lr, beta1, beta2, eps = k64
    f = type(k[0])
    bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
    return (f(1.0 - beta1), k[2], f(1.0 - beta2), f(lr / (1.0 - beta1 ** t) * bc2_sqrt),
            f(eps * bc2_sqrt))


@njit(inline="always")
def _update(i, g, p_i, p, m, v, vmax, k, variant):
    one_minus_beta1, beta2, one_minus_beta2, step_size, eps_hat = k
    mi = m[i] + one_minus_beta1 * (g - m[i])
    vi = v[i] * beta2 + one_minus_beta2 * g * g
    m[i], v[i] = mi, vi
    if variant == 1:
        vi = max(vmax[i], vi)
        vmax[i] = vi
    p[i] = p_i - step_size * (mi / (math.sqrt(vi) + eps_hat))


# --- Options and the functional steps ----------------------------------------------------------

class AdamOptions:
    """Adam with L2 weight decay into the gradient (decoupled with
    ``decoupled_weight_decay=True``, as AdamW) and amsgrad (torch.optim.Adam)."""

    algorithm = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, l1=0.0,
                 max_grad_norm=None, skip_nonfinite=False, master_weights=False, backend=None):
        self._setup(params, dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
            capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
            **gpunn_options(l1, max_grad_norm, skip_nonfinite, master_weights, backend)))


class AdamWOptions(AdamOptions):
    """Adam with decoupled weight decay, default 1e-2 (torch.optim.AdamW, an Adam
    subclass)."""

    algorithm = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, l1=0.0, max_grad_norm=None,
                 skip_nonfinite=False, master_weights=False, backend=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, l1=l1,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, backend=backend)


def _adam(algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
          betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm, skip_nonfinite,
          grad_scale, found_inf, master_params, backend):
    group = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, l1=l1, max_grad_norm=max_grad_norm,
                 skip_nonfinite=skip_nonfinite)
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    return step_lists(checked(algorithm, group), params, grads, states, state_steps,
                      master_params, grad_scale, found_inf, backend)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, l1=0.0,
         max_grad_norm=None, skip_nonfinite=False, grad_scale=None, found_inf=None,
         master_params=None, backend=None) -> bool:
    """One fused Adam step (L2 weight decay into the gradient) over lists of arrays, in
    place. Returns True if skipped."""
    return _adam(ADAM, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 lr, betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm,
                 skip_nonfinite, grad_scale, found_inf, master_params, backend)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr=1e-3,
          betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
          l1=0.0, max_grad_norm=None, skip_nonfinite=False, grad_scale=None, found_inf=None,
          master_params=None, backend=None) -> bool:
    """One fused AdamW step (decoupled weight decay) over lists of arrays, in place.
    Returns True if skipped."""
    return _adam(ADAMW, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 lr, betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm,
                 skip_nonfinite, grad_scale, found_inf, master_params, backend)


ADAM = Algorithm(
    name="adam", title="Adam", states=STATES, required=("lr", "betas", "eps", "weight_decay"),
    hyper=hyper, reference=reference, scalars=scalars, variant=variant,
    cpu_step=cpu_step(__name__, _row, _update, variants=2), functor="Adam",
    options=AdamOptions, functional=adam)
# the same step; decoupled weight decay by default, kept on load (as torch's AdamW)
ADAMW = replace(ADAM, name="adamw", title="AdamW", options=AdamWOptions, functional=adamw,
                forced={"decoupled_weight_decay": True}, parent="adam")
