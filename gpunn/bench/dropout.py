"""Dropout forward, backward and both, against PyTorch, NumPy/CuPy and the memory limit.

Cases: 1-D arrays (default 1M and 16M elements on the CPU, 1M to 64M on the GPU), p = 0.5
(``--p`` for others), directions forward, backward and fwd+bwd (the forward then the backward,
one training step's worth of dropout).

Bytes the op must move: forward reads x and writes y, backward reads dy and writes dx (the mask
is regenerated from the seed, not stored): 2 elements per element each, 4 for fwd+bwd. Torch
moves more, and the table's GB/s for it are still computed from these fewest bytes.

Contenders
    CPU   gpunn cpu (fused Numba, out= preallocated), numpy (gpunn's reference backend),
          torch: forward ``torch.nn.functional.dropout`` as a user calls it (no out= form: it
          allocates y and a float mask ``noise = bernoulli(1 - p) / (1 - p)`` that autograd keeps
          for the backward), backward ``dy * noise`` into a preallocated dx (what autograd's
          MulBackward computes from the stored noise), fwd+bwd the same steps with noise kept
          (noise drawn, ``x * noise`` and ``dy * noise`` into preallocated outputs);
          limit: a Numba kernel reading one array and writing one (``y = x + x``), twice for
          fwd+bwd.
    GPU   gpunn cuda (no mask stored), torch cuda (``torch.native_dropout``, the fused kernel
          F.dropout runs, which writes y and a bool mask; the backward
          ``native_dropout_backward(dy, mask, scale)`` reads dy and that mask), cupy unfused
          (gpunn's reference backend on CuPy arrays, float32/float64 only), copy limit (a
          device-to-device copy of the same bytes).

Checks before timing: gpunn's outputs against gpunn's NumPy reference (the same mask, so the
error is zero, or the 16-bit rounding); torch draws other bits, so its outputs are checked by
statistics: the keep rate within 6 standard deviations of 1 - p (else the error is inf), and
the kept values against x / (1 - p) (the reported error).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "dropout"
OP = "dropout"
DIRECTIONS = ("forward", "backward", "fwd+bwd")
CPU_SIZES = ("1M", "16M")
GPU_SIZES = ("1M", "16M", "64M")
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32", "bfloat16")
CPU_CAN = ("float32", "float64")
GPU_CAN = ("float32", "float64", "float16", "bfloat16")
PS = (0.5,)
#: The seed and offset gpunn's contenders use (any fixed pair: the cost does not depend on it).
SEED, OFFSET = 0x5EED, 0


def n_bytes(direction: str, size: int, itemsize: int) -> int:
    """The fewest bytes: read one array and write one per pass; two passes for fwd+bwd."""
    return (4 if direction == "fwd+bwd" else 2) * size * itemsize


# --- Options ----------------------------------------------------------------------------------


@dataclass
class Options(harness.Options):
    """What to run (``sizes``: of the 1-D arrays)."""

    directions: list[str] | None = None
    ps: list[float] | None = None


def _parse_ps(text: str) -> list[float]:
    try:
        ps = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of probabilities: {text!r}") from None
    if not ps or any(not 0 < p < 1 for p in ps):
        raise argparse.ArgumentTypeError(f"probabilities must be in (0, 1), got {text!r}")
    return ps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's own command-line options (the common ones come from the CLI)."""
    parser.add_argument("--directions", type=harness.names_type(DIRECTIONS, "direction(s)"),
                        metavar="DIR[,DIR...]",
                        help=f"any of {', '.join(DIRECTIONS)} (default all)")
    parser.add_argument("--p", dest="ps", type=_parse_ps, metavar="P[,P...]",
                        help="drop probabilities (default 0.5)")


# --- Cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (direction, size, dtype, p) on one device; inputs are native arrays [x, dy]."""

    device: str
    direction: str
    shape: tuple
    dtype: str
    p: float
    inputs: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def op(self) -> str:
        return f"{OP} p={self.p:g}"

    def record_base(self) -> dict:
        return dict(suite=SUITE, device=self.device, op=self.op, direction=self.direction,
                    shape=list(self.shape), dtype=self.dtype,
                    bytes=n_bytes(self.direction, self.size, harness.itemsize(self.dtype)))


def _gpunn_step(direction: str, p: float, backend: str) -> Callable:
    """f(x, dy, y, dx) -> the outputs of the direction (y; dx; or (y, dx))."""
    from gpunn.ops.dropout import dropout, dropout_backward

    def forward(x, dy, y, dx):
        return dropout(x, p, seed=SEED, offset=OFFSET, out=y, backend=backend)

    def backward(x, dy, y, dx):
        return dropout_backward(dy, p, SEED, OFFSET, out=dx, backend=backend)

    def both(x, dy, y, dx):
        return forward(x, dy, y, dx), backward(x, dy, y, dx)

    return {"forward": forward, "backward": backward, "fwd+bwd": both}[direction]


