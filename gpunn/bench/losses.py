"""Losses, forward and backward: softmax cross-entropy (plain and with label smoothing 0.1),
NLL and MSE, reduction "mean", against PyTorch, NumPy/CuPy and the limit.

Cases: cross-entropy and NLL over (N, C) logits with int64 labels (CPU: 4096x1000 and
256x32768; GPU: 4096x32768 and 32768x1000), MSE over 1-D arrays (CPU 16M, GPU 64M).

Bytes each op must move (s bytes per element, 8 per label): cross-entropy forward reads
N*C*s + 8N and writes s, backward reads N*C*s + 8N and writes N*C*s; NLL forward reads
N*s + 8N (one value per row), backward writes N*C*s and reads 8N; MSE forward reads 2n*s,
backward reads 2n*s and writes n*s.

Contenders
    CPU   gpunn cpu (out= preallocated for backwards; "gpunn cpu lse": the backward from the
          forward's saved log-sum-exp), numpy (gpunn's reference backend), torch (the
          preallocated aten paths where torch has them: forward _log_softmax.out +
          nll_loss_forward.output, backward nll_loss_backward.grad_input +
          _log_softmax_backward_data.out, i.e. what autograd runs, from the saved
          log-softmax; with label smoothing torch has no such path and the torch row is
          F.cross_entropy / autograd.grad, which allocate), "torch F" / "torch autograd"
          (the public calls, allocating, as baselines), limit (a Numba kernel with the same
          access pattern and trivial math: row sums plus the label's element; a gather; a
          fill; a dot product; dx = x + x or a * b).
    GPU   gpunn cuda (check_labels=False: no host synchronization, like torch's device-side
          asserts), "gpunn cuda checked" (the default: labels checked by a kernel the host
          reads before launching, which synchronizes), gpunn cuda lse (backward), torch cuda
          (as on the CPU), cupy unfused (gpunn's reference backend on CuPy arrays,
          float32/float64), copy limit (a device-to-device copy of the same bytes).

Every contender's first output is compared with gpunn's NumPy reference on float64 (CPU) or
float32 (GPU, through CuPy) copies of the inputs; one that fails is flagged 'wrong', one that
raises 'error' (harness.run_contenders).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "losses"


@dataclass(frozen=True)
class OpSpec:
    name: str
    kind: str  # 'rows' ((N, C) and labels) | 'elementwise' (two 1-D arrays)
    eps: float = 0.0  # label smoothing


OPS = {spec.name: spec for spec in (
    OpSpec("cross_entropy", "rows"),
    OpSpec("cross_entropy_smooth", "rows", 0.1),
    OpSpec("nll_loss", "rows"),
    OpSpec("mse_loss", "elementwise"),
)}
DIRECTIONS = ("forward", "backward")
CPU_SHAPES = ((4096, 1000), (256, 32768))
GPU_SHAPES = ((4096, 32768), (32768, 1000))
CPU_SIZES = ("16M",)
GPU_SIZES = ("64M",)
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32", "bfloat16")
CPU_CAN = ("float32", "float64")
GPU_CAN = ("float32", "float64", "float16", "bfloat16")
LABEL_BYTES = 8


def n_bytes(spec: OpSpec, direction: str, shape: tuple, itemsize: int) -> int:
    """The fewest bytes the op must move (module docstring)."""
    if spec.kind == "elementwise":
        n = math.prod(shape)
        return (2 * n + 1 if direction == "forward" else 3 * n) * itemsize
    rows, cols = shape
    if spec.name == "nll_loss":
        if direction == "forward":
            return rows * (itemsize + LABEL_BYTES) + itemsize
        return rows * cols * itemsize + rows * LABEL_BYTES
    if direction == "forward":
        return rows * cols * itemsize + rows * LABEL_BYTES + itemsize
    return 2 * rows * cols * itemsize + rows * LABEL_BYTES


# --- Options ----------------------------------------------------------------------------------


@dataclass
class Options:
    """What to run; the CLI's namespace has the same attributes (all optional)."""

    device: str = "cpu"  # cpu | cuda | all
    sizes: list[int] | None = None  # MSE sizes (elements)
    shapes: list[tuple] | None = None  # (N, C) of cross-entropy and NLL
    dtypes: list[str] | None = None
    ops: list[str] | None = None
    directions: list[str] | None = None
    quick: bool = False
    seed: int = 0
    time_budget: float | None = None
    progress: bool = True


