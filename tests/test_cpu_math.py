"""gpunn.cpu_math against float64 references, over the whole float32 range, as used in kernels.

Every value goes through a ``@njit(parallel=True)`` prange kernel over an array, the way the
ops call these helpers. Relative error is measured where the float32 result is a normal number;
where the reference is subnormal or 0 in float32 the result must be within one subnormal ulp
(2^-149) plus the relative bound; where it overflows, the result must be inf.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit, prange

from gpunn import cpu_math as cm

F32 = np.finfo(np.float32)
SUBNORMAL_ULP = 2.0**-149


def _kernel(fn):
    @njit(parallel=True)
    def kernel(x, y):
        for i in prange(x.size):
            y[i] = fn(x[i])

    return kernel


KERNELS = {name: _kernel(getattr(cm, name)) for name in cm.__all__}


def run(name, x):
    y = np.empty_like(x)
    KERNELS[name](x, y)
    return y


def _sigmoid(x):
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_erfc = np.frompyfunc(math.erfc, 1, 1)

REFERENCE = {  # float64
    "exp": np.exp,
    "expm1": np.expm1,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "normal_cdf": lambda x: 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64),
    "normal_pdf": lambda x: np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi),
}

# max relative error of the float32 path: measured (see the cpu_math docstring) plus a margin
# that also covers CPUs without FMA
BOUND_F32 = {
    "exp": 1.5e-7,
    "expm1": 2e-7,
    "sigmoid": 3e-7,
    "tanh": 4.5e-7,
    "normal_cdf": 6e-7,
    "normal_pdf": 2.5e-7,
}


def _sweep():
    """2.6M float32 values: both signs, log-spaced magnitudes 1e-45..3.4e38, and linear ones."""
    mag = np.logspace(-45, math.log10(F32.max), 1_000_000)
    linear = [np.linspace(-20, 20, 400_001), np.linspace(-110, 110, 200_001)]
    return np.concatenate([-mag, mag, *linear]).astype(np.float32)


@pytest.fixture(scope="module")
def sweep():
    return _sweep()


def assert_accurate(name, x):
    """f(x) in float32 within BOUND_F32 relative error of the float64 reference, for every x."""
    y = run(name, x)
    assert y.dtype == np.float32
    with np.errstate(all="ignore"):
        ref = REFERENCE[name](x.astype(np.float64))
        diff = np.where(y == ref.astype(np.float32), 0.0, np.abs(y.astype(np.float64) - ref))
    bound = BOUND_F32[name]
    normal = np.abs(ref) >= F32.tiny
    rel = diff[normal] / np.abs(ref[normal])
    i = np.argmax(rel)
    where = f"{name}({x[normal][i]!r}) = {y[normal][i]!r}"
    assert rel[i] <= bound, f"{where}: relative error {rel[i]:.3g} > {bound:.3g}"
    tiny = ~normal  # reference subnormal or 0 in float32
    assert np.all(diff[tiny] <= SUBNORMAL_ULP + bound * np.abs(ref[tiny])), name


@pytest.mark.parametrize("name", cm.__all__)
def test_float32_accuracy_over_whole_range(name, sweep):
    assert_accurate(name, sweep)


@pytest.mark.parametrize("name", cm.__all__)
def test_float64_uses_float64_math(name, sweep):
    x = np.concatenate([sweep[::4].astype(np.float64), np.linspace(-40.0, 40.0, 100_001)])
    y = run(name, x)
    assert y.dtype == np.float64
    with np.errstate(all="ignore"):
        ref = REFERENCE[name](x)
        diff = np.where(y == ref, 0.0, np.abs(y - ref))
    normal = np.abs(ref) >= np.finfo(np.float64).tiny
    assert (diff[normal] / np.abs(ref[normal])).max() <= 1e-12  # float32 math would give ~1e-7
    assert np.all(diff[~normal] <= 1e-300)


INF, NAN = np.inf, np.nan
SPECIAL = {  # x: expected f(x), for x = inf, -inf, nan, 0, -0, 1000, -1000
    "exp": [INF, 0.0, NAN, 1.0, 1.0, INF, 0.0],
    "expm1": [INF, -1.0, NAN, 0.0, 0.0, INF, -1.0],
    "sigmoid": [1.0, 0.0, NAN, 0.5, 0.5, 1.0, 0.0],
    "tanh": [1.0, -1.0, NAN, 0.0, 0.0, 1.0, -1.0],
    "normal_cdf": [1.0, 0.0, NAN, 0.5, 0.5, 1.0, 0.0],
    "normal_pdf": [0.0, 0.0, NAN, 1 / math.sqrt(2 * math.pi), 1 / math.sqrt(2 * math.pi), 0.0, 0.0],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", cm.__all__)
def test_special_values(name, dtype):
    x = np.array([INF, -INF, NAN, 0.0, -0.0, 1000.0, -1000.0], dtype)
    expected = np.array(SPECIAL[name], dtype)
    np.testing.assert_allclose(run(name, x), expected, rtol=2e-7, atol=0)


def _around(centers, k=200):
    """The 2k+1 consecutive float32 values around each center (and around its negation)."""
    c = np.array(centers + [-v for v in centers], np.float32).view(np.int32)
    return (c[:, None] + np.arange(-k, k + 1, dtype=np.int32)).ravel().view(np.float32)


# where float32 results overflow to inf, go subnormal, or underflow to 0, and where expm1
# changes form (its lower clamp, and x itself below 2^-100)
EDGES = [88.7228, 89.0, 87.336, 103.279, 103.972, 104.0, 13.0, 13.4, 14.0, 14.2, 14.4, 9.0, 80.0,
         2.0**-100]


@pytest.mark.parametrize("name", cm.__all__)
def test_float32_overflow_and_underflow_edges(name):
    assert_accurate(name, _around(EDGES))


@pytest.mark.parametrize("name", ["expm1", "tanh", "sigmoid", "normal_cdf"])
def test_small_arguments(name):
    x = np.float32(2.0) ** -np.arange(1, 150, dtype=np.float32)
    x = np.concatenate([x, -x])
    ref = REFERENCE[name](x.astype(np.float64))
    np.testing.assert_allclose(run(name, x), ref, rtol=BOUND_F32[name], atol=0)


def test_scalar_calls_keep_the_dtype():
    @njit
    def f(x):
        return cm.exp(x), cm.expm1(x), cm.sigmoid(x), cm.tanh(x), cm.normal_cdf(x), cm.normal_pdf(x)

    f(np.float32(0.5))
    f(0.5)
    for sig in f.nopython_signatures:
        assert all(t == sig.args[0] for t in sig.return_type)


def test_python_call_raises():
    with pytest.raises(TypeError, match="Numba"):
        cm.sigmoid(0.5)


def test_cached_caller_loads_from_cache(tmp_path):
    (tmp_path / "caller.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from numba import njit, prange
            from gpunn import cpu_math as cm

            @njit(parallel=True, cache=True)
            def gelu(x, y):
                for i in prange(x.size):
                    y[i] = x[i] * cm.normal_cdf(x[i])

            x = np.linspace(-3, 3, 7, dtype=np.float32)
            y = np.empty_like(x)
            gelu(x, y)
            print(sum(gelu.stats.cache_hits.values()), sum(gelu.stats.cache_misses.values()), y[0])
            """
        )
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "caller.py"]
    runs = [subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    (hits0, misses0, y0), (hits1, misses1, y1) = (r.stdout.split() for r in runs)
    assert (hits0, misses0) == ("0", "1")
    assert (hits1, misses1) == ("1", "0")
    assert y0 == y1
