"""Batch normalization and BN + ReLU, training forward and backward, against PyTorch,
NumPy/CuPy and a same-pattern limit.

Cases: shapes in NCHW terms (default CPU 64x64x56x56 and 256x1024, GPU 64x256x32x32 and
1024x64x8x8; ``--shapes``), layouts nchw and, with ``--layouts nchw,nhwc``, channels last (the
NHWC array, channels on the last axis: gpunn's ``channels_last=True``, torch's channels_last
memory format), ops batch_norm and batch_norm_relu, directions forward (training: statistics,
running statistics, y) and backward (training: dx, dweight, dbias from the saved mean/invstd).
Weight, bias and running statistics are float32 (for 16-bit x too, as under autocast).

Bytes counted (the two-pass traffic every contender must move without holding the batch on
chip; per-channel arrays are negligible): forward reads x twice (statistics, then normalize)
and writes y: 3 arrays; backward reads dy and x twice (the two sums, then dx) and writes dx:
5 arrays. BN + ReLU the same (its backward recomputes the mask from x).

Contenders
    CPU   gpunn cpu (out= preallocated), numpy (gpunn's reference backend), torch
          (``aten.native_batch_norm.out`` / ``native_batch_norm_backward.out`` into preallocated
          tensors; BN + ReLU adds ``relu_`` on y, and ``threshold_backward`` on dy (masked by
          the reference's y) before the backward: what nn.ReLU(inplace=True) after
          nn.BatchNorm costs), limit (a Numba kernel
          with the same passes and trivial math: forward a vectorized sum over x, then
          y = x + x; backward a sum of dy * x, then dx = dy * x).
    GPU   gpunn cuda, torch cuda (forward ``torch.batch_norm``, which picks cuDNN where it can;
          backward ``aten.cudnn_batch_norm_backward`` from a ``cudnn_batch_norm`` forward, else
          ``native_batch_norm_backward``; the note says which), cupy unfused (gpunn's reference
          backend on CuPy arrays, float32 only), copy limit (a device-to-device copy of the same
          bytes).

Before timing, each contender's y (forward) or dx (backward) is compared with gpunn's NumPy
reference (on the GPU: run through CuPy on float32 values of the inputs). The common ``--sizes``
option does not apply here (use ``--shapes``).
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "batchnorm"
OPS = ("batch_norm", "batch_norm_relu")
DIRECTIONS = ("forward", "backward")
LAYOUTS = ("nchw", "nhwc")
CPU_SHAPES = ((64, 64, 56, 56), (256, 1024))
GPU_SHAPES = ((64, 256, 32, 32), (1024, 64, 8, 8))
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32", "bfloat16")
CPU_CAN = ("float32", "float64")
GPU_CAN = ("float32", "float64", "float16", "bfloat16")
MOMENTUM, EPS = 0.1, 1e-5


def n_bytes(direction: str, size: int, itemsize: int) -> int:
    """Two passes: forward reads x twice and writes y; backward reads dy and x twice and
    writes dx."""
    return (3 if direction == "forward" else 5) * size * itemsize


# --- Options ----------------------------------------------------------------------------------


@dataclass
class Options(harness.Options):
    """What to run (``sizes`` does not apply: ``shapes`` says what to run on)."""

    shapes: list[tuple] | None = None  # NCHW shapes
    layouts: list[str] | None = None
    ops: list[str] | None = None
    directions: list[str] | None = None


def parse_shapes(text: str) -> list[tuple]:
    """'64x64x56x56,256x1024' -> [(64, 64, 56, 56), (256, 1024)]: at least 2 dimensions."""
    shapes = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            shape = tuple(int(s) for s in part.strip().lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a shape: {part!r} (use NxCxHxW)") from None
        if len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"a shape needs N, C (and spatial sizes), each "
                                             f">= 1: {part!r}")
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError(f"no shapes in {text!r}")
    return shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's own command-line options (the common ones come from the CLI)."""
    parser.add_argument("--shapes", type=parse_shapes, metavar="NxCxHxW[,...]",
                        help="NCHW shapes (default CPU 64x64x56x56,256x1024; GPU "
                             "64x256x32x32,1024x64x8x8)")
    parser.add_argument("--layouts", type=harness.names_type(LAYOUTS, "layout(s)"),
                        metavar="L[,L]", help="nchw and/or nhwc (channels last); default nchw")
    parser.add_argument("--ops", type=harness.names_type(OPS, "op(s)"), metavar="OP[,OP]",
                        help=f"any of {', '.join(OPS)} (default both)")
    parser.add_argument("--directions", type=harness.names_type(DIRECTIONS, "direction(s)"),
                        metavar="DIR[,DIR]", help="forward, backward or both (default both)")


