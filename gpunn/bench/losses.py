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
class Options(harness.Options):
    """What to run (``sizes``: of the MSE cases)."""

    shapes: list[tuple] | None = None  # (N, C) of cross-entropy and NLL
    ops: list[str] | None = None
    directions: list[str] | None = None


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
    parser.add_argument("--ops", type=harness.names_type(OPS, "op(s)"), metavar="OP[,OP...]",
                        help=f"ops to run (default all): {', '.join(OPS)}")
    parser.add_argument("--directions", type=harness.names_type(DIRECTIONS, "direction(s)"),
                        metavar="DIR[,DIR]", help="forward, backward or both (default both)")
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


def _shapes(spec: OpSpec, options, device: str) -> list[tuple]:
    if spec.kind == "rows":
        return [tuple(s) for s in (harness.option(options, "shapes")
                                   or (CPU_SHAPES if device == "cpu" else GPU_SHAPES))]
    sizes = harness.selected_sizes(options, CPU_SIZES if device == "cpu" else GPU_SIZES)
    return [(int(n),) for n in sizes]


# --- gpunn, reference and torch calls ---------------------------------------------------------


def _gpunn_call(spec: OpSpec, direction: str, inputs: dict, backend: str, lse=False,
                check_labels=True) -> Callable:
    """The gpunn call for a case on ``inputs`` (NumPy or CuPy arrays), returning its output;
    a backward writes into an ``out=`` array allocated here. ``lse``: the cross-entropy
    backward from the log-sum-exp its forward saves (computed here)."""
    from gpunn.backend import array_module
    from gpunn.ops import losses as L

    out = array_module(inputs["x"]).empty_like(inputs["x"]) if direction == "backward" else None
    saved = None
    if lse:
        _, saved = L.cross_entropy_forward(inputs["x"], inputs["labels"],
                                           label_smoothing=spec.eps)
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
                                            lse=saved, **kw)


def _reference(spec: OpSpec, direction: str, inputs: dict):
    """gpunn's reference on ``inputs`` (NumPy or CuPy, float64 or float32)."""
    return _gpunn_call(spec, direction, inputs, "numpy")()


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

@cache
def _limit_kernels():
    """Numba kernels with the losses' access patterns and trivial math (compiled on first
    use: importing the suite imports no Numba)."""
    from numba import njit, prange

    @njit(fastmath=True, cache=True)
    def row_sum(a):
        s = type(a[0])(0)
        for j in range(a.size):
            s += a[j]
        return s

    @njit(parallel=True, cache=True)
    def row_sums(x, labels, out):
        """out[r] = sum(x[r]) + x[r, labels[r]]: the cross-entropy forward's reads."""
        for r in prange(x.shape[0]):
            out[r] = row_sum(x[r]) + x[r, labels[r]]

    @njit(parallel=True, cache=True)
    def gather(v, labels, out):
        """out[r] = v[r, labels[r]]: the NLL forward's reads."""
        for r in prange(v.shape[0]):
            out[r] = v[r, labels[r]]

    @njit(parallel=True, cache=True)
    def fill(labels, dx):
        """dx = onehot(labels): the NLL backward's writes."""
        for r in prange(dx.shape[0]):
            row = dx[r]
            for j in range(row.size):
                row[j] = 0
            row[labels[r]] = 1

    @njit(parallel=True, fastmath=True, cache=True)
    def dot(a, b):
        """sum(a * b): the MSE forward's reads."""
        s = 0.0
        for i in prange(a.size):
            s += a[i] * b[i]
        return s

    return row_sums, gather, fill, dot


def _cpu_limit(case: Case) -> Callable:
    row_sums, gather, fill, dot = _limit_kernels()
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


def _cpu_contenders(case: Case) -> list[Contender]:
    inputs = case.inputs

    def make_gpunn(backend, lse=False):
        return lambda: _gpunn_call(case.spec, case.direction, inputs, backend, lse=lse)

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

    def __init__(self, ref, xp=np, to_native=harness.host_array):
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


def _run_cpu(runner: harness.Runner, specs, directions) -> None:
    options = runner.options
    dtypes = harness.selected_dtypes(options, CPU_DTYPES, CPU_CAN)
    rng = np.random.default_rng(runner.seed)
    for dtype in dtypes:
        for spec in specs:
            for shape in _shapes(spec, options, "cpu"):
                if runner.out_of_time():  # skipped: no set-up
                    for direction in directions:
                        runner.admit(Case("cpu", spec, direction, shape, dtype,
                                          np.dtype(dtype).itemsize).record_base())
                    continue
                raw = _inputs(spec, shape, dtype, rng, np)
                inputs = {k: v.astype(dtype) if v.dtype.kind == "f" else v
                          for k, v in raw.items()}
                f64 = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                       for k, v in inputs.items()}
                for direction in directions:
                    case = Case("cpu", spec, direction, shape, dtype, np.dtype(dtype).itemsize,
                                inputs)
                    check = _Check(_reference(spec, direction, f64))
                    runner.run_case(case.record_base(), _cpu_contenders(case), check,
                                    runner.policy_cpu, case)


# --- GPU --------------------------------------------------------------------------------------


def _gpu_contenders(case: Case, arrays: dict) -> list[Contender]:
    """arrays: name -> harness.GpuArrays (floats) or a CuPy array (labels)."""
    import cupy

    def native(name):
        a = arrays[name]
        return a if isinstance(a, cupy.ndarray) else a.native

    def make_gpunn(check_labels, lse=False):
        def make():
            inputs = {k: native(k) for k in arrays}
            if any(v is None for v in inputs.values()):
                raise TypeError(f"CuPy cannot hold {case.dtype} arrays")
            return _gpunn_call(case.spec, case.direction, inputs, "cuda", lse=lse,
                               check_labels=check_labels)
        return make

    def make_unfused():
        if case.dtype not in ("float32", "float64"):
            return None
        return _gpunn_call(case.spec, case.direction, {k: native(k) for k in arrays}, "numpy")

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


def _run_gpu(runner: harness.Runner, specs, directions) -> None:
    import cupy

    options = runner.options
    dtypes = harness.selected_dtypes(options, GPU_DTYPES, GPU_CAN)
    rng = cupy.random.default_rng(runner.seed)
    for dtype in dtypes:
        for spec in specs:
            for shape in _shapes(spec, options, "cuda"):
                raw = _inputs(spec, shape, dtype, rng, cupy)
                arrays = {k: (harness.GpuArrays(v, dtype) if v.dtype.kind == "f" else v)
                          for k, v in raw.items()}
                del raw
                f32 = {k: (v.f32 if isinstance(v, harness.GpuArrays) else v)
                       for k, v in arrays.items()}
                for direction in directions:
                    case = Case("cuda", spec, direction, shape, dtype, harness.itemsize(dtype))
                    try:
                        check = _Check(_reference(spec, direction, f32), cupy,
                                       harness.device_f32)
                    except Exception as e:  # no reference: every contender is flagged
                        check = harness.failed_check(e)
                    runner.run_case(case.record_base(), _gpu_contenders(case, arrays), check,
                                    runner.policy_gpu, case)
                    del check
                del arrays, f32
                harness.free_gpu_memory()


# --- Entry point ------------------------------------------------------------------------------


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU)."""
    options = options or Options()
    specs = [OPS[name] for name in (harness.option(options, "ops") or list(OPS))]
    directions = harness.selected(options, "directions", DIRECTIONS)
    return harness.run_suite(SUITE, options, lambda runner: _run_cpu(runner, specs, directions),
                             lambda runner: _run_gpu(runner, specs, directions),
                             extra_contenders)
