"""Activations and softmax, forward and backward, against PyTorch, NumPy/CuPy and the limit.

Ops: sigmoid, tanh, relu, leaky_relu, elu, gelu (erf form), gelu_tanh, silu (elementwise)
and softmax, log_softmax (over the last axis of (rows, n) arrays).

Bytes each op must move: forward reads x and writes y (2 elements per element), backward
reads dy and v (the forward's output or input) and writes dx (3 per element); softmax the
same, per element.

Contenders
    CPU   gpunn cpu (fused Numba, out= preallocated), numpy (gpunn's reference backend),
          torch (CPU, the ``out=`` overloads of aten where torch has them, so that torch is
          not charged for allocating its output), limit (a Numba kernel with the same access
          pattern and trivial math: y = x + x, dx = dy * v).
    GPU   gpunn cuda (fused CUDA kernels), torch cuda, cupy unfused (gpunn's reference
          backend on CuPy arrays, float32/float64 only), limit (a device-to-device copy of
          the same number of bytes). bfloat16 arrays are CuPy arrays of ml_dtypes.bfloat16
          for gpunn and torch.bfloat16 tensors for torch, holding the same values.

Small calls (CPU, ``--small-call``): each op also on one (64, 256) array, where a call's
fixed cost (argument checks, dispatch, the kernel call) outweighs its work; what a small
model pays per op.

Before timing, every contender's first output is compared with gpunn's NumPy reference
(||out - ref|| / ||ref|| under harness.CHECK_TOLERANCE); the reference itself is checked
against a float64 evaluation of a slice. A contender that fails is flagged 'wrong' in the
table (and still timed); one that raises is flagged 'error'.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "activations"

# --- Ops --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    name: str  # as in the table: 'gelu_tanh'
    fn: str  # gpunn.ops function: 'gelu' (its backward is fn + '_backward')
    kind: str  # 'elementwise' | 'softmax'
    backward_from: str  # 'output' | 'input': what the backward's v is
    params: tuple = ()  # keyword parameters, as (name, value) pairs

    @property
    def kwargs(self) -> dict:
        return dict(self.params)


OPS = {spec.name: spec for spec in (
    OpSpec("sigmoid", "sigmoid", "elementwise", "output"),
    OpSpec("tanh", "tanh", "elementwise", "output"),
    OpSpec("relu", "relu", "elementwise", "input"),
    OpSpec("leaky_relu", "leaky_relu", "elementwise", "input", (("negative_slope", 0.01),)),
    OpSpec("elu", "elu", "elementwise", "input", (("alpha", 1.0),)),
    OpSpec("gelu", "gelu", "elementwise", "input", (("approximate", "none"),)),
    OpSpec("gelu_tanh", "gelu", "elementwise", "input", (("approximate", "tanh"),)),
    OpSpec("silu", "silu", "elementwise", "input"),
    OpSpec("softmax", "softmax", "softmax", "output"),
    OpSpec("log_softmax", "log_softmax", "softmax", "output"),
)}
DIRECTIONS = ("forward", "backward")

CPU_SIZES = ("1M", "16M", "64M")
GPU_SIZES = ("1M", "4M", "16M", "64M")
SOFTMAX_COLS = (1024, 4096, 32768)
CPU_SOFTMAX_TOTAL = "16M"
GPU_SOFTMAX_TOTAL = "64M"
#: The shape of the small-call cases (``--small-call``).
SMALL_CALL_SHAPE = (64, 256)
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32", "bfloat16")
CPU_CAN = ("float32", "float64")
GPU_CAN = ("float32", "float64", "float16", "bfloat16")


def n_bytes(direction: str, size: int, itemsize: int) -> int:
    """The fewest bytes the op must move: 2 arrays forward, 3 backward."""
    return (2 if direction == "forward" else 3) * size * itemsize


# --- Options ----------------------------------------------------------------------------------


@dataclass
class Options(harness.Options):
    """What to run (``sizes``: of the elementwise cases)."""

    ops: list[str] | None = None
    directions: list[str] | None = None
    softmax_cols: list[int] | None = None  # row lengths
    softmax_total: int | None = None  # elements per softmax case
    small_call: bool | None = None  # the small-call cases (CPU)


parse_ops = harness.names_type(OPS, "op(s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's own command-line options (the common ones come from the CLI)."""
    parser.add_argument("--ops", type=parse_ops, metavar="OP[,OP...]",
                        help=f"ops to run (default all): {', '.join(OPS)}")
    parser.add_argument("--directions", type=harness.names_type(DIRECTIONS, "direction(s)"),
                        metavar="DIR[,DIR]", help="forward, backward or both (default both)")
    parser.add_argument("--softmax-cols", type=_parse_cols, metavar="N[,N...]",
                        help="softmax row lengths (default 1024,4096,32768)")
    parser.add_argument("--softmax-total", type=_parse_one_size, metavar="N",
                        help=f"elements per softmax case (default {CPU_SOFTMAX_TOTAL} on the "
                             f"CPU, {GPU_SOFTMAX_TOTAL} on the GPU)")
    parser.add_argument("--small-call", action="store_true", default=None,
                        help=f"also run each op on one {harness.format_shape(SMALL_CALL_SHAPE)} "
                             "array on the CPU: the fixed cost of a call")