# --- Cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (op, direction, shape, layout, dtype) on one device. ``shape`` is NCHW; the arrays
    are NHWC for layout nhwc. inputs: native arrays [x, dy, w, b, mean, invstd] (float32
    per-channel arrays; mean/invstd from the reference forward)."""

    device: str
    op: str
    direction: str
    shape: tuple
    layout: str
    dtype: str
    inputs: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def channels_last(self) -> bool:
        return self.layout == "nhwc"

    @property
    def relu(self) -> bool:
        return self.op == "batch_norm_relu"

    @property
    def label_op(self) -> str:
        return self.op if self.layout == "nchw" or len(self.shape) == 2 else f"{self.op} nhwc"

    def record_base(self) -> dict:
        return dict(suite=SUITE, device=self.device, op=self.label_op,
                    direction=self.direction, shape=list(self.shape), dtype=self.dtype,
                    bytes=n_bytes(self.direction, self.size, harness.itemsize(self.dtype)))


def _array_shape(shape: tuple, layout: str) -> tuple:
    return (shape[0], *shape[2:], shape[1]) if layout == "nhwc" and len(shape) > 2 else shape


def _cases(options, device: str, dtypes: list[str]):
    shapes = harness.option(options, "shapes") or (CPU_SHAPES if device == "cpu" else GPU_SHAPES)
    layouts = harness.option(options, "layouts") or ("nchw",)
    ops = harness.selected(options, "ops", OPS)
    directions = harness.selected(options, "directions", DIRECTIONS)
    for dtype in dtypes:
        for shape in shapes:
            for layout in layouts:
                if layout == "nhwc" and len(shape) == 2 and "nchw" in layouts:
                    continue  # (N, C) has one layout
                yield dtype, tuple(shape), layout, ops, directions


def _gpunn_call(case: Case, backend: str, rm, rv) -> Callable:
    """f(out) -> y or dx: the training forward (updating rm, rv) or the backward."""
    from gpunn.ops import batchnorm as bn

    x, dy, w, b, mean, invstd = case.inputs
    cl = case.channels_last
    if case.direction == "forward":
        fwd = bn.batch_norm_relu if case.relu else bn.batch_norm
        return lambda out: fwd(x, rm, rv, w, b, True, MOMENTUM, EPS, channels_last=cl, out=out,
                               backend=backend)
    if case.relu:
        return lambda out: bn.batch_norm_relu_backward(dy, x, mean, invstd, w, b,
                                                       channels_last=cl, out=out,
                                                       backend=backend)[0]
    return lambda out: bn.batch_norm_backward(dy, x, mean, invstd, w, channels_last=cl, out=out,
                                              backend=backend)[0]


# --- CPU --------------------------------------------------------------------------------------

LIMIT_CHUNK = 1 << 16


@cache
def _limit_kernels():
    """Numba kernels with batch norm's passes and trivial math (compiled on first use)."""
    from numba import njit, prange

    @njit(fastmath={"reassoc", "nsz"}, cache=True)
    def chunk_sum(a):
        s = type(a[0])(0)
        for i in range(a.size):
            s += a[i]
        return s

    @njit(fastmath={"reassoc", "nsz"}, cache=True)
    def chunk_dot(a, b):
        s = type(a[0])(0)
        for i in range(a.size):
            s += a[i] * b[i]
        return s

    @njit(parallel=True, cache=True)
    def forward(x, y):
        n = x.size
        chunks = (n + LIMIT_CHUNK - 1) // LIMIT_CHUNK
        part = np.empty(chunks)
        for c in prange(chunks):
            part[c] = chunk_sum(x[c * LIMIT_CHUNK:min(n, (c + 1) * LIMIT_CHUNK)])
        for i in prange(n):
            y[i] = x[i] + x[i]
        return part.sum()

    @njit(parallel=True, cache=True)
    def backward(dy, x, dx):
        n = x.size
        chunks = (n + LIMIT_CHUNK - 1) // LIMIT_CHUNK
        part = np.empty(chunks)
        for c in prange(chunks):
            lo, hi = c * LIMIT_CHUNK, min(n, (c + 1) * LIMIT_CHUNK)
            part[c] = chunk_dot(dy[lo:hi], x[lo:hi])
        for i in prange(n):
            dx[i] = dy[i] * x[i]
        return part.sum()

    return forward, backward


