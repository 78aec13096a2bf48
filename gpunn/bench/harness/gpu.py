"""GPU inputs and outputs: device arrays in every dtype (bfloat16 by its bits), outputs as
float32, a case's usual GPU contenders. CuPy and torch are imported only when called."""

from __future__ import annotations

import sys

import numpy as np

from .limits import cuda_copy_limit
from .records import Contender

def gpu_ready() -> str | None:
    """None when a CUDA device is visible to CuPy, else why not."""
    from gpunn import backend

    if not backend.has_cupy():
        return ('CuPy is not installed: pip install "gpunn[cuda13]" (CUDA 13) or '
                '"gpunn[cuda12]" (CUDA 12)')
    if backend.cuda_device_count() == 0:
        return "CuPy sees no CUDA device"
    return None


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name, bfloat16 included (NumPy has no bfloat16)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


class GpuArrays:
    """One input on the device in a dtype: the native CuPy array (None where CuPy cannot hold
    the dtype), its float32 values (what the reference computes on) and a torch view."""

    def __init__(self, values_f32, dtype: str):
        import cupy

        self.dtype = dtype
        self.native_error = ""
        if dtype == "bfloat16":
            bits = bf16_bits(values_f32)
            self.f32 = bf16_to_f32(bits)
            self._torch_bits = bits
            try:
                import ml_dtypes

                self.native = bits.view(ml_dtypes.bfloat16)
            except Exception as e:  # CuPy without bfloat16, or no ml_dtypes
                self.native = None
                self.native_error = f"{type(e).__name__}: {e}"
        else:
            self.native = values_f32.astype(dtype)
            self.f32 = self.native.astype(cupy.float32, copy=False)
            self._torch_bits = None

    def torch(self):
        import torch

        if self._torch_bits is not None:
            return torch.from_dlpack(self._torch_bits).view(torch.bfloat16)
        return torch.from_dlpack(self.native)


def natives(arrays: list[GpuArrays], dtype: str) -> list:
    """The native CuPy arrays of ``arrays``; TypeError where CuPy cannot hold the dtype."""
    out = [a.native for a in arrays]
    if any(a is None for a in out):
        raise TypeError(f"CuPy cannot hold {dtype} arrays: {arrays[0].native_error}")
    return out


def bf16_bits(a32):
    """Round float32 CuPy values to bfloat16 (to nearest even), as int16 bit patterns."""
    import cupy

    u = a32.view(cupy.uint32)
    rounded = (u + cupy.uint32(0x7FFF) + ((u >> 16) & cupy.uint32(1))) >> 16
    return rounded.astype(cupy.uint16).view(cupy.int16)


def bf16_to_f32(bits16):
    import cupy

    return (bits16.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)


def device_f32(out):
    """A contender's output as a float32 CuPy array (torch tensors and bfloat16 included)."""
    import cupy

    if type(out).__module__.split(".")[0] == "torch":
        import torch

        t = out.detach().float().contiguous()
        torch.cuda.current_stream().synchronize()
        return cupy.from_dlpack(t)
    if out.dtype == cupy.float32:
        return out
    if np.dtype(out.dtype).name == "bfloat16":
        return bf16_to_f32(out.view(cupy.uint16))
    return out.astype(cupy.float32)


def gpu_contenders(make_gpunn, make_torch, make_unfused, nbytes: int,
                   torch_note: str = "") -> list[Contender]:
    """A case's usual GPU contenders, in the table's order: gpunn cuda, torch cuda (``make_torch``
    is called once torch is seen to have CUDA; ``torch_note`` its note), cupy unfused (gpunn's
    reference backend through CuPy; ``make_unfused`` returns None where it does not apply) and
    the copy limit of ``nbytes``."""

    def make_torch_cuda():
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("this torch has no CUDA")
        return make_torch()

    return [
        Contender("gpunn cuda", "gpunn", make_gpunn, clock="cupy"),
        Contender("torch cuda", "torch", make_torch_cuda, clock="torch", note=torch_note),
        Contender("cupy unfused", "baseline", make_unfused, clock="cupy"),
        Contender("copy limit", "limit", lambda: cuda_copy_limit(nbytes), clock="cupy",
                  check=False),
    ]


def free_gpu_memory() -> None:
    """Return the cached blocks of CuPy's pool (and torch's, when torch is loaded) to the
    device, between groups of cases."""
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()