def _opt(options, name, default=None):
    value = getattr(options, name, None)
    return default if value is None else value


def _parse_ops(text: str) -> list[str]:
    try:
        return harness.parse_names(text, OPS, "op(s)")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_directions(text: str) -> list[str]:
    try:
        return harness.parse_names(text, DIRECTIONS, "direction(s)")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_shapes(text: str) -> list[tuple]:
    """'4096x1000,256x32K' -> [(4096, 1000), (256, 32768)]."""
    shapes = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        dims = part.lower().split("x")
        try:
            if len(dims) != 2:
                raise ValueError
            shapes.append(tuple(harness.parse_size(d) for d in dims))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a shape: {part!r} (use ROWSxCOLS, e.g. 4096x1000)") from None
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shapes in {text!r}")
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's own options (the common ones, --sizes for MSE included, come from the CLI)."""
    parser.add_argument("--ops", type=_parse_ops, metavar="OP[,OP...]",
                        help=f"ops to run (default all): {', '.join(OPS)}")
    parser.add_argument("--directions", type=_parse_directions, metavar="DIR[,DIR]",
                        help="forward, backward or both (default both)")
    parser.add_argument("--shapes", type=parse_shapes, metavar="NxC[,NxC...]",
                        help="cross-entropy/NLL shapes (default 4096x1000,256x32768 on the "
                             "CPU, 4096x32768,32768x1000 on the GPU)")


# --- Cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    device: str
    spec: OpSpec
    direction: str
    shape: tuple
    dtype: str
    itemsize: int
    inputs: dict = field(default_factory=dict)

    def record_base(self) -> dict:
        return dict(suite=SUITE, device=self.device, op=self.spec.name,
                    direction=self.direction, shape=list(self.shape), dtype=self.dtype,
                    bytes=n_bytes(self.spec, self.direction, self.shape, self.itemsize))

    def label(self) -> str:
        return (f"{self.spec.name} {self.direction} {harness.format_shape(self.shape)} "
                f"{self.dtype} ({self.device})")


def _shapes(spec: OpSpec, options, device: str) -> list[tuple]:
    if spec.kind == "rows":
        return [tuple(s) for s in (_opt(options, "shapes")
                                   or (CPU_SHAPES if device == "cpu" else GPU_SHAPES))]
    sizes = _opt(options, "sizes") or [harness.parse_size(s) for s in (
        CPU_SIZES if device == "cpu" else GPU_SIZES)]
    return [(int(n),) for n in sizes]


class _Runner:
    def __init__(self, options, extra_contenders):
        quick = _opt(options, "quick", False)
        self.policy_cpu = harness.QUICK_POLICY if quick else harness.CPU_POLICY
        self.policy_gpu = harness.QUICK_POLICY if quick else harness.GPU_POLICY
        budget = _opt(options, "time_budget")
        self.deadline = time.monotonic() + budget if budget else None
        self.extra = list(extra_contenders)
        self.records: list[Record] = []
        self.progress = _opt(options, "progress", True)
        self.count = 0

    def say(self, text: str) -> None:
        if self.progress:
            print(text, file=sys.stderr, flush=True)

    def run_case(self, case: Case, contenders, check, policy) -> None:
        self.count += 1
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.records.append(Record(**case.record_base(), impl="-", role="gpunn",
                                       status="skipped", note="time budget spent"))
            return
        t0 = time.monotonic()
        extra = [c for make in self.extra for c in [make(case)] if c is not None]
        records = harness.run_contenders(case.record_base(), contenders + extra, check=check,
                                         policy=policy)
        self.records.extend(records)
        self.say(f"[{self.count}] {case.label()}: {time.monotonic() - t0:.1f} s"
                 + "".join(f"; {r.impl} {r.status}" for r in records if r.status != "ok"))


# --- gpunn, reference and torch calls ---------------------------------------------------------


