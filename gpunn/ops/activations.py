r"""Fused elementwise activations, forward and backward.

Forward y = f(x) and backward dx = dy * f'(.) for

    sigmoid     y = 1 / (1 + e^{-x})                 dx = dy * y * (1 - y)            (from y)
    tanh        y = tanh(x)                          dx = dy * (1 - y^2)              (from y)
    relu        y = max(x, 0)                        dx = 0 if x <= 0 else dy
    leaky_relu  y = x if x > 0 else a*x              dx = dy if x > 0 else a*dy
    elu         y = a*(e^x - 1) if x <= 0 else x     dx = a*e^x*dy if x <= 0 else dy
    gelu        y = x * Phi(x)                       dx = dy * (Phi(x) + x*phi(x))
    gelu tanh   y = x/2 * (1 + tanh(u)) = x * s,  s = sigmoid(2u),  u = k*(x + c*x^3),
                k = sqrt(2/pi), c = 0.044715
                dx = dy * (s + 2x * s * (1 - s) * k * (1 + 3c*x^2))
    silu        y = x * s,  s = sigmoid(x)           dx = dy * s * (1 + x*(1 - s))

where Phi and phi are the standard normal CDF and density. The tanh form of GELU is computed
through (1 + tanh(u))/2 = sigmoid(2u), which keeps its relative accuracy where tanh(u) is
near -1 (a float32 1 + tanh(u) loses all digits there). The backward takes the forward's
output for sigmoid and tanh and its input for the rest, as PyTorch's backward functions do.

Memory traffic (the least any implementation must move): forward reads x and writes y,
2n elements; backward reads dy and x (or y) and writes dx, 3n elements. Each backend makes
exactly that one pass. On a GPU the math hides behind that traffic; on the CPU the ops built
on exp are partly compute-bound (gelu forward 0.89 ns per element on one core in cache, 256-bit
vectors, a 2-core EPYC) and reach 79-88% of the memory limit there (README, Benchmarks).

In place: pass ``out=x`` to a forward or ``out=dy`` to a backward.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .. import cpu_math as cm
from .. import cuda
from ..backend import array_module, host_kernel
from ..validation import gelu_approximate, real
from ._apply import apply, compute_dtype

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
#: Caps 1 + 3c*x^2 in the tanh-GELU derivative so that a float32 x^2 overflowing (|x| > 1e19)
#: meets s*(1 - s) = 0 as 0, not as 0 * inf = NaN; the cap changes nothing else.
GELU_SLOPE_CAP = 1e30

# --- NumPy reference (runs on CuPy arrays too; math in float32 for 16-bit inputs) -------------


def _ndtr(xp):
    """The normal CDF Phi for the array module xp."""
    if xp is np:
        from scipy.special import ndtr
    else:
        from cupyx.scipy.special import ndtr
    return ndtr


def _ref_sigmoid(xp, x):
    return 1 / (1 + xp.exp(-x))


def _ref_gelu_tanh_s(xp, x):
    return _ref_sigmoid(xp, 2 * SQRT_2_OVER_PI * (x + GELU_C * x * x * x))


REF_FORWARD = {
    "sigmoid": lambda xp, x, a: _ref_sigmoid(xp, x),
    "tanh": lambda xp, x, a: xp.tanh(x),
    "relu": lambda xp, x, a: xp.maximum(x, 0),
    "leaky_relu": lambda xp, x, a: xp.where(x > 0, x, a * x),
    "elu": lambda xp, x, a: xp.where(x <= 0, a * xp.expm1(x), x),
    "gelu": lambda xp, x, a: x * _ndtr(xp)(x),
    "gelu_tanh": lambda xp, x, a: x * _ref_gelu_tanh_s(xp, x),
    "silu": lambda xp, x, a: x * _ref_sigmoid(xp, x),
}


def _ref_gelu_tanh_backward(xp, dy, x):
    s = _ref_gelu_tanh_s(xp, x)
    slope = xp.minimum(1 + 3 * GELU_C * x * x, GELU_SLOPE_CAP)
    return dy * (s + 2 * x * s * (1 - s) * SQRT_2_OVER_PI * slope)


def _ref_silu_backward(xp, dy, x):
    s = _ref_sigmoid(xp, x)
    return dy * s * (1 + x * (1 - s))


REF_BACKWARD = {
    "sigmoid": lambda xp, dy, y, a: dy * y * (1 - y),
    "tanh": lambda xp, dy, y, a: dy * (1 - y * y),
    "relu": lambda xp, dy, x, a: xp.where(x <= 0, 0, dy),
    "leaky_relu": lambda xp, dy, x, a: xp.where(x > 0, dy, a * dy),
    "elu": lambda xp, dy, x, a: xp.where(x <= 0, a * xp.exp(x) * dy, dy),
    "gelu": lambda xp, dy, x, a: dy * (_ndtr(xp)(x) + x * INV_SQRT_2PI * xp.exp(-0.5 * x * x)),
    "gelu_tanh": lambda xp, dy, x, a: _ref_gelu_tanh_backward(xp, dy, x),
    "silu": lambda xp, dy, x, a: _ref_silu_backward(xp, dy, x),
}


def _numpy_forward(name, x, y, param):
    xp = array_module(x)
    xc = compute_dtype(xp, x)
    with np.errstate(over="ignore", invalid="ignore"):
        y[...] = REF_FORWARD[name](xp, xc, xc.dtype.type(param))


def _numpy_backward(name, dy, v, dx, param):
    xp = array_module(dy)
    dyc, vc = compute_dtype(xp, dy), compute_dtype(xp, v)
    with np.errstate(over="ignore", invalid="ignore"):
        dx[...] = REF_BACKWARD[name](xp, dyc, vc, dyc.dtype.type(param))


# --- Numba CPU kernels: one parallel, vectorized pass; scalars arrive in the array's dtype ----
#
# Each op is a serial loop over a piece of the arrays (`_<op>_loop`), which LLVM vectorizes, and a
# parallel driver (`_cpu_<op>`) that runs it over pieces of CHUNK elements. Compiled as a function
# of its own, the loop keeps its constants in registers or on the stack; written as the body of a
# prange, every constant was broadcast again in each iteration (gelu: 79 instead of 43
# instructions per 8 elements, 1.5x slower on one thread).

CHUNK = 1 << 14


@njit(inline="always", cache=True)
def _chunks(x):
    return (x.size + CHUNK - 1) // CHUNK


@njit(inline="always", cache=True)
def _span(c, x):
    """The slice of chunk c of x."""
    return slice(c * CHUNK, min(x.size, (c + 1) * CHUNK))


# Scalar math, typed by its argument (type(x)(c) keeps float32 math in float32).


@njit(inline="always", cache=True)
def _gelu_tanh_s(x):
    k2, c = type(x)(2 * SQRT_2_OVER_PI), type(x)(GELU_C)
    return cm.sigmoid(k2 * (x + c * x * x * x))


@njit(inline="always", cache=True)
def _gelu_tanh_grad(dy, x):
    k2, c3, one = type(x)(2 * SQRT_2_OVER_PI), type(x)(3 * GELU_C), type(x)(1)
    s = _gelu_tanh_s(x)
    return dy * (s + x * s * (one - s) * k2 * min(one + c3 * x * x, type(x)(GELU_SLOPE_CAP)))


@njit(inline="always", cache=True)
def _silu_grad(dy, x):
    s = cm.sigmoid(x)
    one = type(x)(1)
    return dy * s * (one + x * (one - s))


# Forward loops y = f(x) and their drivers.


@njit(cache=True)
def _sigmoid_loop(x, y, a):
    for i in range(x.size):
        y[i] = cm.sigmoid(x[i])


@njit(cache=True)
def _tanh_loop(x, y, a):
    for i in range(x.size):
        y[i] = cm.tanh(x[i])


@njit(cache=True)
def _relu_loop(x, y, a):
    for i in range(x.size):
        y[i] = type(a)(0) if x[i] <= 0 else x[i]


@njit(cache=True)
def _leaky_relu_loop(x, y, a):
    for i in range(x.size):
        y[i] = x[i] if x[i] > 0 else a * x[i]


@njit(cache=True)
def _elu_loop(x, y, a):
    for i in range(x.size):
        y[i] = a * cm.expm1(x[i]) if x[i] <= 0 else x[i]


@njit(cache=True)
def _gelu_loop(x, y, a):
    for i in range(x.size):
        y[i] = x[i] * cm.normal_cdf(x[i])


@njit(cache=True)
def _gelu_tanh_loop(x, y, a):
    for i in range(x.size):
        y[i] = x[i] * _gelu_tanh_s(x[i])


@njit(cache=True)
def _silu_loop(x, y, a):
    for i in range(x.size):
        y[i] = x[i] * cm.sigmoid(x[i])


@njit(parallel=True, cache=True)
def _cpu_sigmoid(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _sigmoid_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_tanh(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _tanh_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_relu(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _relu_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_leaky_relu(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _leaky_relu_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_elu(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _elu_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_gelu(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _gelu_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_gelu_tanh(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _gelu_tanh_loop(x[part], y[part], a)


@njit(parallel=True, cache=True)
def _cpu_silu(x, y, a):
    for c in prange(_chunks(x)):
        part = _span(c, x)
        _silu_loop(x[part], y[part], a)


# Backward loops dx = dy * f'(.) from v (the forward's output or input) and their drivers.


@njit(cache=True)
def _sigmoid_backward_loop(dy, y, dx, a):
    for i in range(dy.size):
        dx[i] = dy[i] * y[i] * (type(a)(1) - y[i])


@njit(cache=True)
def _tanh_backward_loop(dy, y, dx, a):
    for i in range(dy.size):
        dx[i] = dy[i] * (type(a)(1) - y[i] * y[i])


@njit(cache=True)
def _relu_backward_loop(dy, x, dx, a):
    for i in range(dy.size):
        dx[i] = type(a)(0) if x[i] <= 0 else dy[i]


@njit(cache=True)
def _leaky_relu_backward_loop(dy, x, dx, a):
    for i in range(dy.size):
        dx[i] = dy[i] if x[i] > 0 else a * dy[i]


@njit(cache=True)
def _elu_backward_loop(dy, x, dx, a):
    for i in range(dy.size):
        dx[i] = a * cm.exp(x[i]) * dy[i] if x[i] <= 0 else dy[i]


@njit(cache=True)
def _gelu_backward_loop(dy, x, dx, a):
    for i in range(dy.size):  # Phi and phi share their exp once inlined
        dx[i] = dy[i] * (cm.normal_cdf(x[i]) + x[i] * cm.normal_pdf(x[i]))


@njit(cache=True)
def _gelu_tanh_backward_loop(dy, x, dx, a):
    for i in range(dy.size):
        dx[i] = _gelu_tanh_grad(dy[i], x[i])


@njit(cache=True)
def _silu_backward_loop(dy, x, dx, a):
    for i in range(dy.size):
        dx[i] = _silu_grad(dy[i], x[i])


@njit(parallel=True, cache=True)
def _cpu_sigmoid_backward(dy, y, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _sigmoid_backward_loop(dy[part], y[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_tanh_backward(dy, y, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _tanh_backward_loop(dy[part], y[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_relu_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _relu_backward_loop(dy[part], x[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_leaky_relu_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _leaky_relu_backward_loop(dy[part], x[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_elu_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _elu_backward_loop(dy[part], x[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_gelu_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _gelu_backward_loop(dy[part], x[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_gelu_tanh_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _gelu_tanh_backward_loop(dy[part], x[part], dx[part], a)


@njit(parallel=True, cache=True)
def _cpu_silu_backward(dy, x, dx, a):
    for c in prange(_chunks(dy)):
        part = _span(c, dy)
        _silu_backward_loop(dy[part], x[part], dx[part], a)


CPU_FORWARD = {"sigmoid": _cpu_sigmoid, "tanh": _cpu_tanh, "relu": _cpu_relu,
               "leaky_relu": _cpu_leaky_relu, "elu": _cpu_elu, "gelu": _cpu_gelu,
               "gelu_tanh": _cpu_gelu_tanh, "silu": _cpu_silu}
CPU_BACKWARD = {"sigmoid": _cpu_sigmoid_backward, "tanh": _cpu_tanh_backward,
                "relu": _cpu_relu_backward, "leaky_relu": _cpu_leaky_relu_backward,
                "elu": _cpu_elu_backward, "gelu": _cpu_gelu_backward,
                "gelu_tanh": _cpu_gelu_tanh_backward, "silu": _cpu_silu_backward}


def _cpu_forward(name, x, y, param):
    host_kernel(CPU_FORWARD[name], x.size)(x.reshape(-1), y.reshape(-1), x.dtype.type(param))


def _cpu_backward(name, dy, v, dx, param):
    host_kernel(CPU_BACKWARD[name], dy.size)(dy.reshape(-1), v.reshape(-1), dx.reshape(-1),
                                             dy.dtype.type(param))


# --- CUDA launcher: kernels/activations.cu, one grid-stride kernel per (dtype, op) ------------

CUDA_OPS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "leaky_relu": "LeakyRelu",
            "elu": "Elu", "gelu": "GeluErf", "gelu_tanh": "GeluTanh", "silu": "Silu"}
KERNELS = cuda.Family("activations", [
    f"gpunn::unary_{direction}<{ctype}, gpunn::{op}>"
    for ctype in cuda.CTYPES.values() for op in CUDA_OPS.values()
    for direction in ("forward", "backward")])
BLOCK = 256


def _cuda_launch(direction, name, arrays, param):
    n = arrays[0].size
    if n == 0:
        return
    kernel = KERNELS.function(
        f"gpunn::unary_{direction}<{cuda.ctype(arrays[0].dtype)}, gpunn::{CUDA_OPS[name]}>")
    per_thread = 16 // arrays[0].dtype.itemsize  # one 16-byte vector
    grid = cuda.grid_for(-(-n // per_thread), BLOCK, kernel)
    kernel((grid,), (BLOCK,), (*arrays, np.int64(n), np.float64(param)))


IMPLS = {
    "numpy": (_numpy_forward, _numpy_backward),
    "cpu": (_cpu_forward, _cpu_backward),
    "cuda": (lambda name, x, y, p: _cuda_launch("forward", name, (x, y), p),
             lambda name, dy, v, dx, p: _cuda_launch("backward", name, (dy, v, dx), p)),
}


def _forward(name, x, out, backend, param=0.0):
    return apply(name, backend, out, lambda b, x, y: IMPLS[b][0](name, x, y, param), x=x)


def _backward(name, dy, v, v_name, out, backend, param=0.0):
    return apply(f"{name}_backward", backend, out,
                 lambda b, dy, v, dx: IMPLS[b][1](name, dy, v, dx, param), dy=dy, **{v_name: v})


def _any_real(op, name, value):
    """A slope or scale: any real number (inf and NaN too, as PyTorch takes them)."""
    return real(op, name, value, finite=False)


def _gelu_name(op, approximate):
    return "gelu" if gelu_approximate(op, approximate) == "none" else "gelu_tanh"


# --- Public API -------------------------------------------------------------------------------


def sigmoid(x, *, out=None, backend=None):
    """y = 1 / (1 + e^{-x}); saturates to exactly 0 and 1, never overflows."""
    return _forward("sigmoid", x, out, backend)


def sigmoid_backward(dy, y, *, out=None, backend=None):
    """dx = dy * y * (1 - y), from the forward's output y."""
    return _backward("sigmoid", dy, y, "y", out, backend)


