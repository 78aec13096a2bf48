"""Shared test tools: error measure and tolerances (DESIGN.md), backends, the gpu marker."""

import inspect
import os
import re
import zlib

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
    """||out - ref|| / ||ref|| in float64 over the finite entries of ``ref``; its NaN and inf
    must stand in ``out`` at the same places (else inf). The tests' measure: they feed NaN,
    inf and overflowing inputs on purpose, and a reference's NaN must be reproduced, not
    merely tolerated. (gpunn.bench's ``harness.rel_err`` measures the benchmarks' finite
    data, chunk by chunk on NumPy or CuPy, and lets any NaN or inf fail the bound.)"""
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


def array_bytes(a):
    """What identifies an array's contents exactly (NumPy or torch): dtype, shape, bytes."""
    if a is None:
        return None
    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().contiguous().numpy()
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def functional_step(algo, params, grads, states, steps, options, **kwargs):
    """One gpunn functional optimizer step; ``states`` maps slot names to lists."""
    from gpunn.optim import functional as F

    o = dict(options, **kwargs)
    if algo == "sgd":
        return F.sgd(params, grads, states.get("momentum_buffer"), steps, **o)
    if algo == "adagrad":
        return F.adagrad(params, grads, states["sum"], steps, **o)
    if algo == "rmsprop":
        return F.rmsprop(params, grads, states["square_avg"], states.get("grad_avg"),
                         states.get("momentum_buffer"), steps, **o)
    fn = F.adam if algo == "adam" else F.adamw
    return fn(params, grads, states["exp_avg"], states["exp_avg_sq"],
              states.get("max_exp_avg_sq"), steps, **o)


def has_gpu() -> bool:
    return backend.cuda_device_count() > 0 and not simulated()


def simulated() -> bool:
    """The cuda backend runs on gpunn's CUDA simulator (GPUNN_CUDA_SIM=1): the gpu tests run
    on it, except those that need CUDA torch tensors."""
    from gpunn import cuda

    return cuda.simulator() is not None


#: What a test needs CUDA torch tensors for (the simulator has none).
_TORCH_CUDA = re.compile(r"""device\s*=\s*["']cuda|\.cuda\(|torch\.cuda\.|\.to\(["']cuda""")


def _needs_torch_cuda(item) -> bool:
    if "torch_cuda" in item.name:
        return True
    try:
        return bool(_TORCH_CUDA.search(inspect.getsource(item.function)))
    except (OSError, TypeError, AttributeError):
        return False


#: Under the simulator, a gpu test runs its cases with this many elements or more only once
#: (its first such case): they take the same kernel paths as the smaller ones, and a CPU
#: simulating a thread per fiber is slow at them. The GPU run keeps them all.
SIM_LARGE = 1 << 16


#: gpu tests whose large cases all run under the simulator too: only they launch some kernel
#: instantiations (softmax's and cross-entropy's long-row and widest held-items kernels per
#: dtype), which GPUNN_CUDA_SIM_COVERAGE counts, or check an accuracy per size or layout
#: (batch norm at mean 1e4, a float16 MSE gradient that is subnormal at 10^6 elements).
SIM_EVERY_SIZE = {("test_softmax", "test_cuda_matches_reference"),
                  ("test_batchnorm", "test_cuda_large_mean_stays_accurate"),
                  ("test_losses", "test_cuda_mse_matches_reference"),
                  ("test_losses", "test_cuda_cross_entropy_matches_reference"),
                  ("test_losses", "test_cuda_nll_matches_reference")}


def sim_size(gpu, sim):
    """A test size: ``gpu`` on a GPU, ``sim`` under the CUDA simulator (a CPU running a fiber
    per CUDA thread is ~10^3 times slower). ``sim`` must still take the same kernel paths
    (several blocks, several partial sums), and the assertions stay the same."""
    return sim if simulated() else gpu


def _elements(value) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, tuple) and value and all(isinstance(v, (int, np.integer)) for v in value):
        return int(np.prod(value))
    if isinstance(value, tuple):
        return max((_elements(v) for v in value), default=0)
    return 0


def pytest_collection_modifyitems(config, items):
    if simulated():
        torch_cuda = pytest.mark.skip(reason="needs CUDA torch tensors (the CUDA simulator has "
                                             "none)")
        large = pytest.mark.skip(reason="a large size, run once per test under the CUDA "
                                        "simulator (the GPU run takes every one)")
        seen_large = set()
        for item in items:
            if "gpu" not in item.keywords:
                continue
            if _needs_torch_cuda(item):
                item.add_marker(torch_cuda)
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            if max((_elements(v) for v in params.values()), default=0) >= SIM_LARGE:
                key = (item.module.__name__, item.originalname)
                if key in seen_large and key not in SIM_EVERY_SIZE:
                    item.add_marker(large)
                seen_large.add(key)
        return
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA device visible to CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    if simulated():  # compile every kernel family in the background while tests run
        from gpunn import cuda_sim, ops, optim  # noqa: F401  (declares the families)
        import gpunn.optim.fused  # noqa: F401

        cuda_sim.prefetch()


def pytest_sessionfinish(session, exitstatus):
    """Under the simulator: every declared kernel instantiation must have been launched when
    GPUNN_CUDA_SIM_COVERAGE=1 (CI's full gpu run)."""
    if not simulated() or os.environ.get("GPUNN_CUDA_SIM_COVERAGE", "") in ("", "0"):
        return
    from gpunn import cuda_sim

    if any(missing for _, _, missing in cuda_sim.coverage().values()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not simulated():
        return
    from gpunn import cuda_sim

    report = cuda_sim.coverage()
    launched = sum(cuda_sim.LAUNCHES.values())
    covered = sum(c for c, _, _ in report.values())
    total = sum(t for _, t, _ in report.values())
    write = terminalreporter.write_line
    terminalreporter.section("CUDA simulator: kernel instantiations launched")
    for name, (count, declared, missing) in report.items():
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        write(f"{name:12s} {count:3d} / {declared:3d}" + (f"  never launched: {shown}" if missing else ""))
    write(f"{'all':12s} {covered:3d} / {total:3d}  ({launched} launches; settings: "
          f"{cuda_sim.SETTINGS})")


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
