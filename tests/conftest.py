"""Shared test tools: error measure and tolerances (DESIGN.md), backends, the gpu marker."""

import zlib

import os

import numpy as np
import pytest
from hypothesis import settings

from gpunn import backend

# Every run draws the same examples (a red CI blocks landing, and the README's test command is
# CI's); GPUNN_HYPOTHESIS=explore draws fresh ones to look for new failures.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("GPUNN_HYPOTHESIS") == "explore" else "fixed")

#: ||out - ref|| / ||ref|| bounds by dtype (DESIGN.md); float64 tighter.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
#: Host backends the CPU suite runs on.
HOST_BACKENDS = ("numpy", "cpu")
#: Odd sizes: empty, one, primes, not a multiple of any vector width, and a million.
SIZES = (0, 1, 7, 13, 1021, 65537, 10**6)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN positions must match exactly (else inf)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    nan_out, nan_ref = np.isnan(out), np.isnan(ref)
    if not np.array_equal(nan_out, nan_ref):
        return np.inf
    inf_ref = np.isinf(ref)
    if not np.array_equal(out[inf_ref], ref[inf_ref]):
        return np.inf
    keep = ~(nan_ref | inf_ref)
    num = np.linalg.norm(out[keep] - ref[keep])
    den = np.linalg.norm(ref[keep])
    return float(num / den) if den > 0 else float(num)


def assert_close(out, ref, dtype):
    err = rel_err(out, ref)
    bound = TOLERANCE[dtype if isinstance(dtype, str) else np.dtype(dtype).name]
    assert err <= bound, f"relative error {err:.3g} > {bound:g} ({dtype})"


def has_gpu() -> bool:
    return backend.cuda_device_count() > 0


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible to CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one Numba thread for a module of many small steps (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a busy machine a parallel
    region costs milliseconds (a 50-step optimizer run of 6 small tensors: 0.17 s with 2
    Numba threads, 0.016 s with one)."""
    import numba
    import torch

    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)
