r"""gpunn's kernels as differentiable PyTorch ops, with ``torch.nn.functional``'s names,
signatures and defaults.

Each op is a ``torch.library.custom_op`` in the ``gpunn`` namespace (``torch.ops.gpunn.*``)
with a registered autograd formula and a fake (meta) implementation, so autograd,
``torch.autograd.gradcheck`` and ``torch.compile(fullgraph=True)`` work. Forward and backward
are :mod:`gpunn.ops` kernels: Numba on CPU tensors, CUDA on CUDA tensors (on torch's current
stream); the formulas are in :mod:`gpunn.ops`' docstrings.

What each op saves for its backward (what torch saves, for comparison):

    sigmoid, tanh, softmax, log_softmax   y                         (torch: y)
    relu, leaky_relu, elu, gelu, silu     x                         (torch: x or y)
    dropout          an 8-byte seed: the backward regenerates the mask from it
                     (torch: the mask, n bytes on CUDA, n elements on the CPU)
    batch_norm       x, weight, and per channel mean and invstd     (torch: the same)
    batch_norm_relu  the same: the ReLU mask is recomputed from x   (torch's BN then ReLU:
                     x and y)
    cross_entropy    logits, labels and the float64 log-sum-exp per row, so the backward is
                     one pass dx = w (e^{x - lse} - q), no second softmax (torch: log_softmax(x))
    nll_loss, mse_loss   their inputs                               (torch: the same)

Dropout's seed is drawn from torch's default generator at each call, so ``torch.manual_seed``
reproduces a run; the mask is element (seed, offset 0 + i) of gpunn's Philox stream.

Layouts: elementwise ops, dropout and batch norm keep a channels-last input (a (N, C, ...)
tensor whose channels are its innermost dimension, e.g. ``torch.channels_last``) in place and
return that layout; other non-contiguous inputs are copied to contiguous first.

Dtypes and autocast: float32 and float64 everywhere; float16 and bfloat16 run natively on
CUDA (float32 math) and through a float32 copy on the CPU. Under ``torch.autocast`` the
activations, dropout and batch norm run in their input's dtype (as torch's), batch norm with
float32 weight and statistics for 16-bit input; softmax, log_softmax, cross_entropy, nll_loss
and mse_loss cast their inputs to float32 (torch's float32 list).

``inplace=True`` (relu, leaky_relu, elu, silu, dropout) writes the input when no gradient is
recorded; under autograd the result is computed out of place, so the saved input survives.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ... import ops
from ...validation import gelu_approximate
from ._layout import _HALF, _detached, _empty_like, _f32, _host16, _last_perm, _rows, _unrows
from .losses import cross_entropy, mse_loss, nll_loss

# --- Elementwise activations -------------------------------------------------------------------
# name: (forward, backward, saves the output (else the input), extra arguments of the schema)

_ACTIVATIONS = {
    "sigmoid": (ops.sigmoid, ops.sigmoid_backward, True, ""),
    "tanh": (ops.tanh, ops.tanh_backward, True, ""),
    "relu": (ops.relu, ops.relu_backward, False, ""),
    "leaky_relu": (ops.leaky_relu, ops.leaky_relu_backward, False, ", float negative_slope"),
    "elu": (ops.elu, ops.elu_backward, False, ", float alpha"),
    "gelu": (ops.gelu, ops.gelu_backward, False, ", str approximate"),
    "silu": (ops.silu, ops.silu_backward, False, ""),
}


def _run_elementwise(kernel, tensors: tuple, args: tuple) -> Tensor:
    """kernel(*tensors, *args) on C-contiguous copies or views of the tensors laid out like
    the first, the result given back in that layout and dtype (16-bit host tensors computed
    in float32)."""
    first = tensors[0]
    perm = _last_perm(first)
    rows = [_rows(t, perm) for t in tensors]
    if _host16(first):
        return _unrows(kernel(*(t.float() for t in rows), *args).to(first.dtype), perm)
    return _unrows(kernel(*rows, *args), perm)


def _make_activation(name, forward, backward, saves_output, extra):
    fwd = torch.library.custom_op(
        f"gpunn::{name}", lambda x, *args: _run_elementwise(forward, (x,), args),
        mutates_args=(), schema=f"(Tensor input{extra}) -> Tensor")
    # the backward is laid out like the saved tensor (dy is brought to its layout)
    bwd = torch.library.custom_op(
        f"gpunn::{name}_backward",
        lambda dy, v, *args: _run_elementwise(lambda v, dy, *a: backward(dy, v, *a), (v, dy),
                                              args),
        mutates_args=(), schema=f"(Tensor grad, Tensor saved{extra}) -> Tensor")
    fwd.register_fake(lambda x, *args: _empty_like(x, _last_perm(x)))
    bwd.register_fake(lambda dy, v, *args: _empty_like(v, _last_perm(v)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output if saves_output else inputs[0])
        ctx.args = inputs[1:]

    def grad(ctx, dy):
        return (bwd(dy, ctx.saved_tensors[0], *ctx.args), *(None for _ in ctx.args))

    fwd.register_autograd(grad, setup_context=setup_context)
    return fwd


_OPS = {name: _make_activation(name, *spec) for name, spec in _ACTIVATIONS.items()}


def _inplace(input: Tensor, result: Tensor, inplace: bool) -> Tensor:
    """torch's ``inplace=True``: the result written into ``input`` when no gradient is
    recorded for it; under autograd the out-of-place result (the backward needs input)."""
    if not inplace or (torch.is_grad_enabled() and input.requires_grad):
        return result
    return input.copy_(result)


def sigmoid(input: Tensor) -> Tensor:
    """y = 1 / (1 + e^{-x}); dx = dy * y * (1 - y) (saves y)."""
    return _OPS["sigmoid"](input)


def tanh(input: Tensor) -> Tensor:
    """y = tanh(x); dx = dy * (1 - y^2) (saves y)."""
    return _OPS["tanh"](input)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """y = max(x, 0); dx = dy where x > 0, else 0."""
    return _inplace(input, _OPS["relu"](input), inplace)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """y = x where x > 0, else negative_slope * x."""
    return _inplace(input, _OPS["leaky_relu"](input, float(negative_slope)), inplace)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """y = x where x > 0, else alpha * (e^x - 1); dx = dy, or alpha e^x dy."""
    return _inplace(input, _OPS["elu"](input, float(alpha)), inplace)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """y = x Phi(x), or with approximate='tanh' x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return _OPS["gelu"](input, gelu_approximate("gelu", approximate))


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """y = x sigmoid(x); dx = dy s (1 + x (1 - s)), s = sigmoid(x)."""
    return _inplace(input, _OPS["silu"](input), inplace)


