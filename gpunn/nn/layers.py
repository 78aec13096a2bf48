r"""Layers: Linear, Flatten, BatchNorm1d/2d, Dropout and one layer per activation op.

Each layer's forward runs on its device's backend (``cpu``, ``numpy`` or ``cuda``) through the
fused ops of :mod:`gpunn.ops`; its backward adds dL/dparameters into ``.grad`` and returns dL/dx.

Linear, y = x W^T + b (x: (N, in), W: (out, in)):

    dW += dy^T x,   db += sum_n dy,   dx = dy W

each one BLAS gemm on the host (beta = 1 adds b, or accumulates dW, in place). Initialisation
is torch's: W and b uniform in [-1/sqrt(in), 1/sqrt(in)] (Kaiming-uniform with a = sqrt(5)).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from .. import ops
from ..backend import check_writable
from ..validation import gelu_approximate
from .module import Module, ShapeError, check_array
from .parameter import Parameter

MODEL_DTYPES = ("float32", "float64")


def _generator(generator) -> np.random.Generator:
    """The NumPy generator initial values are drawn from (a seed, a Generator or None)."""
    if isinstance(generator, np.random.Generator):
        return generator
    return np.random.default_rng(generator)


def _positive_int(owner: str, name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")
    return value


def _model_dtype(owner: str, dtype) -> str:
    name = np.dtype(dtype).name
    if name not in MODEL_DTYPES:
        raise TypeError(f"{owner}: dtype must be one of {MODEL_DTYPES}, got {name}")
    return name


def _check_input(owner: str, x, expected: str, ok: bool):
    if not ok:
        raise ShapeError(f"{owner} expected input of shape {expected}, got "
                         f"{tuple(x.shape)}")


def _grad_of(p, xp):
    """``p.grad``, created as zeros on first use (a layer outside a packed model)."""
    if p.grad is None:
        p.grad = xp.zeros_like(p.data)
    return p.grad


def _grads(owner: str, named, xp) -> list:
    """The gradients a backward accumulates into, for (name, parameter) pairs: existing ones
    checked (writeable, the parameter's shape and dtype) before any is created or written."""
    for name, p in named:
        if p.grad is not None:
            check_writable(owner, f"{name}.grad", p.grad)
            if tuple(p.grad.shape) != tuple(p.data.shape) or p.grad.dtype != p.data.dtype:
                raise ValueError(f"{owner}: {name}.grad has shape {tuple(p.grad.shape)} and "
                                 f"dtype {p.grad.dtype}; expected {tuple(p.data.shape)} and "
                                 f"{p.data.dtype} (the parameter's)")
    return [_grad_of(p, xp) for _, p in named]


def matmul_into(out, a, b, *, transpose_a=False, transpose_b=False, accumulate=False):
    """out = op(a) @ op(b) (+ out when ``accumulate``), op the transpose where asked; 2-D
    C-contiguous arrays.

    On the host this is one gemm of the BLAS SciPy links (beta = 1 accumulates in place): using
    one BLAS for every product matters, since NumPy's and SciPy's each keep a pool of spinning
    threads that fight over the cores when calls alternate."""
    if isinstance(out, np.ndarray):
        from scipy.linalg import blas

        if out.size == 0 or a.size == 0:  # BLAS refuses empty operands; the sum is empty
            if not accumulate:
                out[...] = 0
            return out

        gemm = blas.get_blas_funcs("gemm", (out,))
        # C-order arrays are Fortran-order transposes: out^T = op(b)^T op(a)^T.
        gemm(1.0, b.T, a.T, beta=1.0 if accumulate else 0.0, c=out.T,
             trans_a=transpose_b, trans_b=transpose_a, overwrite_c=1)
        return out
    product = (a.T if transpose_a else a) @ (b.T if transpose_b else b)
    if accumulate:
        out += product
    else:
        out[...] = product
    return out


class Linear(Module):
    """y = x W^T + b on (N, in_features) inputs (or (*, in_features), flattened to rows)."""

    def __init__(self, in_features, out_features, bias=True, *, dtype="float32",
                 generator=None):
        super().__init__()
        self.in_features = _positive_int("Linear", "in_features", in_features)
        self.out_features = _positive_int("Linear", "out_features", out_features)
        dtype = _model_dtype("Linear", dtype)
        rng = _generator(generator)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(
            rng.uniform(-bound, bound, (self.out_features, self.in_features)).astype(dtype))
        self.bias = (Parameter(rng.uniform(-bound, bound, self.out_features).astype(dtype))
                     if bias else None)

    def _name(self):
        return f"Linear({self.in_features} -> {self.out_features})"

    def forward(self, x):
        check_array(self._name(), "x", x, self.device)
        _check_input(self._name(), x, f"(N, {self.in_features})",
                     x.ndim >= 1 and x.shape[-1] == self.in_features)
        if x.dtype != self.weight.data.dtype:
            raise TypeError(f"{self._name()}: input has dtype {x.dtype}, the weights "
                            f"{self.weight.data.dtype} (cast one of them)")
        x2 = self.xp.ascontiguousarray(x.reshape(-1, self.in_features))
        lead = x.shape[:-1]
        y = self.xp.empty((x2.shape[0], self.out_features), self.weight.data.dtype)
        if self.bias is not None:
            y[...] = self.bias.data
        matmul_into(y, x2, self.weight.data, transpose_b=True,
                    accumulate=self.bias is not None)
        self._saved = (x2, lead)
        return y.reshape(lead + (self.out_features,))

    def backward(self, dy, input_grad=True):
        x2, lead = self._forward_state()
        owner = f"{self._name()} backward"
        check_array(owner, "dy", dy, self.device)
        expected = lead + (self.out_features,)
        _check_input(owner, dy, str(expected), tuple(dy.shape) == expected)
        if dy.dtype != self.weight.data.dtype:
            raise TypeError(f"{owner}: dy has dtype {dy.dtype}, expected "
                            f"{self.weight.data.dtype} (the weights')")
        named = [("weight", self.weight)] + ([("bias", self.bias)] if self.bias is not None
                                              else [])
        grads = _grads(owner, named, self.xp)
        dy2 = self.xp.ascontiguousarray(dy.reshape(-1, self.out_features))
        matmul_into(grads[0], dy2, x2, transpose_a=True, accumulate=True)
        if self.bias is not None:
            grads[1][...] += dy2.sum(axis=0)
        if not input_grad:
            return None
        dx = self.xp.empty((dy2.shape[0], self.in_features), dy2.dtype)
        return matmul_into(dx, dy2, self.weight.data).reshape(lead + (self.in_features,))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Flatten(Module):
    """Reshape (N, d1, d2, ...) to (N, d1 * d2 * ...) (dims start_dim..end_dim merged)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = operator.index(start_dim), operator.index(end_dim)

    def forward(self, x):
        check_array("Flatten", "x", x, self.device)
        start, end = (d % max(x.ndim, 1) for d in (self.start_dim, self.end_dim))
        merged = math.prod(x.shape[start:end + 1])  # not -1: an empty batch has no inferable size
        y = x.reshape(x.shape[:start] + (merged,) + x.shape[end + 1:])
        self._saved = (x.shape, y.shape)
        return y

    def backward(self, dy, input_grad=True):
        shape, out_shape = self._forward_state()
        check_array("Flatten backward", "dy", dy, self.device)
        _check_input("Flatten backward", dy, str(out_shape), tuple(dy.shape) == out_shape)
        return dy.reshape(shape) if input_grad else None

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class _BatchNorm(Module):
    """Batch normalization over axis 1 (see :func:`gpunn.ops.batch_norm`), torch's options."""

    _ndims: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, dtype="float32"):
        super().__init__()
        owner = type(self).__name__
        self.num_features = _positive_int(owner, "num_features", num_features)
        if not eps > 0:
            raise ValueError(f"{owner}: eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{owner}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        dtype = _model_dtype(owner, dtype)
        C = self.num_features
        self.weight = Parameter(np.ones(C, dtype)) if affine else None
        self.bias = Parameter(np.zeros(C, dtype)) if affine else None
        stats = track_running_stats
        self.register_buffer("running_mean", np.zeros(C, dtype) if stats else None)
        self.register_buffer("running_var", np.ones(C, dtype) if stats else None)
        self.register_buffer("num_batches_tracked",
                             np.zeros((), np.int64) if stats else None)

    def _run(self, x, relu):
        owner = f"{type(self).__name__}({self.num_features})"
        check_array(owner, "x", x, self.device)
        _check_input(owner, x, self._layout.replace("C", str(self.num_features)),
                     x.ndim in self._ndims and x.shape[1] == self.num_features)
        has_running = self.running_mean is not None
        momentum, count, counted = self.momentum, None, self.training and has_running
        if counted:  # everything the forward updates in place, before the op writes any
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                check_array(owner, name, getattr(self, name), self.device)
                check_writable(owner, name, getattr(self, name))
        if counted and momentum is None:  # the cumulative average needs the count on the host
            count = int(self.num_batches_tracked) + 1
        w = self.weight.data if self.affine else None
        b = self.bias.data if self.affine else None
        forward = ops.batch_norm_relu_forward if relu else ops.batch_norm_forward
        y, mean, invstd = forward(x, self.running_mean, self.running_var, w, b,
                                  training=self.training, momentum=momentum, eps=self.eps,
                                  num_batches_tracked=count, backend=self.device)
        if counted:  # once the op succeeded; on the device, so no synchronization
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, self.training or not has_running)
        return y

    def _grad(self, dy, relu, input_grad):
        x, mean, invstd, batch_stats = self._forward_state()
        owner = f"{type(self).__name__}({self.num_features}) backward"
        check_array(owner, "dy", dy, self.device)
        if self.affine:
            grads = _grads(owner, [("weight", self.weight), ("bias", self.bias)], self.xp)
        w = self.weight.data if self.affine else None
        if relu:
            b = self.bias.data if self.affine else None
            dx, dw, db = ops.batch_norm_relu_backward(dy, x, mean, invstd, w, b,
                                                      training=batch_stats, backend=self.device)
        else:
            dx, dw, db = ops.batch_norm_backward(dy, x, mean, invstd, w, training=batch_stats,
                                                 backend=self.device)
        if self.affine:
            grads[0][...] += dw
            grads[1][...] += db
        return dx if input_grad else None

    def forward(self, x):
        return self._run(x, relu=False)

    def backward(self, dy, input_grad=True):
        return self._grad(dy, False, input_grad)

    def forward_relu(self, x):
        """relu(self(x)) as one fused op (what Sequential runs for BatchNorm then ReLU)."""
        return self._run(x, relu=True)

    def backward_relu(self, dy, input_grad=True):
        return self._grad(dy, True, input_grad)

    def fused_with(self, following):
        """A ReLU (exactly: not a subclass, which may change the math) folds into the fused
        ``batch_norm_relu`` op."""
        return _BatchNormReLU(self) if type(following) is ReLU else None

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class _BatchNormReLU:
    """relu(bn(x)) as one op: the step Sequential runs for a BatchNorm then a ReLU."""

    def __init__(self, batch_norm: _BatchNorm):
        self.batch_norm = batch_norm

    def forward(self, x):
        return self.batch_norm.forward_relu(x)

    def backward(self, dy, input_grad=True):
        return self.batch_norm.backward_relu(dy, input_grad)


