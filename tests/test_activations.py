"""Activations forward and backward: against PyTorch (CPU), the NumPy reference, finite
differences; edge values; out=/in-place; bad input; GPU dtypes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gpunn import ops
from conftest import HOST_BACKENDS, SIZES, assert_close, rel_err

# name: (forward, backward, torch forward, keyword arguments, backward takes the output)
OPS = {
    "sigmoid": (ops.sigmoid, ops.sigmoid_backward, torch.sigmoid, {}, True),
    "tanh": (ops.tanh, ops.tanh_backward, torch.tanh, {}, True),
    "relu": (ops.relu, ops.relu_backward, F.relu, {}, False),
    "leaky_relu": (ops.leaky_relu, ops.leaky_relu_backward, F.leaky_relu,
                   {"negative_slope": 0.2}, False),
    "elu": (ops.elu, ops.elu_backward, F.elu, {"alpha": 1.3}, False),
    "gelu": (ops.gelu, ops.gelu_backward, F.gelu, {"approximate": "none"}, False),
    "gelu_tanh": (ops.gelu, ops.gelu_backward, F.gelu, {"approximate": "tanh"}, False),
    "silu": (ops.silu, ops.silu_backward, F.silu, {}, False),
}
EDGES = np.array([-np.inf, -1e30, -1000, -104, -88.8, -20, -3, -1e-8, -0.0, 0.0, 1e-30, 1e-8,
                  0.5, 3, 20, 88.8, 104, 1000, 1e30, np.inf, np.nan])


#: Element-wise bounds against float64 PyTorch (edge values: no norm to hide behind).
EDGE_RTOL = {"float32": 1e-5, "float64": 1e-12}


def torch_forward_backward(name, x, dy, y):
    """PyTorch's y and dx for float64 copies of x and dy: dx by autograd, or, for backward
    functions that take the output, by PyTorch's backward function from our own y (so that
    the rounding of y, which 1 - y^2 amplifies near saturation, is not charged to dx)."""
    _, _, fn, kw, takes_output = OPS[name]
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    yt = fn(xt, **kw)
    dyt = torch.tensor(np.asarray(dy, np.float64))
    yt.backward(dyt)
    if takes_output:
        backward = getattr(torch.ops.aten, f"{name}_backward")
        return yt.detach().numpy(), backward(dyt, torch.tensor(np.asarray(y, np.float64))).numpy()
    return yt.detach().numpy(), xt.grad.numpy()


def run(name, x, dy, **call):
    forward, backward, _, kw, takes_output = OPS[name]
    y = forward(x, **kw, **call)
    dx = backward(dy, y if takes_output else x, **kw, **call)
    return y, dx


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_matches_torch(name, backend, dtype, n, rng):
    x = (3 * rng.standard_normal(n)).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    y, dx = run(name, x, dy, backend=backend)
    assert y.dtype == dx.dtype == np.dtype(dtype)
    y_ref, dx_ref = torch_forward_backward(name, x, dy, y)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_edge_values_match_torch(name, backend, dtype):
    """Saturation, overflow, signed zeros, infinities and NaN behave as PyTorch's do (in
    float64: PyTorch's own float32 GELU is off by 1e-4 at x = -3)."""
    x = EDGES.astype(dtype)
    dy = np.linspace(-2, 2, x.size).astype(dtype)
    y, dx = run(name, x, dy, backend=backend)
    y_ref, dx_ref = torch_forward_backward(name, x, dy, y)
    rtol = EDGE_RTOL[dtype]
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=1e-30, equal_nan=True)
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=1e-30, equal_nan=True)


def test_sigmoid_saturates_exactly():
    y = ops.sigmoid(np.array([-1000.0, -np.inf, 1000.0, np.inf], np.float32))
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("name", OPS)
def test_reference_backward_matches_finite_differences(name, rng):
    """dx of the reference equals central differences of its own forward (float64)."""
    forward, backward, _, kw, takes_output = OPS[name]
    x = 3 * rng.standard_normal(2000)
    x = x[np.abs(x) > 1e-2]  # away from the kinks of relu, leaky_relu and elu
    h = 1e-6
    fd = (forward(x + h, **kw, backend="numpy") - forward(x - h, **kw, backend="numpy")) / (2 * h)
    v = forward(x, **kw, backend="numpy") if takes_output else x
    dx = backward(np.ones_like(x), v, **kw, backend="numpy")
    assert rel_err(dx, fd) < 1e-8


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, st.integers(0, 300),
                elements=st.floats(-1e4, 1e4, width=32, allow_subnormal=False)),
       name=st.sampled_from(sorted(OPS)))
