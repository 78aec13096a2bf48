"""The losses' argument checks, call path and public functions (the math: the package's
docstring)."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from ...backend import dtype_name, host_kernel, resolve
from ...validation import choice, real
from .._apply import compute_dtype
from .cpu import (MSE_CHUNK, cpu_ce_backward, cpu_ce_forward, cpu_label_stats, cpu_mse_backward,
                  cpu_mse_backward_none, cpu_mse_chunks, cpu_mse_none, cpu_nll_backward,
                  cpu_nll_forward)
from .cuda import (cuda_ce_backward, cuda_ce_forward, cuda_mse_backward, cuda_mse_forward,
                   cuda_nll_backward, cuda_nll_forward)
from .reference import (raise_bad_label, ref_ce_backward, ref_ce_forward, ref_label_stats,
                        ref_mse_backward, ref_mse_forward, ref_nll_backward, ref_nll_forward)

REDUCTIONS = ("none", "mean", "sum")
LABEL_DTYPES = ("int32", "int64")
_INT64 = np.iinfo(np.int64)


def _check_ignore(op, ignore_index):
    try:
        ignore = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}") from None
    if not _INT64.min <= ignore <= _INT64.max:
        raise ValueError(f"{op}: ignore_index must fit in int64, got {ignore}")
    return ignore


def _native_labels(call, labels):
    """labels as a C-contiguous NumPy/CuPy int32 or int64 array."""
    name = dtype_name(labels)
    if name not in LABEL_DTYPES:
        raise TypeError(f"{call.op}: labels must be int32 or int64 class indices, got dtype "
                        f"{name}")
    return call.contiguous(call.view(labels))


def _rows_inputs(op, call, x, labels, x_name):
    """(x as (N, C), labels as (N,), shape of a "none" loss, the native arrays as given by
    name, for the overlap check of an output) after the shape checks. The kernels take int64
    labels: int32 ones are widened (a copy of N labels costs less than compiling every kernel
    twice)."""
    xn = call.native(x, x_name)
    given = _native_labels(call, labels)
    read = {x_name: xn, "labels": given}
    ln = given if call.backend == "numpy" else given.astype(call.xp.int64, copy=False)
    if xn.ndim == 2:
        if ln.shape != (xn.shape[0],):
            raise ValueError(f"{op}: labels has shape {ln.shape}, expected ({xn.shape[0]},) "
                             f"for {x_name} of shape {xn.shape}")
        return xn, ln, (xn.shape[0],), read
    if xn.ndim == 1:
        if ln.shape != ():
            raise ValueError(f"{op}: labels has shape {ln.shape}, expected () for {x_name} of "
                             f"shape {xn.shape}")
        return xn.reshape(1, -1), ln.reshape(1), (), read
    raise ValueError(f"{op}: {x_name} must have shape (N, C) or (C,), got {xn.shape}")


def _label_stats(call, labels, n_classes, ignore, check):
    """Host backends: (count of used rows, and raise for a bad label when check)."""
    if call.backend == "numpy":
        count, first = ref_label_stats(labels, n_classes, ignore)
    else:
        count, first = cpu_label_stats(labels, n_classes, ignore)
        first = -1 if first == labels.size else first
    if check and first >= 0:
        raise_bad_label(call.op, first, int(labels[first]), n_classes, ignore)
    return count


def _host_dloss(call, dloss, shape, like, name="dloss"):
    """dloss as a float (a Python or NumPy number), or as a native array after checking its
    shape (``shape``) and dtype (``like``'s, as torch's autograd passes it)."""
    if isinstance(dloss, numbers.Real) and not isinstance(dloss, bool):
        return float(dloss)
    d = call.native(dloss, name)
    if dtype_name(d) != dtype_name(like):
        raise TypeError(f"{call.op}: {name} has dtype {dtype_name(d)}, expected "
                        f"{dtype_name(like)} (the dtype of the input)")
    if d.shape != shape:
        raise ValueError(f"{call.op}: {name} has shape {d.shape}, expected {shape}")
    return d


def _weights(call, dloss, rows):
    """(w, stride) for the CPU kernels: float64 weights, w[r * stride] for row r."""
    if isinstance(dloss, float):
        return np.full(1, dloss), 0
    w = np.asarray(dloss, dtype=np.float64).reshape(-1)
    return w, (1 if w.size == rows and dloss.ndim else 0)


def _ref_weights(call, dloss, rows, dtype, scale):
    """(N,) weights in the compute dtype for the reference."""
    xp = call.xp
    if isinstance(dloss, float):
        return xp.full(rows, dloss * scale, dtype=dtype)
    w = compute_dtype(xp, dloss).reshape(-1).astype(dtype) * dtype.type(scale)
    return xp.broadcast_to(w, (rows,)) if w.size == 1 and dloss.ndim == 0 else w


def _scale(reduction, count):
    """The weight's factor: 1 / count for "mean" (0 when no row is used: none reads it)."""
    return (1.0 / count if count else 0.0) if reduction == "mean" else 1.0


