"""What autograd keeps for the backward: bytes of the tensors an op saves, measured with
``torch.autograd.graph.saved_tensors_hooks``."""

from __future__ import annotations

import torch


def saved_bytes(fn, *args, exclude=(), **kwargs) -> int:
    """Bytes of the distinct storages that ``fn(*args, **kwargs)`` saves for its backward,
    leaving out the storages of the tensors in ``exclude`` (parameters, say, which are held
    anyway). A storage saved twice (a tensor and a view of it) counts once."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())
