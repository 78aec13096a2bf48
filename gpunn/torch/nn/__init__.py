"""torch.nn's names on gpunn's kernels: :mod:`.functional` (differentiable custom ops) and
the modules (subclasses of torch's with the same constructor, parameters, buffers and
state_dict keys); SyncBatchNorm from :mod:`gpunn.torch.distributed`."""

from . import functional
from .modules import (ELU, GELU, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d,
                      BatchNormReLU2d, BatchNormReLU3d, CrossEntropyLoss, Dropout, FusedReLU,
                      LeakyReLU, LogSoftmax, MSELoss, NLLLoss, ReLU, Sigmoid, SiLU, Softmax, Tanh)
from ..distributed import SyncBatchNorm, SyncBatchNormReLU  # noqa: E402  (needs the above)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "CrossEntropyLoss", "Dropout", "ELU", "FusedReLU", "GELU",
           "LeakyReLU", "LogSoftmax", "MSELoss", "NLLLoss", "ReLU", "SiLU", "Sigmoid",
           "Softmax", "SyncBatchNorm", "SyncBatchNormReLU", "Tanh", "functional"]
