"""Serial twins of the parallel CPU kernels, for calls on one Numba thread.

A ``parallel=True`` kernel costs about twice the compile time of the same code compiled
serially (process CPU time on this machine: the fused Adam step 4.5 s against 2.1 s, the
affine warp 8.4 s against 4.0 s, softmax 2.6 s against 0.7 s), and on one thread it runs no
faster. The trainer runs the Numba kernels on one thread (see
:func:`gpunn.train.training_threads`), so a cold ``gpunn train`` would pay for parallel
compiles it never uses; so do small host calls (:func:`gpunn.backend.host_kernel`).

``threaded(kernel)`` is ``kernel`` itself when Numba has more than one thread, else its
serial twin: the same code (``prange`` runs as ``range``), compiled without ``parallel`` on
first use and cached on disk under its own name. The twin of a jitted function that calls
parallel kernels (a driver) calls their twins. Results are the same either way: the kernels
never reduce across ``prange`` iterations.
"""

from __future__ import annotations

import types

from numba import get_num_threads, njit
from numba.core.dispatcher import Dispatcher

#: The qualname suffix of a twin: its cache files sit beside the parallel kernel's.
SUFFIX = "__serial"

_twins: dict[Dispatcher, Dispatcher] = {}
_parallel: dict[Dispatcher, bool] = {}


def threaded(kernel: Dispatcher) -> Dispatcher:
    """``kernel``, or its serial twin when Numba runs on one thread."""
    return serial(kernel) if get_num_threads() == 1 else kernel


def serial(kernel: Dispatcher) -> Dispatcher:
    """The serial twin of a jitted function (itself when neither it nor anything it calls
    is parallel)."""
    if not _is_parallel(kernel):
        return kernel
    twin = _twins.get(kernel)
    if twin is None:
        f = kernel.py_func
        scope = dict(f.__globals__)
        for name in f.__code__.co_names:
            if isinstance(scope.get(name), Dispatcher):
                scope[name] = serial(scope[name])
        clone = types.FunctionType(f.__code__, scope, f.__name__, f.__defaults__,
                                   f.__closure__)
        clone.__qualname__ = f.__qualname__ + SUFFIX
        clone.__module__, clone.__doc__ = f.__module__, f.__doc__
        # the error model numba gives a prange body: a float division that may divide by
        # zero raises under 'python', a branch out of the loop that stops vectorizing it
        options = {"error_model": "numpy"} | {k: v for k, v in kernel.targetoptions.items()
                                              if k not in ("parallel", "nopython")}
        cached = type(kernel._cache).__name__ != "NullCache"  # cache=True is not an option
        twin = _twins[kernel] = njit(cache=cached, **options)(clone)
    return twin


def _is_parallel(kernel: Dispatcher) -> bool:
    """Compiled with ``parallel``, or calls (through its globals) a function that is."""
    known = _parallel.get(kernel)
    if known is None:
        _parallel[kernel] = False  # recursion guard
        f = kernel.py_func
        known = bool(kernel.targetoptions.get("parallel")) or any(
            isinstance(g, Dispatcher) and _is_parallel(g)
            for g in (f.__globals__.get(name) for name in f.__code__.co_names))
        _parallel[kernel] = known
    return known
