"""Fused optimizers: one class per algorithm of :mod:`gpunn.optim.algorithms` (SGD with
momentum and Nesterov, Adagrad, RMSprop, Adam, AdamW, ...).

``gpunn.optim.Adam(params, lr=1e-3)`` and friends take gpunn parameters (``.data``/``.grad``
NumPy or CuPy arrays); :mod:`gpunn.torch` has the same optimizers for torch models;
:mod:`gpunn.optim.functional` the same steps over lists of arrays. Every step is one fused
update over all parameters of a group (see :mod:`gpunn.optim.fused`).
"""

from . import functional
from .lr_scheduler import (CosineAnnealingLR, ExponentialLR, LRRangeTestResult, LRScheduler,
                           StepLR, lr_range_test)
from .optimizer import OPTIMIZERS, Optimizer, to_torch

globals().update(OPTIMIZERS)  # SGD, Adagrad, RMSprop, Adam, AdamW... (the registry's)

__all__ = sorted([*OPTIMIZERS, "CosineAnnealingLR", "ExponentialLR", "LRRangeTestResult",
                  "LRScheduler", "Optimizer", "StepLR", "functional", "lr_range_test",
                  "to_torch"])
