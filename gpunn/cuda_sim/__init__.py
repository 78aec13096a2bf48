"""The CUDA simulator: gpunn's CUDA kernels run on the CPU, without CuPy or a GPU.

``GPUNN_CUDA_SIM=1`` (or :func:`enable`) makes the ``cuda`` backend available: a NumPy-backed
stand-in for CuPy (:mod:`gpunn.cuda_sim.device`) takes the place of ``cupy`` in
``sys.modules``, and ``gpunn.cuda.Family.function`` returns kernels compiled from the same
``kernels/*.cu`` text by the host C++ compiler (:mod:`gpunn.cuda_sim.build`) and launched by
the fiber scheduler of ``runtime.cpp`` (:mod:`gpunn.cuda_sim.launch`). The library's own
launch code runs unchanged: grid sizes from the device's properties, argument packing, chunk
tables, multi-block reductions.

It checks what a GPU would not tell you: barriers and warp collectives that can never
complete, reads of ``__shared__`` memory nobody wrote (filled with 0xFF), argument types
against the kernel's parameters, and with ``sanitize`` out-of-bounds accesses of the array
arguments. Thread and block orders (in order, reversed, seeded random) expose races. It does
not model concurrency between blocks, memory-model effects, CUDA's own libm or speed.

Settings come from the environment and can be changed in code (:func:`configure`,
:func:`settings`): GPUNN_CUDA_SIM_ORDER (``in order``, ``reversed``, ``random``; threads and
blocks alike), GPUNN_CUDA_SIM_SEED, GPUNN_CUDA_SIM_SANITIZE=1, GPUNN_CUDA_SIM_CACHE (the
compiled modules' directory).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import threading

from . import build, device
from .device import SimulatorError
from .launch import LAUNCHES, ORDERS, Kernel

__all__ = ["ENV_VAR", "SimulatorError", "enable", "disable", "enabled", "simulated",
           "configure", "settings", "sm_count", "coverage", "LAUNCHES", "prefetch", "device_view",
           "host_view"]

ENV_VAR = "GPUNN_CUDA_SIM"


@dataclasses.dataclass
class Settings:
    """How launches run: thread and block order, the random order's seed, the sanitizer."""

    thread_order: str = "in order"
    block_order: str = "in order"
    seed: int = 0
    sanitize: bool = False

    def check(self) -> None:
        for name in ("thread_order", "block_order"):
            if getattr(self, name) not in ORDERS:
                raise ValueError(f"{name} must be one of {tuple(ORDERS)}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")


def _from_env() -> Settings:
    order = os.environ.get("GPUNN_CUDA_SIM_ORDER", "in order").strip().replace("_", " ")
    s = Settings(thread_order=order, block_order=order,
                 seed=int(os.environ.get("GPUNN_CUDA_SIM_SEED", "0") or 0),
                 sanitize=os.environ.get("GPUNN_CUDA_SIM_SANITIZE", "") not in ("", "0"))
    s.check()
    return s


SETTINGS = _from_env()
sm_count = device.sm_count

_saved_modules: dict | None = None
_lock = threading.RLock()


