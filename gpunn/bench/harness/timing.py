"""The benchmark harness: timing, bandwidth, result records, the JSON file and the table.

Timing
    Warm-up first (run-time compilation, page faults, caches), then many repetitions, each
    timed on its own; a record keeps the median, the minimum, the maximum and the quartiles.
    The number of repetitions adapts to the call: enough for about ``Policy.target_s`` of
    timed work, at least ``min_reps`` (3 for calls slower than ``slow_s``), at most
    ``max_reps``. The table shows the spread (min-max of the repetitions) and marks a timing
    whose spread exceeds ``MAX_SPREAD`` of its median, or a fraction of the limit above
    ``MAX_FRACTION``, as not to be trusted (a busy machine: rerun).

Time budget
    A :class:`Runner` with a time budget starts no case once it is spent (the rest are
    recorded as skipped) and cuts the repetitions of the case in progress at the deadline
    (each contender keeps at least one timed call), so a run ends within about one case's
    checking and warm-up calls after the budget. Its clock is injectable (tests use a fake).

    CPU: ``time.perf_counter`` around each call, garbage collection off while timing. The
    contenders of a case are timed in rounds (A B C D A B C D ...), so that a change of load
    on a shared machine hits them alike and their ratios hold.
    GPU: CUDA events around each call on the stream the work is queued on (CuPy's current
    stream, or torch's for torch contenders), all repetitions queued before one
    synchronization. Before each repetition a buffer larger than the L2 cache is overwritten
    (outside the events), so each call reads its inputs from device memory as a real training
    step would, and the GPU is still busy with that write while the host prepares the call,
    so host-side launch overhead is hidden unless it exceeds it.

Bandwidth
    GB/s from the FEWEST bytes the op must move (each input read once, each output written
    once), and the fraction of a limit measured in the same case (in the same rounds on the
    CPU) with the same bytes: on the CPU a Numba kernel with the same access pattern and
    trivial math, on the GPU a device-to-device copy of the same number of bytes.

Records
    One :class:`Record` per (case, contender). ``finalize`` fills GB/s, the fraction of the
    limit and the speed-up over torch for each group of records that share a case.
    ``write_json`` writes them with the machine, the versions and the git commit.

Suites
    A suite module keeps what is its own (cases, contenders, bytes formulas, its own options)
    and takes the rest from here: :func:`option` and :func:`names_type` for its options, a
    :class:`Runner` (the time budget, the progress lines, the records) for its cases, and
    :func:`run_suite` for its ``run()`` (the device, GPU readiness, an interrupted run's
    record, :func:`finalize`). :class:`GpuArrays`, :func:`device_f32` and the other GPU
    helpers give the suites their device inputs and compare device outputs.

CuPy and torch are imported only when a GPU or torch contender asks for them.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

GB = 1e9

#: A timing whose (max - min) / median exceeds this is marked as not to be trusted.
MAX_SPREAD = 0.5
#: ... and a fraction of the limit above this (faster than the limit: the limit's timing was
#: disturbed).
MAX_FRACTION = 1.5

#: The clock of timings and time budgets (seconds); tests replace it.
default_clock = time.perf_counter

#: Default relative-error bound (||out - ref|| / ||ref||) for the pre-timing check, by dtype.
#: Loose on purpose: it catches broken contenders, the test suite checks accuracy.
CHECK_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "float16": 5e-3, "bfloat16": 1e-2}

#: Roles of contenders: the subject (gpunn), baselines, torch (the speed-up reference), limit.
ROLES = ("gpunn", "baseline", "torch", "limit")


# --- Sizes ------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'1M' -> 1048576, '4k' -> 4096, '1000' -> 1000 (K, M, G are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use a count such as 1000, 64K, 16M)")
    n = int(m.group(1)) * _UNIT[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return n


def parse_names(text: str, choices, what: str) -> list[str]:
    """'a, b' -> ['a', 'b'], each one of ``choices``; ValueError naming the unknown ones."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in names if s not in choices]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(choices)}")
    return names


