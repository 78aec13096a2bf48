"""What every optimizer step does around its algorithm's update, as the NumPy reference and
the host side of the fused step (PyTorch's formulas and defaults):

    prologue   g <- g * gmul, gmul = clip / grad_scale, clip = min(1, max_norm / (||G|| + 1e-6))
               where ||G|| is the L2 norm of all (unscaled) gradients of the step, every
               parameter group's (as torch.nn.utils.clip_grad_norm_ over all of them); the step
               is skipped, parameters and states unchanged, when ``found_inf`` is nonzero or
               (checked when ``max_grad_norm`` or ``skip_nonfinite`` is set, or
               ``grad_scale`` is given without ``found_inf``) a gradient is inf or NaN.
               Otherwise each parameter's step count t advances.
    gradient   g <- -g if maximize;  g <- g + weight_decay * p (unless decoupled);
               g <- g + l1 * sign(p);  p <- p (1 - lr * weight_decay) if decoupled
    update     the algorithm's (gpunn.optim.algorithms), on p, g, its states and t

Float16/bfloat16 parameters keep float32 states and may keep a float32 master copy
('master_param': updated in float32, rounded into p).
"""

from __future__ import annotations

import math

import numpy as np

from ..ops._apply import compute_dtype
from .hyper import Hyper, host_scalar


def grad_norm(xp, grads) -> tuple[float, bool]:
    """(||G||, any inf/NaN): the L2 norm of all gradients in float64, and whether one holds
    inf or NaN. Finite gradients never give an infinite norm: when the sum of squares
    overflows (float64 gradients beyond ~1e154), the norm is m ||G / m|| with m = max |g|."""
    grads = [g.astype(xp.float64) for g in grads if g.size]
    bad = any(not bool(xp.isfinite(g).all()) for g in grads)
    with np.errstate(over="ignore"):  # an overflow is handled below
        sumsq = sum(float(xp.sum(xp.square(g))) for g in grads)
    if bad or math.isfinite(sumsq):
        return math.sqrt(sumsq), bad
    m = max(float(xp.max(xp.abs(g))) for g in grads)
    return m * math.sqrt(sum(float(xp.sum(xp.square(g / m))) for g in grads)), False


def host_scale(grad_scale, found_inf) -> tuple[float, bool]:
    """(scale, skip) of a host step. A number ``grad_scale`` must be finite and > 0
    (ValueError); a one-element array holding inf or NaN skips the step (a loss scaler's
    overflow), one holding a value <= 0 is refused. A nonzero ``found_inf`` skips."""
    scale = host_scalar(grad_scale, "grad_scale")
    skip = found_inf is not None and host_scalar(found_inf, "found_inf") != 0.0
    if scale is None:
        return 1.0, skip
    if isinstance(grad_scale, (int, float)) and not math.isfinite(scale):
        raise ValueError(f"grad_scale must be a finite number > 0, got {scale}")
    if math.isnan(scale) or math.isinf(scale):
        return 1.0, True
    if not scale > 0.0:
        raise ValueError(f"grad_scale must be > 0, got {scale}")
    return scale, skip


def check_step_counts(counts) -> None:
    """Step counts (host floats, before advancing) must be whole numbers >= 0."""
    for i, t in enumerate(counts):
        if not (t >= 0.0 and t == math.floor(t) and math.isfinite(t)):
            raise ValueError(f"state_steps[{i}] is {t}; step counts are whole numbers >= 0")


def needs_grad_pass(h: Hyper, grad_scale, found_inf) -> bool:
    """Whether the prologue reads the gradients: clipping, skip_nonfinite, or grad_scale
    without a found_inf (GradScaler passes the one it computed: no second check)."""
    return (h.max_grad_norm is not None or h.skip_nonfinite
            or (grad_scale is not None and found_inf is None))


def prologue(h: Hyper, grad_scale, found_inf, totals, norm) -> tuple[float, bool]:
    """(gmul, skip) of a host step: the factor every gradient is multiplied by, and whether
    to skip. ``totals``: (norm, any inf/NaN) of all gradients of the step (every group) when
    the caller has it; else ``norm()`` gives this step's own, called only when needed."""
    scale, skip = host_scale(grad_scale, found_inf)
    if totals is None and not skip and needs_grad_pass(h, grad_scale, found_inf):
        totals = norm()
    if totals is not None and not skip:
        norm_value, skip = totals
    gmul = 1.0 / scale
    if h.max_grad_norm is not None and not skip:
        gmul *= min(1.0, h.max_grad_norm / (norm_value / scale + 1e-6))
    return gmul, skip


def reference_gradient(xp, p, g, h: Hyper, gmul: float):
    """The gradient an update sees (p: the float32/float64 compute copy); applies the
    decoupled weight decay to ``p`` in place."""
    dt = p.dtype.type
    g = g.astype(p.dtype) * dt(gmul)
    if h.maximize:
        g = -g
    if h.weight_decay and not h.decoupled:
        g = g + dt(h.weight_decay) * p
    if h.l1:
        g = g + dt(h.l1) * xp.sign(p)
    if h.decoupled:
        p *= dt(1 - h.lr * h.weight_decay)
    return g


def reference_step(xp, params, grads, states, steps, masters, h: Hyper, grad_scale=None,
                   found_inf=None, totals=None) -> bool:
    """The whole step over lists (native arrays); returns True when it was skipped."""
    check_step_counts([float(t) for t in steps])
    gmul, skip = prologue(h, grad_scale, found_inf, totals, lambda: grad_norm(xp, grads))
    if skip:
        return True
    for i, (p, g) in enumerate(zip(params, grads)):
        steps[i][...] = steps[i] + 1
        t = float(steps[i])
        master = masters[i] if masters else None
        work = master if master is not None else compute_dtype(xp, p)
        if work is not p and master is None:
            work = work.copy()
        slots = {k: v[i] for k, v in states.items()}
        h.algorithm.reference(xp, work, reference_gradient(xp, work, g, h, gmul), slots, t, h)
        if work is not p:
            p[...] = work.astype(p.dtype)
    return False