def _finish_host(call, total, count, reduction, out):
    """out[()] = total (/ count for "mean"; 0 / 0 is NaN)."""
    if reduction == "mean":
        total = total / count if count else math.nan
    out[...] = total


def _dloss_input(g):
    """{"dloss": g} for an array dloss (native), {} for a number: an output's overlap check."""
    return {} if isinstance(g, float) else {"dloss": g}


def _dloss_arrays(dloss):
    return {} if isinstance(dloss, numbers.Real) and not isinstance(dloss, bool) else {
        "dloss": dloss}


# --- Public API -------------------------------------------------------------------------------


def _ce(op, logits, labels, reduction, label_smoothing, ignore_index, backend, check_labels,
        want_lse):
    choice(op, "reduction", reduction, REDUCTIONS)
    eps = real(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, logits=logits, labels=labels)
    with call.context():
        x, y, none_shape, _ = _rows_inputs(op, call, logits, labels, "logits")
        rows, n = x.shape
        out = call.empty(none_shape if reduction == "none" else (), x.dtype)
        lse = call.empty((rows,), np.float64) if want_lse else None
        if call.backend == "cuda":
            cuda_ce_forward(op, x, y, eps, ignore, reduction, out.reshape(-1) if
                             reduction == "none" else out, lse, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            if call.backend == "numpy" or n == 0:  # no classes: nothing for a kernel to do
                losses, lse_ref = ref_ce_forward(x, y, eps, ignore, want_lse)
                if want_lse:
                    lse[...] = lse_ref
                if reduction == "none":
                    out.reshape(-1)[...] = losses
                else:
                    _finish_host(call, losses.sum(dtype=call.xp.float64), count, reduction, out)
            else:
                losses = np.empty(rows)  # float64 (one specialization for every output dtype)
                host_kernel(cpu_ce_forward, x.size)(x, y, np.int64(ignore), eps, losses,
                                                    lse if want_lse else np.empty(0), want_lse)
                if reduction == "none":
                    out.reshape(-1)[...] = losses
                else:
                    _finish_host(call, losses.sum(), count, reduction, out)
        loss = call.wrap(out)
        return (loss, call.wrap(lse)) if want_lse else loss


def cross_entropy(logits, labels, reduction="mean", label_smoothing=0.0, ignore_index=-100,
                  backend=None, *, check_labels=True):
    """Softmax cross-entropy of ``logits`` (N, C) (or (C,)) against class indices ``labels``
    (N,) (or ()), int32 or int64, as ``torch.nn.functional.cross_entropy``.

    reduction: "none" (a loss per row, in the logits' dtype), "mean" (over rows whose label is
    not ``ignore_index``) or "sum" (0-d arrays). ``label_smoothing`` eps in [0, 1]: the target
    is (1 - eps) * onehot + eps / C. ``check_labels``: see the module docstring (labels out of
    range raise IndexError; on CUDA the check synchronizes)."""
    return _ce("cross_entropy", logits, labels, reduction, label_smoothing, ignore_index,
               backend, check_labels, want_lse=False)


def cross_entropy_forward(logits, labels, reduction="mean", label_smoothing=0.0,
                          ignore_index=-100, backend=None, *, check_labels=True):
    """``cross_entropy`` returning ``(loss, lse)``: lse (N,) float64 is the log-sum-exp of each
    row, for ``cross_entropy_backward(..., lse=lse)`` (one pass, no row reduction)."""
    return _ce("cross_entropy_forward", logits, labels, reduction, label_smoothing,
               ignore_index, backend, check_labels, want_lse=True)


def cross_entropy_backward(dloss, logits, labels, reduction="mean", label_smoothing=0.0,
                           ignore_index=-100, out=None, backend=None, *, lse=None,
                           check_labels=True):
    """d loss / d logits = w * (softmax(logits) - q), q = (1 - eps) * onehot + eps / C, with
    w = dloss (a scalar for "mean"/"sum": a number or a 0-d array; (N,) for "none"), divided
    by the count of non-ignored rows for "mean"; 0 for ignored rows. ``lse``: the forward's
    saved log-sum-exp (``cross_entropy_forward``); without it the row max and sum are
    recomputed. ``out``: a C-contiguous array like ``logits`` (may be ``logits`` itself)."""
    op = "cross_entropy_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    eps = real(op, "label_smoothing", label_smoothing, 0.0, 1.0)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, logits=logits, labels=labels, **_dloss_arrays(dloss),
                   **({} if lse is None else {"lse": lse}), out=out)
    with call.context():
        x, y, none_shape, read = _rows_inputs(op, call, logits, labels, "logits")
        rows, n = x.shape
        g = _host_dloss(call, dloss, none_shape if reduction == "none" else (), x)
        saved = None
        if lse is not None:
            saved = call.native(lse, "lse")
            if dtype_name(saved) != "float64" or saved.shape != (rows,):
                raise ValueError(f"{op}: lse must be the float64 array of shape ({rows},) that "
                                 f"cross_entropy_forward returns, got {dtype_name(saved)} "
                                 f"{saved.shape}")
        dx = call.output(out, x.reshape(none_shape + (n,)),
                         inputs={**read, **_dloss_input(g), "lse": saved})
        dx2 = dx.reshape(rows, n)
        if call.backend == "cuda":
            cuda_ce_backward(op, g, x, y, eps, ignore, reduction, saved, dx2, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            scale = _scale(reduction, count)
            if call.backend == "numpy":
                w = _ref_weights(call, g, rows, compute_dtype(call.xp, x).dtype, scale)
                dx2[...] = ref_ce_backward(x, y, eps, ignore, w, saved)
            else:
                w, stride = _weights(call, g, rows)
                host_kernel(cpu_ce_backward, x.size)(
                    x, y, np.int64(ignore), eps, w * scale, stride,
                    saved if saved is not None else np.empty(0), saved is not None, dx2)
    return call.wrap(dx, out)


def nll_loss(log_probs, labels, reduction="mean", ignore_index=-100, backend=None, *,
             check_labels=True):
    """Negative log-likelihood: -log_probs[i, labels[i]] per row (0 for ignore_index), as
    ``torch.nn.functional.nll_loss`` (no class weights). With ``log_softmax`` it is the
    cross-entropy; ``cross_entropy`` does both in one pass."""
    op = "nll_loss"
    choice(op, "reduction", reduction, REDUCTIONS)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, log_probs=log_probs, labels=labels)
    with call.context():
        v, y, none_shape, _ = _rows_inputs(op, call, log_probs, labels, "log_probs")
        rows, n = v.shape
        out = call.empty(none_shape if reduction == "none" else (), v.dtype)
        if call.backend == "cuda":
            cuda_nll_forward(op, v, y, ignore, reduction,
                              out.reshape(-1) if reduction == "none" else out, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            if call.backend == "numpy":
                losses = ref_nll_forward(v, y, ignore)
            else:
                losses = np.empty(rows)
                cpu_nll_forward(v, y, np.int64(ignore), losses)
            if reduction == "none":
                out.reshape(-1)[...] = losses
            else:
                _finish_host(call, losses.sum(dtype=call.xp.float64), count, reduction, out)
        return call.wrap(out)


def nll_loss_backward(dloss, log_probs, labels, reduction="mean", ignore_index=-100, out=None,
                      backend=None, *, check_labels=True):
    """d loss / d log_probs: -w at each row's label, 0 elsewhere (and on ignored rows); w as
    in ``cross_entropy_backward``."""
    op = "nll_loss_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    ignore = _check_ignore(op, ignore_index)
    call = resolve(op, backend, log_probs=log_probs, labels=labels, **_dloss_arrays(dloss),
                   out=out)
    with call.context():
        v, y, none_shape, read = _rows_inputs(op, call, log_probs, labels, "log_probs")
        rows, n = v.shape
        g = _host_dloss(call, dloss, none_shape if reduction == "none" else (), v)
        dx = call.output(out, v.reshape(none_shape + (n,)), inputs={**read, **_dloss_input(g)})
        dx2 = dx.reshape(rows, n)
        if call.backend == "cuda":
            cuda_nll_backward(op, g, y, ignore, reduction, dx2, check_labels)
        else:
            count = _label_stats(call, y, n, ignore, check_labels)
            scale = _scale(reduction, count)
            if call.backend == "numpy":
                w = _ref_weights(call, g, rows, compute_dtype(call.xp, v).dtype, scale)
                ref_nll_backward(y, ignore, w, dx2)
            else:
                w, stride = _weights(call, g, rows)
                host_kernel(cpu_nll_backward, dx2.size)(y, np.int64(ignore), w * scale, stride, dx2)
    return call.wrap(dx, out)


def _mse_inputs(op, call, input, target):
    x = call.native(input, "input")
    t = call.native(target, "target")
    if t.shape != x.shape:
        raise ValueError(f"{op}: target has shape {t.shape}, expected {x.shape} (the shape of "
                         "input)")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: target has dtype {dtype_name(t)}, expected {dtype_name(x)}")
    return x, t


def mse_loss(input, target, reduction="mean", backend=None):
    """(input - target)^2: elementwise ("none"), summed, or averaged over all elements (NaN
    for no elements), as ``torch.nn.functional.mse_loss``."""
    op = "mse_loss"
    choice(op, "reduction", reduction, REDUCTIONS)
    call = resolve(op, backend, input=input, target=target)
    with call.context():
        x, t = _mse_inputs(op, call, input, target)
        out = call.empty(x.shape if reduction == "none" else (), x.dtype)
        if call.backend == "cuda":
            cuda_mse_forward(x.reshape(-1), t.reshape(-1), reduction, out.reshape(-1))
        elif call.backend == "numpy":
            out[...] = ref_mse_forward(x, t, reduction)
        elif reduction == "none":
            host_kernel(cpu_mse_none, x.size)(x.reshape(-1), t.reshape(-1), out.reshape(-1))
        else:
            parts = np.empty(-(-x.size // MSE_CHUNK))
            host_kernel(cpu_mse_chunks, x.size)(x.reshape(-1), t.reshape(-1), parts)
            total = parts.sum()
            out[...] = total if reduction == "sum" else (total / x.size if x.size else math.nan)
        return call.wrap(out)


def mse_loss_backward(dloss, input, target, reduction="mean", out=None, backend=None):
    """d loss / d input = 2 * (input - target) * dloss (/ numel for "mean"); dloss is a
    scalar for "mean"/"sum" and shaped like input for "none". (d/d target is its negative.)"""
    op = "mse_loss_backward"
    choice(op, "reduction", reduction, REDUCTIONS)
    call = resolve(op, backend, input=input, target=target, **_dloss_arrays(dloss), out=out)
    with call.context():
        x, t = _mse_inputs(op, call, input, target)
        g = _host_dloss(call, dloss, x.shape if reduction == "none" else (), x)
        norm = 2.0 / x.size if reduction == "mean" and x.size else 2.0
        dx = call.output(out, x, inputs={"input": x, "target": t, **_dloss_input(g)})
        if call.backend == "cuda":
            cuda_mse_backward(g, x.reshape(-1), t.reshape(-1), norm, dx.reshape(-1))
        elif call.backend == "numpy":
            w = g if isinstance(g, float) else compute_dtype(call.xp, g)
            dx[...] = ref_mse_backward(w, x, t, norm)
        elif isinstance(g, float) or g.ndim == 0:
            k = x.dtype.type(norm * float(g))
            host_kernel(cpu_mse_backward, x.size)(x.reshape(-1), t.reshape(-1), k,
                                                  dx.reshape(-1))
        else:
            host_kernel(cpu_mse_backward_none, x.size)(g.reshape(-1), x.reshape(-1),
                                                       t.reshape(-1), x.dtype.type(norm),
                                                       dx.reshape(-1))
    return call.wrap(dx, out)