def format_size(n: int) -> str:
    """The inverse of parse_size where exact: 16777216 -> '16M'; else the plain count."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_shape(shape) -> str:
    shape = tuple(shape)
    return format_size(shape[0]) if len(shape) == 1 else "x".join(str(s) for s in shape)


# --- Timing -----------------------------------------------------------------------------------


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


# --- Checking ---------------------------------------------------------------------------------


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


# --- Records ----------------------------------------------------------------------------------


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


# --- Running contenders -----------------------------------------------------------------------


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


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_contenders(base: dict, contenders: list[Contender], check, policy: Policy,
                   cache: dict | None = None, tol: float | None = None,
                   clock: Callable[[], float] | None = None,
                   deadline: float | None = None) -> list[Record]:
    """Check, then time, the contenders of one case; one Record each, in contender order.

    ``base``: the Record fields the case fixes (suite, device, op, direction, shape, dtype,
    bytes). First every contender is set up and called once, and that output is compared with
    the reference by ``check(contender, output) -> (relative error, note)``; above ``tol``
    (default: CHECK_TOLERANCE of the dtype) the record is flagged 'wrong' but still timed.
    Then the host-clock contenders are timed together in rounds (:func:`time_cpu_interleaved`)
    and the CUDA ones one after another. An exception in set-up, checking or timing flags
    the record 'error'. KeyboardInterrupt propagates. Past ``deadline`` (on ``clock``) the
    host timings are cut short (:func:`time_cpu_interleaved`), noted in their records."""
    tol = tol if tol is not None else CHECK_TOLERANCE.get(base.get("dtype"), 1e-3)
    cache = cache if cache is not None else {}
    records: list[Record] = []
    ready: list[tuple[Record, Contender, Callable[[], Any]]] = []
    for c in contenders:
        rec = Record(**base, impl=c.name, role=c.role, note=c.note)
        try:
            if c.cache_key is not None and c.cache_key in cache:
                rec.set_timing(cache[c.cache_key])
                records.append(rec)
                continue
            call = c.make()
            if call is None:
                continue
            out = call()  # the first call: compiles, faults pages in; its output is checked
            if c.check:
                err, note = check(c, out)
                rec.error = None if err is None else float(err)
                if note:
                    rec.note = f"{rec.note}; {note}" if rec.note else note
                if not passes(rec.error, tol):
                    rec.status = "wrong"
            del out
            ready.append((rec, c, call))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            rec.status = "error"
            rec.note = _short(e)
        records.append(rec)

    def done(rec: Record, c: Contender, timing) -> None:
        if isinstance(timing, Exception):
            rec.status, rec.note = "error", _short(timing)
            return
        rec.set_timing(timing)
        if timing.cut_short:
            note = f"{timing.reps} repetition(s): the time budget ran out"
            rec.note = f"{rec.note}; {note}" if rec.note else note
        if c.cache_key is not None:
            cache[c.cache_key] = timing

    host = [(rec, c, call) for rec, c, call in ready if c.clock == "cpu"]
    if host:
        timings = time_cpu_interleaved([h[2] for h in host], policy, clock, deadline)
        for (rec, c, _), timing in zip(host, timings):
            done(rec, c, timing)
    for rec, c, call in ready:
        if c.clock == "cpu":
            continue
        try:
            timing = time_call(call, c.clock, policy)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            timing = e
        done(rec, c, timing)
    return records


# --- Suites: options, the runner, the entry point -------------------------------------------

DEVICES = ("cpu", "cuda", "all")


@dataclass
class Options:
    """What every suite takes; a suite's ``Options`` adds its own fields. All optional: the
    CLI's namespace has the same attributes, None where an option is not given."""

    device: str = "cpu"  # cpu | cuda | all
    sizes: list[int] | None = None  # elements (each suite says of what)
    dtypes: list[str] | None = None
    quick: bool = False
    seed: int = 0
    time_budget: float | None = None  # seconds; cases after it are skipped
    progress: bool = True  # progress lines on stderr


def option(options, name: str, default=None):
    """``options.name``, or ``default`` where it is missing or None (the CLI's namespace holds
    None for every option not given)."""
    value = getattr(options, name, None)
    return default if value is None else value


