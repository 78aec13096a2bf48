"""Random affine augmentation (``gpunn.ops.augment``) against PyTorch, NumPy/CuPy and the
memory limit.

Cases: batches of 3-channel images, 32 x 32 ("cifar") and 224 x 224 ("imagenet"), with the
batch size chosen so the batch holds about ``size`` elements (default 1M and 4M on the CPU,
16M and 64M on the GPU); every transformation on (rotation 15 degrees, translation 0.1,
scale 0.9-1.1, stretch 0.1, shear 5 degrees, flip 0.5).

Bytes the op must move: one read of x and one write of y, 2 elements per element (the taps
a pixel shares with its neighbours come from cache; the matrices are 24 bytes per image).

Contenders
    CPU   gpunn cpu (the fused Numba kernel: draws and warps, out= preallocated), numpy
          (gpunn's reference backend: random_affine, then the vectorized warp), torch
          (``F.affine_grid`` + ``F.grid_sample`` with the same matrices, drawn beforehand and
          not timed: what a torch user runs per batch), limit (a Numba kernel reading x and
          writing y).
    GPU   gpunn cuda (one launch: draws and warps), torch cuda (affine_grid + grid_sample, the
          matrices drawn beforehand; torch computes its grid in x's dtype, so for 16-bit x its
          coordinates are coarse and the check may flag it), cupy unfused (the reference
          backend on CuPy arrays, float32/float64), copy limit.

Checks before timing: every output against gpunn's NumPy reference on the same images
(torch with the same matrices, so all must agree to the dtype's rounding).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import harness
from .harness import Contender, Record

SUITE = "augment"
OP = "augment"
IMAGES = {"cifar": (3, 32, 32), "imagenet": (3, 224, 224)}
CPU_SIZES = ("1M", "4M")
GPU_SIZES = ("16M", "64M")
CPU_DTYPES = ("float32",)
GPU_DTYPES = ("float32",)
CPU_CAN = ("float32", "float64")
GPU_CAN = ("float32", "float64", "float16", "bfloat16")
OPTIONS = dict(degrees=15.0, translate=(0.1, 0.1), scale=(0.9, 1.1), stretch=0.1, shear=5.0,
               flip_p=0.5)
SEED, OFFSET = 0x5EED, 0


def n_bytes(size: int, itemsize: int) -> int:
    """The fewest bytes: read x, write y."""
    return 2 * size * itemsize


@dataclass
class Options(harness.Options):
    """What to run (``sizes``: elements per batch)."""

    images: list[str] | None = None


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=harness.names_type(tuple(IMAGES), "image kind(s)"),
                        metavar="KIND[,KIND...]",
                        help=f"any of {', '.join(IMAGES)} (default all)")


@dataclass
class Case:
    device: str
    shape: tuple
    dtype: str
    inputs: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def record_base(self) -> dict:
        return dict(suite=SUITE, device=self.device, op=OP, direction="forward",
                    shape=list(self.shape), dtype=self.dtype,
                    bytes=n_bytes(self.size, harness.itemsize(self.dtype)))


def _shapes(options, device: str):
    sizes = harness.selected_sizes(options, CPU_SIZES if device == "cpu" else GPU_SIZES)
    for kind in harness.selected(options, "images", tuple(IMAGES)):
        c, h, w = IMAGES[kind]
        for n in sizes:
            yield (max(1, int(n) // (c * h * w)), c, h, w)


def _thetas(shape, xp=np):
    """The matrices augment draws for this batch (what the torch contenders are given)."""
    from gpunn.ops.augment import random_affine

    n, _, h, w = shape
    return random_affine(n, SEED, OFFSET, aspect=w / h, xp=xp, **OPTIONS)


def _gpunn(backend: str) -> Callable:
    from gpunn.ops.augment import augment

    return lambda x, y: augment(x, SEED, OFFSET, out=y, backend=backend, **OPTIONS)


# --- CPU --------------------------------------------------------------------------------------


def _torch_cpu(case: Case) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(case.inputs[0])
    theta = torch.from_numpy(_thetas(case.shape).astype(case.dtype))

    def run():
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    return run


def _cpu_contenders(case: Case, bufs: dict) -> list[Contender]:
    x = case.inputs[0]

    def make_gpunn(backend, name):
        step, y = _gpunn(backend), bufs[name]
        return lambda: lambda: step(x, y)

    contenders = [
        Contender("numpy", "baseline", make_gpunn("numpy", "numpy")),
        Contender("gpunn cpu", "gpunn", make_gpunn("cpu", "gpunn")),
        Contender("limit", "limit", lambda: harness.cpu_limit(x, bufs["limit"]), check=False),
    ]
    if importlib.util.find_spec("torch") is not None:
        contenders.insert(2, Contender("torch", "torch", lambda: _torch_cpu(case),
                                       note="affine_grid + grid_sample, matrices given"))
    return contenders


class _CpuCheck:
    def __init__(self, case: Case):
        self.case = case
        self.ref = None

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        out = harness.host_array(out)
        if contender.name == "numpy" and self.ref is None:
            self.ref = out.copy()
            return 0.0, ""
        if self.ref is None:
            raise RuntimeError("no reference output to check against")
        return harness.rel_err(out, self.ref), ""


def _run_cpu(runner: harness.Runner) -> None:
    options = runner.options
    dtypes = harness.selected_dtypes(options, CPU_DTYPES, CPU_CAN)
    rng = np.random.default_rng(runner.seed)
    for dtype in dtypes:
        for shape in _shapes(options, "cpu"):
            if runner.out_of_time():  # skipped: no set-up
                runner.admit(Case("cpu", shape, dtype).record_base())
                continue
            x = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
            bufs = {who: np.empty(shape, dtype=dtype) for who in ("numpy", "gpunn", "limit")}
            case = Case("cpu", shape, dtype, [x])
            runner.run_case(case.record_base(), _cpu_contenders(case, bufs), _CpuCheck(case),
                            runner.policy_cpu, case)
            del bufs, x


# --- GPU --------------------------------------------------------------------------------------


class _GpuCheck:
    """Against the reference backend on the float32 values of the input (CuPy)."""

    def __init__(self, case: Case, x: harness.GpuArrays):
        import cupy

        y = cupy.empty(case.shape, dtype=cupy.float32)
        self.ref = _gpunn("numpy")(x.f32, y)

    def __call__(self, contender: Contender, out) -> tuple[float | None, str]:
        import cupy

        return harness.rel_err(harness.device_f32(out), self.ref, xp=cupy), ""


def _torch_cuda(case: Case, x: harness.GpuArrays) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    xt = x.torch()
    theta = torch.from_numpy(_thetas(case.shape)).to(device=xt.device, dtype=xt.dtype)

    def run():
        grid = F.affine_grid(theta, list(xt.shape), align_corners=False)
        return F.grid_sample(xt, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)

    return run


def _gpu_contenders(case: Case, x: harness.GpuArrays) -> list[Contender]:
    import cupy

    def make_gpunn(backend):
        def make():
            if backend == "numpy" and case.dtype not in ("float32", "float64"):
                return None
            (xn,) = harness.natives([x], case.dtype)
            y = cupy.empty_like(xn)
            step = _gpunn(backend)
            return lambda: step(xn, y)
        return make

    nbytes = n_bytes(case.size, harness.itemsize(case.dtype))
    return harness.gpu_contenders(make_gpunn("cuda"), lambda: _torch_cuda(case, x),
                                  make_gpunn("numpy"), nbytes,
                                  "affine_grid + grid_sample, matrices given")


def _run_gpu(runner: harness.Runner) -> None:
    import cupy

    options = runner.options
    dtypes = harness.selected_dtypes(options, GPU_DTYPES, GPU_CAN)
    rng = cupy.random.default_rng(runner.seed)
    for dtype in dtypes:
        for shape in _shapes(options, "cuda"):
            x = harness.GpuArrays(rng.standard_normal(shape, dtype=cupy.float32), dtype)
            case = Case("cuda", shape, dtype, [x.native])
            try:
                check = _GpuCheck(case, x)
            except Exception as e:
                check = harness.failed_check(e)
            runner.run_case(case.record_base(), _gpu_contenders(case, x), check,
                            runner.policy_gpu, case)
            del check, x
            harness.free_gpu_memory()


def run(options=None, *, extra_contenders=()) -> list[Record]:
    """Run the suite; returns finalized records (CPU first, then GPU)."""
    return harness.run_suite(SUITE, options or Options(), _run_cpu, _run_gpu, extra_contenders)
