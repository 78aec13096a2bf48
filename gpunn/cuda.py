"""CUDA kernel loader: ``kernels/<family>.cu`` compiled through CuPy (NVRTC), cached per device.

A family's kernels are C++ templates over the storage type; each op module declares the
instantiations it launches as a :class:`Family`, and every declared instantiation is compiled
in one NVRTC call the first time any of them is used on a device. Local ``#include "x.cuh"``
lines are inlined here, so the text handed to NVRTC is self-contained (no include paths) and
CuPy's on-disk cache, keyed by that text and the options, never serves a stale build.

The same :meth:`Family.text` and :data:`NVRTC_OPTIONS` are what the CI test compiles for sm_80
and sm_90 without a GPU (tests/test_cuda_compile.py).
"""

from __future__ import annotations

import re
import sys
from functools import cache
from pathlib import Path

import numpy as np

#: Where the .cu sources are: inside the installed package, or beside it in a checkout.
KERNEL_DIRS = (Path(__file__).parent / "kernels", Path(__file__).parent.parent / "kernels")

#: Compiler options, the same at run time and in the CI compile test (CuPy adds -arch).
NVRTC_OPTIONS = ("-std=c++17",)

#: C++ storage type of each dtype the cuda backend computes in.
CTYPES = {"float16": "gpunn::half", "bfloat16": "gpunn::bfloat16", "float32": "float",
          "float64": "double"}

#: Every declared family, by name (filled as op modules are imported).
FAMILIES: dict[str, "Family"] = {}

_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    for d in KERNEL_DIRS:
        if (d / "common.cuh").is_file():
            return d
    raise FileNotFoundError(f"gpunn's CUDA sources (common.cuh) are in none of {KERNEL_DIRS}")


@cache
def source(family: str) -> str:
    """The text of ``kernels/<family>.cu`` with its local includes inlined (each once)."""
    seen: set[str] = set()

    def inline(match: re.Match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(inline, (kernel_dir() / name).read_text())

    return _INCLUDE.sub(inline, (kernel_dir() / f"{family}.cu").read_text())


def ctype(dtype) -> str:
    return CTYPES[np.dtype(dtype).name]


def cpp_constant(name: str, value) -> str:
    """One ``constexpr`` definition: bool, int (``int`` when it fits 32 bits, else
    ``long long``) or float (``double``, exact: Python's repr round-trips)."""
    if isinstance(value, bool):
        return f"constexpr bool {name} = {'true' if value else 'false'};"
    if isinstance(value, int):
        ctype = "int" if -2**31 <= value < 2**31 else "long long"
        return f"constexpr {ctype} {name} = {value};"
    if isinstance(value, float):
        return f"constexpr double {name} = {value!r};"
    raise TypeError(f"constant {name}: expected a bool, int or float, got {type(value).__name__}")


class Family:
    """The instantiations of one ``kernels/<family>.cu`` that gpunn launches, and the constants
    its launcher and kernels share (block sizes, chunk lengths, flag bits, row layouts).

    The constants are defined once, in Python, and reach the kernels as a ``constexpr`` prelude
    in namespace ``gpunn`` ahead of the file's text (:meth:`text`): what NVRTC, the CUDA
    simulator and the compile test all compile."""

    def __init__(self, name: str, expressions: list[str], constants: dict | None = None):
        self.name = name
        self.expressions = tuple(expressions)
        self.constants = dict(constants or {})
        FAMILIES[name] = self

    def prelude(self) -> str:
        """The constants as C++ (empty when there are none)."""
        if not self.constants:
            return ""
        lines = [cpp_constant(k, v) for k, v in self.constants.items()]
        return ("// Generated from gpunn's Python launcher (gpunn.cuda.Family.constants).\n"
                "namespace gpunn {\n" + "\n".join(lines) + "\n}  // namespace gpunn\n")

    def text(self) -> str:
        """The compiled text: the constants' prelude, then ``kernels/<name>.cu`` with its
        includes inlined."""
        return self.prelude() + source(self.name)

    def function(self, expression: str):
        """The compiled kernel for one of this family's name expressions, on the current device
        (on the CUDA simulator when it is enabled: :mod:`gpunn.cuda_sim`)."""
        sim = simulator()
        if sim is not None:
            return sim.function(self, expression)
        import cupy

        return _module(self, cupy.cuda.Device().id).get_function(expression)


@cache
def _module(family: Family, device_id: int):
    import cupy

    return cupy.RawModule(code=family.text(), options=NVRTC_OPTIONS,
                          name_expressions=family.expressions)


def simulator():
    """The :mod:`gpunn.cuda_sim` module when the CUDA simulator is enabled, else None."""
    sim = sys.modules.get("gpunn.cuda_sim")
    return sim if sim is not None and sim.enabled() else None


def grid_for(n_items: int, block: int, kernel) -> int:
    """Blocks for a grid-stride loop over ``n_items``: one full wave of the blocks the device
    can hold at once (from the kernel's registers), fewer if ``n_items`` needs fewer. A grid
    that is not a whole number of waves leaves SMs idle for the last partial wave."""
    import cupy

    device = cupy.cuda.Device()
    wanted = max(1, -(-n_items // block))
    return min(wanted, _blocks_per_sm(device.id, kernel.num_regs, block) * device.attributes[
        "MultiProcessorCount"])


@cache
def _blocks_per_sm(device_id: int, regs_per_thread: int, block: int) -> int:
    """Resident blocks per SM, limited by threads, registers (allocated per warp in units of
    256) and the block count."""
    import cupy

    attributes = cupy.cuda.Device(device_id).attributes
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = attributes["MaxRegistersPerMultiprocessor"] // (regs_per_warp * (block // 32))
    by_threads = attributes["MaxThreadsPerMultiProcessor"] // block
    return max(1, min(by_regs, by_threads, attributes["MaxBlocksPerMultiprocessor"]))

