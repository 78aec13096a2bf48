"""Optimizer steps: gpunn's fused step against torch.optim's variants, NumPy and the limit.

Cases: one step of SGD (momentum 0.9), Adagrad, RMSprop, Adam and AdamW (torch's defaults
otherwise) over many parameter tensors of mixed sizes (default: 16M float32 parameters in 200
tensors on the CPU; 100M in 200 tensors, and 2,000 tensors of 10k, on the GPU).

Overhead (CPU, on by default, ``--no-overhead`` to leave out): one step of SGD, Adam and
AdamW over 200 tensors of 8 elements, direction 'overhead': the step is all Python, checks
and launch cost, what a model of many small tensors pays on every step. Contenders: gpunn
cpu (gpunn.torch on CPU tensors), gpunn.optim cpu (gpunn.optim on NumPy arrays, the Numba
kernels), gpunn numpy and torch fused / foreach / for-loop; no limit (nothing to move).

Bytes per parameter (the fewest a step must move): Adam/AdamW read p, g, m, v and write p,
m, v (28 for float32; 22 for bfloat16 parameters with float32 states); SGD with momentum,
Adagrad and RMSprop read p, g, one state and write p and the state (20 for float32).

Contenders
    CPU   gpunn cpu (gpunn.torch's optimizer on the same CPU tensors: the Numba kernels),
          gpunn numpy (gpunn.optim with backend='numpy': the unfused reference), torch
          fused / foreach / for-loop (each where torch has it), limit (a Numba kernel over
          flat arrays with the same reads and writes and trivial math).
    GPU   gpunn cuda (gpunn.torch on CUDA tensors), torch fused / foreach, limit (a
          device-to-device copy of the same bytes). bfloat16 cases give gpunn float32 states;
          torch keeps bfloat16 states (the note says so).

Each contender's first step is compared with torch's for-loop step from the same start.
"vs torch" is against the fastest torch variant of the case (named in the note).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "optim"

#: Algorithm -> (torch class name, options, states per parameter).
ALGORITHMS = {
    "sgd": ("SGD", dict(lr=1e-3, momentum=0.9), 1),
    "adagrad": ("Adagrad", dict(lr=1e-2), 1),
    "rmsprop": ("RMSprop", dict(lr=1e-3), 1),
    "adam": ("Adam", dict(lr=1e-3), 2),
    "adamw": ("AdamW", dict(lr=1e-3), 2),
}
TORCH_VARIANTS = ("fused", "foreach", "for-loop")
CPU_TOTAL, CPU_TENSORS = "16M", 200
#: The overhead case: tensors x elements, and its algorithms.
OVERHEAD_TENSORS, OVERHEAD_ELEMENTS = 200, 8
OVERHEAD_ALGORITHMS = ("sgd", "adam", "adamw")
GPU_CASES = (("100M", 200), ("20000000", 2000))  # (total parameters, tensors)


@dataclass
class Options(harness.Options):
    """What to run (``sizes``: total parameters per case)."""

    tensors: int | None = None
    algorithms: list[str] | None = None
    overhead: bool | None = None  # the overhead case (None: on, CPU only)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algorithms", type=harness.names_type(ALGORITHMS, "algorithm(s)"),
                        metavar="NAME[,NAME...]",
                        help=f"optimizers to run (default all): {', '.join(ALGORITHMS)}")
    parser.add_argument("--tensors", type=int, metavar="N",
                        help=f"tensors the parameters are split into (default {CPU_TENSORS})")
    parser.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=None,
                        help=f"the per-step overhead case on the CPU: {OVERHEAD_TENSORS} "
                             f"tensors of {OVERHEAD_ELEMENTS} elements (default on)")


def tensor_sizes(total: int, count: int, seed: int) -> list[int]:
    """``count`` sizes summing to ``total``, spread over two decades like a real model's."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(0.0, np.log(100.0), count))
    sizes = np.maximum(1, np.floor(weights / weights.sum() * total)).astype(np.int64)
    sizes[0] += total - sizes.sum()
    return [int(s) for s in sizes]


def step_bytes(algorithm: str, n: int, param_itemsize: int, state_itemsize: int) -> int:
    states = ALGORITHMS[algorithm][2]
    return n * (3 * param_itemsize + 2 * states * state_itemsize)


