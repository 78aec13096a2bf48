"""Timing: host calls by ``time.perf_counter`` in rounds, GPU calls by CUDA events.

Warm-up first (run-time compilation, page faults, caches), then many repetitions, each timed
on its own; a :class:`Timing` keeps the median, the minimum, the maximum and the quartiles.
The number of repetitions adapts to the call: enough for about ``Policy.target_s`` of timed
work, at least ``min_reps`` (3 for calls slower than ``slow_s``), at most ``max_reps``.

CPU: ``time.perf_counter`` around each call, garbage collection off while timing. The
contenders of a case are timed in rounds (A B C D A B C D ...), so that a change of load on a
shared machine hits them alike and their ratios hold.
GPU: CUDA events around each call on the stream the work is queued on (CuPy's current stream,
or torch's for torch contenders), all repetitions queued before one synchronization. Before
each repetition a buffer larger than the L2 cache is overwritten (outside the events), so each
call reads its inputs from device memory as a real training step would, and the GPU is still
busy with that write while the host prepares the call, so host-side launch overhead is hidden
unless it exceeds it.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

import numpy as np

#: The clock of timings and time budgets (seconds); tests replace it.
default_clock = time.perf_counter


@dataclass(frozen=True)
class Policy:
    """How long to measure: warm-up calls, then an adaptive number of timed repetitions.

    Calls faster than ``slow_s`` get ``target_s`` of timed work, between ``min_reps`` and
    ``max_reps`` repetitions. Slower calls (the unfused reference on big arrays) get at most
    3, and no more than fit in ``max_time_s`` (at least 1); their warm-up call, which follows
    the untimed checking call, counts as the first repetition."""

    target_s: float = 0.2  # timed work per contender per case
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 1  # calls after the (untimed) checking call; the last one gives the estimate
    slow_s: float = 0.3
    max_time_s: float = 2.0

    def reps(self, estimate_s: float) -> int:
        if estimate_s >= self.slow_s:
            return max(1, min(3, self.max_reps, int(self.max_time_s // estimate_s)))
        wanted = math.ceil(self.target_s / max(estimate_s, 1e-9))
        return max(self.min_reps, min(self.max_reps, wanted))


CPU_POLICY = Policy()
GPU_POLICY = Policy(target_s=0.05, min_reps=10, max_reps=100, warmup=2, slow_s=0.1,
                    max_time_s=1.0)
QUICK_POLICY = Policy(target_s=0.0, min_reps=3, max_reps=3, warmup=1, slow_s=math.inf)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``reps`` repetitions."""

    median: float
    min: float
    q1: float
    q3: float
    reps: int
    max: float | None = None
    cut_short: bool = False  # fewer repetitions than the policy asked: the deadline came

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples, cut_short: bool = False) -> "Timing":
        s = np.asarray(samples, dtype=np.float64)
        if s.size == 0:
            raise ValueError("no samples")
        q1, med, q3 = np.percentile(s, [25, 50, 75])
        return cls(median=float(med), min=float(s.min()), q1=float(q1), q3=float(q3),
                   reps=int(s.size), max=float(s.max()), cut_short=cut_short)


def time_cpu(fn: Callable[[], Any], policy: Policy = CPU_POLICY,
             clock: Callable[[], float] | None = None) -> Timing:
    """Seconds per call of ``fn`` on the host clock (the caller made one call already)."""
    result = time_cpu_interleaved([fn], policy, clock)[0]
    if isinstance(result, Exception):
        raise result
    return result


