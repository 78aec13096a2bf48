"""Fused optimizers: SGD (momentum, Nesterov), Adagrad, RMSprop, Adam, AdamW.

``gpunn.optim.Adam(params, lr=1e-3)`` and friends take gpunn parameters (``.data``/``.grad``
NumPy or CuPy arrays); :mod:`gpunn.torch` has the same optimizers for torch models;
:mod:`gpunn.optim.functional` the same steps over lists of arrays. Every step is one fused
update over all parameters of a group (see :mod:`gpunn.optim.fused`).
"""

from . import functional
from .lr_scheduler import (CosineAnnealingLR, ExponentialLR, LRRangeTestResult, LRScheduler,
                           StepLR, lr_range_test)
from .optimizer import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop, to_torch

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "CosineAnnealingLR", "ExponentialLR",
           "LRRangeTestResult", "LRScheduler", "Optimizer", "RMSprop", "StepLR", "functional",
           "lr_range_test", "to_torch"]
