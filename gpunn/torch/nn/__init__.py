"""torch.nn's names on gpunn's kernels: :mod:`.functional` (differentiable custom ops)."""

from . import functional

__all__ = ["functional"]
