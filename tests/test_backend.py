"""Dispatch: the backend follows the data, overrides, clear errors; cheap import; disk cache."""

import os
import subprocess
import sys
import textwrap
import warnings

import numba
import numpy as np
import pytest
import torch

from gpunn import backend, ops
from gpunn.backend import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_follows_the_data(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert resolve("op", x=np.ones(3)).backend == "cpu"
    call = resolve("op", x=torch.ones(3))
    assert (call.backend, call.kind, call.device) == ("cpu", "torch", "cpu")


def test_explicit_choice_beats_the_environment(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "numpy")
    assert resolve("op", x=np.ones(3)).backend == "numpy"
    assert resolve("op", backend="cpu", x=np.ones(3)).backend == "cpu"
    monkeypatch.setenv(backend.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="GPUNN_BACKEND must be one of"):
        resolve("op", x=np.ones(3))


def test_environment_variable_routes_ops(monkeypatch):
    """GPUNN_BACKEND=numpy sends an op to the reference (whose float16 support differs)."""
    x = np.ones(3, np.float32)
    monkeypatch.setenv(backend.ENV_VAR, "numpy")
    seen = []
    monkeypatch.setitem(ops.activations.IMPLS, "numpy",
                        (lambda *a: seen.append("numpy"), None))
    ops.relu(x)
    assert seen == ["numpy"]


def test_requests_that_cannot_be_met(monkeypatch):
    x = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.relu(x, backend="gpu")
    monkeypatch.setattr(backend, "has_cupy", lambda: False)
    with pytest.raises(RuntimeError, match="cuda backend needs CuPy"):
        ops.relu(x, backend="cuda")
    monkeypatch.setattr(backend, "has_cupy", lambda: True)
    monkeypatch.setattr(backend, "cuda_device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        ops.relu(x, backend="cuda")
    monkeypatch.setattr(backend, "cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs device arrays, but x is in host memory"):
        ops.relu(x, backend="cuda")


def test_mixed_array_types_and_non_arrays():
    with pytest.raises(TypeError, match="dy is a numpy array but y is a torch array"):
        ops.sigmoid_backward(np.ones(3, np.float32), torch.ones(3))
    with pytest.raises(TypeError, match="x must be a NumPy array, a CuPy array or a torch tensor"):
        ops.relu(3.0)
    with pytest.raises(ValueError, match="no input array"):
        resolve("op", x=None)


def _full_path(monkeypatch, op, backend_arg=None, **arrays):
    """What resolve decides without its host fast path (backend._host_call)."""
    with monkeypatch.context() as m:
        m.setattr(backend, "_host_call", lambda *args: None)
        call = resolve(op, backend_arg, **arrays)
    return call.backend, call.kind, call.device


@pytest.mark.parametrize("backend_arg", [None, "cpu", "numpy"])
def test_numpy_fast_path_decides_as_the_full_path(monkeypatch, backend_arg):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    x = np.ones((5, 3), np.float32)
    cases = [{"x": x}, {"x": x, "out": None}, {"dy": x, "y": x[:, ::2], "out": np.empty(7)},
             {"x": np.ones(0)}, {"x": np.ones(())}]
    for arrays in cases:
        call = resolve("op", backend_arg, **arrays)
        assert (call.backend, call.kind, call.device) == \
            _full_path(monkeypatch, "op", backend_arg, **arrays)


def test_fast_path_leaves_other_arrays_to_the_full_path(tmp_path):
    """A subclass, a memmap, a non-native byte order, a torch tensor and a non-array each
    take the full path: the same decision or the same error as before."""
    class Sub(np.ndarray):
        pass

    x = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="x is a Sub, a NumPy array subclass"):
        resolve("op", x=x.view(Sub))
    with pytest.raises(TypeError, match="out has non-native byte order"):
        resolve("op", x=x, out=x.astype(x.dtype.newbyteorder()))
    with pytest.raises(TypeError, match="x is a numpy array but out is a torch array"):
        resolve("op", x=x, out=torch.ones(4))
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        resolve("op", x=x, out=[1.0])
    with pytest.raises(TypeError, match="out must be a NumPy array"):  # before the backend
        resolve("op", "gpu", x=x, out=[1.0])
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("op", "gpu", x=x)
    mapped = np.memmap(tmp_path / "m", np.float32, "w+", shape=(4,))
    assert (resolve("op", x=mapped).kind, resolve("op", x=mapped).device) == ("numpy", "cpu")
    call = resolve("op", x=torch.ones(4))
    assert (call.backend, call.kind, call.device) == ("cpu", "torch", "cpu")


@pytest.mark.parametrize("backend_arg", [None, "cpu", "numpy"])
def test_torch_host_fast_path_decides_as_the_full_path(monkeypatch, backend_arg):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    t = torch.ones(5, 3)
    cases = [{"x": t}, {"x": torch.nn.Parameter(t.clone())}, {"x": t, "out": None},
             {"dy": t, "y": t[:, ::2], "out": torch.empty(7, dtype=torch.float64)},
             {"x": torch.ones(0)}, {"x": torch.ones(())}]
    for arrays in cases:
        call = resolve("op", backend_arg, **arrays)
        assert (call.backend, call.kind, call.device) == \
            _full_path(monkeypatch, "op", backend_arg, **arrays)


def test_torch_host_fast_path_leaves_other_tensors_to_the_full_path():
    """A tensor subclass, a sparse, quantized or meta tensor, a NumPy array beside a tensor,
    and a cuda request each get the full path's answer."""
    class Sub(torch.Tensor):
        pass

    t = torch.ones(4)
    with pytest.raises(TypeError, match="x is a Sub, a torch.Tensor subclass"):
        resolve("op", x=t.as_subclass(Sub))
    with pytest.raises(TypeError, match="layout torch.sparse_coo"):
        resolve("op", x=t.to_sparse())
    with warnings.catch_warnings():  # torch deprecates quantized tensors
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(t, 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match="quantized"):
        resolve("op", x=quantized)
    with pytest.raises(TypeError, match="meta tensor"):
        resolve("op", x=torch.ones(4, device="meta"))
    with pytest.raises(TypeError, match="x is a torch array but out is a numpy array"):
        resolve("op", x=t, out=np.ones(4, np.float32))
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        resolve("op", "cuda", x=t)


def test_repeated_calls_check_each_call_anew():
    """Nothing of one call is kept for the next of the same kinds of arrays: a different
    dtype, an out made read-only or strided, a torch tensor or a strided input each get
    the answer of a first call."""
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    out = np.empty_like(x)
    for _ in range(2):
        np.testing.assert_array_equal(ops.relu(x, out=out), np.maximum(x, 0))
    out[...] = 7
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        ops.relu(x, out=out)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        ops.relu(x, out=np.empty((8, 12), np.float32)[:, ::2])
    assert (out == 7).all()
    with pytest.raises(TypeError, match="x has dtype float16, which the 'cpu' backend"):
        ops.relu(x.astype(np.float16))
    with pytest.raises(TypeError, match="x has dtype int32"):
        ops.relu(x.astype(np.int32))
    np.testing.assert_array_equal(ops.relu(x[:, ::2]), np.maximum(x[:, ::2], 0))
    y = ops.relu(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), np.maximum(x, 0))
    with pytest.raises(ValueError, match="out partly overlaps x"):
        ops.relu(x.reshape(-1)[:40], out=x.reshape(-1)[8:48])
    np.testing.assert_array_equal(ops.relu(x.astype(np.float64)), np.maximum(x, 0))


