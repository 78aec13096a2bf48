"""gpunn: fused training kernels for NumPy, CuPy and PyTorch arrays.

``import gpunn`` is cheap: it imports neither CuPy nor torch and compiles nothing. The
submodules (``gpunn.ops``, ``gpunn.backend``, ...) load on first access.
"""

import importlib
import os

__version__ = "0.1.0"

_SUBMODULES = ("backend", "bench", "cli", "cpu_math", "cuda", "nn", "ops", "optim", "torch")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'gpunn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])


if os.environ.get("GPUNN_CUDA_SIM", "") not in ("", "0"):  # kernels on the CPU: gpunn/cuda_sim
    from . import cuda_sim

    cuda_sim.enable()