def _outputs(direction: str, out) -> list:
    """The checked outputs of a direction as a list: [y], [dx] or [y, dx]."""
    return list(out) if direction == "fwd+bwd" else [out]


def _check_inputs(direction: str, x, dy) -> list:
    """The array each output is the dropout of: x for y, dy for dx."""
    return {"forward": [x], "backward": [dy], "fwd+bwd": [x, dy]}[direction]


def _statistics_error(xp, v, out, p: float) -> tuple[float, str]:
    """For another generator's output ``out`` of input ``v``: (relative error of the kept
    values against v / (1 - p), note); inf when the keep rate is off by 6 sigma."""
    v, out = v.reshape(-1), out.reshape(-1)
    kept = out != 0
    n = v.size
    rate = float(kept.mean()) if n else 1 - p
    sigma = math.sqrt(p * (1 - p) / max(n, 1))
    if abs(rate - (1 - p)) > 6 * sigma:
        return math.inf, f"keep rate {rate:.4f}, expected {1 - p:.4f}"
    scaled = v[kept].astype(xp.float32) * xp.float32(1 / (1 - p))
    return harness.rel_err(out[kept].astype(xp.float32), scaled, xp=xp), "checked by statistics"


def _cases(options, device: str, dtypes: list[str]):
    sizes = harness.selected_sizes(options, CPU_SIZES if device == "cpu" else GPU_SIZES)
    directions = harness.selected(options, "directions", DIRECTIONS)
    for dtype in dtypes:
        for n in sizes:
            for p in harness.option(options, "ps") or PS:
                yield dtype, (int(n),), float(p), directions


# --- CPU --------------------------------------------------------------------------------------


def _torch_cpu(case: Case, bufs: dict) -> Callable[[], Any]:
    import torch

    x, dy = (torch.from_numpy(a) for a in case.inputs)
    p, keep = case.p, 1 - case.p
    if case.direction == "forward":
        return lambda: torch.nn.functional.dropout(x, p, training=True)
    dx = torch.from_numpy(bufs["torch dx"])
    if case.direction == "backward":
        noise = torch.empty_like(x).bernoulli_(keep).div_(keep)  # what F.dropout stores
        return lambda: torch.mul(dy, noise, out=dx)
    y = torch.from_numpy(bufs["torch y"])

    def both():
        noise = torch.empty_like(x).bernoulli_(keep).div_(keep)
        torch.mul(x, noise, out=y)
        torch.mul(dy, noise, out=dx)
        return y, dx

    return both


def _cpu_contenders(case: Case, bufs: dict) -> list[Contender]:
    x, dy = case.inputs

    def make_gpunn(backend, prefix):
        step = _gpunn_step(case.direction, case.p, backend)
        y, dx = bufs[f"{prefix} y"], bufs[f"{prefix} dx"]
        return lambda: lambda: step(x, dy, y, dx)

    def make_limit():
        fwd = harness.cpu_limit(x, bufs["limit y"])
        bwd = harness.cpu_limit(dy, bufs["limit dx"])
        if case.direction == "forward":
            return fwd
        if case.direction == "backward":
            return bwd
        return lambda: (fwd(), bwd())

    contenders = [
        Contender("numpy", "baseline", make_gpunn("numpy", "numpy")),
        Contender("gpunn cpu", "gpunn", make_gpunn("cpu", "gpunn")),
        Contender("limit", "limit", make_limit, check=False),
    ]
    if importlib.util.find_spec("torch") is not None:
        note = {"forward": "F.dropout: allocates y and a float mask",
                "backward": "dy * stored float mask",
                "fwd+bwd": "float mask drawn and kept, out= for y and dx"}[case.direction]
        contenders.insert(2, Contender("torch", "torch", lambda: _torch_cpu(case, bufs),
                                       note=note))
    return contenders


class _CpuCheck:
    """gpunn's contenders against the reference's outputs (exact: the same mask); others by
    statistics."""

    def __init__(self, case: Case):
        self.case = case
        self.ref: list[np.ndarray] | None = None

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        case = self.case
        outs = [harness.host_array(o) for o in _outputs(case.direction, out)]
        if contender.name == "numpy" and self.ref is None:
            self.ref = [o.copy() for o in outs]
            return 0.0, ""
        if contender.role in ("gpunn", "baseline"):
            if self.ref is None:
                raise RuntimeError("no reference output to check against")
            return max(harness.rel_err(o, r) for o, r in zip(outs, self.ref)), ""
        errors = [_statistics_error(np, v, o, case.p)
                  for v, o in zip(_check_inputs(case.direction, *case.inputs), outs)]
        return max(e for e, _ in errors), next((n for e, n in errors if e == math.inf),
                                               errors[0][1])


