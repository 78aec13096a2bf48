"""Batch normalization's public functions: argument checks (all before anything is written),
the call path, and the dispatch to the backend's implementation."""

from __future__ import annotations

import math
import operator

import numpy as np

from ...backend import HALF_DTYPES, check_no_overlap, compute_dtype_name, dtype_name, resolve
from ...validation import real
from .cpu import cpu_backward, cpu_forward
from .cuda import cuda_backward, cuda_forward
from .reference import numpy_backward, numpy_forward

#: Each backend's (forward, backward) on the (A, C, B) views, arguments already checked.
IMPLS = {
    "numpy": (numpy_forward, numpy_backward),
    "cpu": (cpu_forward, cpu_backward),
    "cuda": (cuda_forward, cuda_backward),
}

# --- Argument checks and the call path ------------------------------------------------------------


def _layout(shape, channels_last: bool) -> tuple[int, int, int]:
    """(A, C, B) of the C-contiguous view; one channel collapses to (1, 1, n): one long row."""
    if channels_last:
        A, C, B = math.prod(shape[:-1]), shape[-1], 1
    else:
        A, C, B = shape[0], shape[1], math.prod(shape[2:])
    if C == 1:
        A, B = 1, A * B
    return A, C, B


def _channels(op, x, channels_last):
    if x.ndim < 2:
        raise ValueError(f"{op}: x must have at least 2 dimensions ((N, C, ...) or, channels "
                         f"last, (N, ..., C)), got shape {tuple(x.shape)}")
    return int(x.shape[-1] if channels_last else x.shape[1])


def _check_per_channel(op, arrays: dict, C: int):
    for name, a in arrays.items():
        if a is not None and tuple(a.shape) != (C,):
            raise ValueError(f"{op}: {name} should contain {C} elements (one per channel, "
                             f"shape ({C},)), got shape {tuple(a.shape)}")


def _check_param_dtypes(op, x_dt: str, params: dict) -> str:
    """The params' common dtype: x's, or float32 beside 16-bit x."""
    allowed = (x_dt, "float32") if x_dt in HALF_DTYPES else (x_dt,)
    given = {name: dtype_name(a) for name, a in params.items() if a is not None}
    for name, dt in given.items():
        if dt not in allowed:
            raise TypeError(f"{op}: {name} has dtype {dt}, expected {' or '.join(allowed)} "
                            f"(x is {x_dt})")
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{n} {d}" for n, d in given.items())
        raise TypeError(f"{op}: weight, bias and the running statistics must share one dtype, "
                        f"got {listed}")
    return next(iter(given.values()), x_dt)


def _factor(op, training, has_running, momentum, num_batches_tracked) -> float:
    if momentum is not None:
        momentum = real(op, "momentum", momentum, finite=False)
    if not (training and has_running):
        return 0.0
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError(f"{op}: momentum=None (cumulative moving average) needs "
                         "num_batches_tracked, the number of training batches seen including "
                         "this one (torch.nn.BatchNorm's counter after its increment)")
    try:
        count = operator.index(num_batches_tracked)
    except TypeError:
        raise TypeError(f"{op}: num_batches_tracked must be an int, got "
                        f"{num_batches_tracked!r}") from None
    if count < 1:
        raise ValueError(f"{op}: num_batches_tracked must be >= 1 (this batch included), "
                         f"got {count}")
    return 1.0 / count


def _forward(op, relu, x, running_mean, running_var, weight, bias, training, momentum, eps,
             channels_last, num_batches_tracked, out, backend):
    call = resolve(op, backend, x=x, running_mean=running_mean, running_var=running_var,
                   weight=weight, bias=bias, out=out)
    C = _channels(op, x, channels_last)
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight,
              "bias": bias}
    _check_per_channel(op, params, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must either both be None or "
                         "neither be None")
    call.check_dtype(x, "x")
    x_dt = dtype_name(x)
    _check_param_dtypes(op, x_dt, params)
    eps = real(op, "eps", eps, finite=False)
    has_running = running_mean is not None
    use_batch = bool(training) or not has_running
    update = bool(training) and has_running
    if update:
        for name in ("running_mean", "running_var"):
            call.check_in_place(params[name], name)
    factor = _factor(op, bool(training), has_running, momentum, num_batches_tracked)
    shape = tuple(x.shape)
    A, _, B = _layout(shape, channels_last)
    if use_batch and A * B == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{shape}")
    with call.context():
        xn = call.native(x, "x")
        w, b = call.native(weight, "weight"), call.native(bias, "bias")
        rm, rv = call.native(running_mean, "running_mean"), call.native(running_var, "running_var")
        read = {"x": xn, "weight": w, "bias": b}
        y = call.output(out, xn, inputs={**read, "running_mean": rm, "running_var": rv})
        if update:  # written after other arrays were read or before they are: no overlap at all
            check_no_overlap(op, "running_mean", rm, {**read, "running_var": rv})
            check_no_overlap(op, "running_var", rv, read)
        cdt = compute_dtype_name(x_dt)
        mean, invstd = call.empty(C, cdt), call.empty(C, cdt)
        A, C3, B = _layout(shape, channels_last)
        if use_batch and A * B == 0:  # an empty batch: no statistics, running ones untouched
            mean[...] = np.nan
            invstd[...] = np.nan
        elif C3 > 0:
            IMPLS[call.backend][0](xn.reshape(A, C3, B), w, b, rm, rv, mean, invstd,
                                   y.reshape(A, C3, B), use_batch, update, factor, eps, relu)
    return call.wrap(y, out), call.wrap(mean), call.wrap(invstd)


