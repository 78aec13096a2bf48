"""The CUDA simulator's own tests: small deliberately broken kernels it must catch, the host
versions of the half conversions, argument checks, and the stand-in device arrays.

The kernels below are compiled once (one module) through the simulated ``cupy.RawModule``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from gpunn import cuda, cuda_sim
from gpunn.cuda_sim import SimulatorError

from conftest import has_gpu

pytestmark = pytest.mark.skipif(has_gpu(), reason="a real GPU is present: the simulator's "
                                                 "self-tests run where CI runs (no GPU)")

KERNELS = r"""
#include_common

// A block sum with the barrier between the writes and the reads missing (BROKEN) or not.
template <bool BROKEN> __global__ void block_sum(const float* x, float* out) {
  __shared__ float partial[256];
  partial[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  if (!BROKEN) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (unsigned i = 0; i < blockDim.x; ++i) s += partial[i];
    out[blockIdx.x] = s;
  }
}

// y[i] = x[0] + 1 for i <= n: one element too many.
__global__ void off_by_one(const float* x, float* y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i <= n;
       i += gridDim.x * (long long)blockDim.x)
    y[i] = x[0] + 1.0f;
}

// Reads 4 KiB past the end of x.
__global__ void far_read(const float* x, float* y, long long n) {
  if (threadIdx.x == 0) y[0] = x[n + 1024];
}

// Half the block waits at a barrier the other half never reaches.
__global__ void divergent_barrier(float* y) {
  if (threadIdx.x < 16) __syncthreads();
  y[threadIdx.x] = 1.0f;
}

// Two barriers on two lines: a divergent barrier even though every thread waits.
__global__ void two_barriers(float* y) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  y[threadIdx.x] = 1.0f;
}

// Lanes 16-31 exit; the others shuffle with a mask that still names them.
__global__ void shuffle_exited(float* y) {
  if (threadIdx.x >= 16) return;
  y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// A correct warp reduction (every lane ends with the sum) and the collectives' results.
__global__ void warp_ops(const float* x, float* sum, unsigned* ballot, float* down, float* up,
                         float* idx) {
  const unsigned t = threadIdx.x;
  float v = x[t];
  down[t] = __shfl_down_sync(0xffffffffu, v, 3);
  up[t] = __shfl_up_sync(0xffffffffu, v, 2, 8);
  idx[t] = __shfl_sync(0xffffffffu, v, 5, 16);
  ballot[t] = __ballot_sync(0xffffffffu, v > 0.0f);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  sum[t] = v;
}

// Reads shared memory nobody wrote (the store that never runs keeps the compiler from
// taking s for all zeros).
__global__ void unwritten_shared(float* y) {
  __shared__ float s[32];
  if (threadIdx.x >= blockDim.x) s[0] = 1.0f;
  y[threadIdx.x] = s[threadIdx.x];
}

// The host versions of the half conversions of common.cuh.
__global__ void half_conversions(const gpunn::half* h, float* widened, const float* f,
                                 gpunn::half* narrowed, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += gridDim.x * (long long)blockDim.x) {
    widened[i] = gpunn::to_compute(h[i]);
    narrowed[i] = gpunn::from_compute<gpunn::half>(f[i]);
  }
}