def _run_cpu(runner: harness.Runner) -> None:
    options = runner.options
    dtypes = harness.selected_dtypes(options, CPU_DTYPES, CPU_CAN)
    rng = np.random.default_rng(runner.seed)
    for dtype, shape, p, directions in _cases(options, "cpu", dtypes):
        if runner.out_of_time():  # skipped: no set-up
            for direction in directions:
                runner.admit(Case("cpu", direction, shape, dtype, p).record_base())
            continue
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
        bufs = {f"{who} {what}": np.empty(shape, dtype=dtype)
                for who in ("numpy", "gpunn", "torch", "limit") for what in ("y", "dx")}
        for direction in directions:
            case = Case("cpu", direction, shape, dtype, p, [x, dy])
            runner.run_case(case.record_base(), _cpu_contenders(case, bufs), _CpuCheck(case),
                            runner.policy_cpu, case)
        del bufs


# --- GPU --------------------------------------------------------------------------------------


class _GpuCheck:
    """gpunn cuda against the reference on float32 values of the inputs (the same mask: the
    error is the storage rounding); torch by statistics."""

    def __init__(self, case: Case, arrays):
        import cupy

        self.case = case
        x32, dy32 = (a.f32 for a in arrays)
        step = _gpunn_step(case.direction, case.p, "numpy")
        y, dx = (cupy.empty(case.shape, dtype=cupy.float32) for _ in range(2))
        self.ref = [o.copy() for o in _outputs(case.direction, step(x32, dy32, y, dx))]
        self.inputs = [x32, dy32]

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        import cupy

        case = self.case
        outs = [harness.device_f32(o) for o in _outputs(case.direction, out)]
        if contender.role in ("gpunn", "baseline"):
            return max(harness.rel_err(o, r, xp=cupy) for o, r in zip(outs, self.ref)), ""
        errors = [_statistics_error(cupy, v, o, case.p)
                  for v, o in zip(_check_inputs(case.direction, *self.inputs), outs)]
        return max(e for e, _ in errors), next((n for e, n in errors if e == math.inf),
                                               errors[0][1])


def _torch_cuda(case: Case, arrays) -> Callable[[], Any]:
    import torch

    x, dy = (a.torch() for a in arrays)
    p, scale = case.p, 1 / (1 - case.p)
    if case.direction == "forward":
        return lambda: torch.native_dropout(x, p, True)[0]
    _, mask = torch.native_dropout(x, p, True)
    if case.direction == "backward":
        return lambda: torch.ops.aten.native_dropout_backward(dy, mask, scale)

    def both():
        y, m = torch.native_dropout(x, p, True)
        return y, torch.ops.aten.native_dropout_backward(dy, m, scale)

    return both


def _gpu_contenders(case: Case, arrays) -> list[Contender]:
    import cupy

    nbytes = n_bytes(case.direction, case.size, harness.itemsize(case.dtype))

    def make_gpunn(backend):
        def make():
            if backend == "numpy" and case.dtype not in ("float32", "float64"):
                return None  # the reference computes in float32/float64 only
            x, dy = harness.natives(arrays, case.dtype)
            y, dx = cupy.empty_like(x), cupy.empty_like(x)
            step = _gpunn_step(case.direction, case.p, backend)
            return lambda: step(x, dy, y, dx)
        return make

    return harness.gpu_contenders(make_gpunn("cuda"), lambda: _torch_cuda(case, arrays),
                                  make_gpunn("numpy"), nbytes, "stores a bool mask")


def _run_gpu(runner: harness.Runner) -> None:
    import cupy

    options = runner.options
    dtypes = harness.selected_dtypes(options, GPU_DTYPES, GPU_CAN)
    rng = cupy.random.default_rng(runner.seed)
    for dtype, shape, p, directions in _cases(options, "cuda", dtypes):
        x = harness.GpuArrays(rng.standard_normal(shape, dtype=cupy.float32), dtype)
        dy = harness.GpuArrays(rng.standard_normal(shape, dtype=cupy.float32), dtype)
        for direction in directions:
            case = Case("cuda", direction, shape, dtype, p, [x.native, dy.native])
            try:
                check = _GpuCheck(case, [x, dy])
            except Exception as e:
                check = harness.failed_check(e)
            runner.run_case(case.record_base(), _gpu_contenders(case, [x, dy]), check,
                            runner.policy_gpu, case)
            del check
        del x, dy
        harness.free_gpu_memory()


# --- Entry point ------------------------------------------------------------------------------


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU)."""
    return harness.run_suite(SUITE, options or Options(), _run_cpu, _run_gpu, extra_contenders)