def cpu_limit(direction: str, x, dy, out) -> Callable[[], Any]:
    """The limit contender's call: forward (x -> out) or backward (dy, x -> out)."""
    forward, backward = _limit_kernels()
    xf, dyf, of = x.reshape(-1), dy.reshape(-1), out.reshape(-1)
    if direction == "forward":
        return lambda: (forward(xf, of), out)[1]
    return lambda: (backward(dyf, xf, of), out)[1]


def _torch_views(case: Case, tensors):
    """The tensors x, dy as torch sees them (logical NCHW; the channels_last memory format for
    nhwc) and the view that turns an NCHW result back into the arrays' layout."""
    x, dy = tensors
    if case.channels_last and len(case.shape) > 2:
        nd = x.dim()
        to_nchw = (0, nd - 1, *range(1, nd - 1))
        back = (0, *range(2, nd), 1)
        return x.permute(to_nchw), dy.permute(to_nchw), lambda t: t.permute(back)
    return x, dy, lambda t: t


def _torch_cpu(case: Case, bufs: dict) -> Callable[[], Any]:
    import torch

    aten = torch.ops.aten
    x_np, dy_np, w, b, mean, invstd = case.inputs
    x, dy, back = _torch_views(case, [torch.from_numpy(x_np), torch.from_numpy(dy_np)])
    w, b, mean, invstd = (torch.from_numpy(a) for a in (w, b, mean, invstd))
    out = torch.from_numpy(bufs["torch"])
    out_v = _torch_views(case, [out, out])[0]  # the NCHW view of out
    C = w.shape[0]
    rm, rv = torch.zeros(C), torch.ones(C)
    sm, si = torch.empty(C), torch.empty(C)
    if case.direction == "forward":
        def forward():
            aten.native_batch_norm.out(x, w, b, rm, rv, True, MOMENTUM, EPS, out=out_v,
                                       save_mean=sm, save_invstd=si)
            if case.relu:
                out_v.relu_()
            return out
        return forward
    dw, db = torch.empty(C), torch.empty(C)
    if case.relu:
        # the mask from the reference's y, as every contender's: torch's own channels-last
        # forward is ~1e-5 off and would flip the sign of values near 0
        y = torch.from_numpy(_relu_output(case))
        y_v = _torch_views(case, [y, y])[0]
        g = torch.empty_like(dy)

        def backward_relu():
            aten.threshold_backward.grad_input(dy, y_v, 0, grad_input=g)
            aten.native_batch_norm_backward.out(g, x, w, None, None, mean, invstd, True, EPS,
                                                [True, True, True], out0=out_v, out1=dw,
                                                out2=db)
            return out
        return backward_relu

    def backward():
        aten.native_batch_norm_backward.out(dy, x, w, None, None, mean, invstd, True, EPS,
                                            [True, True, True], out0=out_v, out1=dw, out2=db)
        return out
    return backward


def _relu_output(case: Case) -> np.ndarray:
    """BN + ReLU's y from the reference (what the backward's mask comes from)."""
    from gpunn.ops import batchnorm as bn

    x, _, w, b = case.inputs[:4]
    return bn.batch_norm_relu(x, None, None, w, b, True, channels_last=case.channels_last,
                              backend="numpy")