# --- The limit on the CPU: same reads and writes over flat arrays ---------------------------

try:
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def _limit_one_state(p, g, s):
        for i in prange(p.size):
            s[i] = s[i] + g[i]
            p[i] = p[i] + g[i]

    @njit(parallel=True, cache=True)
    def _limit_two_states(p, g, m, v):
        for i in prange(p.size):
            m[i] = m[i] + g[i]
            v[i] = v[i] + g[i]
            p[i] = p[i] + g[i]
except ImportError:  # pragma: no cover - numba is a dependency
    _limit_one_state = _limit_two_states = None


# --- Cases ----------------------------------------------------------------------------------


def _torch_optimizer(torch, algorithm, params, variant):
    name, options, _ = ALGORITHMS[algorithm]
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True),
             "for-loop": dict(foreach=False)}[variant]
    return getattr(torch.optim, name)(params, **options, **flags)


def _case(runner, device, algorithm, sizes, dtype, overhead=False):
    """Contenders of one case, all starting from the same parameters and gradients
    (``overhead``: the overhead case's contenders and direction)."""
    import torch

    import gpunn.torch as gt

    from ..nn import Parameter
    from ..optim import optimizer as gpunn_optim

    total = sum(sizes)
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(runner.seed)
    dev = "cuda" if device == "cuda" else "cpu"
    init = [torch.randn(n, generator=gen).to(dev, tdtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dev, tdtype) for n in sizes]

    def torch_params():
        params = [torch.nn.Parameter(x.clone()) for x in init]
        for p, g in zip(params, grads):
            p.grad = g
        return params

    reference = torch_params()
    _torch_optimizer(torch, algorithm, reference, "for-loop").step()
    ref = torch.cat([p.detach().float().cpu() for p in reference]).numpy()
    del reference

    def check(contender, out):
        got = np.concatenate([np.asarray(o.detach().float().cpu()) if hasattr(o, "detach")
                              else np.asarray(o).astype(np.float32) for o in out])
        return harness.rel_err(got, ref), ""

    def stepper(opt, params):
        return lambda: (opt.step(), params)[1]

    def make_gpunn():
        params = torch_params()
        name, options, _ = ALGORITHMS[algorithm]
        return stepper(getattr(gt, name)(params, **options), params)

    def make_gpunn_optim(backend):
        def make():
            if device != "cpu" or dtype not in ("float32", "float64"):
                return None
            params = [Parameter(x.numpy().copy(), g.numpy()) for x, g in zip(init, grads)]
            name, options, _ = ALGORITHMS[algorithm]
            opt = getattr(gpunn_optim, name)(params, **options, backend=backend)
            return lambda: (opt.step(), [p.data for p in params])[1]
        return make

    def make_torch(variant):
        def make():
            params = torch_params()
            try:
                opt = _torch_optimizer(torch, algorithm, params, variant)
            except (RuntimeError, ValueError, TypeError) as e:
                runner.say(f"  torch {variant}: not available ({str(e).splitlines()[0][:80]})")
                return None
            return stepper(opt, params)
        return make

    itemsize = torch.empty((), dtype=tdtype).element_size()
    state_itemsize = 4 if itemsize == 2 else itemsize
    nbytes = step_bytes(algorithm, total, itemsize, state_itemsize)

    def make_limit():
        if device == "cuda":
            return harness.cuda_copy_limit(nbytes)
        flat = [np.ones(total, dtype) for _ in range(2 + ALGORITHMS[algorithm][2])]
        flat[1] *= 1e-7
        kernel = _limit_two_states if len(flat) == 4 else _limit_one_state
        return lambda: kernel(*flat)

    clock = "torch" if device == "cuda" else "cpu"
    contenders = [Contender(f"gpunn {device}", "gpunn", make_gpunn, clock=clock)]
    if overhead:
        contenders.append(Contender("gpunn.optim cpu", "gpunn", make_gpunn_optim("cpu")))
    if device == "cpu":
        contenders.append(Contender("gpunn numpy", "baseline", make_gpunn_optim("numpy")))
    variants = TORCH_VARIANTS if device == "cpu" else TORCH_VARIANTS[:2]
    note = "torch keeps bfloat16 states" if itemsize == 2 else ""
    contenders += [Contender(f"torch {v}", "baseline", make_torch(v), clock=clock, note=note)
                   for v in variants]
    if not overhead:
        contenders.append(Contender("limit", "limit", make_limit, clock=clock if device == "cuda"
                                    else "cpu", check=False))
    base = dict(suite=SUITE, device=device, op=algorithm,
                direction="overhead" if overhead else "step",
                shape=[total, len(sizes)], dtype=dtype, bytes=nbytes)
    return base, contenders, check