def _parse_cols(text: str) -> list[int]:
    try:
        return [harness.parse_size(s) for s in str(text).split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_one_size(text: str) -> int:
    try:
        return harness.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- torch: the out= overloads ----------------------------------------------------------------


@cache
def _aten(name: str, overload: str) -> tuple[Callable, str]:
    """(call, note): ``call(*args, out=tensor, **kw)`` runs aten.<name>.<overload> writing into
    ``out``; without that overload, the plain op and a copy (the note says so)."""
    import torch

    packet = getattr(torch.ops.aten, name)
    try:
        op = getattr(packet, overload)
        out_name = next(a.name for a in op._schema.arguments if a.is_out)
    except (AttributeError, RuntimeError, StopIteration):
        default = packet.default

        def plain(*args, out, **kw):
            out.copy_(default(*args, **kw))

        return plain, f"torch has no aten.{name}.{overload}: allocates + copies"

    def call(*args, out, **kw):
        op(*args, **kw, **{out_name: out})

    return call, ""


def _torch_call(spec: OpSpec, direction: str, dtype) -> tuple[Callable, str]:
    """(f(inputs..., out), note) for the torch version of the op, writing into ``out``."""
    n, p = spec.name, spec.kwargs
    if direction == "forward":
        table = {
            "sigmoid": ("sigmoid", "out", lambda f, x, o: f(x, out=o)),
            "tanh": ("tanh", "out", lambda f, x, o: f(x, out=o)),
            "relu": ("relu", "out", lambda f, x, o: f(x, out=o)),
            "leaky_relu": ("leaky_relu", "out", lambda f, x, o: f(x, p["negative_slope"], out=o)),
            "elu": ("elu", "out", lambda f, x, o: f(x, p["alpha"], 1, 1, out=o)),
            "gelu": ("gelu", "out", lambda f, x, o: f(x, approximate="none", out=o)),
            "gelu_tanh": ("gelu", "out", lambda f, x, o: f(x, approximate="tanh", out=o)),
            "silu": ("silu", "out", lambda f, x, o: f(x, out=o)),
            "softmax": ("_softmax", "out", lambda f, x, o: f(x, -1, False, out=o)),
            "log_softmax": ("_log_softmax", "out", lambda f, x, o: f(x, -1, False, out=o)),
        }
    else:
        table = {
            "sigmoid": ("sigmoid_backward", "grad_input", lambda f, dy, y, o: f(dy, y, out=o)),
            "tanh": ("tanh_backward", "grad_input", lambda f, dy, y, o: f(dy, y, out=o)),
            "relu": ("threshold_backward", "grad_input",
                     lambda f, dy, x, o: f(dy, x, 0, out=o)),
            "leaky_relu": ("leaky_relu_backward", "grad_input",
                           lambda f, dy, x, o: f(dy, x, p["negative_slope"], False, out=o)),
            "elu": ("elu_backward", "grad_input",
                    lambda f, dy, x, o: f(dy, p["alpha"], 1, 1, False, x, out=o)),
            "gelu": ("gelu_backward", "grad_input",
                     lambda f, dy, x, o: f(dy, x, approximate="none", out=o)),
            "gelu_tanh": ("gelu_backward", "grad_input",
                          lambda f, dy, x, o: f(dy, x, approximate="tanh", out=o)),
            "silu": ("silu_backward", "grad_input", lambda f, dy, x, o: f(dy, x, out=o)),
            "softmax": ("_softmax_backward_data", "out",
                        lambda f, dy, y, o: f(dy, y, -1, dtype, out=o)),
            "log_softmax": ("_log_softmax_backward_data", "out",
                            lambda f, dy, y, o: f(dy, y, -1, dtype, out=o)),
        }
    name, overload, shape_call = table[n]
    f, note = _aten(name, overload)
    return (lambda *arrays: shape_call(f, *arrays)), note


# --- gpunn ------------------------------------------------------------------------------------


def _gpunn_call(spec: OpSpec, direction: str) -> Callable:
    """f(inputs..., out, backend) -> out for the gpunn op."""
    from gpunn import ops

    fn = getattr(ops, spec.fn if direction == "forward" else spec.fn + "_backward")
    kwargs = spec.kwargs

    def call(*arrays, backend):
        *inputs, out = arrays
        return fn(*inputs, **kwargs, out=out, backend=backend)

    return call


def _reference_f64(spec: OpSpec, direction: str, inputs: list[np.ndarray]) -> np.ndarray:
    """gpunn's NumPy reference in float64 on host arrays."""
    call = _gpunn_call(spec, direction)
    inputs = [np.asarray(a, dtype=np.float64) for a in inputs]
    return call(*inputs, np.empty_like(inputs[0]), backend="numpy")


def _head(shape: tuple, limit: int = 1 << 16) -> tuple:
    """An index of the first ~``limit`` elements: leading elements, or whole leading rows."""
    if len(shape) == 1:
        return (slice(0, min(shape[0], limit)),)
    return (slice(0, max(1, min(shape[0], limit // max(1, shape[1])))),)


# --- Cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (op, direction, shape, dtype) on one device, with the inputs it runs on."""

    device: str
    spec: OpSpec
    direction: str
    shape: tuple
    dtype: str
    inputs: list = field(default_factory=list)  # native arrays: [x] or [dy, v]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def record_base(self) -> dict:
        return dict(suite=SUITE, device=self.device, op=self.spec.name,
                    direction=self.direction, shape=list(self.shape), dtype=self.dtype,
                    bytes=n_bytes(self.direction, self.size, harness.itemsize(self.dtype)))


def _shapes(kind: str, options, device: str) -> list[tuple]:
    if kind == "elementwise":
        sizes = harness.selected_sizes(options, CPU_SIZES if device == "cpu" else GPU_SIZES)
        return [(int(n),) for n in sizes]
    total = harness.option(options, "softmax_total") or harness.parse_size(
        CPU_SOFTMAX_TOTAL if device == "cpu" else GPU_SOFTMAX_TOTAL)
    return [(max(1, int(total) // int(cols)), int(cols))
            for cols in (harness.option(options, "softmax_cols") or SOFTMAX_COLS)]


# --- CPU --------------------------------------------------------------------------------------


def _cpu_contenders(case: Case, bufs: dict, ref_name: str) -> list[Contender]:
    inputs = case.inputs
    gpunn = _gpunn_call(case.spec, case.direction)

    def buf(name):
        if name not in bufs:
            bufs[name] = np.empty(case.shape, dtype=case.dtype)
        return bufs[name]

    def make_gpunn(backend, name):
        def make():
            out = buf(name)
            return lambda: gpunn(*inputs, out, backend=backend)
        return make

    def make_torch():
        import torch

        f, _ = _torch_call(case.spec, case.direction, getattr(torch, case.dtype))
        targs = [torch.from_numpy(a) for a in inputs]
        tout = torch.from_numpy(buf("torch"))
        return lambda: (f(*targs, tout), tout)[1]

    def make_limit():
        return harness.cpu_limit(*inputs, buf("limit"))

    contenders = [
        Contender(ref_name, "baseline", make_gpunn("numpy", "numpy")),
        Contender("gpunn cpu", "gpunn", make_gpunn("cpu", "gpunn")),
        Contender("limit", "limit", make_limit, check=False),
    ]
    if importlib.util.find_spec("torch") is not None:  # else no torch row (nothing to compare)
        import torch

        note = _torch_call(case.spec, case.direction, getattr(torch, case.dtype))[1]
        contenders.insert(2, Contender("torch", "torch", make_torch, note=note))
    return contenders


def _run_cpu(runner: harness.Runner, specs: list[OpSpec], directions: list[str]) -> None:
    options = runner.options
    dtypes = harness.selected_dtypes(options, CPU_DTYPES, CPU_CAN)
    rng = np.random.default_rng(runner.seed)
    ref_name = "numpy"
    for dtype, tol, kind_specs, shape in _case_groups(specs, options, "cpu", dtypes):
        if runner.out_of_time():  # skipped: no set-up
            for spec in kind_specs:
                for direction in directions:
                    runner.admit(Case("cpu", spec, direction, shape, dtype).record_base())
            continue
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        y = np.empty_like(x)  # the forward's output (the reference's), for backwards
        bufs: dict = {}
        for spec in kind_specs:
            have_y = False
            for direction in DIRECTIONS:
                if direction == "backward" and not have_y and spec.backward_from == "output":
                    # the backward needs y even when the forward is not benchmarked
                    _gpunn_call(spec, "forward")(x, y, backend="numpy")
                    have_y = True
                if direction not in directions:
                    continue
                v = y if spec.backward_from == "output" else x
                inputs = [x] if direction == "forward" else [dy, v]
                case = Case("cpu", spec, direction, shape, dtype, inputs)
                check = _CpuCheck(case, ref_name, tol)
                runner.run_case(case.record_base(), _cpu_contenders(case, bufs, ref_name),
                                check, runner.policy_cpu, case)
                if (direction == "forward" and spec.backward_from == "output"
                        and check.ref is not None):
                    np.copyto(y, check.ref)
                    have_y = True
        bufs.clear()


def _case_groups(specs: list[OpSpec], options, device: str, dtypes: list[str]):
    """(dtype, check tolerance, the specs of one kind, shape) for each group of cases that
    share their inputs."""
    small_call = device == "cpu" and harness.option(options, "small_call", False)
    for dtype in dtypes:
        for kind in ("elementwise", "softmax"):
            kind_specs = [s for s in specs if s.kind == kind]
            shapes = _shapes(kind, options, device) + ([SMALL_CALL_SHAPE] if small_call else [])
            for shape in shapes if kind_specs else ():
                yield dtype, harness.CHECK_TOLERANCE[dtype], kind_specs, shape


class _CpuCheck:
    """Compares each output with the reference contender's (its first output is kept)."""

    def __init__(self, case: Case, ref_name: str, tol: float):
        self.case, self.ref_name, self.tol = case, ref_name, tol
        self.ref: np.ndarray | None = None
        self.ref_note = ""

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        out = harness.host_array(out)
        if contender.name == self.ref_name and self.ref is None:
            self.ref = out.copy()
            head = _head(self.case.shape)
            exact = _reference_f64(self.case.spec, self.case.direction,
                                   [a[head] for a in self.case.inputs])
            err = harness.rel_err(self.ref[head], exact)
            if not harness.passes(err, self.tol):
                self.ref_note = f"reference off by {err:.1e} against float64"
            return err, self.ref_note
        if self.ref is None:
            raise RuntimeError("no reference output to check against")
        return harness.rel_err(out, self.ref), self.ref_note


# --- GPU --------------------------------------------------------------------------------------


class _GpuCheck:
    """Compares each output with the reference computed by gpunn's NumPy backend through CuPy
    on float32 values of the inputs; the reference is itself checked on the host in float64."""

    def __init__(self, case: Case, arrays: list[harness.GpuArrays], tol: float):
        import cupy

        self.tol = tol
        call = _gpunn_call(case.spec, case.direction)
        inputs32 = [a.f32 for a in arrays]
        self.ref = call(*inputs32, cupy.empty(case.shape, dtype=cupy.float32), backend="numpy")
        head = _head(case.shape)
        exact = _reference_f64(case.spec, case.direction, [cupy.asnumpy(a[head]) for a in inputs32])
        err = harness.rel_err(cupy.asnumpy(self.ref[head]), exact)
        self.ref_err = err
        self.ref_note = ("" if harness.passes(err, harness.CHECK_TOLERANCE["float32"])
                         else f"reference off by {err:.1e} against float64")

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        import cupy

        if contender.name == "cupy unfused" and self.ref_note:
            return self.ref_err, self.ref_note
        return harness.rel_err(harness.device_f32(out), self.ref, xp=cupy), self.ref_note


def _gpu_contenders(case: Case, arrays: list[harness.GpuArrays]) -> list[Contender]:
    import cupy

    gpunn = _gpunn_call(case.spec, case.direction)
    nbytes = n_bytes(case.direction, case.size, harness.itemsize(case.dtype))

    def make_gpunn():
        natives = harness.natives(arrays, case.dtype)
        out = cupy.empty(case.shape, dtype=natives[0].dtype)
        return lambda: gpunn(*natives, out, backend="cuda")

    def make_unfused():
        if case.dtype not in ("float32", "float64"):
            return None  # the reference backend computes in float32/float64 only
        natives = [a.native for a in arrays]
        out = cupy.empty(case.shape, dtype=natives[0].dtype)
        return lambda: gpunn(*natives, out, backend="numpy")

    def make_torch():
        import torch

        tdtype = getattr(torch, case.dtype)
        f, _ = _torch_call(case.spec, case.direction, tdtype)
        targs = [a.torch() for a in arrays]
        tout = torch.empty(case.shape, dtype=tdtype, device=targs[0].device)
        return lambda: (f(*targs, tout), tout)[1]

    try:
        import torch

        torch_note = _torch_call(case.spec, case.direction, getattr(torch, case.dtype))[1]
    except ImportError:
        torch_note = "torch not installed"
    return harness.gpu_contenders(make_gpunn, make_torch, make_unfused, nbytes, torch_note)


def _run_gpu(runner: harness.Runner, specs: list[OpSpec], directions: list[str]) -> None:
    import cupy

    options = runner.options
    dtypes = harness.selected_dtypes(options, GPU_DTYPES, GPU_CAN)
    rng = cupy.random.default_rng(runner.seed)
    for dtype, tol, kind_specs, shape in _case_groups(specs, options, "cuda", dtypes):
        x = harness.GpuArrays(rng.standard_normal(shape, dtype=cupy.float32), dtype)
        dy = harness.GpuArrays(rng.standard_normal(shape, dtype=cupy.float32), dtype)
        for spec in kind_specs:
            y = None
            if "backward" in directions and spec.backward_from == "output":
                y32 = _gpunn_call(spec, "forward")(
                    x.f32, cupy.empty(shape, dtype=cupy.float32), backend="numpy")
                y = harness.GpuArrays(y32, dtype)  # rounded to the case's dtype
                del y32
            for direction in directions:
                v = y if spec.backward_from == "output" else x
                arrays = [x] if direction == "forward" else [dy, v]
                case = Case("cuda", spec, direction, shape, dtype, [a.native for a in arrays])
                if runner.out_of_time():  # skipped: no reference to compute
                    runner.run_case(case.record_base(), [], None, runner.policy_gpu, case)
                    continue
                try:
                    check = _GpuCheck(case, arrays, tol)
                except Exception as e:
                    check = harness.failed_check(e)
                runner.run_case(case.record_base(), _gpu_contenders(case, arrays), check,
                                runner.policy_gpu, case)
                del check
            del y
        del x, dy
        harness.free_gpu_memory()


# --- Entry point ------------------------------------------------------------------------------


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU).

    ``options``: an :class:`Options` or any object with those attributes (the CLI's
    namespace). ``extra_contenders``: callables ``f(case) -> Contender | None`` adding
    contenders to each case (the tests add a wrong one)."""
    options = options or Options()
    specs = [OPS[name] for name in (harness.option(options, "ops") or list(OPS))]
    directions = harness.selected(options, "directions", DIRECTIONS)
    return harness.run_suite(SUITE, options, lambda runner: _run_cpu(runner, specs, directions),
                             lambda runner: _run_gpu(runner, specs, directions),
                             extra_contenders)
