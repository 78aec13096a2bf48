"""One contiguous block for all of a model's parameters, and one for their gradients.

Each :class:`~gpunn.nn.Parameter` of a packed model is a view into ``arena.data`` and its
gradient a view into ``arena.grad`` at the same offset, so zeroing every gradient is one fill,
the fused optimizers walk one allocation, and moving the model between host and device is one
copy of each block. Offsets are rounded up to :data:`ALIGN` elements (64 bytes in float32), so
every parameter starts on a vector boundary; the padding stays zero in both blocks.
"""

from __future__ import annotations

import numpy as np

from ..backend import dtype_name

#: parameters start at multiples of this many elements
ALIGN = 16


def transfer(a, xp):
    """``a`` (NumPy or CuPy) as an array of module ``xp``; no copy when it already is one."""
    if xp is np:
        return a.get() if type(a).__module__.startswith("cupy") else a
    return xp.asarray(a)


class Arena:
    """``data`` and ``grad``: two flat arrays of one dtype holding ``params`` back to back."""

    def __init__(self, params, xp=np):
        params = list(params)
        dtypes = sorted({dtype_name(p.data) for p in params})
        if len(dtypes) > 1:
            raise TypeError(f"a model's parameters must share one dtype to live in one arena, "
                            f"got {', '.join(dtypes)}")
        self.params = params
        self.offsets = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += -(-p.data.size // ALIGN) * ALIGN
        dtype = dtypes[0] if dtypes else "float32"
        self.data = xp.zeros(total, dtype=dtype)
        self.grad = xp.zeros(total, dtype=dtype)
        for p, view, grad in zip(params, self._views(self.data), self._views(self.grad)):
            view[...] = transfer(p.data, xp)
            if p.grad is not None:
                grad[...] = transfer(p.grad, xp)
            p.data, p.grad = view, grad

    def _views(self, flat):
        return [flat[o:o + p.data.size].reshape(p.data.shape)
                for p, o in zip(self.params, self.offsets)]

    def to(self, xp) -> None:
        """Move both blocks to module ``xp`` (one copy each) and rebind every parameter."""
        self.data, self.grad = transfer(self.data, xp), transfer(self.grad, xp)
        for p, view, grad in zip(self.params, self._views(self.data), self._views(self.grad)):
            p.data, p.grad = view, grad

    def owns(self, params) -> bool:
        """Whether ``params`` are exactly this arena's, still bound to its blocks."""
        params = list(params)
        return (len(params) == len(self.params)
                and all(p is q for p, q in zip(params, self.params))
                and all(p.data.base is self.data for p in params))

    def __repr__(self) -> str:
        return (f"Arena({len(self.params)} parameters, {self.data.size} elements, "
                f"{dtype_name(self.data)})")
