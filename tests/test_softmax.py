"""Softmax and log-softmax forward and backward: against PyTorch (CPU), the NumPy reference,
finite differences; edge rows; axes; bad input; GPU dtypes and every launch shape."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpunn import ops
from gpunn.ops.softmax import ITEMS, MAX_BLOCK, launch_config
from conftest import HOST_BACKENDS, assert_close, rel_err

# name: (forward, backward, torch forward)
OPS = {
    "softmax": (ops.softmax, ops.softmax_backward, torch.softmax),
    "log_softmax": (ops.log_softmax, ops.log_softmax_backward, torch.log_softmax),
}
SHAPES = [(0, 5), (4, 0), (1, 1), (7, 13), (5, 1021), (3, 4, 1000), (64, 4099), (10**6,)]
EDGE_ROWS = np.array([
    [1e30, -1e30, 0.0, 1.0],
    [-1e30, -1e30, -1e30, -1e30],
    [-np.inf, -np.inf, -np.inf, -np.inf],
    [-np.inf, 0.0, 1.0, -np.inf],
    [np.inf, 0.0, 1.0, 2.0],
    [np.nan, 0.0, 1.0, 2.0],
    [0.0, 0.0, 0.0, 0.0],
    [88.0, 89.0, 90.0, -1000.0],
])


def torch_forward_backward(name, x, dy, y, axis):
    """PyTorch's y, and its dx computed from our own y (float64): the backward takes y."""
    xt = torch.tensor(np.asarray(x, np.float64))
    yt = OPS[name][2](xt, axis)
    backward = torch._softmax_backward_data if name == "softmax" else torch._log_softmax_backward_data
    dx = backward(torch.tensor(np.asarray(dy, np.float64)), torch.tensor(np.asarray(y, np.float64)),
                  axis, torch.float64)
    return yt.numpy(), dx.numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_matches_torch(name, backend, dtype, shape, rng):
    forward, backward, _ = OPS[name]
    x = (5 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y = forward(x, backend=backend)
    dx = backward(dy, y, backend=backend)
    y_ref, dx_ref = torch_forward_backward(name, x, dy, y, -1)
    assert y.dtype == dx.dtype == np.dtype(dtype)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("axis", [0, 1, -3])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_any_axis(name, backend, axis, rng):
    forward, backward, _ = OPS[name]
    x = rng.standard_normal((6, 5, 9)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    assert forward(x, axis, out=out, backend=backend) is out
    dx = backward(dy, out, axis=axis, backend=backend)
    y_ref, dx_ref = torch_forward_backward(name, x, dy, out, axis)
    assert_close(out, y_ref, "float32")
    assert_close(dx, dx_ref, "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_zero_dimensional(name, backend):
    y = OPS[name][0](np.array(3.0, np.float32), backend=backend)
    assert y.shape == () and float(y) == (1.0 if name == "softmax" else 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_edge_rows_match_torch(name, backend, dtype):
    """+-1e30 never overflows; all -inf, +inf or NaN rows give NaN, as PyTorch's do."""
    forward, backward, fn = OPS[name]
    x = EDGE_ROWS.astype(dtype)
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(dtype)
    y = forward(x, backend=backend)
    dx = backward(dy, y, backend=backend)
    y_ref, dx_ref = torch_forward_backward(name, x, dy, y, -1)
    rtol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=1e-30, equal_nan=True)
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=1e-30, equal_nan=True)
    assert np.isfinite(y[0]).all() and np.isnan(y[2]).all()


@pytest.mark.parametrize("name", OPS)
def test_reference_backward_matches_finite_differences(name, rng):
    """<dy, dx> equals the directional derivative of <dy, f(x)> along random v (float64)."""
    forward, backward, _ = OPS[name]
    x = rng.standard_normal((6, 50))
    dy, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    h = 1e-6
    f = lambda z: np.sum(dy * forward(z, backend="numpy"))  # noqa: E731
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    dx = backward(dy, forward(x, backend="numpy"), backend="numpy")
    assert abs(np.sum(dx * v) - fd) <= 1e-7 * max(1.0, abs(fd))


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 200)),
                elements=st.floats(-1e4, 1e4, width=32)),
       name=st.sampled_from(sorted(OPS)))
