"""Batch normalization's NumPy reference (runs on CuPy arrays too): the readable spec, the
``numpy`` backend and the tests' oracle; the math is in :mod:`gpunn.ops.batchnorm`.

Arrays are (A, C, B) views; per-channel arrays broadcast as [:, None]. Statistics in float64,
elementwise math in the compute dtype (float32 for 16-bit input), the same formulas as the
kernels: y = (x - mean) * (invstd * w) + b and dx = k1 * (g + k2 * (x - mean) + k3)."""

from __future__ import annotations

import numpy as np

from ...backend import array_module
from .._apply import compute_dtype


def numpy_forward(x3, w, b, rm, rv, mean, invstd, y3, use_batch, update, factor, eps, relu):
    xp = array_module(x3)
    xc = compute_dtype(xp, x3)
    cd = xc.dtype
    if use_batch:
        n = x3.shape[0] * x3.shape[2]
        mu = xc.mean(axis=(0, 2), dtype=xp.float64)
        var = xp.square(xc - mu[:, None]).mean(axis=(0, 2))  # two passes: exact for a large mean
        mean[...] = mu
        invstd[...] = 1 / xp.sqrt(var + eps)
        if update:
            rm[...] = (1 - factor) * rm.astype(xp.float64) + factor * mu
            with np.errstate(over="ignore"):  # beyond float32's range: inf, as the kernels
                rv[...] = (1 - factor) * rv.astype(xp.float64) + factor * var * (n / (n - 1))
    else:
        mean[...] = rm
        invstd[...] = 1 / xp.sqrt(rv.astype(xp.float64) + eps)
    scale = invstd.astype(cd) * (w.astype(cd) if w is not None else cd.type(1))
    beta = b.astype(cd) if b is not None else xp.zeros(scale.shape, cd)
    z = (xc - mean.astype(cd)[:, None]) * scale[:, None] + beta[:, None]
    y3[...] = xp.where(z < 0, cd.type(0), z) if relu else z


def numpy_backward(dy3, x3, mean, invstd, w, b, dx3, dw, db, training, relu):
    xp = array_module(x3)
    xc, gc = compute_dtype(xp, x3), compute_dtype(xp, dy3)
    cd = xc.dtype
    n = x3.shape[0] * x3.shape[2]
    m = mean.astype(cd)
    scale = invstd.astype(cd) * (w.astype(cd) if w is not None else cd.type(1))
    xmu = xc - m[:, None]
    if relu:
        beta = b.astype(cd) if b is not None else xp.zeros(scale.shape, cd)
        z = xmu * scale[:, None] + beta[:, None]
        gc = xp.where(z <= 0, cd.type(0), gc)
    sum_g = gc.sum(axis=(0, 2), dtype=xp.float64)
    sum_gx = xp.multiply(gc, xmu, dtype=xp.float64).sum(axis=(0, 2))  # float32 products overflow
    inv = invstd.astype(xp.float64)
    db[...] = sum_g
    dw[...] = sum_gx * inv
    k1 = (w.astype(xp.float64) if w is not None else 1.0) * inv
    if training:
        k2 = -inv * inv * sum_gx / n
        k3 = -sum_g / n
        dx3[...] = k1.astype(cd)[:, None] * (gc + k2.astype(cd)[:, None] * xmu
                                             + k3.astype(cd)[:, None])
    else:
        dx3[...] = k1.astype(cd)[:, None] * gc

