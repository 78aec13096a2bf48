"""A trainable array and its gradient."""

from __future__ import annotations


class Parameter:
    """``data`` (a NumPy or CuPy array, or a torch tensor) and ``grad`` (None, or an array of
    the same shape, dtype and device): what the optimizers in :mod:`gpunn.optim` update."""

    __slots__ = ("data", "grad")

    def __init__(self, data, grad=None):
        self.data = data
        self.grad = grad

    def __repr__(self) -> str:
        return (f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
                f"grad={'None' if self.grad is None else 'set'})")