def _gpunn_call(spec: OpSpec, direction: str, inputs: dict, out, backend: str,
                lse=None, check_labels=True) -> Callable:
    """The gpunn call for a case, returning its output (``out`` for backwards)."""
    from gpunn.ops import losses as L

    if spec.name == "mse_loss":
        x, t = inputs["x"], inputs["t"]
        if direction == "forward":
            return lambda: L.mse_loss(x, t, backend=backend)
        return lambda: L.mse_loss_backward(1.0, x, t, out=out, backend=backend)
    x, y = inputs["x"], inputs["labels"]
    kw = dict(backend=backend, check_labels=check_labels)
    if spec.name == "nll_loss":
        if direction == "forward":
            return lambda: L.nll_loss(x, y, **kw)
        return lambda: L.nll_loss_backward(1.0, x, y, out=out, **kw)
    if direction == "forward":
        return lambda: L.cross_entropy(x, y, label_smoothing=spec.eps, **kw)
    return lambda: L.cross_entropy_backward(1.0, x, y, label_smoothing=spec.eps, out=out,
                                            lse=lse, **kw)


def _reference(spec: OpSpec, direction: str, inputs: dict, xp):
    """gpunn's reference on ``inputs`` (NumPy or CuPy, float64 or float32)."""
    out = xp.empty_like(inputs["x"]) if direction == "backward" else None
    return _gpunn_call(spec, direction, inputs, out, "numpy")()


@cache
def _aten(name: str, overload: str):
    import torch

    return getattr(getattr(torch.ops.aten, name), overload)


def _torch_calls(spec: OpSpec, direction: str, inputs: dict, dtype) -> list[tuple]:
    """[(name, role, make, note)] of the torch contenders; inputs are torch tensors."""
    import torch
    import torch.nn.functional as F

    if spec.name == "mse_loss":
        x, t = inputs["x"], inputs["t"]
        if direction == "forward":
            return [("torch", "torch", lambda: (lambda: F.mse_loss(x, t)), "")]

        def make():
            out, g = torch.empty_like(x), torch.ones((), dtype=x.dtype, device=x.device)
            f = _aten("mse_loss_backward", "grad_input")
            return lambda: f(g, x, t, 1, grad_input=out)

        return [("torch", "torch", make, "aten.mse_loss_backward.grad_input (out=)")]

    x, y = inputs["x"], inputs["labels"]
    rows = x.shape[0]
    if spec.name == "nll_loss":
        if direction == "forward":
            return [("torch", "torch", lambda: (lambda: F.nll_loss(x, y)), "")]

        def make():
            out = torch.empty_like(x)
            g = torch.ones((), dtype=x.dtype, device=x.device)
            total = torch.tensor(float(rows), dtype=x.dtype, device=x.device)
            f = _aten("nll_loss_backward", "grad_input")
            return lambda: f(g, x, y, None, 1, -100, total, grad_input=out)

        return [("torch", "torch", make, "aten.nll_loss_backward.grad_input (out=)")]

    eps = spec.eps
    if direction == "forward":
        public = ("torch F" if eps == 0 else "torch", "baseline" if eps == 0 else "torch",
                  lambda: (lambda: F.cross_entropy(x, y, label_smoothing=eps)),
                  "F.cross_entropy (allocates the log-softmax)")
        if eps:
            return [public]

        def make():
            logp, loss = torch.empty_like(x), torch.empty((), dtype=x.dtype, device=x.device)
            total = torch.empty((), dtype=x.dtype, device=x.device)
            log_softmax = _aten("_log_softmax", "out")
            nll = _aten("nll_loss_forward", "output")

            def call():
                log_softmax(x, 1, False, out=logp)
                nll(logp, y, None, 1, -100, output=loss, total_weight=total)
                return loss

            return call

        return [("torch", "torch", make, "_log_softmax.out + nll_loss_forward.output"), public]

    def make_autograd():
        xr = x.detach().clone().requires_grad_()
        loss = F.cross_entropy(xr, y, label_smoothing=eps)
        return lambda: torch.autograd.grad(loss, xr, retain_graph=True)[0]

    public = ("torch autograd" if eps == 0 else "torch", "baseline" if eps == 0 else "torch",
              make_autograd, "autograd.grad of F.cross_entropy (allocates)")
    if eps:
        return [public]

    def make():
        logp = torch.log_softmax(x, 1)  # what autograd saved in the forward
        g_nll, out = torch.empty_like(x), torch.empty_like(x)
        g = torch.ones((), dtype=x.dtype, device=x.device)
        total = torch.tensor(float(rows), dtype=x.dtype, device=x.device)
        nll_backward = _aten("nll_loss_backward", "grad_input")
        log_softmax_backward = _aten("_log_softmax_backward_data", "out")

        def call():
            nll_backward(g, logp, y, None, 1, -100, total, grad_input=g_nll)
            log_softmax_backward(g_nll, logp, 1, x.dtype, out=out)
            return out

        return call

    return [("torch", "torch", make,
             "nll_loss_backward.grad_input + _log_softmax_backward_data.out from the saved "
             "log-softmax"), public]