def _cpu_contenders(case: Case, bufs: dict) -> list[Contender]:
    x, dy = case.inputs[:2]
    C = case.inputs[2].shape[0]

    def make_gpunn(backend):
        def make():
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            rm, rv = rm.astype(x.dtype), rv.astype(x.dtype)
            call, out = _gpunn_call(case, backend, rm, rv), bufs[backend]
            return lambda: call(out)
        return make

    contenders = [
        Contender("numpy", "baseline", make_gpunn("numpy")),
        Contender("gpunn cpu", "gpunn", make_gpunn("cpu")),
        Contender("limit", "limit", lambda: cpu_limit(case.direction, x, dy, bufs["limit"]),
                  check=False),
    ]
    if importlib.util.find_spec("torch") is not None:
        note = ("+ relu_ (a separate pass)" if case.direction == "forward"
                else "+ threshold_backward (a separate pass)") if case.relu else ""
        contenders.insert(2, Contender("torch", "torch", lambda: _torch_cpu(case, bufs),
                                       note=note))
    return contenders


class _CpuCheck:
    """Every output against the reference contender's first output."""

    def __init__(self):
        self.ref: np.ndarray | None = None

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        out = harness.host_array(out)
        if contender.name == "numpy" and self.ref is None:
            self.ref = out.copy()
            return 0.0, ""
        if self.ref is None:
            raise RuntimeError("no reference output to check against")
        return harness.rel_err(out, self.ref), ""


def _inputs_cpu(rng, shape, layout, dtype):
    """x, dy, w, b (float32 per channel -> the dtype on the CPU), and the reference's saved
    mean / invstd of x."""
    from gpunn.ops import batchnorm as bn

    ashape = _array_shape(shape, layout)
    C = shape[1]
    x = (rng.standard_normal(ashape, dtype=np.float32) + 0.5).astype(dtype)
    dy = rng.standard_normal(ashape, dtype=np.float32).astype(dtype)
    w = (0.5 + rng.random(C, dtype=np.float32)).astype(dtype)
    b = rng.standard_normal(C, dtype=np.float32).astype(dtype)
    _, mean, invstd = bn.batch_norm_forward(x, None, None, w, b, True,
                                            channels_last=layout == "nhwc", backend="numpy")
    return [x, dy, w, b, mean, invstd]


def _run_cpu(runner: harness.Runner) -> None:
    options = runner.options
    dtypes = harness.selected_dtypes(options, CPU_DTYPES, CPU_CAN)
    rng = np.random.default_rng(runner.seed)
    for dtype, shape, layout, ops, directions in _cases(options, "cpu", dtypes):
        if runner.out_of_time():  # skipped: no set-up
            for op in ops:
                for direction in directions:
                    runner.admit(Case("cpu", op, direction, shape, layout, dtype).record_base())
            continue
        inputs = _inputs_cpu(rng, shape, layout, dtype)
        ashape = inputs[0].shape
        bufs = {who: np.empty(ashape, dtype) for who in ("numpy", "cpu", "torch", "limit")}
        for op in ops:
            for direction in directions:
                case = Case("cpu", op, direction, shape, layout, dtype, inputs)
                runner.run_case(case.record_base(), _cpu_contenders(case, bufs), _CpuCheck(),
                                runner.policy_cpu, case)
        del bufs, inputs


# --- GPU --------------------------------------------------------------------------------------


class _GpuCheck:
    """Outputs against gpunn's reference through CuPy on float32 values of the inputs.
    ``notes``: contender name -> a note found while setting it up (which torch kernel ran)."""

    def __init__(self, case: Case, arrays, notes: dict):
        import cupy

        self.notes = notes
        x32, dy32 = arrays[0].f32, arrays[1].f32
        w, b, mean, invstd = case.inputs[2:]
        ref_case = Case(case.device, case.op, case.direction, case.shape, case.layout,
                        "float32", [x32, dy32, w, b, mean, invstd])
        rm, rv = cupy.zeros(w.shape, cupy.float32), cupy.ones(w.shape, cupy.float32)
        self.ref = _gpunn_call(ref_case, "numpy", rm, rv)(cupy.empty(x32.shape, cupy.float32))

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        import cupy

        return (harness.rel_err(harness.device_f32(out), self.ref, xp=cupy),
                self.notes.get(contender.name, ""))


