"""Mini-batches: index batches per epoch and a loader that gathers them.

The order of epoch ``e`` is a permutation drawn from ``np.random.default_rng((seed, e))``:
it depends on nothing but the seed and the epoch number, so a run resumed at epoch ``e``
sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .datasets import Dataset


def _count(value, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def order(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """The int64 sample order of one epoch: ``arange(n)``, or its permutation for
    ``(seed, epoch)``."""
    n = _count(n, "n", 0)
    seed = _count(seed, "seed", 0)
    epoch = _count(epoch, "epoch", 0)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng((seed, epoch)).permutation(n).astype(np.int64, copy=False)


def batches(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            drop_last: bool = False) -> Iterator[np.ndarray]:
    """int64 index arrays of ``batch_size`` (the last one shorter unless ``drop_last``) that
    cover ``range(n)`` once, in the order of :func:`order`."""
    batch_size = _count(batch_size, "batch_size", 1)
    idx = order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    return _slices(idx, batch_size, drop_last)


def _slices(idx, batch_size: int, drop_last: bool):
    n = len(idx)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield idx[start:start + batch_size]


def _module_name(xp) -> str:
    name = getattr(xp, "__name__", None)
    if name not in ("numpy", "cupy"):
        raise ValueError(f"xp must be the numpy or the cupy module; got {xp!r}")
    return name


class DataLoader:
    """(x_batch, y_batch) pairs of a Dataset, epoch by epoch: ``for x, y in loader.epoch(e)``.

    ``xp=cupy`` copies the dataset to the current device once; batches are then gathered on
    the device (the epoch's order is copied over once per epoch). Each batch is gathered into
    a contiguous buffer; with ``reuse_buffers=True`` the same two buffers serve every batch
    (no allocation per batch, but a batch is only valid until the next one is drawn: copy
    what you keep).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, xp=np, reuse_buffers: bool = False):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a Dataset; got {type(dataset).__name__}")
        self.batch_size = _count(batch_size, "batch_size", 1)
        self.seed = _count(seed, "seed", 0)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.reuse_buffers = bool(reuse_buffers)
        self.dataset = dataset
        self.xp = xp
        self._on_device = _module_name(xp) == "cupy"
        self.x = xp.asarray(dataset.x)
        self.y = xp.asarray(dataset.y)
        self._buffers = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _buffer(self, m: int):
        """Output arrays for a batch of m samples (views of the shared buffers if reused)."""
        xp = self.xp
        shape = (self.batch_size,) if self.reuse_buffers else (m,)
        if self.reuse_buffers:
            if self._buffers is None:
                self._buffers = (xp.empty(shape + self.x.shape[1:], self.x.dtype),
                                 xp.empty(shape, self.y.dtype))
            bx, by = self._buffers
            return bx[:m], by[:m]
        return xp.empty((m,) + self.x.shape[1:], self.x.dtype), xp.empty((m,), self.y.dtype)

    def epoch(self, e: int) -> Iterator[tuple]:
        """The batches of epoch ``e`` (every sample once; the last batch shorter unless
        drop_last)."""
        idx = order(len(self.dataset), shuffle=self.shuffle, seed=self.seed, epoch=e)
        return self._gather(idx)

    def _gather(self, idx):
        if self._on_device:
            idx = self.xp.asarray(idx)
        for part in _slices(idx, self.batch_size, self.drop_last):
            bx, by = self._buffer(len(part))
            if self._on_device:
                self.xp.take(self.x, part, axis=0, out=bx)
                self.xp.take(self.y, part, axis=0, out=by)
            else:
                # mode="clip": the indices are in range by construction, and "raise" would
                # gather into a temporary and copy it over.
                np.take(self.x, part, axis=0, out=bx, mode="clip")
                np.take(self.y, part, axis=0, out=by, mode="clip")
            yield bx, by

    def __repr__(self) -> str:
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"xp={_module_name(self.xp)})")