# --- CPU --------------------------------------------------------------------------------------

from numba import njit, prange  # noqa: E402  (a dependency; these compile at first use)


@njit(fastmath=True, cache=True)
def _limit_row_sum(a):
    s = type(a[0])(0)
    for j in range(a.size):
        s += a[j]
    return s


@njit(parallel=True, cache=True)
def _limit_row_sums(x, labels, out):
    """out[r] = sum(x[r]) + x[r, labels[r]]: the cross-entropy forward's reads."""
    for r in prange(x.shape[0]):
        out[r] = _limit_row_sum(x[r]) + x[r, labels[r]]


@njit(parallel=True, cache=True)
def _limit_gather(v, labels, out):
    """out[r] = v[r, labels[r]]: the NLL forward's reads."""
    for r in prange(v.shape[0]):
        out[r] = v[r, labels[r]]


@njit(parallel=True, cache=True)
def _limit_fill(labels, dx):
    """dx = onehot(labels): the NLL backward's writes."""
    for r in prange(dx.shape[0]):
        row = dx[r]
        for j in range(row.size):
            row[j] = 0
        row[labels[r]] = 1


@njit(parallel=True, fastmath=True, cache=True)
def _limit_dot(a, b):
    """sum(a * b): the MSE forward's reads."""
    s = 0.0
    for i in prange(a.size):
        s += a[i] * b[i]
    return s


def _cpu_limit(case: Case) -> Callable:
    row_sums, gather, fill, dot = _limit_row_sums, _limit_gather, _limit_fill, _limit_dot
    inputs = case.inputs
    if case.spec.kind == "elementwise":
        x, t = inputs["x"], inputs["t"]
        if case.direction == "forward":
            return lambda: dot(x, t)
        return harness.cpu_limit(x, t, np.empty_like(x))
    x, y = inputs["x"], inputs["labels"]
    rows = np.empty(x.shape[0], dtype=x.dtype)
    if case.spec.name == "nll_loss":
        if case.direction == "forward":
            return lambda: (gather(x, y, rows), rows.sum())[1]
        dx = np.empty_like(x)
        return lambda: (fill(y, dx), dx)[1]
    if case.direction == "forward":
        return lambda: (row_sums(x, y, rows), rows.sum())[1]
    return harness.cpu_limit(x, np.empty_like(x))


def _host(out) -> np.ndarray:
    if isinstance(out, np.ndarray):
        return out
    if type(out).__module__.split(".")[0] == "torch":
        return out.detach().numpy()
    return np.asarray(out)


def _cpu_contenders(case: Case) -> list[Contender]:
    inputs = case.inputs

    def make_gpunn(backend, lse=False):
        def make():
            out = np.empty_like(inputs["x"]) if case.direction == "backward" else None
            saved = None
            if lse:
                from gpunn.ops import losses as L

                _, saved = L.cross_entropy_forward(inputs["x"], inputs["labels"],
                                                   label_smoothing=case.spec.eps)
            return _gpunn_call(case.spec, case.direction, inputs, out, backend, lse=saved)
        return make

    contenders = [
        Contender("numpy", "baseline", make_gpunn("numpy")),
        Contender("gpunn cpu", "gpunn", make_gpunn("cpu")),
    ]
    if case.spec.name.startswith("cross_entropy") and case.direction == "backward":
        contenders.append(Contender("gpunn cpu lse", "gpunn", make_gpunn("cpu", lse=True)))
    if importlib.util.find_spec("torch") is not None:
        import torch

        tinputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
        for name, role, make, note in _torch_calls(case.spec, case.direction, tinputs,
                                                   case.dtype):
            contenders.append(Contender(name, role, make, note=note))
    contenders.append(Contender("limit", "limit", lambda: _cpu_limit(case), check=False))
    return contenders


