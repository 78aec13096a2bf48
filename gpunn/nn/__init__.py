"""The model layer: explicit forward/backward layers over the fused ops (no autograd).

    model = Sequential(Linear(64, 256), BatchNorm1d(256), ReLU(), Dropout(0.2), Linear(256, 10))
    criterion = CrossEntropyLoss()
    loss = criterion(model(x), y)
    model.zero_grad(); model.backward(criterion.backward()); optimizer.step()

Parameters live in one arena (:mod:`gpunn.nn.arena`); ``model.to("cuda")`` moves it.
"""

from .arena import Arena
from .layers import (ELU, GELU, BatchNorm1d, BatchNorm2d, Dropout, Flatten, LeakyReLU, Linear,
                     LogSoftmax, ReLU, Sigmoid, SiLU, Softmax, Tanh)
from .losses import CrossEntropyLoss, MSELoss
from .module import Module, ShapeError
from .parameter import Parameter
from .regularization import l1_penalty, l2_penalty
from .sequential import Sequential

__all__ = [
    "Arena", "BatchNorm1d", "BatchNorm2d", "CrossEntropyLoss", "Dropout", "ELU", "Flatten",
    "GELU", "LeakyReLU", "Linear", "LogSoftmax", "MSELoss", "Module", "Parameter", "ReLU",
    "Sequential", "ShapeError", "SiLU", "Sigmoid", "Softmax", "Tanh", "l1_penalty",
    "l2_penalty",
]
