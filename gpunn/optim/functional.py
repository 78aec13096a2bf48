"""Optimizer steps as functions over lists of arrays, in place: one per registered
algorithm (``sgd``, ``adagrad``, ``rmsprop``, ``adam``, ``adamw``, ...; its module in
:mod:`gpunn.optim.algorithms` holds the formula and the function).

Every step runs the common prologue and gradient (:mod:`gpunn.optim.prologue`: clipping,
grad_scale/found_inf, maximize, weight_decay, l1), then the algorithm's update, fused over
all parameters (:mod:`gpunn.optim.fused`). States are named as in ``torch.optim``; step
counts are 0-d float32 arrays. Each returns True when the step was skipped.
"""

from .algorithms import ALGORITHMS

globals().update({name: algorithm.functional for name, algorithm in ALGORITHMS.items()})

__all__ = list(ALGORITHMS)