class _Check:
    """Compares each output with a reference computed once (float64 on the host, float32
    through CuPy on the GPU)."""

    def __init__(self, ref, xp=np, to_native=_host):
        self.ref, self.xp, self.to_native = ref, xp, to_native

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        return harness.rel_err(self.to_native(out), self.ref, xp=self.xp), ""


def _inputs(spec: OpSpec, shape: tuple, dtype, rng, xp) -> dict:
    """Host or device inputs of a case in float32 (the caller rounds them to the dtype)."""
    if spec.kind == "elementwise":
        return {"x": rng.standard_normal(shape, dtype=xp.float32),
                "t": rng.standard_normal(shape, dtype=xp.float32)}
    rows, cols = shape
    x = 2 * rng.standard_normal(shape, dtype=xp.float32)
    labels = rng.integers(0, cols, rows).astype(xp.int64)
    if spec.name == "nll_loss":  # log-probabilities
        from gpunn.ops.softmax import log_softmax

        x = log_softmax(x, backend="numpy")
    return {"x": x, "labels": labels}


def _run_cpu(runner: _Runner, specs, directions, options) -> None:
    dtypes = [d for d in (_opt(options, "dtypes") or CPU_DTYPES) if d in CPU_CAN]
    rng = np.random.default_rng(_opt(options, "seed", 0))
    for dtype in dtypes:
        for spec in specs:
            for shape in _shapes(spec, options, "cpu"):
                raw = _inputs(spec, shape, dtype, rng, np)
                inputs = {k: v.astype(dtype) if v.dtype.kind == "f" else v
                          for k, v in raw.items()}
                f64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                       for k, v in inputs.items()}
                for direction in directions:
                    case = Case("cpu", spec, direction, shape, dtype, np.dtype(dtype).itemsize,
                                inputs)
                    check = _Check(_reference(spec, direction, f64, np))
                    runner.run_case(case, _cpu_contenders(case), check, runner.policy_cpu)


# --- GPU --------------------------------------------------------------------------------------


def _gpu_contenders(case: Case, arrays: dict) -> list[Contender]:
    """arrays: name -> activations._GpuArrays (floats) or a CuPy array (labels)."""
    import cupy

    def native(name):
        a = arrays[name]
        return a if isinstance(a, cupy.ndarray) else a.native

    def make_gpunn(check_labels, lse=False):
        def make():
            inputs = {k: native(k) for k in arrays}
            if any(v is None for v in inputs.values()):
                raise TypeError(f"CuPy cannot hold {case.dtype} arrays")
            out = cupy.empty_like(inputs["x"]) if case.direction == "backward" else None
            saved = None
            if lse:
                from gpunn.ops import losses as L

                _, saved = L.cross_entropy_forward(inputs["x"], inputs["labels"],
                                                   label_smoothing=case.spec.eps)
            return _gpunn_call(case.spec, case.direction, inputs, out, "cuda", lse=saved,
                               check_labels=check_labels)
        return make

    def make_unfused():
        if case.dtype not in ("float32", "float64"):
            return None
        inputs = {k: native(k) for k in arrays}
        out = cupy.empty_like(inputs["x"]) if case.direction == "backward" else None
        return _gpunn_call(case.spec, case.direction, inputs, out, "numpy")

    rows_op = case.spec.kind == "rows"
    contenders = [Contender("gpunn cuda", "gpunn", make_gpunn(False), clock="cupy",
                            note="check_labels=False" if rows_op else "")]
    if rows_op:
        contenders.append(Contender("gpunn cuda checked", "baseline", make_gpunn(True),
                                    clock="cupy", note="labels checked (synchronizes)"))
    if case.spec.name.startswith("cross_entropy") and case.direction == "backward":
        contenders.append(Contender("gpunn cuda lse", "gpunn", make_gpunn(False, lse=True),
                                    clock="cupy"))
    try:
        import torch

        if torch.cuda.is_available():
            tinputs = {k: (torch.from_dlpack(v) if isinstance(v, cupy.ndarray) else v.torch())
                       for k, v in arrays.items()}
            for name, role, make, note in _torch_calls(case.spec, case.direction, tinputs,
                                                       case.dtype):
                contenders.append(Contender(name + (" cuda" if name == "torch" else ""), role,
                                            make, clock="torch", note=note))
    except ImportError:
        pass
    nbytes = n_bytes(case.spec, case.direction, case.shape, case.itemsize)
    contenders += [
        Contender("cupy unfused", "baseline", make_unfused, clock="cupy"),
        Contender("copy limit", "limit", lambda: harness.cuda_copy_limit(nbytes), clock="cupy",
                  check=False),
    ]
    return contenders