# --- Softmax -----------------------------------------------------------------------------------


def _softmax_ops(name, forward, backward):
    @torch.library.custom_op(f"gpunn::{name}", mutates_args=())
    def fwd(input: Tensor, dim: int) -> Tensor:
        x = input.detach()
        if _host16(x):
            return forward(x.float(), dim).to(x.dtype)
        return forward(x, dim)

    @torch.library.custom_op(f"gpunn::{name}_backward", mutates_args=())
    def bwd(grad: Tensor, output: Tensor, dim: int) -> Tensor:
        dy, y = grad.detach(), output.detach()
        if _host16(y):
            return backward(dy.float(), y.float(), dim).to(y.dtype)
        return backward(dy, y, dim)

    fwd.register_fake(lambda input, dim: _empty_like(input, None))
    bwd.register_fake(lambda grad, output, dim: _empty_like(output, None))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    fwd.register_autograd(lambda ctx, dy: (bwd(dy, ctx.saved_tensors[0], ctx.dim), None),
                          setup_context=setup_context)
    for device in ("cpu", "cuda"):
        torch.library.register_autocast(fwd, device, torch.float32)
    return fwd


_softmax = _softmax_ops("softmax", ops.softmax, ops.softmax_backward)
_log_softmax = _softmax_ops("log_softmax", ops.log_softmax, ops.log_softmax_backward)


def _softmax_dim(name: str, ndim: int, dim, stacklevel: int) -> int:
    """torch's choice for dim=None (deprecated there too): 0 for 0, 1 and 3 dimensions, else 1."""
    if dim is not None:
        return dim
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  "to include dim=X as an argument.", stacklevel=stacklevel)
    return 0 if ndim in (0, 1, 3) else 1


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> Tensor:
    """y = e^{x - max} / sum e^{x - max} along dim; dx = y (dy - sum dy y) (saves y)."""
    dim = _softmax_dim("softmax", input.dim(), dim, _stacklevel)
    return _softmax(input if dtype is None else input.to(dtype), dim)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> Tensor:
    """y = x - max - log sum e^{x - max} along dim; dx = dy - e^y sum dy (saves y)."""
    dim = _softmax_dim("log_softmax", input.dim(), dim, _stacklevel)
    return _log_softmax(input if dtype is None else input.to(dtype), dim)


