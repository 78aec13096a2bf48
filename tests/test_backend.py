"""Dispatch: the backend follows the data, overrides, clear errors; cheap import; disk cache."""

import os
import subprocess
import sys
import textwrap

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
