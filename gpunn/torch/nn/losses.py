"""cross_entropy, nll_loss and mse_loss as differentiable PyTorch ops (custom ops
``torch.ops.gpunn.*`` with autograd formulas and fake implementations), with
``torch.nn.functional``'s names, signatures and defaults; :mod:`gpunn.torch.nn.functional`
exports them. cross_entropy saves the float64 log-sum-exp per row, so its backward is one pass
dx = w (e^{x - lse} - q) with no second softmax."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ... import ops
from ._layout import _empty_like, _host16

def _reduction(size_average, reduce, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


def _host_float(x: Tensor) -> Tensor:
    return x.detach().float() if _host16(x) else x.detach()


@torch.library.custom_op("gpunn::cross_entropy", mutates_args=())
def _cross_entropy(input: Tensor, target: Tensor, reduction: str, label_smoothing: float,
                   ignore_index: int) -> tuple[Tensor, Tensor]:
    """(loss, lse): lse (N,) float64, the log-sum-exp of every row, saved for the backward."""
    loss, lse = ops.cross_entropy_forward(_host_float(input), target.detach(), reduction,
                                          label_smoothing, ignore_index)
    return loss.to(input.dtype), lse


@_cross_entropy.register_fake
def _(input, target, reduction, label_smoothing, ignore_index):
    rows = input.shape[0] if input.dim() == 2 else 1
    loss_shape = tuple(input.shape[:-1]) if reduction == "none" else ()
    return input.new_empty(loss_shape), input.new_empty(rows, dtype=torch.float64)


@torch.library.custom_op("gpunn::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(grad: Tensor, input: Tensor, target: Tensor, lse: Tensor,
                            reduction: str, label_smoothing: float,
                            ignore_index: int) -> Tensor:
    x = _host_float(input)
    dx = ops.cross_entropy_backward(grad.detach().to(x.dtype), x, target.detach(), reduction,
                                    label_smoothing, ignore_index, lse=lse.detach())
    return dx.to(input.dtype)


_cross_entropy_backward.register_fake(lambda grad, input, *rest: _empty_like(input, None))


def _cross_entropy_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.options = inputs[2:]
    ctx.mark_non_differentiable(output[1])


_cross_entropy.register_autograd(
    lambda ctx, dloss, _: (_cross_entropy_backward(dloss, *ctx.saved_tensors, *ctx.options),
                           None, None, None, None),
    setup_context=_cross_entropy_setup)


@torch.library.custom_op("gpunn::nll_loss", mutates_args=())
def _nll_loss(input: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    return ops.nll_loss(_host_float(input), target.detach(), reduction,
                        ignore_index).to(input.dtype)


@_nll_loss.register_fake
def _(input, target, reduction, ignore_index):
    return input.new_empty(tuple(input.shape[:-1]) if reduction == "none" else ())


@torch.library.custom_op("gpunn::nll_loss_backward", mutates_args=())
def _nll_loss_backward(grad: Tensor, input: Tensor, target: Tensor, reduction: str,
                       ignore_index: int) -> Tensor:
    x = _host_float(input)
    return ops.nll_loss_backward(grad.detach().to(x.dtype), x, target.detach(), reduction,
                                 ignore_index).to(input.dtype)


_nll_loss_backward.register_fake(lambda grad, input, *rest: _empty_like(input, None))


def _nll_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.options = inputs[2:]


_nll_loss.register_autograd(
    lambda ctx, dloss: (_nll_loss_backward(dloss, *ctx.saved_tensors, *ctx.options),
                        None, None, None),
    setup_context=_nll_setup)


@torch.library.custom_op("gpunn::mse_loss", mutates_args=())
def _mse_loss(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    return ops.mse_loss(_host_float(input), _host_float(target), reduction).to(input.dtype)


_mse_loss.register_fake(
    lambda input, target, reduction: input.new_empty(input.shape if reduction == "none" else ()))


@torch.library.custom_op("gpunn::mse_loss_backward", mutates_args=())
def _mse_loss_backward(grad: Tensor, input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """d loss / d input (d / d target is its negative)."""
    x = _host_float(input)
    return ops.mse_loss_backward(grad.detach().to(x.dtype), x, _host_float(target),
                                 reduction).to(input.dtype)


_mse_loss_backward.register_fake(lambda grad, input, *rest: _empty_like(input, None))


def _mse_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.reduction = inputs[2]


def _mse_grad(ctx, dloss):
    input, target = ctx.saved_tensors
    dx = _mse_loss_backward(dloss, input, target, ctx.reduction)
    return (dx if ctx.needs_input_grad[0] else None,
            -dx if ctx.needs_input_grad[1] else None, None)


_mse_loss.register_autograd(_mse_grad, setup_context=_mse_setup)

for _op in (_cross_entropy, _nll_loss, _mse_loss):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device, torch.float32)


def _class_rows(name: str, input: Tensor, target: Tensor, weight):
    """(input as (N, C) or (C,), target as (N,) or ()): torch's (N, C, d1, ...) inputs with
    (N, d1, ...) targets have their class dimension moved last."""
    if weight is not None:
        raise NotImplementedError(f"{name}: weight (per-class weights) is not supported by "
                                  "gpunn's kernel; pass weight=None (or use torch.nn.functional)")
    if target.is_floating_point():
        raise NotImplementedError(f"{name}: target must hold class indices (int64 or int32); "
                                  "class probabilities are not supported by gpunn's kernel")
    if input.dim() > 2:
        return input.movedim(1, -1).reshape(-1, input.shape[1]), target.reshape(-1)
    return input, target


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100,
                  reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """loss_i = -sum_j q_ij log_softmax(x)_ij, q = (1 - eps) onehot(target) + eps / C, reduced
    over rows whose target is not ignore_index; dx = w (e^{x - lse} - q) from the saved lse.
    Class-index targets only; weight must be None."""
    reduction = _reduction(size_average, reduce, reduction)
    x, t = _class_rows("cross_entropy", input, target, weight)
    loss, _ = _cross_entropy(x, t, reduction, float(label_smoothing), int(ignore_index))
    return loss.reshape(target.shape) if reduction == "none" else loss


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None,
             size_average: bool | None = None, ignore_index: int = -100,
             reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """loss_i = -input[i, target_i] (0 where target_i = ignore_index), reduced; weight must
    be None."""
    reduction = _reduction(size_average, reduce, reduction)
    x, t = _class_rows("nll_loss", input, target, weight)
    loss = _nll_loss(x, t, reduction, int(ignore_index))
    return loss.reshape(target.shape) if reduction == "none" else loss


def mse_loss(input: Tensor, target: Tensor, size_average: bool | None = None,
             reduce: bool | None = None, reduction: str = "mean",
             weight: Tensor | None = None) -> Tensor:
    """(input - target)^2 elementwise, summed or averaged; dx = 2 (x - t) dloss (/ n).
    Shapes that differ broadcast with torch's warning; weight must be None."""
    if weight is not None:
        raise NotImplementedError("mse_loss: weight is not supported by gpunn's kernel; pass "
                                  "weight=None (or use torch.nn.functional)")
    reduction = _reduction(size_average, reduce, reduction)
    if target.shape != input.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input "
                      f"size ({input.size()}). This will likely lead to incorrect results due "
                      "to broadcasting. Please ensure they have the same size.", stacklevel=2)
        input, target = torch.broadcast_tensors(input, target)
    if target.dtype != input.dtype:
        target = target.to(input.dtype)
    return _mse_loss(input, target, reduction)


__all__ = ["cross_entropy", "mse_loss", "nll_loss"]