def _backward(op, relu, dy, x, mean, invstd, weight, bias, training, channels_last, out,
              backend):
    call = resolve(op, backend, dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, bias=bias,
                   out=out)
    C = _channels(op, x, channels_last)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {tuple(x.shape)} "
                         "(the shape of x)")
    call.check_dtype(x, "x")
    x_dt = dtype_name(x)
    if dtype_name(dy) != x_dt:
        raise TypeError(f"{op}: dy has dtype {dtype_name(dy)}, expected {x_dt}")
    _check_per_channel(op, {"mean": mean, "invstd": invstd, "weight": weight, "bias": bias}, C)
    cdt = compute_dtype_name(x_dt)
    for name, a in (("mean", mean), ("invstd", invstd)):
        if dtype_name(a) != cdt:
            raise TypeError(f"{op}: {name} has dtype {dtype_name(a)}, expected {cdt} (the "
                            "forward's saved statistics)")
    p_dt = _check_param_dtypes(op, x_dt, {"weight": weight, "bias": bias})
    shape = tuple(x.shape)
    with call.context():
        dyn, xn = call.native(dy, "dy"), call.native(x, "x")
        mn, isn = call.native(mean, "mean"), call.native(invstd, "invstd")
        w, b = call.native(weight, "weight"), call.native(bias, "bias")
        dx = call.output(out, xn, inputs={"dy": dyn, "x": xn, "mean": mn, "invstd": isn,
                                          "weight": w, "bias": b})
        dw, db = call.empty(C, p_dt), call.empty(C, p_dt)
        A, C3, B = _layout(shape, channels_last)
        if xn.size == 0:
            dw[...] = 0
            db[...] = 0
        else:
            IMPLS[call.backend][1](dyn.reshape(A, C3, B), xn.reshape(A, C3, B), mn, isn, w, b,
                                   dx.reshape(A, C3, B), dw, db, bool(training), relu)
    return call.wrap(dx, out), call.wrap(dw), call.wrap(db)


# --- Public API -----------------------------------------------------------------------------------


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
                       out=None, backend=None):
    """Batch normalization; returns (y, mean, invstd), the statistics the backward needs.

    Arguments as :func:`batch_norm`. In training (or without running statistics) mean and
    invstd = 1/sqrt(biased var + eps) are the batch's (torch's saved statistics); in eval
    they are running_mean and 1/sqrt(running_var + eps)."""
    return _forward("batch_norm_forward", False, x, running_mean, running_var, weight, bias,
                    training, momentum, eps, channels_last, num_batches_tracked, out, backend)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
               out=None, backend=None):
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel, as
    ``torch.nn.functional.batch_norm``: channels on axis 1, or on the last axis with
    ``channels_last=True``. training=True normalizes with the batch statistics and updates
    running_mean / running_var in place (unbiased variance) with ``momentum``;
    ``momentum=None`` is the cumulative average, which needs ``num_batches_tracked`` (the
    batches seen, this one included). running_mean = running_var = None uses the batch
    statistics in eval mode too (track_running_stats=False)."""
    return batch_norm_forward(x, running_mean, running_var, weight, bias, training, momentum,
                              eps, channels_last=channels_last,
                              num_batches_tracked=num_batches_tracked, out=out,
                              backend=backend)[0]


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channels_last=False,
                        out=None, backend=None):
    """(dx, dweight, dbias) from dy, the forward's input x and its saved mean and invstd.

    training=False is the backward of an eval-mode forward (the statistics are constants:
    dx = dy * weight * invstd). dweight and dbias are returned also when weight is None."""
    return _backward("batch_norm_backward", False, dy, x, mean, invstd, weight, None, training,
                     channels_last, out, backend)


def batch_norm_relu_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                            momentum=0.1, eps=1e-5, *, channels_last=False,
                            num_batches_tracked=None, out=None, backend=None):
    """relu(batch_norm(x, ...)) in one pass over x for the output; returns (y, mean, invstd)."""
    return _forward("batch_norm_relu_forward", True, x, running_mean, running_var, weight, bias,
                    training, momentum, eps, channels_last, num_batches_tracked, out, backend)


def batch_norm_relu(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, channels_last=False, num_batches_tracked=None,
                    out=None, backend=None):
    """relu(batch_norm(x, ...)), fused; arguments as :func:`batch_norm`."""
    return batch_norm_relu_forward(x, running_mean, running_var, weight, bias, training,
                                   momentum, eps, channels_last=channels_last,
                                   num_batches_tracked=num_batches_tracked, out=out,
                                   backend=backend)[0]


def batch_norm_relu_backward(dy, x, mean, invstd, weight=None, bias=None, *, training=True,
                             channels_last=False, out=None, backend=None):
    """(dx, dweight, dbias) of relu(batch_norm(x)). The ReLU mask is recomputed from x, mean,
    invstd, weight and bias (pass the same ones as the forward), not read from a saved y."""
    return _backward("batch_norm_relu_backward", True, dy, x, mean, invstd, weight, bias,
                     training, channels_last, out, backend)