class BatchNorm1d(_BatchNorm):
    """Per-feature batch norm of (N, C) or (N, C, L) inputs."""

    _ndims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Per-channel batch norm of (N, C, H, W) inputs."""

    _ndims = (4,)
    _layout = "(N, C, H, W)"


class Dropout(Module):
    """Zero each element with probability p in training and scale the rest by 1/(1-p).

    The mask comes from Philox at (seed, offset + i) (:func:`gpunn.ops.dropout`): the layer
    keeps its seed and advances its offset by the elements of each batch, so the backward
    regenerates the mask and a resumed run draws the same masks (``extra_state``)."""

    def __init__(self, p=0.5, *, generator=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self.seed = int(_generator(generator).integers(0, 2**63))
        self.offset = 0

    def forward(self, x):
        check_array("Dropout", "x", x, self.device)
        if not self.training or self.p == 0.0:
            self._saved = (None,)
            return x
        y = ops.dropout(x, self.p, True, self.seed, self.offset, backend=self.device)
        self._saved = (self.offset,)  # advanced only once the op succeeded
        self.offset += x.size
        return y

    def backward(self, dy, input_grad=True):
        (stream,) = self._forward_state()
        check_array("Dropout backward", "dy", dy, self.device)
        if not input_grad:
            return None
        if stream is None:
            return dy
        return ops.dropout_backward(dy, self.p, self.seed, stream, backend=self.device)

    def _extra_state(self):
        return {"seed": self.seed, "offset": self.offset}

    def _check_extra_state(self, value):
        if not isinstance(value, dict) or set(value) != {"seed", "offset"}:
            raise ValueError(f"expected {{'seed': int, 'offset': int}}, got {value!r:.80}")
        for key in ("seed", "offset"):
            v = value[key]
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) \
                    or not 0 <= int(v) < 2**64:
                raise ValueError(f"{key} must be an integer in [0, 2^64), got {v!r:.80}")
        return {"seed": int(value["seed"]), "offset": int(value["offset"])}

    def _load_extra_state(self, value):
        self.seed, self.offset = value["seed"], value["offset"]

    def extra_repr(self):
        return f"p={self.p}"


class _Activation(Module):
    """y = f(x); dx = f'(.) dy from the saved x or y (``saves``), extra args in ``args``."""

    forward_op = backward_op = None
    saves = "x"

    def __init__(self, *args):
        super().__init__()
        self.args = args

    def forward(self, x):
        check_array(type(self).__name__, "x", x, self.device)
        y = type(self).forward_op(x, *self.args, backend=self.device)
        self._saved = x if self.saves == "x" else y
        return y

    def backward(self, dy, input_grad=True):
        saved = self._forward_state()
        check_array(f"{type(self).__name__} backward", "dy", dy, self.device)
        if not input_grad:
            return None
        return type(self).backward_op(dy, saved, *self.args, backend=self.device)

    def extra_repr(self):
        return ", ".join(map(repr, self.args))


