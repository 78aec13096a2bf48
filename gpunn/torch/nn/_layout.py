"""Tensor layouts the torch ops share: channels-last detection, the C-contiguous rows the
kernels take and the permutation back, fake-tensor outputs, and the float32 copies of 16-bit
CPU tensors."""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)

def _last_perm(x: Tensor):
    """The permutation (0, 2, ..., d-1, 1) when x is channels-last dense but not contiguous
    (its permuted view is C-contiguous); None otherwise."""
    d = x.dim()
    if d < 3 or x.is_contiguous():
        return None
    perm = (0, *range(2, d), 1)
    return perm if x.permute(perm).is_contiguous() else None


def _rows(t: Tensor, perm) -> Tensor:
    """t detached as a C-contiguous tensor: permuted to channels-last order when perm."""
    t = t.detach()
    return t.permute(perm).contiguous() if perm else t.contiguous()


def _unrows(t: Tensor, perm) -> Tensor:
    """Undo :func:`_rows`' permutation (a view)."""
    if not perm:
        return t
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return t.permute(inverse)


def _empty_like(x: Tensor, perm, dtype=None) -> Tensor:
    """An uninitialized tensor shaped like x in the layout the kernels return (fake impls)."""
    dtype = x.dtype if dtype is None else dtype
    if perm:
        return torch.empty_permuted(x.shape, perm, dtype=dtype, device=x.device)
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _host16(t: Tensor) -> bool:
    """A float16/bfloat16 CPU tensor: the host kernels compute it through a float32 copy."""
    return t.device.type == "cpu" and t.dtype in _HALF


def _f32(t):
    return None if t is None else t.float()


def _detached(t):
    return None if t is None else t.detach()
