"""Running cases: check and time the contenders of a case, the runner, a suite's ``run``.

Time budget: a :class:`Runner` with a time budget starts no case once it is spent (the rest
are recorded as skipped) and cuts the repetitions of the case in progress at the deadline
(each contender keeps at least one timed call), so a run ends within about one case's checking
and warm-up calls after the budget. Its clock is injectable (tests use a fake).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from . import timing as _timing
from .gpu import gpu_ready
from .options import DEVICES, case_label, option
from .records import CHECK_TOLERANCE, Contender, Record, finalize, passes
from .timing import CPU_POLICY, GPU_POLICY, QUICK_POLICY, Policy, time_call, time_cpu_interleaved

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


class Runner:
    """Runs the cases of one suite invocation: the time budget, the progress lines, the records.

    ``options``: the suite's options (quick, seed, time_budget, progress are read here).
    ``extra_contenders``: callables ``f(case) -> Contender | None`` adding contenders to each
    case (the tests add wrong or broken ones). ``clock``: seconds (default
    :data:`.timing.default_clock`); the budget runs from the Runner's creation."""

    def __init__(self, options, extra_contenders=(), clock: Callable[[], float] | None = None):
        self.options = options
        quick = option(options, "quick", False)
        self.policy_cpu = QUICK_POLICY if quick else CPU_POLICY
        self.policy_gpu = QUICK_POLICY if quick else GPU_POLICY
        self.seed = option(options, "seed", 0)
        self.clock = clock or _timing.default_clock  # looked up here, not at import: tests replace it
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
