"""gpunn's PyTorch face.

- :mod:`gpunn.torch.optim`: the fused optimizers as ``torch.optim.Optimizer`` subclasses
  (``gpunn.torch.Adam`` etc., re-exported here);
- :mod:`gpunn.torch.nn.functional`: the kernels as differentiable ``torch.library`` custom
  ops with torch.nn.functional's names (autograd, ``torch.compile``, gradcheck);
- :mod:`gpunn.torch.nn`: modules with torch.nn's names, arguments and state_dict keys;
- :func:`patch` / :func:`unpatch`: swap a torch model's modules for gpunn's in place, and back.
"""

from . import nn, optim
from .optim import *  # noqa: F403  (Optimizer and one class per gpunn.optim.algorithms entry)
from .patch import Swap, patch, unpatch

__all__ = [*optim.__all__, "Swap", "nn", "patch", "unpatch"]