def _fastest_torch(records: list[Record]) -> None:
    """'vs torch' against the fastest torch variant of each case."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    for group in groups.values():
        torch_runs = [r for r in group if r.impl.startswith("torch") and r.status == "ok"
                      and r.median_s]
        if not torch_runs:
            continue
        best = min(torch_runs, key=lambda r: r.median_s)
        best.role = "torch"
        for r in group:
            if r.median_s and r.role != "limit":
                r.speedup_vs_torch = best.median_s / r.median_s


def _run_case(runner: harness.Runner, device, algorithm, sizes, dtype, overhead=False) -> None:
    """One case: skipped once the time budget is spent, else set up and measured."""
    label = (f"{device} {algorithm} {dtype} {harness.format_size(sum(sizes))} in {len(sizes)}"
             + (" (overhead)" if overhead else ""))
    if not runner.admit(dict(suite=SUITE, device=device, op=algorithm,
                             direction="overhead" if overhead else "step",
                             shape=[sum(sizes), len(sizes)], dtype=dtype, bytes=0)):
        return
    t0 = time.monotonic()
    base, contenders, check = _case(runner, device, algorithm, sizes, dtype, overhead)
    policy = runner.policy_gpu if device == "cuda" else runner.policy_cpu
    records = runner.measure(base, contenders, check, policy)
    runner.say(f"{label}: {time.monotonic() - t0:.1f} s"
               + "".join(f"; {r.impl} {r.status} {r.note}" for r in records
                         if r.status != "ok"))


def _run_cpu(runner: harness.Runner, algorithms) -> None:
    options = runner.options
    for total in harness.option(options, "sizes") or [harness.parse_size(CPU_TOTAL)]:
        sizes = tensor_sizes(total, min(total, harness.option(options, "tensors", CPU_TENSORS)),
                             runner.seed)
        for dtype in harness.selected_dtypes(options, ["float32"], ("float32", "float64")):
            for algorithm in algorithms:
                _run_case(runner, "cpu", algorithm, sizes, dtype)
    if harness.option(options, "overhead", True):
        sizes = [OVERHEAD_ELEMENTS] * OVERHEAD_TENSORS
        for dtype in harness.selected_dtypes(options, ["float32"], ("float32", "float64")):
            for algorithm in algorithms:
                if algorithm in OVERHEAD_ALGORITHMS:
                    _run_case(runner, "cpu", algorithm, sizes, dtype, overhead=True)


def _run_gpu(runner: harness.Runner, algorithms) -> None:
    import torch

    options = runner.options
    cases = ([(t, harness.option(options, "tensors", 200)) for t in options.sizes]
             if harness.option(options, "sizes") else
             [(harness.parse_size(t), n) for t, n in GPU_CASES])
    for total, count in cases:
        sizes = tensor_sizes(total, count, runner.seed)
        for dtype in harness.option(options, "dtypes") or ["float32", "bfloat16"]:
            for algorithm in algorithms:
                if dtype == "bfloat16" and algorithm not in ("adam", "adamw"):
                    continue
                _run_case(runner, "cuda", algorithm, sizes, dtype)
                torch.cuda.empty_cache()


def run(options=None) -> list[Record]:
    """Run the suite (CPU and/or GPU cases); returns finalized records."""
    options = options or Options()
    algorithms = harness.option(options, "algorithms") or list(ALGORITHMS)
    records = harness.run_suite(SUITE, options, lambda runner: _run_cpu(runner, algorithms),
                                lambda runner: _run_gpu(runner, algorithms))
    _fastest_torch(records)
    return records
