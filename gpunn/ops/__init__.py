"""Functional ops: each takes NumPy or CuPy arrays or torch tensors and returns the same type.

Every op accepts ``out=`` (a preallocated, C-contiguous, writeable result; pass the input
itself to work in place, but never memory that partly overlaps an input) and ``backend=``
("numpy" | "cpu" | "cuda"; see :mod:`gpunn.backend`). Everything a call writes is checked
before the first write: a bad call raises and changes nothing.
"""

from .activations import (elu, elu_backward, gelu, gelu_backward, leaky_relu,
                          leaky_relu_backward, relu, relu_backward, sigmoid, sigmoid_backward,
                          silu, silu_backward, tanh, tanh_backward)
from .augment import affine_warp, augment, random_affine
from .batchnorm import (batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_relu,
                        batch_norm_relu_backward, batch_norm_relu_forward)
from .dropout import dropout, dropout_backward, dropout_mask
from .losses import (cross_entropy, cross_entropy_backward, cross_entropy_forward, mse_loss,
                     mse_loss_backward, nll_loss, nll_loss_backward)
from .softmax import log_softmax, log_softmax_backward, softmax, softmax_backward

__all__ = [
    "affine_warp", "augment", "random_affine",
    "batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_norm_relu",
    "batch_norm_relu_backward", "batch_norm_relu_forward",
    "cross_entropy", "cross_entropy_backward", "cross_entropy_forward", "mse_loss",
    "mse_loss_backward", "nll_loss", "nll_loss_backward",
    "dropout", "dropout_backward", "dropout_mask",
    "elu", "elu_backward", "gelu", "gelu_backward", "leaky_relu", "leaky_relu_backward",
    "log_softmax", "log_softmax_backward", "relu", "relu_backward", "sigmoid",
    "sigmoid_backward", "silu", "silu_backward", "softmax", "softmax_backward", "tanh",
    "tanh_backward",
]