def tanh(x, *, out=None, backend=None):
    """y = tanh(x)."""
    return _forward("tanh", x, out, backend)


def tanh_backward(dy, y, *, out=None, backend=None):
    """dx = dy * (1 - y^2), from the forward's output y."""
    return _backward("tanh", dy, y, "y", out, backend)


def relu(x, *, out=None, backend=None):
    """y = max(x, 0) (NaN stays NaN)."""
    return _forward("relu", x, out, backend)


def relu_backward(dy, x, *, out=None, backend=None):
    """dx = 0 where x <= 0, else dy."""
    return _backward("relu", dy, x, "x", out, backend)


def leaky_relu(x, negative_slope=0.01, *, out=None, backend=None):
    """y = x where x > 0, else negative_slope * x."""
    a = _any_real("leaky_relu", "negative_slope", negative_slope)
    return _forward("leaky_relu", x, out, backend, a)


def leaky_relu_backward(dy, x, negative_slope=0.01, *, out=None, backend=None):
    """dx = dy where x > 0, else negative_slope * dy."""
    a = _any_real("leaky_relu_backward", "negative_slope", negative_slope)
    return _backward("leaky_relu", dy, x, "x", out, backend, a)


def elu(x, alpha=1.0, *, out=None, backend=None):
    """y = x where x > 0, else alpha * (e^x - 1) (computed with expm1)."""
    return _forward("elu", x, out, backend, _any_real("elu", "alpha", alpha))


def elu_backward(dy, x, alpha=1.0, *, out=None, backend=None):
    """dx = dy where x > 0, else alpha * e^x * dy."""
    a = _any_real("elu_backward", "alpha", alpha)
    return _backward("elu", dy, x, "x", out, backend, a)


def gelu(x, approximate="none", *, out=None, backend=None):
    """y = x * Phi(x), or with approximate='tanh' x/2 * (1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))."""
    return _forward(_gelu_name("gelu", approximate), x, out, backend)


def gelu_backward(dy, x, approximate="none", *, out=None, backend=None):
    """dx = dy * (Phi(x) + x * phi(x)), or the derivative of the tanh form."""
    return _backward(_gelu_name("gelu_backward", approximate), dy, x, "x", out, backend)


def silu(x, *, out=None, backend=None):
    """y = x * sigmoid(x)."""
    return _forward("silu", x, out, backend)


def silu_backward(dy, x, *, out=None, backend=None):
    """dx = dy * s * (1 + x * (1 - s)), s = sigmoid(x)."""
    return _backward("silu", dy, x, "x", out, backend)
