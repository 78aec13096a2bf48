"""Compile kernels/*.cu for the host: the simulator's runtime library and kernel modules.

A kernel module is the family's text (local includes inlined, with ``#line`` marks so that
messages name kernels/<file>:<line>), after the force-included ``sim.cuh``, followed by one
entry pair per instantiation: its parameter signature and a trampoline that calls it with
cuLaunchKernel-style arguments. Modules are cached under :func:`cache_dir` by a hash of
everything that goes into them (texts, flags, compiler), so a second run compiles nothing.

Granularity (``GPUNN_CUDA_SIM_UNIT``): ``kernel`` (default) builds one module per
instantiation, on demand and in parallel; ``family`` builds one module per family.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

HERE = Path(__file__).parent
SHIM = HERE / "sim.cuh"
RUNTIME = HERE / "runtime.cpp"
LINK_SCRIPT = HERE / "shared.ld"

#: Flags of every kernel module. -ffp-contract=fast (with FMA where the CPU has it) contracts
#: a*b+c as NVRTC does by default (GCC contracts only with -fexpensive-optimizations, an -O2
#: pass added here to -O1); rounded intrinsics (__fmul_rn, ...) stay uncontracted.
KERNEL_FLAGS = ("-std=c++17", "-O1", "-fexpensive-optimizations", "-fPIC", "-shared",
                "-fno-threadsafe-statics", "-fno-exceptions", "-fvisibility=hidden",
                "-fdata-sections", "-ffp-contract=fast", "-w", "-DGPUNN_CUDA_SIM=1")
RUNTIME_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden", "-w")

_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$')


class CompileError(RuntimeError):
    """The host compiler rejected a simulated kernel module (its log is the message)."""


def cache_dir() -> Path:
    """$GPUNN_CUDA_SIM_CACHE, else $XDG_CACHE_HOME/gpunn/cuda_sim (~/.cache/gpunn/cuda_sim)."""
    if os.environ.get("GPUNN_CUDA_SIM_CACHE"):
        path = Path(os.environ["GPUNN_CUDA_SIM_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        path = base / "gpunn" / "cuda_sim"
    path.mkdir(parents=True, exist_ok=True)
    return path


@cache
def compiler() -> str:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise CompileError(f"the CUDA simulator needs a C++17 compiler; {cxx!r} is not on PATH "
                           "(install g++ or set CXX)")
    return cxx


@cache
def _compiler_id() -> str:
    return subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout


@cache
def machine_flags() -> tuple[str, ...]:
    """-mfma where the CPU has FMA (x86-64), so contracted a*b+c is one rounding as on a GPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    return ("-mfma",) if re.search(r"^flags\s*:.*\bfma\b", flags, re.MULTILINE) else ()


def kernel_source(directory: Path, family: str) -> str:
    """``<family>.cu`` with its local includes inlined once each, as :func:`gpunn.cuda.source`
    does, plus ``#line`` marks pointing back at the files."""
    seen: set[str] = set()

    def text(name: str) -> list[str]:
        out = [f'#line 1 "{name}"']
        for number, line in enumerate((directory / name).read_text().splitlines(), 1):
            match = _INCLUDE.match(line)
            if not match:
                out.append(line)
                continue
            include = match.group(1)
            if include not in seen:
                seen.add(include)
                out.extend(text(include))
            out.append(f'#line {number + 1} "{name}"')
        return out

    return "\n".join(text(f"{family}.cu")) + "\n"


def _entries(expressions) -> str:
    """The exported signature/trampoline pair of each instantiation."""
    lines = ["namespace gpunn { struct half; struct bfloat16; }",
             "template <> struct gpunn_sim::TypeCode<gpunn::half> {",
             '  static void put(char* out) { std::snprintf(out, 16, "h2"); } };',
             "template <> struct gpunn_sim::TypeCode<gpunn::bfloat16> {",
             '  static void put(char* out) { std::snprintf(out, 16, "B2"); } };',
             "#define GPUNN_SIM_EXPORT extern \"C\" __attribute__((visibility(\"default\")))",
             "extern char gpunn_sim_shared_lo[] __attribute__((visibility(\"hidden\")));",
             "extern char gpunn_sim_shared_hi[] __attribute__((visibility(\"hidden\")));",
             "GPUNN_SIM_EXPORT void gpunn_sim_shared_bounds(char** lo, char** hi) {",
             "  *lo = gpunn_sim_shared_lo; *hi = gpunn_sim_shared_hi; }"]
    for i, expression in enumerate(expressions):
        lines += [f"GPUNN_SIM_EXPORT void gpunn_sim_signature_{i}(char* out, unsigned long size) {{",
                  f"  ::gpunn_sim::signature(&{expression}, out, size); }}",
                  f"GPUNN_SIM_EXPORT void gpunn_sim_kernel_{i}(void** args) {{",
                  f"  ::gpunn_sim::invoke(&{expression}, args); }}"]
    return "\n".join(lines) + "\n"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise CompileError(f"{what} failed to compile for the CUDA simulator:\n"
                           f"{' '.join(command)}\n{done.stderr[-20000:]}")


def _publish(build, target: Path) -> Path:
    """Run ``build(temporary path)`` and move the result to ``target`` (atomic: concurrent
    builders of one target each write their own file and the last rename wins)."""
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_runtime_lock = threading.Lock()


def runtime_library() -> Path:
    """The scheduler library (built once per runtime text, flags and compiler)."""
    with _runtime_lock:
        key = _digest(RUNTIME.read_text(), SHIM.read_text(), RUNTIME_FLAGS, _compiler_id())
        target = cache_dir() / f"gpunn_sim_rt-{key}.so"
        return _publish(lambda out: _run(
            [compiler(), *RUNTIME_FLAGS, f"-I{HERE}", f"-Wl,-soname,{target.name}", str(RUNTIME),
             "-o", str(out)], "the simulator runtime"), target)


def module(source: str, expressions, extra_flags=(), label: str = "kernel") -> Path:
    """A shared library running ``expressions`` of ``source`` (a kernel text with its
    includes already inlined), from the cache when it was built before."""
    runtime = runtime_library()
    flags = (*KERNEL_FLAGS, *machine_flags(), *extra_flags)
    text = source + "\n" + _entries(expressions)
    key = _digest(text, SHIM.read_text(), LINK_SCRIPT.read_text(), flags, _compiler_id(),
                  runtime.name)
    target = runtime.parent / f"{key}.so"

    def build(out: Path) -> None:
        cpp = out.with_suffix(".cpp")
        cpp.write_text(text)
        try:
            _run([compiler(), *flags, "-include", str(SHIM), str(cpp), "-o", str(out),
                  str(runtime), "-Wl,-rpath,$ORIGIN", f"-Wl,-T,{LINK_SCRIPT}"], label)
        finally:
            cpp.unlink(missing_ok=True)

    return _publish(build, target)


_POOL: ThreadPoolExecutor | None = None
_FUTURES: dict = {}
_futures_lock = threading.Lock()


def workers() -> int:
    """Parallel compiles: $GPUNN_CUDA_SIM_JOBS, else the CPU count (at most 8)."""
    return int(os.environ.get("GPUNN_CUDA_SIM_JOBS") or min(os.cpu_count() or 1, 8))


def submit(key, build) -> Future:
    """``build()`` on the compile pool, once per key."""
    global _POOL
    with _futures_lock:
        if key not in _FUTURES:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=workers(),
                                           thread_name_prefix="gpunn-cuda-sim-build")
            _FUTURES[key] = _POOL.submit(build)
        return _FUTURES[key]
