"""Serial twins of the parallel CPU kernels (gpunn.cpu_jit): how they are made and chosen,
and that the kernels the trainer runs give bit-identical results either way."""

import importlib
import platform

import numba
import numpy as np
import pytest
from numba import njit, prange

from gpunn import ops
from gpunn.backend import numba_threads
from gpunn.cpu_jit import SUFFIX, serial, threaded

#: The op modules that run the kernels the trainer uses (the names in gpunn.ops are the
#: functions).
OP_MODULES = [importlib.import_module(f"gpunn.ops.{name}")
              for name in ("augment", "batchnorm.cpu", "dropout", "losses.api", "softmax")]


@njit(parallel=True)
def _double(x, y):
    for i in prange(x.size):
        y[i] = 2 * x[i]


@njit
def _driver(x, y):
    _double(x, y)
    return y.sum()


@njit
def _plain(x):
    return x + 1


def test_a_twin_is_the_same_code_without_parallel_calling_twins():
    twin = serial(_driver)
    assert twin is not _driver and serial(_driver) is twin  # made once
    assert twin.py_func.__qualname__ == _driver.py_func.__qualname__ + SUFFIX
    assert twin.py_func.__code__ is _driver.py_func.__code__
    assert twin.py_func.__globals__["_double"] is serial(_double)
    assert not serial(_double).targetoptions.get("parallel")
    assert serial(_plain) is _plain  # nothing parallel below: no twin
    assert type(twin._cache).__name__ == "NullCache"  # cached when the kernel is
    x = np.arange(10.0)
    assert twin(x, np.empty_like(x)) == _driver(x, np.empty_like(x)) == 90.0


def test_twins_of_cached_kernels_are_cached_under_their_own_name():
    batchnorm_cpu = importlib.import_module("gpunn.ops.batchnorm.cpu")
    twin = serial(batchnorm_cpu._cpu_forward_flat)
    assert type(twin._cache).__name__ == "FunctionCache"
    assert twin._cache._cache_file._index_name.startswith("cpu._cpu_forward_flat" + SUFFIX)


@njit(parallel=True)
def _scale_rows(x, y, d):
    for r in prange(x.shape[0]):
        for i in range(x.shape[1]):
            y[r, i] = x[r, i] / d[r, i]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
def test_a_twin_vectorizes_a_float_division_as_the_prange_body_does():
    """Numba compiles a prange body with error_model='numpy'; under its default 'python'
    model a float division that may divide by zero raises, and the loop, with an exit,
    stays scalar (the Adam twin took 70 ms for 16M parameters, the parallel kernel 17 ms
    on the same one thread)."""
    x = np.ones((4, 64), np.float32)
    serial(_scale_rows)(x, np.empty_like(x), x)
    (asm,) = serial(_scale_rows).inspect_asm().values()
    assert "divps" in asm  # packed: vdivps on AVX, divps on SSE
    assert serial(_scale_rows).targetoptions["error_model"] == "numpy"


def test_threaded_takes_the_twin_on_one_thread():
    with numba_threads(1):
        assert threaded(_driver) is serial(_driver)
    if numba.config.NUMBA_NUM_THREADS > 1:
        with numba_threads(2):
            assert threaded(_driver) is _driver


@pytest.fixture
def parallel_kernels(monkeypatch):
    """A function that, called, makes the ops below run their parallel kernels even on one
    thread."""
    def force():
        for module in OP_MODULES:
            if hasattr(module, "host_kernel"):  # kernels chosen by size (gpunn.backend)
                monkeypatch.setattr(module, "host_kernel", lambda kernel, size: kernel)
            else:
                monkeypatch.setattr(module, "threaded", lambda kernel: kernel)
    return force


def _training_ops(rng):
    """The trainer's CPU ops (one training step and the evaluation) on a small batch."""
    x = rng.standard_normal((37, 1, 8, 8), dtype=np.float32)
    h = rng.standard_normal((37, 24), dtype=np.float32)
    labels = rng.integers(0, 24, 37)
    w, b = rng.random(24, dtype=np.float32) + 0.5, rng.standard_normal(24, dtype=np.float32)
    rm, rv = np.zeros(24, np.float32), np.ones(24, np.float32)
    out = {"augment": ops.augment(x, 3, 100, degrees=10, translate=(0.1, 0.1))}
    y, mean, invstd = ops.batch_norm_relu_forward(h, rm, rv, w, b, True, 0.1, 1e-5)
    out.update(bn=y, rm=rm, rv=rv)
    out["bn_backward"] = ops.batch_norm_relu_backward(h * 0.5, h, mean, invstd, w, b)
    out["dropout"] = ops.dropout(h, 0.2, True, 7, 11)
    loss, lse = ops.cross_entropy_forward(h, labels, label_smoothing=0.1)
    out.update(loss=loss, ce_backward=ops.cross_entropy_backward(np.float32(1), h, labels,
                                                                 label_smoothing=0.1, lse=lse))
    out["softmax"] = ops.softmax(h)
    return out


def test_twins_give_the_parallel_kernels_results_bit_for_bit(parallel_kernels):
    with numba_threads(1):
        twins = _training_ops(np.random.default_rng(0))
        parallel_kernels()
        kernels = _training_ops(np.random.default_rng(0))
    for name, value in twins.items():
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (value, kernels[name]))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
