"""Optimizer steps as functions: the math of every algorithm, its NumPy reference, and the
functional API (``sgd``, ``adagrad``, ``rmsprop``, ``adam``, ``adamw``) over lists of arrays.

One step, for each parameter p with gradient g (PyTorch's formulas and defaults):

    prologue   g <- g * gmul, gmul = clip / grad_scale, clip = min(1, max_norm / (||G|| + 1e-6))
               where ||G|| is the L2 norm of all (unscaled) gradients of the step, every
               parameter group's (as torch.nn.utils.clip_grad_norm_ over all of them); the step
               is skipped, parameters and states unchanged, when ``found_inf`` is nonzero or
               (checked when ``max_grad_norm`` or ``skip_nonfinite`` is set, or
               ``grad_scale`` is given without ``found_inf``) a gradient is inf or NaN. Otherwise each parameter's step count t advances.
    gradient   g <- -g if maximize;  g <- g + weight_decay * p (not AdamW);  g <- g + l1 * sign(p)
    SGD        b <- g at t = 1, else momentum * b + (1 - dampening) * g      (if momentum != 0)
               g <- g + momentum * b if nesterov else b;   p <- p - lr * g
    Adagrad    s <- s + g^2;   p <- p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)
    RMSprop    v <- alpha v + (1 - alpha) g^2;   a <- a + (1 - alpha)(g - a)   (centered)
               d <- sqrt(v - a^2 if centered else v) + eps
               b <- momentum * b + g / d;  p <- p - lr * b   (momentum > 0), else p <- p - lr g / d
    Adam(W)    p <- p (1 - lr * weight_decay)   (AdamW only, before the moments)
               m <- m + (1 - beta1)(g - m);   v <- beta2 v + (1 - beta2) g^2
               v_max <- max(v_max, v) (amsgrad, used in place of v below)
               p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
               (computed as lr c / (1 - beta1^t) * m / (sqrt(v) + eps c), c = sqrt(1 - beta2^t):
               the same value with one division per element instead of two)

States are named as in ``torch.optim``: 'momentum_buffer' (SGD, RMSprop), 'sum' (Adagrad),
'square_avg' and 'grad_avg' (RMSprop), 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq' (Adam), and
'step' (a 0-d float32 array). Float16/bfloat16 parameters keep float32 states and may keep
a float32 master copy ('master_param': updated in float32, rounded into p).

Bytes per parameter of a fused Adam step, float32: read p, g, m, v (16), write p, m, v (12).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..ops._apply import compute_dtype

#: Algorithm -> (kernel id, the state slots it may use, in kernel order).
ALGORITHMS = {
    "sgd": (0, ("momentum_buffer",)),
    "adagrad": (1, ("sum",)),
    "rmsprop": (2, ("square_avg", "momentum_buffer", "grad_avg")),
    "adam": (3, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
}

#: Bits of ``Hyper.flags`` (kernels/optim.cu gets them as constants).
MAXIMIZE, NESTEROV, AMSGRAD, CENTERED, DECOUPLED, MOMENTUM = 1, 2, 4, 8, 16, 32


@dataclass(frozen=True)
class Hyper:
    """One step's hyperparameters, as the kernels take them. ``beta1``/``beta2`` carry
    momentum/dampening (SGD), lr_decay (Adagrad) and momentum/alpha (RMSprop)."""

    algorithm: str
    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    weight_decay: float = 0.0
    l1: float = 0.0
    flags: int = 0
    max_grad_norm: float | None = None
    skip_nonfinite: bool = False
    slots: tuple = ()  # the state slots this step uses

    @property
    def kernel_id(self) -> int:
        return ALGORITHMS[self.algorithm][0]


# --- Hyperparameters: checked once, in one place -------------------------------------------

#: The options a parameter group must hold, by algorithm (torch's __setstate__ fills in the
#: others, such as nesterov, centered, amsgrad and maximize, with their defaults).
REQUIRED = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay"),
    "adagrad": ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}


def _elements(value) -> int | None:
    """The element count of an array or Tensor option (torch allows a Tensor lr); None for
    anything else."""
    if callable(getattr(value, "numel", None)):
        return int(value.numel())
    size = getattr(value, "size", None)
    return None if isinstance(value, numbers.Number) or not isinstance(size, int) else size


def _number(name, value) -> float:
    """A number, or the value of a one-element array or Tensor, as torch takes them."""
    count = _elements(value)
    if count is not None and count != 1:
        raise ValueError(f"Tensor {name} must be 1-element, got {count} elements")
    return float(host_scalar(value, name))


def _nonneg(name, value):
    value = _number(name, value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _unit(name, value):
    value = _number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _common(lr, weight_decay, l1, max_grad_norm):
    if max_grad_norm is not None and not _number("max_grad_norm", max_grad_norm) > 0.0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    return dict(lr=_nonneg("lr", lr), weight_decay=_nonneg("weight_decay", weight_decay),
                l1=_nonneg("l1", l1),
                max_grad_norm=None if max_grad_norm is None else float(max_grad_norm))


def _adam_betas(g) -> tuple[float, float]:
    """betas as torch takes them: a pair of numbers or of one-element Tensors, and with
    foreach=True (and capturable=False) neither they nor lr may be Tensors."""
    try:
        betas = tuple(g["betas"])
    except TypeError:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {g['betas']!r}") from None
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {g['betas']!r}")
    tensors = [_elements(b) is not None for b in betas]
    if tensors[0] != tensors[1]:
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")
    if g.get("foreach") and not g.get("capturable"):
        for name, value in (("lr", g["lr"]), ("betas[0]", betas[0]), ("betas[1]", betas[1])):
            if _elements(value) is not None:
                raise ValueError(f"{name} as a Tensor is not supported for capturable=False "
                                 "and foreach=True")
    return _unit("betas[0]", betas[0]), _unit("betas[1]", betas[1])


def hyper(algorithm: str, group: dict) -> Hyper:
    """Check a parameter group's options (torch's names; numbers or one-element Tensors) and
    turn them into a :class:`Hyper`; raises ValueError (TypeError for a value of the wrong
    type) naming the option. torch's ``foreach`` and ``fused`` change nothing (the step is
    always fused); ``capturable`` and ``differentiable`` are not supported."""
    if algorithm not in REQUIRED:
        raise ValueError(f"algorithm must be one of {sorted(REQUIRED)}, got {algorithm!r}")
    g = group
    missing = [key for key in REQUIRED[algorithm] if key not in g]
    if missing:
        raise ValueError(f"the parameter group lacks {missing}, which {algorithm} needs")
    for name in ("capturable", "differentiable"):
        if g.get(name):
            raise ValueError(f"{name}=True is not supported: gpunn's fused step is neither "
                             "capturable nor differentiable")
    common = _common(g["lr"], g["weight_decay"], g.get("l1", 0.0), g.get("max_grad_norm"))
    flags = MAXIMIZE if g.get("maximize", False) else 0
    skip = bool(g.get("skip_nonfinite", False))
    if algorithm == "sgd":
        momentum = _nonneg("momentum", g["momentum"])
        dampening, nesterov = _number("dampening", g["dampening"]), g.get("nesterov", False)
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("nesterov needs momentum > 0 and dampening == 0")
        flags |= (NESTEROV if nesterov else 0) | (MOMENTUM if momentum != 0.0 else 0)
        return Hyper("sgd", beta1=momentum, beta2=dampening, flags=flags, skip_nonfinite=skip,
                     slots=("momentum_buffer",) if momentum != 0.0 else (), **common)
    if algorithm == "adagrad":
        _nonneg("initial_accumulator_value", g["initial_accumulator_value"])
        return Hyper("adagrad", beta1=_nonneg("lr_decay", g["lr_decay"]),
                     eps=_nonneg("eps", g["eps"]), flags=flags, skip_nonfinite=skip,
                     slots=("sum",), **common)
    if algorithm == "rmsprop":
        momentum, alpha = _nonneg("momentum", g.get("momentum", 0)), _nonneg("alpha", g["alpha"])
        centered = g.get("centered", False)
        flags |= (CENTERED if centered else 0) | (MOMENTUM if momentum > 0.0 else 0)
        slots = ("square_avg",) + (("momentum_buffer",) if momentum > 0 else ()) + (
            ("grad_avg",) if centered else ())
        return Hyper("rmsprop", beta1=momentum, beta2=alpha, eps=_nonneg("eps", g["eps"]),
                     flags=flags, skip_nonfinite=skip, slots=slots, **common)
    beta1, beta2 = _adam_betas(g)
    amsgrad = g.get("amsgrad", False)
    # torch's Adam reads decoupled_weight_decay from the group (AdamW sets it True)
    decoupled = g.get("decoupled_weight_decay", algorithm == "adamw")
    flags |= (AMSGRAD if amsgrad else 0) | (DECOUPLED if decoupled else 0)
    return Hyper("adam", beta1=beta1, beta2=beta2, eps=_nonneg("eps", g["eps"]), flags=flags,
                 skip_nonfinite=skip,
                 slots=("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()),
                 **common)


# --- The NumPy reference: the spec, one tensor at a time -----------------------------------


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


def host_scalar(value, name) -> float | None:
    """A number, or the value of a one-element array (read from the device if need be)."""
    if value is None or isinstance(value, (int, float)):
        return value
    if getattr(value, "size", None) == 1 or (callable(getattr(value, "numel", None))
                                              and value.numel() == 1):
        return float(value.reshape(()).item() if hasattr(value, "reshape") else value.item())
    raise TypeError(f"{name} must be a number or a one-element array, got {value!r}")


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


def reference_update(xp, p, g, s: dict, t: float, h: Hyper, gmul: float):
    """Update one parameter in place: ``p`` (float32/float64 compute copy), gradient ``g``,
    states ``s`` (by slot name), step count ``t`` (already advanced)."""
    dt = p.dtype.type
    g = g.astype(p.dtype) * dt(gmul)
    if h.flags & MAXIMIZE:
        g = -g
    if h.weight_decay and not h.flags & DECOUPLED:
        g = g + dt(h.weight_decay) * p
    if h.l1:
        g = g + dt(h.l1) * xp.sign(p)
    if h.algorithm == "sgd":
        if h.flags & MOMENTUM:
            b = s["momentum_buffer"]
            b[...] = g if t == 1 else b * dt(h.beta1) + dt(1 - h.beta2) * g
            g = g + dt(h.beta1) * b if h.flags & NESTEROV else b
        p -= dt(h.lr) * g
    elif h.algorithm == "adagrad":
        s["sum"] += g * g
        p -= dt(h.lr / (1 + (t - 1) * h.beta1)) * (g / (xp.sqrt(s["sum"]) + dt(h.eps)))
    elif h.algorithm == "rmsprop":
        v = s["square_avg"]
        v[...] = v * dt(h.beta2) + dt(1 - h.beta2) * g * g
        if h.flags & CENTERED:
            a = s["grad_avg"]
            a += dt(1 - h.beta2) * (g - a)
            d = xp.sqrt(v - a * a) + dt(h.eps)
        else:
            d = xp.sqrt(v) + dt(h.eps)
        if h.flags & MOMENTUM:
            b = s["momentum_buffer"]
            b[...] = b * dt(h.beta1) + g / d
            p -= dt(h.lr) * b
        else:
            p -= dt(h.lr) * (g / d)
    else:
        if h.flags & DECOUPLED:
            p *= dt(1 - h.lr * h.weight_decay)
        m, v = s["exp_avg"], s["exp_avg_sq"]
        m += dt(1 - h.beta1) * (g - m)
        v[...] = v * dt(h.beta2) + dt(1 - h.beta2) * g * g
        if h.flags & AMSGRAD:
            xp.maximum(s["max_exp_avg_sq"], v, out=s["max_exp_avg_sq"])
            v = s["max_exp_avg_sq"]
        # torch's lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), with one division per element:
        # lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2)), as the kernels compute it
        bc2_sqrt = math.sqrt(1 - h.beta2 ** t)
        p -= dt(h.lr / (1 - h.beta1 ** t) * bc2_sqrt) * (m / (xp.sqrt(v) + dt(h.eps * bc2_sqrt)))


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
        if work is p:
            reference_update(xp, p, g, {k: v[i] for k, v in states.items()}, t, h, gmul)
        else:
            work = work if master is not None else work.copy()
            reference_update(xp, work, g, {k: v[i] for k, v in states.items()}, t, h, gmul)
            p[...] = work.astype(p.dtype)
    return False


# --- The functional API ----------------------------------------------------------------------


def _run(algorithm, group, params, grads, states, state_steps, master_params, grad_scale,
         found_inf, backend):
    from .fused import step_lists

    return step_lists(hyper(algorithm, group), params, grads, states, state_steps,
                      master_params, grad_scale, found_inf, backend)


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
    return _run("sgd", group, params, grads, states, state_steps, master_params, grad_scale,
                found_inf, backend)


def adagrad(params, grads, state_sums, state_steps, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, l1=0.0, max_grad_norm=None, skip_nonfinite=False,
            grad_scale=None, found_inf=None, master_params=None, backend=None) -> bool:
    """One fused Adagrad step over lists of arrays, in place. Returns True if skipped."""
    group = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize,
                 initial_accumulator_value=0.0, l1=l1, max_grad_norm=max_grad_norm,
                 skip_nonfinite=skip_nonfinite)
    return _run("adagrad", group, params, grads, {"sum": state_sums}, state_steps, master_params,
                grad_scale, found_inf, backend)


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
    return _run("rmsprop", group, params, grads, states, state_steps, master_params, grad_scale,
                found_inf, backend)


def _adam(algorithm, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
          betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm, skip_nonfinite,
          grad_scale, found_inf, master_params, backend):
    group = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                 maximize=maximize, l1=l1, max_grad_norm=max_grad_norm,
                 skip_nonfinite=skip_nonfinite)
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    return _run(algorithm, group, params, grads, states, state_steps, master_params, grad_scale,
                found_inf, backend)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False, l1=0.0,
         max_grad_norm=None, skip_nonfinite=False, grad_scale=None, found_inf=None,
         master_params=None, backend=None) -> bool:
    """One fused Adam step (L2 weight decay into the gradient) over lists of arrays, in
    place. Returns True if skipped."""
    return _adam("adam", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 lr, betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm,
                 skip_nonfinite, grad_scale, found_inf, master_params, backend)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr=1e-3,
          betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
          l1=0.0, max_grad_norm=None, skip_nonfinite=False, grad_scale=None, found_inf=None,
          master_params=None, backend=None) -> bool:
    """One fused AdamW step (decoupled weight decay) over lists of arrays, in place.
    Returns True if skipped."""
    return _adam("adamw", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                 lr, betas, eps, weight_decay, amsgrad, maximize, l1, max_grad_norm,
                 skip_nonfinite, grad_scale, found_inf, master_params, backend)