def names_type(choices, what: str) -> Callable[[str], list[str]]:
    """An argparse ``type``: 'a,b' -> ['a', 'b'] by :func:`parse_names`, its error as an
    ArgumentTypeError."""

    def parse(text: str) -> list[str]:
        try:
            return parse_names(text, choices, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def selected(options, name: str, choices) -> list:
    """The choices option ``name`` names (all when it is not set), in the order of ``choices``."""
    chosen = option(options, name) or choices
    return [c for c in choices if c in chosen]


def selected_dtypes(options, default, can) -> list[str]:
    """The ``dtypes`` option (else ``default``), less those the device cannot run (``can``)."""
    return [d for d in (option(options, "dtypes") or default) if d in can]


def selected_sizes(options, default) -> list[int]:
    """The ``sizes`` option, else the sizes ``default`` spells ('1M', ...)."""
    return option(options, "sizes") or [parse_size(s) for s in default]


def case_label(base: dict) -> str:
    """A case's progress label from its record fields: 'relu forward 1M float32 (cpu)'."""
    return (f"{base['op']} {base['direction']} {format_shape(base['shape'])} {base['dtype']} "
            f"({base['device']})")


class Runner:
    """Runs the cases of one suite invocation: the time budget, the progress lines, the records.

    ``options``: the suite's options (quick, seed, time_budget, progress are read here).
    ``extra_contenders``: callables ``f(case) -> Contender | None`` adding contenders to each
    case (the tests add wrong or broken ones). ``clock``: seconds (default
    :data:`default_clock`); the budget runs from the Runner's creation."""

    def __init__(self, options, extra_contenders=(), clock: Callable[[], float] | None = None):
        self.options = options
        quick = option(options, "quick", False)
        self.policy_cpu = QUICK_POLICY if quick else CPU_POLICY
        self.policy_gpu = QUICK_POLICY if quick else GPU_POLICY
        self.seed = option(options, "seed", 0)
        self.clock = clock or default_clock
        budget = option(options, "time_budget")
        self.deadline = self.clock() + budget if budget else None
        self.extra = list(extra_contenders)
        self.cache: dict = {}  # timings of contenders with a cache_key, across cases
        self.records: list[Record] = []
        self.progress = option(options, "progress", True)
        self.count = 0

    def out_of_time(self) -> bool:
        """The time budget is spent: start no new case (nor its set-up)."""
        return self.deadline is not None and self.clock() >= self.deadline

    def say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def admit(self, base: dict) -> bool:
        """Counts a case; once the time budget is spent, records it as skipped (fields
        ``base``) and returns False."""
        self.count += 1
        if self.out_of_time():
            self.records.append(Record(**base, impl="-", role="gpunn", status="skipped",
                                       note="time budget spent"))
            return False
        return True

    def measure(self, base: dict, contenders: list[Contender], check, policy: Policy,
                case=None) -> list[Record]:
        """:func:`run_contenders` on the contenders and the extra ones for ``case``; the
        records are kept and returned."""
        extra = [c for make in self.extra for c in [make(case)] if c is not None]
        records = run_contenders(base, contenders + extra, check=check, policy=policy,
                                 cache=self.cache, clock=self.clock, deadline=self.deadline)
        self.records.extend(records)
        return records

    def run_case(self, base: dict, contenders: list[Contender], check, policy: Policy,
                 case=None) -> None:
        """One case (record fields ``base``): skipped once the time budget is spent, else
        measured, with a progress line naming the contenders that are not ok."""
        if not self.admit(base):
            return
        t0 = self.clock()
        records = self.measure(base, contenders, check, policy, case)
        self.say(f"[{self.count}] {case_label(base)}: {self.clock() - t0:.1f} s"
                 + "".join(f"; {r.impl} {r.status}" for r in records if r.status != "ok"))


def run_suite(suite: str, options, run_cpu: Callable[[Runner], None],
              run_gpu: Callable[[Runner], None], extra_contenders=(),
              clock: Callable[[], float] | None = None) -> list[Record]:
    """A suite's ``run``: ``run_cpu(runner)`` and/or ``run_gpu(runner)`` as the ``device``
    option says (cpu, cuda or all; cuda without a usable GPU raises, all skips the GPU part),
    a 'skipped' record noting 'interrupted' on Ctrl-C (the records so far are kept), then
    :func:`finalize`."""
    device = option(options, "device", "cpu")
    if device not in DEVICES:
        raise ValueError(f"device must be cpu, cuda or all, got {device!r}")
    runner = Runner(options, extra_contenders, clock)
    try:
        if device in ("cpu", "all"):
            run_cpu(runner)
        if device in ("cuda", "all"):
            why = gpu_ready()
            if why is None:
                run_gpu(runner)
            elif device == "cuda":
                raise RuntimeError(f"--device cuda: {why}")
            else:
                runner.say(f"GPU part skipped: {why}")
    except KeyboardInterrupt:
        runner.say("interrupted: writing the results measured so far")
        runner.records.append(Record(suite=suite, device=device, op="*", direction="*",
                                     shape=[0], dtype="*", impl="-", role="gpunn", bytes=0,
                                     status="skipped", note="interrupted"))
    return finalize(runner.records)


def failed_check(error: Exception) -> Callable[[Contender, Any], tuple]:
    """The check of a case whose reference could not be computed: every contender it sees is
    flagged 'error', naming why."""

    def check(contender, out):
        raise RuntimeError(f"no reference: {type(error).__name__}: {error}")

    return check


def host_array(out) -> np.ndarray:
    """A CPU contender's output as a NumPy array (torch tensors as views)."""
    if isinstance(out, np.ndarray):
        return out
    if type(out).__module__.split(".")[0] == "torch":
        return out.detach().numpy()
    return np.asarray(out)


# --- GPU inputs and outputs -------------------------------------------------------------------


def gpu_ready() -> str | None:
    """None when a CUDA device is visible to CuPy, else why not."""
    from gpunn import backend

    if not backend.has_cupy():
        return ('CuPy is not installed: pip install "gpunn[cuda13]" (CUDA 13) or '
                '"gpunn[cuda12]" (CUDA 12)')
    if backend.cuda_device_count() == 0:
        return "CuPy sees no CUDA device"
    return None


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name, bfloat16 included (NumPy has no bfloat16)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class GpuArrays:
    """One input on the device in a dtype: the native CuPy array (None where CuPy cannot hold
    the dtype), its float32 values (what the reference computes on) and a torch view."""

    def __init__(self, values_f32, dtype: str):
        import cupy

        self.dtype = dtype
        self.native_error = ""
        if dtype == "bfloat16":
            bits = bf16_bits(values_f32)
            self.f32 = bf16_to_f32(bits)
            self._torch_bits = bits
            try:
                import ml_dtypes

                self.native = bits.view(ml_dtypes.bfloat16)
            except Exception as e:  # CuPy without bfloat16, or no ml_dtypes
                self.native = None
                self.native_error = f"{type(e).__name__}: {e}"
        else:
            self.native = values_f32.astype(dtype)
            self.f32 = self.native.astype(cupy.float32, copy=False)
            self._torch_bits = None

    def torch(self):
        import torch

        if self._torch_bits is not None:
            return torch.from_dlpack(self._torch_bits).view(torch.bfloat16)
        return torch.from_dlpack(self.native)


def natives(arrays: list[GpuArrays], dtype: str) -> list:
    """The native CuPy arrays of ``arrays``; TypeError where CuPy cannot hold the dtype."""
    out = [a.native for a in arrays]
    if any(a is None for a in out):
        raise TypeError(f"CuPy cannot hold {dtype} arrays: {arrays[0].native_error}")
    return out


def bf16_bits(a32):
    """Round float32 CuPy values to bfloat16 (to nearest even), as int16 bit patterns."""
    import cupy

    u = a32.view(cupy.uint32)
    rounded = (u + cupy.uint32(0x7FFF) + ((u >> 16) & cupy.uint32(1))) >> 16
    return rounded.astype(cupy.uint16).view(cupy.int16)


def bf16_to_f32(bits16):
    import cupy

    return (bits16.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)


def device_f32(out):
    """A contender's output as a float32 CuPy array (torch tensors and bfloat16 included)."""
    import cupy

    if type(out).__module__.split(".")[0] == "torch":
        import torch

        t = out.detach().float().contiguous()
        torch.cuda.current_stream().synchronize()
        return cupy.from_dlpack(t)
    if out.dtype == cupy.float32:
        return out
    if np.dtype(out.dtype).name == "bfloat16":
        return bf16_to_f32(out.view(cupy.uint16))
    return out.astype(cupy.float32)


def gpu_contenders(make_gpunn, make_torch, make_unfused, nbytes: int,
                   torch_note: str = "") -> list[Contender]:
    """A case's usual GPU contenders, in the table's order: gpunn cuda, torch cuda (``make_torch``
    is called once torch is seen to have CUDA; ``torch_note`` its note), cupy unfused (gpunn's
    reference backend through CuPy; ``make_unfused`` returns None where it does not apply) and
    the copy limit of ``nbytes``."""

    def make_torch_cuda():
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("this torch has no CUDA")
        return make_torch()

    return [
        Contender("gpunn cuda", "gpunn", make_gpunn, clock="cupy"),
        Contender("torch cuda", "torch", make_torch_cuda, clock="torch", note=torch_note),
        Contender("cupy unfused", "baseline", make_unfused, clock="cupy"),
        Contender("copy limit", "limit", lambda: cuda_copy_limit(nbytes), clock="cupy",
                  check=False),
    ]


def free_gpu_memory() -> None:
    """Return the cached blocks of CuPy's pool (and torch's, when torch is loaded) to the
    device, between groups of cases."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


# --- Where results go; machine, versions, commit ---------------------------------------------


def checkout_root() -> Path | None:
    """The source checkout gpunn runs from, if it runs from one (not an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "gpunn" / "__init__.py").is_file():
        return root
    return None


def default_results_dir() -> Path:
    """./gpunn-bench-results/: a user's run never writes into the package it runs from."""
    return Path.cwd() / "gpunn-bench-results"


def checkout_results_dir() -> Path | None:
    """bench/results/ of the source checkout gpunn runs from (where the README's tables come
    from: ``gpunn bench --repo-results``), or None when it runs from an installed package."""
    root = checkout_root()
    return root / "bench" / "results" if root else None


def git_commit(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout, or (None, None) outside one."""
    root = root or checkout_root()
    if root is None:
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict | None:
    """The current CUDA device as CuPy sees it, or None without CuPy or a device."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "device_id": dev.id,
            "compute_capability": dev.compute_capability,
            "sm_count": dev.attributes.get("MultiProcessorCount"),
            "l2_cache_bytes": dev.attributes.get("L2CacheSize"),
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        }
    except Exception as e:  # no driver, no device
        return {"error": f"{type(e).__name__}: {e}"}


def machine_info(gpu: bool = False) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hostname": platform.node(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import numba

        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if gpu:
        info["gpu"] = gpu_info()
    return info


def _dist_version(module: str) -> str | None:
    if module in sys.modules and getattr(sys.modules[module], "__version__", None):
        return str(sys.modules[module].__version__)
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    for dist in metadata.packages_distributions().get(module, [module]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for module in ("numpy", "numba", "llvmlite", "scipy", "torch", "cupy", "ml_dtypes", "rich"):
        out[module] = _dist_version(module)
    try:
        from importlib import metadata

        import gpunn

        out["gpunn"] = getattr(gpunn, "__version__", None) or metadata.version("gpunn")
    except Exception:
        out["gpunn"] = None
    return out


def results_path(suite: str, device: str, out_dir: str | os.PathLike | None = None) -> Path:
    """``<out_dir>/<suite>-<device>-<UTC timestamp>.json``, never overwriting a file."""
    d = Path(out_dir) if out_dir is not None else default_results_dir()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = d / f"{suite}-{device}-{stamp}.json"
    i = 1
    while path.exists():
        path = d / f"{suite}-{device}-{stamp}-{i}.json"
        i += 1
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def write_json(records: list[Record], suite: str, device: str,
               out_dir: str | os.PathLike | None = None, options: dict | None = None,
               notes: list[str] | None = None) -> Path:
    """Write the records with machine, versions and git commit; returns the file's path."""
    path = results_path(suite, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    payload = {
        "suite": suite,
        "device": device,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine_info(gpu=device in ("cuda", "all")
                                or any(r.device == "cuda" for r in records)),
        "versions": versions(),
        "options": _jsonable(options or {}),
        "notes": list(notes or []),
        "records": [r.to_dict() for r in records],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


# --- The table --------------------------------------------------------------------------------

_STATUS_STYLE = {"ok": "green", "wrong": "bold red", "error": "bold red", "skipped": "yellow"}
#: Distrusted timings listed by name under the table (the rest are counted).
SHOW_DISTRUSTED = 10


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def print_table(records: list[Record], title: str | None = None, console=None,
                show_limit: bool = True) -> None:
    """A rich table: op, dir, size, dtype, impl, ms (median), min-max ms, GB/s, % of limit,
    speed-up vs torch and the check (relative error against the reference); notes are listed
    under the table, and a warning for the timings marked ``!`` (see :func:`distrust`)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: don't squeeze the table into 80 columns
            console = Console(width=150)
    table = Table(title=title, header_style="bold", pad_edge=False)
    for name, justify in (("op", "left"), ("dir", "left"), ("size", "right"),
                          ("dtype", "left"), ("impl", "left"), ("ms", "right"),
                          ("min-max ms", "right"), ("GB/s", "right"), ("% limit", "right"),
                          ("vs torch", "right"), ("check", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    notes: dict[str, int] = {}
    skipped = [r for r in records if r.status == "skipped"]
    previous = None
    for r in records:
        if r.status == "skipped" or (r.role == "limit" and not show_limit):
            continue
        key = r.key()
        if previous is not None and key != previous:
            table.add_section()
        first = key != previous
        previous = key
        check = r.status.upper() if r.status != "ok" else "ok"
        if r.error is not None:
            check += f" {r.error:.0e}"
        if r.note:
            check += f" [{notes.setdefault(r.note, len(notes) + 1)}]"
        style = "dim" if r.role == "limit" else ("bold" if r.role == "gpunn" else None)
        speedup = _fmt(r.speedup_vs_torch, ".2f") + ("x" if r.speedup_vs_torch else "")
        spread = (f"{_fmt(r.min_s, '.3f', 1e3)}-{_fmt(r.max_s, '.3f', 1e3)}"
                  if r.min_s is not None and r.max_s is not None else "")
        table.add_row(
            r.op if first else "", {"forward": "fwd", "backward": "bwd"}.get(r.direction, r.direction) if first else "",
            format_shape(r.shape) if first else "", r.dtype if first else "",
            r.impl, _fmt(r.median_s, ".3f", 1e3) + ("[bold yellow]![/]" if r.distrust else ""),
            spread, _fmt(r.gbps, ".1f"), _fmt(r.frac_of_limit, ".0f", 100), speedup,
            f"[{_STATUS_STYLE.get(r.status, '')}]{check}[/]", style=style)
    console.print(table)
    for note, i in notes.items():
        console.print(f"[{i}] {note}", markup=False, highlight=False)
    if skipped:
        reasons = sorted({r.note or "skipped" for r in skipped})
        console.print(f"[yellow]{len(skipped)} case(s) not run: {'; '.join(reasons)}[/]")
    shaky = [r for r in records if r.distrust]
    if shaky:
        console.print(f"[bold yellow]warning: {len(shaky)} timing(s) marked ! are not to be "
                      f"trusted (a spread over {100 * MAX_SPREAD:.0f}% of the median, or over "
                      f"{100 * MAX_FRACTION:.0f}% of the limit): the machine was busy; rerun "
                      f"when it is quiet.[/]")
        for r in shaky[:SHOW_DISTRUSTED]:
            console.print(f"  ! {r.op} {r.direction} {format_shape(r.shape)} {r.dtype} {r.impl}: "
                          f"{r.distrust}", markup=False, highlight=False)
        if len(shaky) > SHOW_DISTRUSTED:
            console.print(f"  ... and {len(shaky) - SHOW_DISTRUSTED} more (the JSON has each "
                          f"one's 'distrust')", markup=False, highlight=False)
    bad = [r for r in records if r.status in ("wrong", "error")]
    if bad:
        console.print(f"[bold red]{len(bad)} result(s) flagged WRONG or ERROR "
                      "(see the check column)[/]")


# --- The CPU limit: same access pattern, trivial math ----------------------------------------

@cache
def _limit_kernels():
    """The limit kernels, compiled on first use (importing the harness imports no Numba)."""
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def unary(x, y):
        for i in prange(x.size):
            y[i] = x[i] + x[i]

    @njit(parallel=True, cache=True)
    def binary(a, b, y):
        for i in prange(a.size):
            y[i] = a[i] * b[i]

    return unary, binary


def cpu_limit(*arrays) -> Callable[[], Any]:
    """A Numba kernel reading the inputs and writing the last array, trivial math:
    y = x + x for one input, y = a * b for two. Returns the call (it returns the output)."""
    unary, binary = _limit_kernels()
    flat = [a.reshape(-1) for a in arrays]
    if len(flat) == 2:
        x, y = flat
        return lambda: (unary(x, y), arrays[-1])[1]
    if len(flat) == 3:
        a, b, y = flat
        return lambda: (binary(a, b, y), arrays[-1])[1]
    raise ValueError("cpu_limit takes (x, y) or (a, b, y)")


def cuda_copy_limit(nbytes: int) -> Callable[[], Any]:
    """A device-to-device copy moving ``nbytes`` in all (read nbytes/2, write nbytes/2)."""
    import cupy

    half = max(1, nbytes // 2)
    src = cupy.ones(half, dtype=cupy.uint8)
    dst = cupy.empty(half, dtype=cupy.uint8)

    def copy():
        dst.data.copy_from_device_async(src.data, half)
        return dst

    return copy
