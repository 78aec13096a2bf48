r"""Philox4x32-10, the counter-based random generator of dropout (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011; the ``philox4x32_10`` of Random123).

A counter-based generator is a keyed bijection: ``philox(counter, key)`` maps a 128-bit
counter (four 32-bit words) to four pseudo-random 32-bit words, and any block can be computed
on its own, in any order, on any device. That is what lets the dropout backward regenerate
the forward's mask instead of storing it, and lets the NumPy, Numba and CUDA backends produce
the same bits.

One round, on the counter words (c0, c1, c2, c3) and the key words (k0, k1)::

    hi0:lo0 = M0 * c0        (the 64-bit product of two 32-bit words, split in halves)
    hi1:lo1 = M1 * c2
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)

with M0 = 0xD2511F53, M1 = 0xCD9E8D57. Ten rounds; between two rounds the key is bumped by
the Weyl constants, k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32). The four words after the
tenth round are the output. ``tests/test_dropout.py`` checks the published known-answer
vectors of Random123 (``kat_vectors``, philox4x32_10).

This module holds the NumPy version, vectorized over blocks (uint64 arithmetic for the 32 x 32
-> 64-bit products; it runs on CuPy arrays too), the Numba version (:func:`cpu_rounds`) and
what the ops that draw from a stream share (dropout, augmentation): the stream's bounds, its
checks, the key words of a seed and fresh seeds. The CUDA version is ``kernels/philox.cuh``;
the three follow this text operation for operation.

A stream is what one seed keys: its elements are numbered d = 0, 1, ... < 2^64, and a call
reads the elements offset .. offset + n - 1 (each op says how it maps elements to counters).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit

from .cpu_vector import ir_splat
from .validation import integer

M0 = 0xD2511F53  #: multiplier applied to counter word 0
M1 = 0xCD9E8D57  #: multiplier applied to counter word 2
W0 = 0x9E3779B9  #: Weyl increment of key word 0 (golden ratio)
W1 = 0xBB67AE85  #: Weyl increment of key word 1 (sqrt(3) - 1)
ROUNDS = 10
MASK32 = 0xFFFFFFFF
#: Stream positions are 64-bit: seed < 2^64, offset + n <= 2^64.
STREAM_END = 1 << 64


def philox4x32_10(counter, key, xp=np):
    """Philox4x32-10 of each counter block under each key.

    ``counter``: unsigned integers of shape (..., 4), the words c0..c3 (values below 2^32);
    ``key``: shape (..., 2), the words k0, k1; the leading shapes broadcast. Returns uint32 of
    the broadcast shape (..., 4): the output words in order. ``xp`` is numpy or cupy."""
    counter = xp.asarray(counter)
    key = xp.asarray(key)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(f"philox4x32_10: counter must have shape (..., 4) and key (..., 2), "
                         f"got {counter.shape} and {key.shape}")
    c = [counter[..., j].astype(xp.uint64) & MASK32 for j in range(4)]
    k = [key[..., j].astype(xp.uint64) & MASK32 for j in range(2)]
    out = rounds(*c, *k, xp=xp)
    shape = np.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    return xp.stack([xp.broadcast_to(w, shape) for w in out], axis=-1).astype(xp.uint32)


def rounds(c0, c1, c2, c3, k0, k1, xp=np):
    """The ten rounds on uint64 arrays (or scalars) holding 32-bit words; returns the four
    output words as uint64 holding 32-bit values."""
    m0, m1, mask, shift = (xp.uint64(v) for v in (M0, M1, MASK32, 32))
    w0, w1 = xp.uint64(W0), xp.uint64(W1)
    for r in range(ROUNDS):
        if r:
            k0 = (k0 + w0) & mask
            k1 = (k1 + w1) & mask
        p0 = c0 * m0  # < 2^64: no wrap
        p1 = c2 * m1
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
    return c0, c1, c2, c3


# --- Numba: the rounds inside CPU kernels -----------------------------------------------------
# All arithmetic is uint64 (Numba would turn uint64 mixed with int64 into float64). A counter
# word is masked only where it enters a product: the low 32 bits are all the product reads
# (vpmuludq), so the 64-bit lanes may carry garbage above bit 31 in between.

_U32, _MASK32 = np.uint64(32), np.uint64(MASK32)
_M0, _M1, _W0, _W1 = np.uint64(M0), np.uint64(M1), np.uint64(W0), np.uint64(W1)


@njit(inline="always", cache=True)
def cpu_rounds(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 words < 2^32: the four output words, as uint64 < 2^32."""
    for r in range(ROUNDS):
        p0 = (c0 & _MASK32) * _M0
        p1 = (c2 & _MASK32) * _M1
        c0, c1, c2, c3 = (p1 >> _U32) ^ c1 ^ k0, p1, (p0 >> _U32) ^ c3 ^ k1, p0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0 & _MASK32, c1 & _MASK32, c2 & _MASK32, c3 & _MASK32


