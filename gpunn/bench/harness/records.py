"""Records: one :class:`Record` per (case, contender), the error check, bandwidth, trust.

Bandwidth is GB/s from the FEWEST bytes the op must move (each input read once, each output
written once), and the fraction of a limit measured in the same case (in the same rounds on the
CPU) with the same bytes: on the CPU a Numba kernel with the same access pattern and trivial
math, on the GPU a device-to-device copy of the same number of bytes (:mod:`.limits`).
:func:`finalize` fills GB/s, the fraction of the limit and the speed-up over torch for each
group of records that share a case, and marks a timing whose spread exceeds ``MAX_SPREAD`` of
its median, or a fraction of the limit above ``MAX_FRACTION``, as not to be trusted (a busy
machine: rerun).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from .timing import Timing

GB = 1e9

#: A timing whose (max - min) / median exceeds this is marked as not to be trusted.
MAX_SPREAD = 0.5
#: ... and a fraction of the limit above this (faster than the limit: the limit's timing was
#: disturbed).
MAX_FRACTION = 1.5

#: Default relative-error bound (||out - ref|| / ||ref||) for the pre-timing check, by dtype.
#: Loose on purpose: it catches broken contenders, the test suite checks accuracy.
CHECK_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 5e-3, "bfloat16": 1e-2}

#: Roles of contenders: the subject (gpunn), baselines, torch (the speed-up reference), limit.
ROLES = ("gpunn", "baseline", "torch", "limit")


def rel_err(out, ref, xp=np, chunk: int = 1 << 20) -> float:
    """||out - ref|| / ||ref|| accumulated in float64, chunk by chunk (no big temporaries).

    ``out`` and ``ref`` are arrays of module ``xp`` (NumPy or CuPy) of one shape. NaN or inf
    anywhere gives NaN or inf, which never passes a bound."""
    out, ref = out.reshape(-1), ref.reshape(-1)
    if out.shape != ref.shape:
        raise ValueError(f"shapes differ: {out.shape} vs {ref.shape}")
    num = den = 0.0
    for i in range(0, out.size, chunk):
        r = ref[i:i + chunk].astype(xp.float64)
        d = out[i:i + chunk].astype(xp.float64) - r
        num += float((d * d).sum())  # a reduction, not a dot: no BLAS/cuBLAS needed
        den += float((r * r).sum())
    if den == 0.0:
        return math.sqrt(num)
    return math.sqrt(num / den)


def passes(err: float | None, tol: float) -> bool:
    return err is not None and err == err and err < tol  # NaN fails


@dataclass
class Record:
    """One contender on one case. Times in seconds; None where not measured."""

    suite: str
    device: str  # 'cpu' or 'cuda'
    op: str
    direction: str  # 'forward' or 'backward'
    shape: list[int]
    dtype: str
    impl: str
    role: str  # one of ROLES
    bytes: int  # the fewest bytes the op must move
    status: str = "ok"  # ok | wrong | error | skipped
    error: float | None = None  # relative error against the reference
    note: str = ""
    median_s: float | None = None
    min_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    max_s: float | None = None
    reps: int | None = None
    gbps: float | None = None
    limit_gbps: float | None = None
    frac_of_limit: float | None = None
    speedup_vs_torch: float | None = None
    distrust: str = ""  # why this timing is not to be trusted ("" when it is)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the timed repetitions."""
        if self.max_s is None or self.min_s is None or not self.median_s:
            return None
        return (self.max_s - self.min_s) / self.median_s

    def set_timing(self, t: Timing) -> None:
        self.median_s, self.min_s, self.q1_s, self.q3_s, self.max_s, self.reps = (
            t.median, t.min, t.q1, t.q3, t.max, t.reps)
        self.gbps = self.bytes / t.median / GB if t.median > 0 else None

    def key(self) -> tuple:
        return (self.suite, self.device, self.op, self.direction, tuple(self.shape), self.dtype)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = self.size
        d["iqr_s"] = (self.q3_s - self.q1_s) if self.q3_s is not None else None
        d["spread"] = self.spread
        return d


def finalize(records: list[Record]) -> list[Record]:
    """Fill GB/s, the fraction of the limit and the speed-up over torch, group by group, and
    say which timings not to trust (:func:`distrust`)."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r.median_s]
        limit = next((r for r in timed if r.role == "limit" and r.status == "ok"), None)
        torch = next((r for r in timed if r.role == "torch" and r.status == "ok"), None)
        for r in timed:
            r.gbps = r.bytes / r.median_s / GB
            if limit is not None and limit.gbps:
                r.limit_gbps = limit.gbps
                r.frac_of_limit = r.gbps / limit.gbps
            if torch is not None and r.role != "limit":
                r.speedup_vs_torch = torch.median_s / r.median_s
        for r in timed:
            r.distrust = distrust(r)
    return records


def distrust(r: Record) -> str:
    """Why a timed record is not to be trusted: a spread over MAX_SPREAD of its median, or a
    fraction of the limit over MAX_FRACTION; "" when neither."""
    why = []
    if r.spread is not None and r.reps and r.reps > 1 and r.spread > MAX_SPREAD:
        why.append(f"spread {100 * r.spread:.0f}% of the median (min {1e3 * r.min_s:.4g} ms, "
                   f"max {1e3 * r.max_s:.4g} ms)")
    if r.frac_of_limit is not None and r.frac_of_limit > MAX_FRACTION:
        why.append(f"{100 * r.frac_of_limit:.0f}% of the limit (the limit's timing was "
                   f"disturbed)")
    return "; ".join(why)


@dataclass
class Contender:
    """One implementation in a case.

    ``make()`` sets it up (allocations, conversions) and returns the call to time, which
    returns its output; or None when the contender does not apply to the case (no record).
    ``clock``: 'cpu', 'cupy' or 'torch' (see :func:`time_call`). ``check``: compare the first
    output with the reference. ``cache_key``: contenders with equal keys are timed once per
    run (the limit, shared by every op moving the same bytes)."""

    name: str
    role: str
    make: Callable[[], Callable[[], Any] | None]
    clock: str = "cpu"
    check: bool = True
    note: str = ""
    cache_key: Any = None
