"""The limits a case's bandwidth is compared with: on the CPU a Numba kernel with the same
access pattern and trivial math, on the GPU a device-to-device copy of the same bytes."""

from __future__ import annotations

from functools import cache
from typing import Any, Callable

@cache
def _limit_kernels():
    """The limit kernels, compiled on first use (importing the harness imports no Numba)."""
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def unary(x, y):
        for i in prange(x.size):
            y[i] = x[i] + x[i]

    @njit(parallel=True, cache=True)
    def binary(a, b, y):
        for i in prange(a.size):
            y[i] = a[i] * b[i]

    return unary, binary


def cpu_limit(*arrays) -> Callable[[], Any]:
    """A Numba kernel reading the inputs and writing the last array, trivial math:
    y = x + x for one input, y = a * b for two. Returns the call (it returns the output)."""
    unary, binary = _limit_kernels()
    flat = [a.reshape(-1) for a in arrays]
    if len(flat) == 2:
        x, y = flat
        return lambda: (unary(x, y), arrays[-1])[1]
    if len(flat) == 3:
        a, b, y = flat
        return lambda: (binary(a, b, y), arrays[-1])[1]
    raise ValueError("cpu_limit takes (x, y) or (a, b, y)")


def cuda_copy_limit(nbytes: int) -> Callable[[], Any]:
    """A device-to-device copy moving ``nbytes`` in all (read nbytes/2, write nbytes/2)."""
    import cupy

    half = max(1, nbytes // 2)
    src = cupy.ones(half, dtype=cupy.uint8)
    dst = cupy.empty(half, dtype=cupy.uint8)

    def copy():
        dst.data.copy_from_device_async(src.data, half)
        return dst

    return copy