def test_overlap_checks_catch_interleaved_and_shifted_arrays():
    """check_no_overlap's NumPy shortcut (disjoint bounds) leaves every overlap to the full
    check: interleaved views, shifted views and the same array refused, in place allowed."""
    buf = np.zeros(20, np.float32)
    even, odd = buf[0::2], buf[1::2]
    with pytest.raises(ValueError, match="must not overlap x"):
        backend.check_no_overlap("op", "y", odd, {"x": even})
    with pytest.raises(ValueError, match="partly overlaps x"):
        backend.check_no_overlap("op", "y", buf[1:11], {"x": buf[:10]}, in_place=True)
    with pytest.raises(ValueError, match="must not overlap x"):
        backend.check_no_overlap("op", "y", buf, {"x": buf})
    backend.check_no_overlap("op", "y", buf, {"x": buf}, in_place=True)
    backend.check_no_overlap("op", "y", buf[:10], {"x": buf[:10]}, in_place=True)
    backend.check_no_overlap("op", "y", buf[:10], {"x": buf[10:], "w": None})


def test_small_host_calls_run_serial_twins_without_changing_the_thread_count(monkeypatch):
    from gpunn.cpu_jit import serial, threaded
    from gpunn.ops.activations import _cpu_relu

    assert backend.host_kernel(_cpu_relu, backend.SERIAL_BELOW - 1) is serial(_cpu_relu)
    assert backend.host_kernel(_cpu_relu, backend.SERIAL_BELOW) is threaded(_cpu_relu)
    changes = []
    monkeypatch.setattr(numba, "set_num_threads", changes.append)
    x = np.ones((64, 256), np.float32)
    ops.relu(x)
    ops.softmax(x)
    ops.relu_backward(x, x)
    assert changes == []