def time_cpu_interleaved(fns: list[Callable[[], Any]], policy: Policy = CPU_POLICY,
                         clock: Callable[[], float] | None = None,
                         deadline: float | None = None) -> list[Timing | Exception]:
    """Time several host calls in rounds (A B C A B C ...), so that a change of machine load
    during the case hits every contender alike and their ratios stay meaningful on a shared
    machine. Each call gets its own number of repetitions (``policy.reps`` of its own
    estimate); one that raises gets its exception in place of a Timing. ``clock`` returns
    seconds (default :data:`default_clock`; tests inject a fake one). Past ``deadline`` (on that
    clock) no new round starts once every call has a sample (its Timing says cut_short)."""
    clock = clock or default_clock
    n = len(fns)
    results: list[Timing | Exception | None] = [None] * n
    estimates = [0.0] * n
    for i, fn in enumerate(fns):
        try:
            for k in range(max(1, policy.warmup)):
                t0 = clock()
                fn()
                estimates[i] = clock() - t0
                if estimates[i] >= policy.slow_s:
                    break
        except Exception as e:
            results[i] = e
    reps = [policy.reps(e) for e in estimates]
    reps_of = list(reps)
    # a slow call's warm-up is already warm (the checking call came first): keep it
    samples: list[list[float]] = [[e] if e >= policy.slow_s else [] for e in estimates]
    reps = [r - len(got) for r, got in zip(reps, samples)]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    cut = False
    try:
        for r in range(max(reps, default=0)):
            if (deadline is not None and clock() >= deadline
                    and all(samples[i] or results[i] is not None for i in range(n))):
                cut = True
                break
            for i, fn in enumerate(fns):
                if r >= reps[i] or results[i] is not None:
                    continue
                try:
                    t0 = clock()
                    fn()
                    samples[i].append(clock() - t0)
                except Exception as e:
                    results[i] = e
    finally:
        if gc_was_enabled:
            gc.enable()
    return [res if res is not None else Timing.of(samples[i], cut and len(samples[i]) < reps_of[i])
            for i, res in enumerate(results)]


class _CupyClock:
    """CUDA events on CuPy's current stream."""

    def __init__(self):
        import cupy

        self.cupy = cupy

    def event(self):
        return self.cupy.cuda.Event()  # timing enabled

    def record(self, event):
        event.record()  # on the current stream

    def elapsed_s(self, start, end) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def flusher(self) -> Callable[[], None]:
        buf = _cupy_flush_buffer(self.cupy.cuda.Device().id)
        return lambda: buf.data.memset_async(0, buf.nbytes)


class _TorchClock:
    """CUDA events on torch's current stream (torch contenders queue their work there)."""

    def __init__(self):
        import torch

        self.torch = torch

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event):
        event.record()  # on torch's current stream

    def elapsed_s(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3

    def synchronize(self):
        self.torch.cuda.current_stream().synchronize()

    def flusher(self) -> Callable[[], None]:
        buf = _torch_flush_buffer(self.torch.cuda.current_device())
        return buf.zero_


def _flush_bytes(l2_bytes: int) -> int:
    return max(256 << 20, 4 * int(l2_bytes))


@cache
def _cupy_flush_buffer(device_id: int):
    import cupy

    l2 = cupy.cuda.Device(device_id).attributes.get("L2CacheSize", 64 << 20)
    with cupy.cuda.Device(device_id):
        return cupy.empty(_flush_bytes(l2), dtype=cupy.uint8)


@cache
def _torch_flush_buffer(device_index: int):
    import torch

    props = torch.cuda.get_device_properties(device_index)
    l2 = getattr(props, "L2_cache_size", 64 << 20)
    return torch.empty(_flush_bytes(l2), dtype=torch.uint8, device=f"cuda:{device_index}")


def time_cuda(fn: Callable[[], Any], policy: Policy = GPU_POLICY, clock: str = "cupy",
              flush_l2: bool = True) -> Timing:
    """Median seconds per call of ``fn`` by CUDA events (``clock``: 'cupy' or 'torch')."""
    c = _CupyClock() if clock == "cupy" else _TorchClock()
    flush = c.flusher() if flush_l2 else (lambda: None)

    def timed(n: int) -> list[float]:
        starts = [c.event() for _ in range(n)]
        ends = [c.event() for _ in range(n)]
        for s, e in zip(starts, ends):
            flush()
            c.record(s)
            fn()
            c.record(e)
        c.synchronize()
        return [c.elapsed_s(s, e) for s, e in zip(starts, ends)]

    estimate = float(np.median(timed(max(1, policy.warmup))))
    return Timing.of(timed(policy.reps(estimate)))


def time_call(fn: Callable[[], Any], clock: str, policy: Policy) -> Timing:
    """Dispatch on the clock: 'cpu' (host), 'cupy' or 'torch' (CUDA events)."""
    if clock == "cpu":
        return time_cpu(fn, policy)
    return time_cuda(fn, policy, clock=clock)