# --- Dropout -----------------------------------------------------------------------------------


def _seed_of(seed: Tensor) -> int:
    return int(seed) % (1 << 64)


def _dropout_run(x: Tensor, p: float, seed: Tensor, perm, kernel) -> Tensor:
    rows = _rows(x, perm)
    if p == 0.0:  # the kernels would hand x itself back; an op's output is new memory
        return _unrows(rows.clone(), perm)
    if _host16(x):
        return _unrows(kernel(rows.float(), p, _seed_of(seed)).to(x.dtype), perm)
    return _unrows(kernel(rows, p, _seed_of(seed)), perm)


@torch.library.custom_op("gpunn::dropout", mutates_args=())
def _dropout(input: Tensor, p: float, seed: Tensor) -> Tensor:
    return _dropout_run(input, p, seed, _last_perm(input),
                        lambda x, p, s: ops.dropout(x, p, True, s, 0))


@torch.library.custom_op("gpunn::dropout_backward", mutates_args=())
def _dropout_backward(grad: Tensor, p: float, seed: Tensor, channels_last: bool) -> Tensor:
    perm = (0, *range(2, grad.dim()), 1) if channels_last else None
    return _dropout_run(grad, p, seed, perm, lambda dy, p, s: ops.dropout_backward(dy, p, s, 0))


_dropout.register_fake(lambda input, p, seed: _empty_like(input, _last_perm(input)))
_dropout_backward.register_fake(
    lambda grad, p, seed, channels_last: _empty_like(
        grad, (0, *range(2, grad.dim()), 1) if channels_last else None))


def _dropout_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])  # the seed, not a mask
    ctx.p, ctx.channels_last = inputs[1], _last_perm(inputs[0]) is not None


_dropout.register_autograd(
    lambda ctx, dy: (_dropout_backward(dy, ctx.p, ctx.saved_tensors[0], ctx.channels_last),
                     None, None),
    setup_context=_dropout_setup)


def _new_seed() -> Tensor:
    """A seed from torch's default CPU generator (``torch.manual_seed`` reproduces it)."""
    return torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """y = x * keep / (1 - p), keep ~ Bernoulli(1 - p) from gpunn's Philox stream at a seed
    drawn from torch's default generator; the backward regenerates the mask from the seed.
    training=False or p=0 returns input itself, as torch does."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    return _inplace(input, _dropout(input, float(p), _new_seed()), inplace)


# --- Batch normalization -----------------------------------------------------------------------


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Per-channel mean and invstd: float32 for 16-bit input, else the input's dtype."""
    return torch.float32 if x.dtype in _HALF else x.dtype