def test_cpu_kernels_agree_with_reference(x, name):
    forward, backward, _, kw, takes_output = OPS[name]
    dy = np.linspace(-1, 1, x.size, dtype=np.float32)
    y_cpu, y_ref = forward(x, **kw, backend="cpu"), forward(x, **kw, backend="numpy")
    np.testing.assert_allclose(y_cpu, y_ref, rtol=1e-5, atol=1e-30)
    v = y_ref if takes_output else x  # one y for both: 1 - y^2 would amplify their last bits
    np.testing.assert_allclose(backward(dy, v, **kw, backend="cpu"),
                               backward(dy, v, **kw, backend="numpy"), rtol=1e-5, atol=1e-30)
    if name == "sigmoid":
        assert np.all((y_cpu >= 0) & (y_cpu <= 1))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_and_in_place(backend, rng):
    x = rng.standard_normal((4, 33)).astype(np.float32)
    expected = ops.silu(x, backend=backend)
    out = np.full_like(x, np.nan)
    assert ops.silu(x, out=out, backend=backend) is out
    np.testing.assert_array_equal(out, expected)
    ops.silu(x, out=x, backend=backend)  # in place
    np.testing.assert_array_equal(x, expected)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = ops.tanh_backward(dy, x, backend=backend)
    ops.tanh_backward(dy, x, out=dy, backend=backend)
    np.testing.assert_array_equal(dy, dx)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_contiguous_input(backend, rng):
    x = rng.standard_normal((64, 40)).astype(np.float32)[:, ::3].T
    assert not x.flags.c_contiguous
    assert_close(ops.elu(x, backend=backend), F.elu(torch.from_numpy(x.astype(np.float64))),
                 "float32")


def test_torch_tensors_in_torch_tensors_out(rng):
    x = torch.randn(5, 7)
    y = ops.gelu(x, approximate="tanh")
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, F.gelu(x.detach(), approximate="tanh"), "float32")
    out = torch.empty(5, 7)
    assert ops.relu(x, out=out) is out
    assert torch.equal(out, torch.relu(x.detach()))
    dx = ops.relu_backward(torch.ones(5, 7), x)
    assert torch.equal(dx, (x.detach() > 0).float())


def test_bad_input_raises_and_changes_nothing(rng):
    x = rng.standard_normal(10).astype(np.float32)
    out = np.full(10, 7.0, np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        ops.sigmoid(x, out=np.empty(9, np.float32))
    with pytest.raises(TypeError, match="out has dtype float64, expected float32"):
        ops.sigmoid(x, out=np.empty(10, np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.sigmoid(x, out=np.empty(20, np.float32)[::2])
    with pytest.raises(TypeError, match="int32.*'cpu' backend"):
        ops.relu(np.arange(10, dtype=np.int32), out=out)
    with pytest.raises(TypeError, match="float16.*'numpy' backend"):
        ops.tanh(x.astype(np.float16), backend="numpy")
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        ops.tanh([1.0, 2.0])
    with pytest.raises(ValueError, match="y has shape"):
        ops.sigmoid_backward(x, x[:5], out=out)
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        ops.leaky_relu(x, negative_slope="0.1")
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        ops.gelu(x, approximate="erf")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.gelu(x, backend="gpu")
    with pytest.raises(TypeError, match="pass one array type per call"):
        ops.relu_backward(torch.from_numpy(x), x)
    assert np.all(out == 7.0)


GPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]


def _device_array(cupy, x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return cupy.asarray(x.astype(ml_dtypes.bfloat16))
    return cupy.asarray(x.astype(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 7, 1021, 4099, 10**6 + 3])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_cuda_matches_reference(name, dtype, n, rng):
    """Every dtype on the GPU against the float64 reference of the same (rounded) inputs."""
    cupy = pytest.importorskip("cupy")
    x = _device_array(cupy, 3 * rng.standard_normal(n), dtype)
    dy = _device_array(cupy, rng.standard_normal(n), dtype)
    poison = cupy.full(x.shape, np.nan, x.dtype)
    y, dx = run(name, x, dy, backend="cuda")
    forward, backward, _, kw, takes_output = OPS[name]
    forward(x, **kw, out=poison, backend="cuda")
    assert not bool(cupy.isnan(poison.astype(cupy.float32)).any()), "an element was not written"
    xh, dyh = cupy.asnumpy(x).astype(np.float64), cupy.asnumpy(dy).astype(np.float64)
    y_ref = forward(xh, **kw, backend="numpy")
    v = cupy.asnumpy(y).astype(np.float64) if takes_output else xh
    dx_ref = backward(dyh, v, **kw, backend="numpy")
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert_close(cupy.asnumpy(y).astype(np.float64), y_ref, dtype)
    assert_close(cupy.asnumpy(dx).astype(np.float64), dx_ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPS)
def test_cuda_edge_values_match_torch(name):
    x = torch.tensor(EDGES, dtype=torch.float32, device="cuda")
    dy = torch.linspace(-2, 2, x.numel(), device="cuda")
    y, dx = run(name, x, dy)
    assert y.device == x.device
    y_ref, dx_ref = torch_forward_backward(name, x.cpu(), dy.cpu(), y.cpu())
    np.testing.assert_allclose(y.cpu(), y_ref, rtol=1e-5, atol=1e-30, equal_nan=True)
    np.testing.assert_allclose(dx.cpu(), dx_ref, rtol=1e-5, atol=1e-30, equal_nan=True)


@pytest.mark.gpu
def test_cuda_torch_bfloat16_and_unaligned(rng):
    x = torch.randn(3001, device="cuda", dtype=torch.bfloat16)[1:]  # 2 bytes past alignment
    y = ops.silu(x)
    assert y.dtype == torch.bfloat16 and y.is_cuda
    assert_close(y.double().cpu(), F.silu(x.double()).cpu(), "bfloat16")