def _torch_cuda(case: Case, arrays) -> tuple[Callable[[], Any], str]:
    import torch

    aten = torch.ops.aten
    x, dy, back = _torch_views(case, [arrays[0].torch(), arrays[1].torch()])
    w, b, mean, invstd = (torch.from_dlpack(a) for a in case.inputs[2:])
    C = w.shape[0]
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    if case.direction == "forward":
        def forward():
            y = torch.batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS, True)
            if case.relu:
                y.relu_()
            return back(y)
        return forward, "torch.batch_norm (cuDNN where it applies)" + (
            " + relu_" if case.relu else "")
    # backward: cuDNN's, from its own forward's saved statistics and reserve space
    try:
        y, save_mean, save_var, reserve = aten.cudnn_batch_norm(x, w, b, rm, rv, True, MOMENTUM,
                                                                EPS)
        aten.cudnn_batch_norm_backward(x, dy, w, rm, rv, save_mean, save_var, EPS, reserve)
        use_cudnn = True
    except Exception:
        y = torch.batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS, True)
        use_cudnn = False
    if case.relu:
        y = y.relu()

    def grad():
        return aten.threshold_backward(dy, y, 0) if case.relu else dy

    if use_cudnn:
        def backward():
            return back(aten.cudnn_batch_norm_backward(x, grad(), w, rm, rv, save_mean,
                                                       save_var, EPS, reserve)[0])
        note = "cudnn_batch_norm_backward"
    else:
        def backward():
            return back(aten.native_batch_norm_backward(grad(), x, w, None, None, mean, invstd,
                                                        True, EPS, [True, True, True])[0])
        note = "native_batch_norm_backward (cuDNN refused this case)"
    return backward, note + (" + threshold_backward" if case.relu else "")


def _gpu_contenders(case: Case, arrays, notes: dict) -> list[Contender]:
    import cupy

    nbytes = n_bytes(case.direction, case.size, harness.itemsize(case.dtype))
    C = case.inputs[2].shape[0]

    def make_gpunn(backend):
        def make():
            if backend == "numpy" and case.dtype not in ("float32", "float64"):
                return None  # the reference computes in float32/float64 only
            natives = harness.natives(arrays, case.dtype)
            run_case = Case(case.device, case.op, case.direction, case.shape, case.layout,
                            case.dtype, natives + list(case.inputs[2:]))
            rm, rv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
            call, out = _gpunn_call(run_case, backend, rm, rv), cupy.empty_like(natives[0])
            return lambda: call(out)
        return make

    def make_torch():
        call, notes["torch cuda"] = _torch_cuda(case, arrays)
        return call

    return harness.gpu_contenders(make_gpunn("cuda"), make_torch, make_gpunn("numpy"), nbytes)


def _run_gpu(runner: harness.Runner) -> None:
    import cupy

    from gpunn.ops import batchnorm as bn

    options = runner.options
    dtypes = harness.selected_dtypes(options, GPU_DTYPES, GPU_CAN)
    rng = cupy.random.default_rng(runner.seed)
    for dtype, shape, layout, ops, directions in _cases(options, "cuda", dtypes):
        ashape = _array_shape(shape, layout)
        C = shape[1]
        x = harness.GpuArrays(rng.standard_normal(ashape, dtype=cupy.float32) + 0.5, dtype)
        dy = harness.GpuArrays(rng.standard_normal(ashape, dtype=cupy.float32), dtype)
        w = 0.5 + rng.random(C, dtype=cupy.float32)
        b = rng.standard_normal(C, dtype=cupy.float32)
        _, mean, invstd = bn.batch_norm_forward(x.f32, None, None, w, b, True,
                                                channels_last=layout == "nhwc",
                                                backend="numpy")
        for op in ops:
            for direction in directions:
                case = Case("cuda", op, direction, shape, layout, dtype,
                            [x.native, dy.native, w, b, mean, invstd])
                notes: dict = {}
                try:
                    check = _GpuCheck(case, [x, dy], notes)
                except Exception as e:
                    check = harness.failed_check(e)
                runner.run_case(case.record_base(), _gpu_contenders(case, [x, dy], notes),
                                check, runner.policy_gpu, case)
                del check
        del x, dy
        harness.free_gpu_memory()


# --- Entry point ------------------------------------------------------------------------------


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU)."""
    return harness.run_suite(SUITE, options or Options(), _run_cpu, _run_gpu, extra_contenders)
