"""Swap a torch model's modules for gpunn's in place, and back.

``patch(model)`` changes the class of every module whose type is exactly one of torch's
supported modules (not a user subclass: its forward may differ) to gpunn's subclass of it:
the module object, its parameters, buffers, hooks and train/eval mode stay as they are, so
optimizers, state dicts and references to the modules keep working. A BatchNorm directly
followed by a ReLU in a ``Sequential`` becomes a BatchNormReLU (one fused op) and the ReLU a
pass-through, unless either has hooks or is used at more than one place in the model.
CrossEntropyLoss and NLLLoss with class weights stay torch's (the kernels have none).
``unpatch(model)`` makes every gpunn module a plain torch one again.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from .distributed import SyncBatchNorm, SyncBatchNormReLU
from .nn import modules as gm

#: torch class -> gpunn class
SWAPS = {
    torch.nn.ReLU: gm.ReLU, torch.nn.LeakyReLU: gm.LeakyReLU, torch.nn.ELU: gm.ELU,
    torch.nn.GELU: gm.GELU, torch.nn.SiLU: gm.SiLU, torch.nn.Sigmoid: gm.Sigmoid,
    torch.nn.Tanh: gm.Tanh, torch.nn.Softmax: gm.Softmax, torch.nn.LogSoftmax: gm.LogSoftmax,
    torch.nn.Dropout: gm.Dropout, torch.nn.BatchNorm1d: gm.BatchNorm1d,
    torch.nn.BatchNorm2d: gm.BatchNorm2d, torch.nn.BatchNorm3d: gm.BatchNorm3d,
    torch.nn.CrossEntropyLoss: gm.CrossEntropyLoss, torch.nn.NLLLoss: gm.NLLLoss,
    torch.nn.MSELoss: gm.MSELoss, torch.nn.SyncBatchNorm: SyncBatchNorm,
}
#: batch norm class (torch's or gpunn's) -> the fused BatchNormReLU of its dimensionality
FUSED = {torch.nn.BatchNorm1d: gm.BatchNormReLU1d, torch.nn.BatchNorm2d: gm.BatchNormReLU2d,
         torch.nn.BatchNorm3d: gm.BatchNormReLU3d, gm.BatchNorm1d: gm.BatchNormReLU1d,
         gm.BatchNorm2d: gm.BatchNormReLU2d, gm.BatchNorm3d: gm.BatchNormReLU3d,
         torch.nn.SyncBatchNorm: SyncBatchNormReLU, SyncBatchNorm: SyncBatchNormReLU}
#: gpunn class -> torch class
RESTORE = {**{new: old for old, new in SWAPS.items()},
           gm.BatchNormReLU1d: torch.nn.BatchNorm1d, gm.BatchNormReLU2d: torch.nn.BatchNorm2d,
           gm.BatchNormReLU3d: torch.nn.BatchNorm3d, SyncBatchNormReLU: torch.nn.SyncBatchNorm,
           gm.FusedReLU: torch.nn.ReLU}


class Swap(NamedTuple):
    """One module whose class changed: its qualified name in the model, old and new class."""

    name: str
    before: type
    after: type


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _supported(m: torch.nn.Module) -> bool:
    """Whether gpunn's kernel covers this module's configuration."""
    return getattr(m, "weight", None) is None or not isinstance(
        m, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))


def _swap(m: torch.nn.Module, name: str, new: type, swapped: list) -> None:
    swapped.append(Swap(name, type(m), new))
    m.__class__ = new


def patch(model: torch.nn.Module, *, fuse: bool = True) -> list[Swap]:
    """Swap the supported torch.nn modules of ``model`` (itself included) for gpunn's, in
    place; with ``fuse``, BatchNorm + ReLU pairs of a Sequential become one fused op.
    Returns what changed, in module order (a module already gpunn's is left as it is)."""
    swapped: list[Swap] = []
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    if fuse:
        for prefix, seq in model.named_modules():
            if not isinstance(seq, torch.nn.Sequential):
                continue
            children = list(seq.named_children())
            for (bn_name, bn), (relu_name, relu) in zip(children, children[1:]):
                if (type(bn) in FUSED and type(relu) in (torch.nn.ReLU, gm.ReLU)
                        and uses[id(bn)] == 1 and uses[id(relu)] == 1
                        and not _has_hooks(bn) and not _has_hooks(relu)):
                    _swap(bn, f"{prefix}.{bn_name}".lstrip("."), FUSED[type(bn)], swapped)
                    _swap(relu, f"{prefix}.{relu_name}".lstrip("."), gm.FusedReLU, swapped)
    for name, m in model.named_modules():
        new = SWAPS.get(type(m))
        if new is not None and _supported(m):
            _swap(m, name, new, swapped)
    return swapped


def unpatch(model: torch.nn.Module) -> list[Swap]:
    """Make every gpunn module of ``model`` (itself included) the plain torch module it
    subclasses, in place (a fused BatchNormReLU is a BatchNorm again, its ReLU a ReLU).
    Returns what changed."""
    swapped: list[Swap] = []
    for name, m in model.named_modules():
        old = RESTORE.get(type(m))
        if old is not None:
            _swap(m, name, old, swapped)
    return swapped


__all__ = ["Swap", "patch", "unpatch"]