@torch.library.custom_op("gpunn::batch_norm", mutates_args=())
def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                momentum: Optional[float], eps: float, num_batches_tracked: Optional[Tensor],
                relu: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, new running_mean, new running_var); the running statistics come back
    updated (empty when not updated) for the caller to copy: an op with an autograd formula
    may not write its inputs."""
    perm = _last_perm(input)
    x = _rows(input, perm)
    update = training and running_mean is not None
    rm, rv = ((running_mean.detach().clone(), running_var.detach().clone()) if update
              else (_detached(running_mean), _detached(running_var)))
    w, b = _detached(weight), _detached(bias)
    host16 = _host16(x)
    if host16:
        x, w, b = x.float(), _f32(w), _f32(b)
        rm16, rv16 = rm, rv
        rm, rv = _f32(rm), _f32(rv)
    forward = ops.batch_norm_relu_forward if relu else ops.batch_norm_forward
    count = None if num_batches_tracked is None else int(num_batches_tracked)
    y, mean, invstd = forward(x, rm, rv, w, b, training, momentum, eps,
                              channels_last=perm is not None, num_batches_tracked=count)
    if host16:
        y = y.to(input.dtype)
        if update:
            rm, rv = rm16.copy_(rm), rv16.copy_(rv)
    y = _unrows(y, perm)
    if not update:
        rm, rv = mean.new_empty(0), mean.new_empty(0)
    return y, mean, invstd, rm, rv


@_batch_norm.register_fake
def _(input, running_mean, running_var, weight, bias, training, momentum, eps,
      num_batches_tracked, relu):
    c, sdt = input.shape[1], _stat_dtype(input)
    update = training and running_mean is not None
    mean, invstd = input.new_empty(c, dtype=sdt), input.new_empty(c, dtype=sdt)
    rm = torch.empty_like(running_mean) if update else input.new_empty(0, dtype=sdt)
    rv = torch.empty_like(running_var) if update else input.new_empty(0, dtype=sdt)
    return _empty_like(input, _last_perm(input)), mean, invstd, rm, rv


@torch.library.custom_op("gpunn::batch_norm_backward", mutates_args=())
def _batch_norm_backward(grad: Tensor, input: Tensor, mean: Tensor, invstd: Tensor,
                         weight: Optional[Tensor], bias: Optional[Tensor],
                         batch_stats: bool, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx laid out like input, dweight, dbias in weight's dtype (input's without weight))."""
    perm = _last_perm(input)
    dy, x = _rows(grad, perm), _rows(input, perm)
    w, b = _detached(weight), _detached(bias)
    if _host16(x):
        dy, x, w, b = dy.float(), x.float(), _f32(w), _f32(b)
    backward = ops.batch_norm_relu_backward if relu else ops.batch_norm_backward
    extra = (b,) if relu else ()
    dx, dw, db = backward(dy, x, mean.detach(), invstd.detach(), w, *extra,
                          training=batch_stats, channels_last=perm is not None)
    pdt = weight.dtype if weight is not None else input.dtype
    return _unrows(dx.to(input.dtype), perm), dw.to(pdt), db.to(pdt)


@_batch_norm_backward.register_fake
def _(grad, input, mean, invstd, weight, bias, batch_stats, relu):
    pdt = weight.dtype if weight is not None else input.dtype
    c = input.shape[1]
    return (_empty_like(input, _last_perm(input)), input.new_empty(c, dtype=pdt),
            input.new_empty(c, dtype=pdt))


def _batch_norm_setup(ctx, inputs, output):
    input, running_mean, _, weight, bias, training = inputs[:6]
    ctx.save_for_backward(input, output[1], output[2], weight, bias)
    ctx.batch_stats, ctx.relu = bool(training) or running_mean is None, inputs[9]
    ctx.mark_non_differentiable(*output[1:])


def _batch_norm_grad(ctx, dy, *_):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    dx, dw, db = _batch_norm_backward(dy, x, mean, invstd, weight, bias, ctx.batch_stats,
                                      ctx.relu)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, None, dw if need[3] else None,
            db if need[4] else None, None, None, None, None, None)


_batch_norm.register_autograd(_batch_norm_grad, setup_context=_batch_norm_setup)


def _bn(relu, input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked):
    if not training and (running_mean is None or running_var is None):  # as torch
        raise RuntimeError("batch_norm: running_mean and running_var must be defined in "
                           "evaluation mode (training=False)")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    y, _, _, rm, rv = _batch_norm(input, running_mean, running_var, weight, bias,
                                  bool(training), None if momentum is None else float(momentum),
                                  float(eps), num_batches_tracked, relu)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *,
               num_batches_tracked: Tensor | None = None) -> Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias per channel (dimension 1), with the
    batch's statistics when training (running ones updated in place, unbiased variance,
    factor ``momentum``) or the running ones. momentum=None is the cumulative average over
    ``num_batches_tracked`` batches (torch.nn.BatchNorm's counter, already incremented).
    Backward: dx = w invstd (dy - mean(dy) - xhat mean(dy xhat)) in training."""
    return _bn(False, input, running_mean, running_var, weight, bias, training, momentum, eps,
               num_batches_tracked)


def batch_norm_relu(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None = None, bias: Tensor | None = None,
                    training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5, *,
                    num_batches_tracked: Tensor | None = None) -> Tensor:
    """relu(batch_norm(...)) fused; saves x (not the output): the backward recomputes the
    ReLU mask from x and the statistics."""
    return _bn(True, input, running_mean, running_var, weight, bias, training, momentum, eps,
               num_batches_tracked)


__all__ = ["batch_norm", "batch_norm_relu", "cross_entropy", "dropout", "elu", "gelu",
           "leaky_relu", "log_softmax", "mse_loss", "nll_loss", "relu", "sigmoid", "silu",
           "softmax", "tanh"]
