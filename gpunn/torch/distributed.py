r"""Batch normalization across processes on torch.distributed (gloo on the CPU, NCCL on GPUs).

``SyncBatchNorm`` normalizes with the statistics of the whole batch, split over the processes
of a group. Per channel, each process computes its (count n_r, mean m_r, M2_r = n_r var_r)
(``torch.var_mean``, one read of its x); one all-gather brings every process's triple to
every process, which merges them as the kernels merge their blocks (Chan):

    N = sum n_r,   mean = sum n_r m_r / N,   M2 = sum M2_r + sum n_r (m_r - mean)^2

(a sum of means is not a mean: the triples are gathered, in one collective). y is the gpunn
kernel's batch norm with that mean and var = M2 / N; the running statistics take
var * N / (N - 1), as one process on the whole batch would. Backward: the kernel's eval-mode
backward gives dx_e = w invstd g and the local sums (sum g, sum g xhat); one all-reduce
makes them global, and

    dx = dx_e - w invstd / N (sum g + xhat sum g xhat)

is the whole-batch training backward. The weight and bias gradients are the local sums, as
torch's SyncBatchNorm returns them (DistributedDataParallel then averages them). With
``SyncBatchNormReLU`` (fused by :func:`gpunn.torch.patch`), g is dy where the output is
positive, recomputed from x.

Without an initialized process group, in eval mode, or in a group of one, it is the plain
batch norm of :mod:`gpunn.torch.nn.functional`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .nn import functional as F
from .nn.modules import _BatchNormForward

_HALF = (torch.float16, torch.bfloat16)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """A per-channel (C,) tensor shaped to broadcast over (N, C, ...)."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def merge_statistics(counts: Tensor, means: Tensor, m2s: Tensor):
    """(N, mean, M2) per channel from per-part (world, C) counts, means and M2s (Chan)."""
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, factor, group, relu):
        C, ndim = input.shape[1], input.dim()
        axes = [0, *range(2, ndim)]
        x = input.float() if input.dtype in _HALF else input
        var, mean = torch.var_mean(x, dim=axes, correction=0)
        n = torch.full_like(mean, input.numel() // max(C, 1))
        local = torch.stack([n, mean, var * n]).double()
        world = dist.get_world_size(group)
        gathered = local.new_empty(world * 3, C)
        dist.all_gather_into_tensor(gathered, local, group=group)
        total, mean_g, m2 = merge_statistics(*gathered.reshape(world, 3, C).unbind(1))
        if bool((total <= 1).any()):
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(total[0])} over the process group")
        var_g = m2 / total
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(factor * mean_g.to(running_mean.dtype))
            running_var.mul_(1 - factor).add_(
                factor * (var_g * total / (total - 1)).to(running_var.dtype))
        sdt = torch.float32 if input.dtype in _HALF else input.dtype
        # the kernel's normalization with the whole batch's statistics (eval-mode arithmetic)
        y, mean_s, invstd_s, _, _ = torch.ops.gpunn.batch_norm(
            input, mean_g.to(sdt), var_g.to(sdt), weight, bias, False, 0.0, eps, None, relu)
        ctx.save_for_backward(input, weight, bias, mean_s, invstd_s)
        ctx.total, ctx.group, ctx.relu = total, group, relu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gpunn.batch_norm_backward(dy, x, mean, invstd, weight, bias,
                                                         False, ctx.relu)
        sums = torch.cat([dw, db]).double()
        dist.all_reduce(sums, group=ctx.group)
        dw_g, db_g = sums.chunk(2)
        inv = invstd.double()
        k = inv / ctx.total * (1.0 if weight is None else weight.double())
        a = k * inv * dw_g  # dx -= a x + b per channel
        b = k * db_g - a * mean.double()
        cdt = torch.float32 if x.dtype in _HALF else x.dtype
        ndim = x.dim()
        dx = (dx.to(cdt) - (x.to(cdt) * _channel_view(a.to(cdt), ndim)
                            + _channel_view(b.to(cdt), ndim))).to(x.dtype)
        return (dx, dw if weight is not None and ctx.needs_input_grad[1] else None,
                db if bias is not None and ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None)


class SyncBatchNorm(_BatchNormForward, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm on gpunn's kernels, CPU (gloo) and CUDA (NCCL) alike; torch's
    constructor, parameters, buffers and state_dict keys."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = None
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) <= 1:
                group = None
        if group is None:
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / int(self.num_batches_tracked)
        running = ((self.running_mean, self.running_var) if self.track_running_stats
                   else (None, None))
        return _SyncBatchNorm.apply(input, self.weight, self.bias, *running, self.eps, factor,
                                    group, self._relu)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch's conversion of every BatchNorm*d of ``module`` (a BatchNorm is replaced by
        a new module sharing its parameters and buffers), to gpunn's SyncBatchNorm; a fused
        BatchNormReLU becomes a SyncBatchNormReLU."""
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
            converted.__class__ = (SyncBatchNormReLU if getattr(module, "_relu", False)
                                   else SyncBatchNorm)
            return converted
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


class SyncBatchNormReLU(SyncBatchNorm):
    """relu(SyncBatchNorm(x)) fused: saves x only (the ReLU mask is recomputed)."""

    _relu = True


__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "merge_statistics"]