def _run_gpu(runner: _Runner, specs, directions, options) -> None:
    import cupy

    from .activations import _device_f32, _GpuArrays, _itemsize

    dtypes = [d for d in (_opt(options, "dtypes") or GPU_DTYPES) if d in GPU_CAN]
    rng = cupy.random.default_rng(_opt(options, "seed", 0))
    for dtype in dtypes:
        for spec in specs:
            for shape in _shapes(spec, options, "cuda"):
                raw = _inputs(spec, shape, dtype, rng, cupy)
                arrays = {k: (_GpuArrays(v, dtype) if v.dtype.kind == "f" else v)
                          for k, v in raw.items()}
                del raw
                f32 = {k: (v.f32 if isinstance(v, _GpuArrays) else v) for k, v in arrays.items()}
                for direction in directions:
                    case = Case("cuda", spec, direction, shape, dtype, _itemsize(dtype))
                    try:
                        check = _Check(_reference(spec, direction, f32, cupy), cupy, _device_f32)
                    except Exception as e:  # no reference: every contender is flagged
                        check = _failed_check(e)
                    runner.run_case(case, _gpu_contenders(case, arrays), check,
                                    runner.policy_gpu)
                    del check
                del arrays, f32
                cupy.get_default_memory_pool().free_all_blocks()
                if "torch" in sys.modules:
                    sys.modules["torch"].cuda.empty_cache()


def _failed_check(error: Exception):
    def check(contender, out):
        raise RuntimeError(f"no reference: {type(error).__name__}: {error}")
    return check


def _gpu_ready() -> str | None:
    from gpunn import backend

    if not backend.has_cupy():
        return "CuPy is not installed"
    if backend.cuda_device_count() == 0:
        return "CuPy sees no CUDA device"
    return None


# --- Entry point ------------------------------------------------------------------------------


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU)."""
    options = options or Options()
    specs = [OPS[name] for name in (_opt(options, "ops") or list(OPS))]
    directions = [d for d in DIRECTIONS if d in (_opt(options, "directions") or DIRECTIONS)]
    device = _opt(options, "device", "cpu")
    if device not in ("cpu", "cuda", "all"):
        raise ValueError(f"device must be cpu, cuda or all, got {device!r}")
    runner = _Runner(options, extra_contenders)
    try:
        if device in ("cpu", "all"):
            _run_cpu(runner, specs, directions, options)
        if device in ("cuda", "all"):
            why = _gpu_ready()
            if why is None:
                _run_gpu(runner, specs, directions, options)
            elif device == "cuda":
                raise RuntimeError(f"--device cuda: {why}")
            else:
                runner.say(f"GPU part skipped: {why}")
    except KeyboardInterrupt:
        runner.say("interrupted: writing the results measured so far")
        runner.records.append(Record(suite=SUITE, device=device, op="*", direction="*",
                                     shape=[0], dtype="*", impl="-", role="gpunn", bytes=0,
                                     status="skipped", note="interrupted"))
    return harness.finalize(runner.records)
