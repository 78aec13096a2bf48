"""torch.nn modules on gpunn's kernels.

Each class subclasses the torch module of the same name and replaces only ``forward`` with
the op of :mod:`gpunn.torch.nn.functional`: constructor arguments, parameters, buffers,
``state_dict`` keys, hooks and ``isinstance`` checks are torch's, so a state dict moves
between a gpunn model and a plain torch model both ways, and :func:`gpunn.torch.patch` can
swap a module's class in place without touching its tensors.

``BatchNormReLU1d/2d/3d`` are a batch norm whose forward is the fused ``batch_norm_relu``
(state as the batch norm's); :func:`gpunn.torch.patch` makes them from a BatchNorm directly
followed by a ReLU in a ``Sequential``, the ReLU becoming a :class:`FusedReLU` pass-through.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F


class ReLU(torch.nn.ReLU):
    """torch.nn.ReLU on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(torch.nn.ELU):
    """torch.nn.ELU on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.elu(input, self.alpha, self.inplace)


class GELU(torch.nn.GELU):
    """torch.nn.GELU on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    """torch.nn.SiLU on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    """torch.nn.Sigmoid on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    """torch.nn.Tanh on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax on gpunn's kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout on gpunn's kernel: no mask is kept for the backward."""

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class _BatchNormForward:
    """torch.nn.BatchNorm's forward (counter, momentum=None as the cumulative average,
    batch statistics in eval without running ones) on gpunn's kernel."""

    _relu = False

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        count = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                count = self.num_batches_tracked
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        fn = F.batch_norm_relu if self._relu else F.batch_norm
        return fn(input, self.running_mean if use_running else None,
                  self.running_var if use_running else None, self.weight, self.bias,
                  batch_stats, self.momentum, self.eps, num_batches_tracked=count)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on gpunn's kernel."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on gpunn's kernel (channels_last inputs stay channels_last)."""


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on gpunn's kernel."""


class BatchNormReLU1d(BatchNorm1d):
    """relu(BatchNorm1d(x)) fused: saves x only (the ReLU mask is recomputed)."""

    _relu = True


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x)) fused: saves x only (the ReLU mask is recomputed)."""

    _relu = True


class BatchNormReLU3d(BatchNorm3d):
    """relu(BatchNorm3d(x)) fused: saves x only (the ReLU mask is recomputed)."""

    _relu = True


class FusedReLU(torch.nn.ReLU):
    """A ReLU that the BatchNormReLU before it in its Sequential applies: passes its input
    through. :func:`gpunn.torch.unpatch` makes it a torch.nn.ReLU again."""

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return "applied by the preceding BatchNormReLU"


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on gpunn's kernel (class-index targets, no class weights)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class NLLLoss(torch.nn.NLLLoss):
    """torch.nn.NLLLoss on gpunn's kernel (no class weights)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class MSELoss(torch.nn.MSELoss):
    """torch.nn.MSELoss on gpunn's kernel."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "CrossEntropyLoss", "Dropout", "ELU", "FusedReLU", "GELU",
           "LeakyReLU", "LogSoftmax", "MSELoss", "NLLLoss", "ReLU", "SiLU", "Sigmoid",
           "Softmax", "Tanh"]
