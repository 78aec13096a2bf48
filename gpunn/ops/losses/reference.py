"""The NumPy reference of the losses (runs on CuPy arrays too; 16-bit inputs computed in
float32): the fallback backend and the tests' oracle."""

from __future__ import annotations

import math

import numpy as np

from ...backend import array_module
from .._apply import compute_dtype

def ref_label_stats(labels, n_classes, ignore):
    """(rows not ignored, first row with a bad label or -1)."""
    xp = array_module(labels)
    used = labels != ignore
    bad = used & ((labels < 0) | (labels >= n_classes))
    first = int(xp.argmax(bad)) if bool(bad.any()) else -1
    return int(used.sum()), first


def ref_masks(labels, n_classes, ignore):
    """used (label is not ignore_index), ok (used and in range), labels made safe to index."""
    xp = array_module(labels)
    used = labels != ignore
    ok = used & (labels >= 0) & (labels < n_classes)
    return used, ok, xp.where(ok, labels, 0).astype(xp.int64)


def ref_ce_forward(x, labels, eps, ignore, want_lse):
    """Per-row losses (compute dtype) and lse (float64 or None)."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    rows, n = xc.shape
    used, ok, safe = ref_masks(labels, n, ignore)
    if n == 0:  # every label is ignored (or bad)
        loss = xp.where(used, xc.dtype.type(np.nan), xc.dtype.type(0))
        return loss, (xp.full(rows, -np.inf) if want_lse else None)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = xc.max(axis=1, keepdims=True)
        shifted = xc - m  # <= 0
        s = xp.exp(shifted).sum(axis=1)
        log_s = xp.log(s)
        picked = xp.take_along_axis(shifted, safe[:, None], axis=1)[:, 0]
        loss = log_s - picked
        if eps > 0:
            e = xc.dtype.type(eps)
            loss = (1 - e) * loss + e / n * (n * log_s - shifted.sum(axis=1))
        loss = xp.where(ok, loss, xc.dtype.type(np.nan))
        loss = xp.where(used, loss, xc.dtype.type(0))
        lse = m[:, 0].astype(xp.float64) + xp.log(s.astype(xp.float64)) if want_lse else None
    return loss, lse


def ref_ce_backward(x, labels, eps, ignore, w, lse):
    """dx = w * (softmax(x) - q); w (N,) in the compute dtype."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    rows, n = xc.shape
    used, ok, safe = ref_masks(labels, n, ignore)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if lse is not None:
            p = xp.exp(xc.astype(xp.float64) - lse[:, None]).astype(xc.dtype)
        elif n:
            shifted = xc - xc.max(axis=1, keepdims=True)
            e = xp.exp(shifted)
            p = e / e.sum(axis=1, keepdims=True)
        else:
            p = xc
        q = xp.full((rows, n), xc.dtype.type(eps / n) if n else 0, dtype=xc.dtype)
        q[xp.arange(rows)[ok], safe[ok]] += xc.dtype.type(1 - eps)
        dx = w[:, None] * (p - q)
    dx = xp.where(ok[:, None], dx, xc.dtype.type(np.nan))
    return xp.where(used[:, None], dx, xc.dtype.type(0))


def ref_nll_forward(v, labels, ignore):
    xp = array_module(v)
    vc = compute_dtype(xp, v)
    rows, n = vc.shape
    used, ok, safe = ref_masks(labels, n, ignore)
    picked = xp.take_along_axis(vc, safe[:, None], axis=1)[:, 0] if n else xp.zeros(rows, vc.dtype)
    loss = xp.where(ok, -picked, vc.dtype.type(np.nan))
    return xp.where(used, loss, vc.dtype.type(0))


def ref_nll_backward(labels, ignore, w, dx):
    xp = array_module(dx)
    rows, n = dx.shape
    used, ok, safe = ref_masks(labels, n, ignore)
    dx[...] = 0
    dx[xp.arange(rows)[ok], safe[ok]] = -w[ok]
    dx[used & ~ok] = np.nan


def ref_mse_forward(x, t, reduction):
    xp = array_module(x)
    d = compute_dtype(xp, x) - compute_dtype(xp, t)
    sq = d * d
    if reduction == "none":
        return sq
    total = sq.sum(dtype=xp.float64)
    if reduction == "sum":
        return total
    return total / sq.size if sq.size else math.nan  # the mean of nothing is NaN


def ref_mse_backward(w, x, t, norm):
    """dx = (norm * (x - t)) * w, w a scalar or an array like x."""
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    d = xc - compute_dtype(xp, t)
    return (xc.dtype.type(norm) * d) * w


def raise_bad_label(op, row, value, n_classes, ignore):
    """IndexError naming the first bad label (a label outside [0, C) that is not ignore_index)."""
    raise IndexError(f"{op}: labels[{row}] = {value} is out of range [0, {n_classes}) and is "
                     f"not ignore_index ({ignore})")