__global__ void takes_int(float* y, int n) {
  if (threadIdx.x < n) y[threadIdx.x] = float(n);
}
"""
NAMES = ["block_sum<false>", "block_sum<true>", "off_by_one", "far_read", "divergent_barrier",
         "two_barriers", "shuffle_exited", "warp_ops", "unwritten_shared", "half_conversions",
         "takes_int"]


@pytest.fixture(scope="module")
def sim():
    """The simulator, switched on for this module (restored after)."""
    with cuda_sim.simulated():
        import cupy

        code = KERNELS.replace("#include_common", (cuda.kernel_dir() / "common.cuh").read_text())
        module = cupy.RawModule(code=code, name_expressions=NAMES)
        yield cupy, module.get_function


@pytest.fixture(autouse=True)
def default_settings():
    with cuda_sim.settings(order="in order", seed=0, sanitize=False):
        yield


def _sum_in(order, get, cupy, broken):
    x = cupy.asarray(np.arange(1, 513, dtype=np.float32))
    out = cupy.zeros(2, cupy.float32)
    with cuda_sim.settings(order=order, seed=7):
        get(f"block_sum<{'true' if broken else 'false'}>")((2,), (256,), (x, out))
    return cupy.asnumpy(out)


def test_missing_syncthreads_is_caught_by_the_order_modes(sim):
    cupy, get = sim
    good = [_sum_in(order, get, cupy, False) for order in cuda_sim.ORDERS]
    for result in good:  # with the barrier: the same bits in every order
        assert result.tobytes() == good[0].tobytes()
    np.testing.assert_array_equal(good[0], [256 * 257 / 2, 256 * 257 / 2 + 256 * 256])
    broken = [_sum_in(order, get, cupy, True) for order in cuda_sim.ORDERS]
    assert len({r.tobytes() for r in broken}) > 1, "a race the orders did not expose"
    assert np.isnan(broken[0]).all()  # in order, thread 0 reads slots still 0xFF (NaN)


def test_unwritten_shared_memory_reads_as_nan(sim):
    cupy, get = sim
    y = cupy.zeros(32, cupy.float32)
    get("unwritten_shared")((1,), (32,), (y,))
    assert np.isnan(cupy.asnumpy(y)).all()


def test_out_of_bounds_write_is_caught_by_the_sanitizer(sim):
    cupy, get = sim
    n = 1000
    x, y = cupy.ones(n + 1, cupy.float32)[:n], cupy.zeros(n, cupy.float32)
    get("off_by_one")((4,), (256,), (x, y, np.int64(n)))  # unnoticed without the sanitizer
    with cuda_sim.settings(sanitize=True):
        with pytest.raises(SimulatorError, match=r"off_by_one: out-of-bounds write: argument 1 "
                                                 r"\(4000 bytes\): bytes 4000\.\.4003 written, "
                                                 r"0 bytes past its end"):
            get("off_by_one")((4,), (256,), (x, y, np.int64(n)))
        y2 = cupy.zeros(n, cupy.float32)
        get("off_by_one")((4,), (256,), (x, y2, np.int64(n - 1)))  # in bounds: passes, copied back
    np.testing.assert_array_equal(cupy.asnumpy(y2)[:n], 2.0)


def test_far_read_hits_a_guard_page(sim):
    cupy, get = sim
    x, y = cupy.ones(16, cupy.float32), cupy.zeros(1, cupy.float32)
    with cuda_sim.settings(sanitize=True):
        with pytest.raises(SimulatorError, match=r"out-of-bounds access at 0x[0-9a-f]+: a guard "
                                                 r"page of argument 0 in thread 0 .*kernel far_read"):
            get("far_read")((1,), (32,), (x, y, np.int64(16)))


@pytest.mark.parametrize("order", list(cuda_sim.ORDERS))
def test_divergent_barrier_is_reported_with_the_kernel(sim, order):
    cupy, get = sim
    y = cupy.zeros(64, cupy.float32)
    with cuda_sim.settings(order=order), pytest.raises(SimulatorError) as error:
        get("divergent_barrier")((1,), (64,), (y,))
    message = str(error.value)
    assert "divergent barrier" in message and "kernel divergent_barrier" in message
    assert re.search(r"threads? [\d, -]+ wait at __syncthreads \(module\.cu:\d+\)", message)


def test_barriers_on_two_lines_are_divergent(sim):
    cupy, get = sim
    with pytest.raises(SimulatorError, match=r"divergent barrier.*threads 0, 2, 4.*wait at "
                                             r"__syncthreads .*threads 1, 3, 5.*kernel two_barriers"):
        get("two_barriers")((1,), (32,), (cupy.zeros(32, cupy.float32),))


@pytest.mark.parametrize("order", list(cuda_sim.ORDERS))
def test_shuffle_naming_exited_lanes_is_reported(sim, order):
    cupy, get = sim
    with cuda_sim.settings(order=order), pytest.raises(
            SimulatorError, match=r"__shfl_xor_sync \(module\.cu:\d+\) in warp 0 can never "
                                  r"complete: its mask 0xffffffff names exited lanes? "
                                  r"(1[6-9]|2\d|3[01])\b.*\(kernel shuffle_exited"):
        get("shuffle_exited")((1,), (32,), (cupy.zeros(32, cupy.float32),))


def test_warp_collectives_follow_cuda(sim):
    cupy, get = sim
    host = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    x = cupy.asarray(host)
    outs = [cupy.zeros(64, t) for t in (cupy.float32, cupy.uint32, cupy.float32, cupy.float32,
                                        cupy.float32)]
    get("warp_ops")((1,), (64,), (x, *outs))
    total, ballot, down, up, idx = (cupy.asnumpy(o) for o in outs)
    lane, warp = np.arange(64) % 32, np.arange(64) // 32
    w = host.reshape(2, 32)
    np.testing.assert_allclose(total, np.repeat(w.sum(1), 32), rtol=1e-6)
    assert len(set(total[:32].tobytes()[i:i + 4] for i in range(0, 128, 4))) == 1  # butterfly
    expected_ballot = [sum(1 << l for l in range(32) if w[k, l] > 0) for k in range(2)]
    np.testing.assert_array_equal(ballot, np.repeat(expected_ballot, 32))
    src_down = np.where(lane + 3 <= 31, lane + 3, lane) + 32 * warp
    np.testing.assert_array_equal(down, host[src_down])
    seg = lane & ~7
    src_up = np.where(lane - 2 >= seg, lane - 2, lane) + 32 * warp
    np.testing.assert_array_equal(up, host[src_up])
    src_idx = (lane & ~15) + 5 + 32 * warp
    np.testing.assert_array_equal(idx, host[src_idx])


def test_half_conversions_match_numpy(sim):
    cupy, get = sim
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = bits[:0x7c00].view(np.float16).astype(np.float64)  # 0 .. 65504
    ties = (finite + np.diff(np.append(finite, 65536.0)) / 2).astype(np.float32)  # to even
    rng = np.random.default_rng(2)
    scattered = rng.standard_normal(30000) * 10.0 ** rng.integers(-9, 6, 30000)
    edges = [65504, 65519.99, 65520, 1e30, -1e30, np.inf, -np.inf, np.nan, 2**-25, 2**-26,
             3 * 2**-26, -0.0]
    f = np.concatenate([ties, -ties, scattered, edges]).astype(np.float32)
    n = max(bits.size, f.size)
    h, f = np.resize(bits, n), np.resize(f, n)
    widened, narrowed = cupy.zeros(n, cupy.float32), cupy.zeros(n, cupy.float16)
    get("half_conversions")((64,), (256,), (cupy.asarray(h.view(np.float16)), widened,
                                            cupy.asarray(f), narrowed, np.int64(n)))
    want_w = h.view(np.float16).astype(np.float32)
    got_w = cupy.asnumpy(widened)
    assert np.array_equal(np.isnan(got_w), np.isnan(want_w))
    ok = ~np.isnan(want_w)
    assert got_w[ok].tobytes() == want_w[ok].tobytes()
    with np.errstate(over="ignore"):  # the overflow to inf is one of the cases
        want_n = f.astype(np.float16).view(np.uint16)
    got_n = cupy.asnumpy(narrowed).view(np.uint16)
    nan = np.isnan(f)
    assert np.isnan(got_n[nan].view(np.float16)).all()
    bad = np.flatnonzero(got_n[~nan] != want_n[~nan])
    assert bad.size == 0, f"float -> half differs at {f[~nan][bad[:5]]}"


def test_arguments_are_checked_against_the_parameters(sim):
    cupy, get = sim
    kernel = get("takes_int")
    y = cupy.zeros(4, cupy.float32)
    with pytest.raises(TypeError, match=r"takes_int: argument 1 \(int\) takes int, but the "
                                        r"argument is int64 .*pass np.int32"):
        kernel((1,), (32,), (y, np.int64(4)))
    with pytest.raises(TypeError, match=r"argument 0 \(float\*\) points to float, but the "
                                        r"argument is a cupy float64 array"):
        kernel((1,), (32,), (cupy.zeros(4), np.int32(4)))
    with pytest.raises(TypeError, match="must be a device array"):
        kernel((1,), (32,), (np.zeros(4, np.float32), np.int32(4)))
    with pytest.raises(TypeError, match=r"takes 2 arguments \(float\*, int\), got 1"):
        kernel((1,), (32,), (y,))
    with pytest.raises(SimulatorError, match="invalid launch configuration"):
        kernel((1,), (2048,), (y, np.int32(4)))
    kernel((1,), (32,), (y, np.int32(4)))
    np.testing.assert_array_equal(cupy.asnumpy(y), 4.0)


def test_device_arrays_behave_like_cupy(sim):
    cupy, _ = sim
    a = cupy.asarray(np.arange(10, dtype=np.float32))
    assert isinstance(a, cupy.ndarray) and a.data.ptr % 256 == 0
    assert a[1:].data.ptr % 16 == 4  # views keep their offsets (the kernels' scalar paths)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError, match="does not mix host"):
        a + np.ones(10, np.float32)
    b = (a * 2 + 1).sum()
    assert isinstance(b, cupy.ndarray) and b.ndim == 0 and float(b) == 100.0
    assert isinstance(a[3], cupy.ndarray) and int(a[3]) == 3
    assert np.isnan(cupy.asnumpy(cupy.empty(4, cupy.float32))).all()  # fresh memory is 0xFF
    with cuda_sim.sm_count(1):
        assert cupy.cuda.Device().attributes["MultiProcessorCount"] == 1
    assert cupy.cuda.Device().attributes["MultiProcessorCount"] == 132


@pytest.mark.gpu
def test_numpy_arrays_run_on_the_cuda_backend(sim):
    """backend="cuda" takes NumPy arrays under the simulator and gives NumPy arrays back,
    writing out= and running statistics in place."""
    from gpunn import ops
    from gpunn.ops import batchnorm as bn

    rng = np.random.default_rng(3)
    x = rng.standard_normal((33, 70)).astype(np.float32)
    y = ops.gelu(x, backend="cuda")
    assert type(y) is np.ndarray
    np.testing.assert_allclose(y, ops.gelu(x, backend="numpy"), rtol=1e-6, atol=1e-7)
    out = np.full_like(x, np.nan)
    assert ops.softmax(x, out=out, backend="cuda") is out
    np.testing.assert_allclose(out, ops.softmax(x, backend="numpy"), rtol=1e-6)
    xb = rng.standard_normal((8, 3, 5, 5)).astype(np.float32)
    stats = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    got = bn.batch_norm_forward(xb, *stats, training=True, backend="cuda")
    ref_stats = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    ref = bn.batch_norm_forward(xb, *ref_stats, training=True, backend="numpy")
    for a, b in zip([*got, *stats], [*ref, *ref_stats]):
        assert type(a) is np.ndarray
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6)