class ReLU(_Activation):
    forward_op, backward_op = ops.relu, ops.relu_backward


class LeakyReLU(_Activation):
    forward_op, backward_op = ops.leaky_relu, ops.leaky_relu_backward

    def __init__(self, negative_slope=0.01):
        super().__init__(float(negative_slope))


class ELU(_Activation):
    forward_op, backward_op = ops.elu, ops.elu_backward

    def __init__(self, alpha=1.0):
        super().__init__(float(alpha))


class GELU(_Activation):
    forward_op, backward_op = ops.gelu, ops.gelu_backward

    def __init__(self, approximate="none"):
        super().__init__(gelu_approximate("GELU", approximate))


class SiLU(_Activation):
    forward_op, backward_op = ops.silu, ops.silu_backward


class Sigmoid(_Activation):
    forward_op, backward_op, saves = ops.sigmoid, ops.sigmoid_backward, "y"


class Tanh(_Activation):
    forward_op, backward_op, saves = ops.tanh, ops.tanh_backward, "y"


class Softmax(_Activation):
    """softmax along ``dim`` (torch's Softmax(dim); default the last axis)."""

    forward_op, backward_op, saves = ops.softmax, ops.softmax_backward, "y"

    def __init__(self, dim=-1):
        super().__init__(operator.index(dim))


class LogSoftmax(_Activation):
    forward_op, backward_op, saves = ops.log_softmax, ops.log_softmax_backward, "y"

    def __init__(self, dim=-1):
        super().__init__(operator.index(dim))