def test_cpu_kernels_agree_with_reference(x, name):
    forward, backward, _ = OPS[name]
    y_cpu, y_ref = forward(x, backend="cpu"), forward(x, backend="numpy")
    np.testing.assert_allclose(y_cpu, y_ref, rtol=2e-5, atol=1e-6)
    dy = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)
    np.testing.assert_allclose(backward(dy, y_cpu, backend="cpu"),
                               backward(dy, y_cpu, backend="numpy"), rtol=2e-5, atol=1e-5)
    if name == "softmax":
        np.testing.assert_allclose(y_cpu.sum(axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cols, shift", [(1024, 0), (1024, 1), (1001, 0), (3, 1)])
def test_streamed_backward_rows_equal_plain_ones(name, dtype, cols, shift, rng):
    """A backward output of STREAM_MIN_BYTES or more (softmax's written with non-temporal
    stores; rows aligned or not, ``out`` offset or not): each row bit for bit as the same row
    in a small call, which writes plainly."""
    from gpunn.cpu_vector import STREAM_MIN_BYTES

    forward, backward = getattr(ops, name), getattr(ops, name + "_backward")
    rows = STREAM_MIN_BYTES // (cols * np.dtype(dtype).itemsize) + 3
    dy = rng.standard_normal((rows, cols)).astype(dtype)
    y = forward(rng.standard_normal((rows, cols)).astype(dtype), backend="cpu")
    dx = np.empty(rows * cols + 1, dtype)[shift:shift + rows * cols].reshape(rows, cols)
    backward(dy, y, out=dx, backend="cpu")
    for part in (slice(0, 5), slice(rows // 2, rows // 2 + 3), slice(rows - 5, rows)):
        small = backward(dy[part], y[part], backend="cpu")
        np.testing.assert_array_equal(small.view(f"u{small.itemsize}"),
                                      dx[part].view(f"u{small.itemsize}"))


def test_torch_tensors(rng):
    x = torch.randn(4, 300)
    y = ops.log_softmax(x)
    assert isinstance(y, torch.Tensor)
    assert_close(y, torch.log_softmax(x.double(), -1), "float32")


def test_bad_input_raises_and_changes_nothing(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    out = np.full_like(x, 5.0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        ops.softmax(x, axis=2, out=out)
    with pytest.raises(TypeError, match="axis must be an int"):
        ops.softmax(x, axis=1.0, out=out)
    with pytest.raises(ValueError, match="y has shape"):
        ops.softmax_backward(x, x[:, :2], out=out)
    with pytest.raises(TypeError, match="y has dtype float64, expected float32"):
        ops.log_softmax_backward(x, x.astype(np.float64), out=out)
    assert np.all(out == 5.0)


@pytest.mark.parametrize("n", [1, 31, 32, 1024, 1025, 4096, 8192, 8193, 32768, 32769, 10**6])
def test_launch_config_covers_the_row(n):
    items, block = launch_config(n)
    assert 32 <= block <= MAX_BLOCK and block & (block - 1) == 0
    if n <= MAX_BLOCK * ITEMS[-1]:
        assert items in ITEMS and items * block >= n
        assert items * block < 2 * n or block == 32  # no more than twice the threads needed
    else:
        assert items is None


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (33, 100), (9, 200), (17, 1024), (5, 1025), (8, 4096),
                                   (3, 8193), (2, 32768), (2, 32769), (1, 200003), (4000, 64)],
                         ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_reference(name, dtype, shape, rng):
    """Every dtype and every launch shape on the GPU: 4, 8, 16 and 32 items per thread, rows
    that leave threads idle, the long-row kernel."""
    cupy = pytest.importorskip("cupy")
    from test_activations import _device_array

    forward, backward, _ = OPS[name]
    x = _device_array(cupy, 4 * rng.standard_normal(shape), dtype)
    dy = _device_array(cupy, rng.standard_normal(shape), dtype)
    y = cupy.full(x.shape, np.nan, x.dtype)
    forward(x, out=y, backend="cuda")
    dx = backward(dy, y, backend="cuda")
    xh, dyh = cupy.asnumpy(x).astype(np.float64), cupy.asnumpy(dy).astype(np.float64)
    yh = cupy.asnumpy(y).astype(np.float64)
    assert_close(yh, forward(xh, backend="numpy"), dtype)
    assert_close(cupy.asnumpy(dx).astype(np.float64), backward(dyh, yh, backend="numpy"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
def test_cuda_edge_rows_match_torch(name):
    forward, backward, fn = OPS[name]
    x = torch.tensor(EDGE_ROWS, dtype=torch.float32, device="cuda")
    y = forward(x)
    y_ref, _ = torch_forward_backward(name, x.cpu(), x.cpu(), y.cpu(), -1)
    np.testing.assert_allclose(y.cpu(), y_ref, rtol=1e-5, atol=1e-30, equal_nan=True)


@pytest.mark.gpu
def test_cuda_deterministic(rng):
    cupy = pytest.importorskip("cupy")
    x = cupy.asarray(rng.standard_normal((64, 50000)).astype(np.float32))
    dy = cupy.asarray(rng.standard_normal(x.shape).astype(np.float32))
    runs = [ops.softmax_backward(dy, ops.softmax(x), backend="cuda") for _ in range(3)]
    assert all(bool((r == runs[0]).all()) for r in runs)
    assert rel_err(cupy.asnumpy(runs[0]), ops.softmax_backward(
        cupy.asnumpy(dy), ops.softmax(cupy.asnumpy(x)))) < 1e-5