def ir_rounds(builder, c0, c1, c2, c3, k0, k1):
    """:func:`cpu_rounds` in LLVM IR, for kernels written as explicit vector code: c0..c3
    are vectors of i64 lanes (one block each) holding 32-bit words, anything above bit 31;
    k0, k1 i64 scalars < 2^32. Returns the four output words, anything above bit 31 (the
    caller reads the low halves). The masked operands let LLVM multiply with vpmuludq."""
    lanes = c0.type.count
    i64 = ir.IntType(64)

    def const(v):
        return ir.Constant(c0.type, [v] * lanes)

    mask, shift, m0, m1 = const(MASK32), const(32), const(M0), const(M1)
    for r in range(ROUNDS):
        rk0 = ir_splat(builder, builder.and_(builder.add(k0, ir.Constant(i64, r * W0)),
                                             ir.Constant(i64, MASK32)), lanes)
        rk1 = ir_splat(builder, builder.and_(builder.add(k1, ir.Constant(i64, r * W1)),
                                             ir.Constant(i64, MASK32)), lanes)
        p0 = builder.mul(builder.and_(c0, mask), m0)
        p1 = builder.mul(builder.and_(c2, mask), m1)
        c0, c1, c2, c3 = (builder.xor(builder.xor(builder.lshr(p1, shift), c1), rk0), p1,
                          builder.xor(builder.xor(builder.lshr(p0, shift), c3), rk1), p0)
    return c0, c1, c2, c3


# --- Streams ----------------------------------------------------------------------------------


def key_words(seed: int) -> tuple[np.uint64, np.uint64]:
    """The key (k0, k1) = (seed mod 2^32, seed >> 32) of a seed in [0, 2^64), as uint64."""
    return np.uint64(seed & MASK32), np.uint64(seed >> 32)


def fresh_seed() -> int:
    """A seed from NumPy's global generator (``np.random.seed`` makes it reproducible)."""
    return int(np.random.randint(0, STREAM_END, dtype=np.uint64))


def check_stream(op: str, seed, offset, n: int, allow_none: bool = False):
    """(seed, offset) of a call reading ``n`` stream elements, checked: integers in
    [0, 2^64) with offset + n <= 2^64; seed None stays None where ``allow_none`` (the caller
    draws a :func:`fresh_seed` once the call is known to run)."""
    if seed is None and not allow_none:
        raise TypeError(f"{op}: seed must be the forward's seed (an integer in [0, 2^64)), "
                        "got None")
    if seed is not None:
        seed = integer(op, "seed", seed, 0, STREAM_END, hi_open=True)
    offset = integer(op, "offset", offset, 0, STREAM_END, hi_open=True)
    if offset + n > STREAM_END:
        raise ValueError(f"{op}: offset + size must be at most 2^64 (the stream's end), "
                         f"got offset {offset} and {n} elements")
    return seed, offset