@pytest.mark.gpu
def test_device_arrays_take_the_full_path():
    """CuPy arrays (the simulator's too) and NumPy arrays sent to cuda are resolved as
    before, after NumPy calls of the same op."""
    cupy = pytest.importorskip("cupy")
    x = np.ones(5, np.float32)
    ops.relu(x)
    call = resolve("relu", x=cupy.asarray(x))
    assert (call.backend, call.kind, call.device) == ("cuda", "cupy", "cuda:0")
    y = ops.relu(cupy.asarray(x - 2))
    assert type(y) is type(cupy.asarray(x)) and (cupy.asnumpy(y) == 0).all()
    with pytest.raises(ValueError, match="backend 'cpu' needs host arrays"):
        ops.relu(cupy.asarray(x), backend="cpu")


def test_torch_meta_tensor_is_refused():
    with pytest.raises(TypeError, match="meta tensor"):
        ops.relu(torch.ones(3, device="meta"))


def test_torch_results_share_memory_with_the_native_result():
    x = torch.randn(1000)
    y = ops.sigmoid(x)
    y_again = ops.sigmoid(x, out=y)  # writes into y's memory in place
    assert y_again is y
    assert np.shares_memory(y.numpy(), y_again.numpy())


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          check=True).stdout


def test_import_is_cheap():
    out = _run("""
        import sys, gpunn, gpunn.ops
        from gpunn.ops import activations, softmax
        compiled = [f for m in (activations, softmax) for f in vars(m).values()
                    if hasattr(f, 'signatures') and f.signatures]
        print(sorted({'cupy', 'torch'} & set(sys.modules)), compiled)
    """)
    assert out.strip() == "[] []"


def test_numba_kernels_load_from_the_disk_cache(tmp_path):
    """A second process finds the compiled kernel on disk instead of compiling it again."""
    code = """
        import numpy as np, gpunn.ops as ops
        from gpunn.ops.activations import _cpu_tanh
        ops.tanh(np.ones(1 << 16, np.float32))  # the parallel kernel (small calls run its twin)
        print(sum(_cpu_tanh.stats.cache_hits.values()), sum(_cpu_tanh.stats.cache_misses.values()))
    """
    first = _run(code, NUMBA_CACHE_DIR=str(tmp_path))
    second = _run(code, NUMBA_CACHE_DIR=str(tmp_path))
    assert first.split() == ["0", "1"]
    assert second.split() == ["1", "0"]


@pytest.mark.gpu
def test_arrays_on_two_devices_raise():
    with pytest.raises(ValueError, match="dy is on cpu but x is on cuda:0"):
        ops.relu_backward(torch.ones(3), torch.ones(3, device="cuda"))
    cupy = pytest.importorskip("cupy")
    with pytest.raises(ValueError, match="x is on cuda:0 but out is on cpu"):
        ops.relu(cupy.ones(3, cupy.float32), out=np.empty(3, np.float32))


@pytest.mark.gpu
def test_cuda_runs_on_torch_current_stream():
    """gpunn's kernels queue behind torch's work on torch's current stream."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.randn(1 << 24, device="cuda")
        y = ops.sigmoid(x * 2)
        expected = torch.sigmoid(x * 2)
    stream.synchronize()
    torch.testing.assert_close(y, expected)


@pytest.mark.gpu
def test_torch_results_live_in_torch_memory_pool():
    x = torch.randn(1 << 20, device="cuda")
    before = torch.cuda.memory_allocated()
    y = ops.sigmoid(x)
    assert torch.cuda.memory_allocated() - before >= y.numel() * y.element_size()
