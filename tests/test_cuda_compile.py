"""Every CUDA kernel gpunn launches compiles for sm_80 and sm_90, without a GPU.

The text and options are exactly what run time uses (``Family.text()``: the launcher's
constants as a prelude, then the source; and ``gpunn.cuda.NVRTC_OPTIONS``); the kernels are the name expressions each op module declares
as a ``gpunn.cuda.Family``. NVRTC is called through ctypes from the ``nvidia-cuda-nvrtc`` pip
package (or a CUDA toolkit), so neither CuPy nor a driver is needed.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

import gpunn.cuda
import gpunn.ops  # noqa: F401  (importing the op modules declares their kernel families)
import gpunn.optim.fused  # noqa: F401

ARCHS = ("sm_80", "sm_90")
REQUIRED_FAMILIES = ("activations", "augment", "batchnorm", "dropout", "losses", "optim", "softmax")
NVRTC_SUCCESS = 0


def _nvrtc_candidates():
    """Where libnvrtc may be: the nvidia-cuda-nvrtc wheels first, then a CUDA toolkit."""
    names = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        for sub in ("cu13/lib", "cu12/lib", "cuda_nvrtc/lib"):
            for name in names:
                yield Path(root) / sub / name
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            for name in names:
                yield Path(os.environ[env]) / "lib64" / name
    for name in names:
        yield Path("/usr/local/cuda/lib64") / name


@cache
def _nvrtc():
    """The NVRTC library with its argument types declared, or None."""
    for path in _nvrtc_candidates():
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        prog, p_prog = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
        size = ctypes.POINTER(ctypes.c_size_t)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
        lib.nvrtcCreateProgram.argtypes = [p_prog, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcAddNameExpression.argtypes = [prog, ctypes.c_char_p]
        lib.nvrtcCompileProgram.argtypes = [prog, ctypes.c_int,
                                            ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetProgramLogSize.argtypes = [prog, size]
        lib.nvrtcGetProgramLog.argtypes = [prog, ctypes.c_char_p]
        lib.nvrtcGetLoweredName.argtypes = [prog, ctypes.c_char_p,
                                            ctypes.POINTER(ctypes.c_char_p)]
        lib.nvrtcGetCUBINSize.argtypes = [prog, size]
        lib.nvrtcDestroyProgram.argtypes = [p_prog]
        lib.path = path
        return lib
    return None


def _check(lib, status: int, call: str) -> None:
    assert status == NVRTC_SUCCESS, f"{call}: {lib.nvrtcGetErrorString(status).decode()}"


def compile_family(lib, family: gpunn.cuda.Family, arch: str) -> dict[str, str]:
    """Compile a family's source for ``arch``; return {name expression: lowered name}."""
    source = family.text().encode()
    options = [*gpunn.cuda.NVRTC_OPTIONS, f"--gpu-architecture={arch}"]
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source,
                                       f"{family.name}.cu".encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        for expression in family.expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, expression.encode()),
                   f"nvrtcAddNameExpression({expression})")
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == NVRTC_SUCCESS, (
            f"{family.name}.cu failed to compile for {arch} with {options} "
            f"({lib.nvrtcGetErrorString(status).decode()}):\n{log.value.decode(errors='replace')}")

        lowered = {}
        for expression in family.expressions:
            name = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(name)),
                   f"nvrtcGetLoweredName({expression})")
            assert name.value, f"{expression} has no lowered name"
            lowered[expression] = name.value.decode()
        cubin_size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin_size)), "nvrtcGetCUBINSize")
        assert cubin_size.value > 0, f"{family.name}.cu: empty cubin for {arch}"
        return lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@cache
def _compile_all(lib) -> dict:
    """Every (family, arch) compiled at once, on parallel threads: NVRTC compiles separate
    programs independently (about 15 s instead of 30 s for the lot on two cores).
    Maps (family, arch) to the lowered names, or to the exception the compile raised."""

    def attempt(job):
        try:
            return compile_family(lib, gpunn.cuda.FAMILIES[job[0]], job[1])
        except Exception as error:  # reported by that job's own test
            return error

    families = sorted(gpunn.cuda.FAMILIES.values(), key=lambda f: -len(f.expressions))
    jobs = [(family.name, arch) for family in families for arch in ARCHS]  # biggest first
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 4)) as pool:
        return dict(zip(jobs, pool.map(attempt, jobs)))


def test_families_declared():
    missing = [name for name in REQUIRED_FAMILIES if name not in gpunn.cuda.FAMILIES]
    assert not missing, f"gpunn.ops declares no CUDA family {missing}"
    for family in gpunn.cuda.FAMILIES.values():
        assert family.expressions, f"family {family.name} declares no kernels"
        assert len(set(family.expressions)) == len(family.expressions), family.name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", sorted(gpunn.cuda.FAMILIES))
def test_family_compiles(family, arch):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library found (pip install nvidia-cuda-nvrtc, or set CUDA_PATH)")
    lowered = _compile_all(lib)[family, arch]
    if isinstance(lowered, BaseException):
        raise lowered
    assert len(set(lowered.values())) == len(lowered), "two expressions lowered to one kernel"