def env_requested() -> bool:
    """GPUNN_CUDA_SIM is set to something other than '' or '0'."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def enabled() -> bool:
    return _saved_modules is not None


def _clear_caches() -> None:
    from .. import backend, cuda

    backend.has_cupy.cache_clear()
    backend.cuda_device_count.cache_clear()
    cuda._blocks_per_sm.cache_clear()
    cuda._module.cache_clear()


def enable() -> None:
    """Put the simulated ``cupy`` (and ``cupyx``) in sys.modules; the cuda backend then runs
    on the simulator. Idempotent."""
    global _saved_modules
    with _lock:
        if _saved_modules is not None:
            return
        modules = device.build_modules()
        _saved_modules = {name: sys.modules.get(name) for name in modules}
        sys.modules.update(modules)
        _clear_caches()


def disable() -> None:
    """Restore the modules :func:`enable` replaced (the real CuPy, if any)."""
    global _saved_modules
    with _lock:
        if _saved_modules is None:
            return
        for name, module in _saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _saved_modules = None
        _clear_caches()


@contextlib.contextmanager
def simulated(**overrides):
    """Run the block on the simulator (with :func:`settings` overrides), then restore."""
    was = enabled()
    enable()
    try:
        with settings(**overrides):
            yield SETTINGS
    finally:
        if not was:
            disable()


def configure(**values) -> Settings:
    """Change the settings (thread_order, block_order, order for both, seed, sanitize)."""
    if "order" in values:
        order = values.pop("order")
        values.setdefault("thread_order", order)
        values.setdefault("block_order", order)
    new = dataclasses.replace(SETTINGS, **values)
    new.check()
    for field in dataclasses.fields(Settings):
        setattr(SETTINGS, field.name, getattr(new, field.name))
    return SETTINGS


@contextlib.contextmanager
def settings(**values):
    """:func:`configure` inside the block only."""
    saved = dataclasses.replace(SETTINGS)
    configure(**values)
    try:
        yield SETTINGS
    finally:
        configure(**dataclasses.asdict(saved))


def device_view(a):
    """A NumPy array as a simulated device array over the same memory (no copy)."""
    return a if isinstance(a, device.ndarray) else device.ndarray._wrap(a)


def host_view(a):
    """A simulated device array as the NumPy array over its memory (no copy)."""
    return a._a if isinstance(a, device.ndarray) else a


# --- kernels ------------------------------------------------------------------------------------

_kernels: dict = {}


def _load(name: str, source: str, expressions: tuple) -> dict:
    """{expression: Kernel} of one module (compiled, or from the cache)."""
    path = build.module(source, expressions, label=name)
    library = ctypes.CDLL(str(path))
    return {e: Kernel(name, e, library, i, SETTINGS) for i, e in enumerate(expressions)}


def _family_future(family):
    from .. import cuda

    def compile_family():
        return _load(family.name,
                     family.prelude() + build.kernel_source(cuda.kernel_dir(), family.name),
                     family.expressions)

    return build.submit(("family", family.name, family.expressions,
                         tuple(family.constants.items())), compile_family)


def function(family, expression: str) -> Kernel:
    """The simulated kernel of one of ``family``'s name expressions (its family's module is
    compiled on first use, or loaded from the cache)."""
    key = (family.name, expression)
    kernel = _kernels.get(key)
    if kernel is None:
        if expression not in family.expressions:
            raise KeyError(f"{expression} is not declared by the cuda.Family {family.name!r}")
        for e, k in _family_future(family).result().items():
            _kernels[family.name, e] = k
        kernel = _kernels[key]
    return kernel


def prefetch(families=None) -> None:
    """Start compiling these families (default: every declared one) in the background."""
    from .. import cuda

    for family in (families or list(cuda.FAMILIES.values())):
        _family_future(family)


def _module_kernels(name: str, code: str, expressions: tuple) -> dict:
    """Kernels of a ``cupy.RawModule`` built on the simulator (code already self-contained)."""
    code = f'#line 1 "{name}.cu"\n{code}'  # messages name the module's lines
    return build.submit(("module", name, code, expressions),
                        lambda: _load(name, code, expressions)).result()


device.compile_module = _module_kernels


def coverage() -> dict[str, tuple[int, int, list[str]]]:
    """{family: (instantiations launched, declared, the ones never launched)} for every
    declared family, from :data:`LAUNCHES` (this process)."""
    from .. import cuda

    out = {}
    for name, family in sorted(cuda.FAMILIES.items()):
        missing = [e for e in family.expressions if not LAUNCHES[name, e]]
        out[name] = (len(family.expressions) - len(missing), len(family.expressions), missing)
    return out
