"""The simulated device: a NumPy-backed stand-in for the part of CuPy that gpunn and its tests use.

Device memory is host memory. :class:`ndarray` wraps a NumPy array the way ``cupy.ndarray``
wraps device memory: allocations are 256-byte aligned (so the kernels' 16-byte vector paths
are taken exactly when they would be on a GPU), ``cupy.empty`` memory is filled with 0xFF
(an element nobody wrote reads as NaN or -1), arithmetic and NumPy functions work and return
device arrays, and host arrays are not converted implicitly (``np.asarray(device_array)``
is a TypeError, as in CuPy; use ``.get()`` or ``cupy.asnumpy``). ``cupy.cuda`` offers a
device with H100-like properties (:data:`PROPERTIES`; the SM count can be changed) and no-op
streams and events.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import math
import sys
import time
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

ALIGN = 256

class SimulatorError(RuntimeError):
    """A simulated launch failed: a bad argument, a deadlock, a fault, an out-of-bounds write;
    or something the simulated device does not have."""


#: What the simulated device reports (an H100 SXM's figures; ``cuda_sim.sm_count`` changes
#: MultiProcessorCount).
PROPERTIES = {
    "MultiProcessorCount": 132,
    "MaxRegistersPerMultiprocessor": 65536,
    "MaxRegistersPerBlock": 65536,
    "MaxThreadsPerMultiProcessor": 2048,
    "MaxThreadsPerBlock": 1024,
    "MaxBlocksPerMultiprocessor": 32,
    "MaxSharedMemoryPerMultiprocessor": 233472,
    "MaxSharedMemoryPerBlock": 49152,
    "MaxSharedMemoryPerBlockOptin": 232448,
    "WarpSize": 32,
    "MaxGridDimX": 2**31 - 1,
    "MaxGridDimY": 65535,
    "MaxGridDimZ": 65535,
    "ComputeCapabilityMajor": 9,
    "ComputeCapabilityMinor": 0,
    "L2CacheSize": 52428800,
}
NAME = "gpunn CUDA simulator (H100-like)"


def _aligned_empty(shape, dtype, order="C") -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    flat = raw[start:start + nbytes].view(dtype)
    if order == "F":
        return flat.reshape(shape[::-1]).T
    return flat.reshape(shape)


def _to_device(host: np.ndarray) -> "ndarray":
    """A new aligned device array holding a copy of ``host``."""
    a = _aligned_empty(host.shape, host.dtype)
    np.copyto(a, host, casting="unsafe")
    return ndarray._wrap(a)


class MemoryPointer:
    """``ndarray.data``: the address of the first element."""

    def __init__(self, owner: "ndarray"):
        self._owner = owner
        self.ptr = owner._a.__array_interface__["data"][0]
        self.device = Device(0)

    def memset_async(self, value: int, size: int, stream=None) -> None:
        ctypes.memset(self.ptr, value, size)

    def memset(self, value: int, size: int) -> None:
        ctypes.memset(self.ptr, value, size)

    def __int__(self):
        return self.ptr


class ndarray(NDArrayOperatorsMixin):
    """Device memory of the simulated GPU (host memory underneath)."""

    __slots__ = ("_a", "_base")
    __array_priority__ = 100

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("the simulated cupy.ndarray takes no memptr or strides")
        self._a = _aligned_empty(shape, dtype, order)
        self._base = None

    @classmethod
    def _wrap(cls, a: np.ndarray, base: "ndarray | None" = None) -> "ndarray":
        obj = object.__new__(cls)
        obj._a = a
        obj._base = base
        return obj

    def _derived(self, r):
        """A result of an operation on self: a view of self's memory keeps CuPy's ``base``
        (the array that owns the memory), anything else is a new array."""
        if isinstance(r, np.ndarray) and r.base is not None and np.may_share_memory(r, self._a):
            return ndarray._wrap(r, self._base if self._base is not None else self)
        return _wrap_result(r, scalars=True)

    # --- what CuPy arrays have ---------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    base = property(lambda self: self._base)
    T = property(lambda self: self._derived(self._a.T))
    data = property(lambda self: MemoryPointer(self))
    device = property(lambda self: Device(0))

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if isinstance(arr, ndarray):
            raise TypeError("set() takes a host array")
        self._a[...] = arr

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly. (gpunn's CUDA simulator)")

    def __dlpack__(self, *args, **kwargs):
        raise TypeError("the CUDA simulator's arrays do not export DLPack")

    def __repr__(self):
        return repr(self._a)

    def __str__(self):
        return str(self._a)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return self._a.__index__()

    def __complex__(self):
        return complex(self._a)

    def __getitem__(self, key):
        key = _unwrap(key)
        r = self._a[key]
        if not isinstance(r, np.ndarray):  # CuPy: indexing to one element gives a 0-d view
            r = self._a[(*key, Ellipsis) if isinstance(key, tuple) else (key, Ellipsis)]
        return self._derived(r)

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value, host_ok=False)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        return (_to_device, (self.get(),))

    def copy(self, order="C"):
        return _to_device(self._a)

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _to_device(self._a.astype(dtype))

    def view(self, dtype=None, *args):
        return self._derived(self._a.view(dtype) if dtype is not None else self._a.view())

    def fill(self, value):
        self._a.fill(value)

    def item(self, *args):
        return self._a.item(*args)

    def tolist(self):
        return self._a.tolist()

    def __getattr__(self, name):  # reshape, ravel, sum, max, transpose, ...: NumPy's, wrapped
        if name.startswith("__") or name == "_a":
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: self._derived(attr(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap_result(attr)

    # --- NumPy's protocols: compute on the host memory, hand back device arrays ---------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        given = kwargs.get("out")
        if given is not None:
            kwargs["out"] = tuple(_unwrap(o, host_ok=False) for o in given)
        result = getattr(ufunc, method)(*_unwrap(inputs, host_ok=False), **kwargs)
        if given is not None and method == "__call__":
            return given[0] if len(given) == 1 else given  # CuPy hands back out itself
        return _wrap_result(result, scalars=True)

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap_result(func(*_unwrap(args, host_ok=False), **_unwrap(kwargs, host_ok=False)),
                            scalars=True)


ndarray.__module__ = "cupy"  # what gpunn.backend (and CuPy's users) tell device arrays by


def _unwrap(value, host_ok: bool = True):
    """Device arrays -> their NumPy arrays, inside tuples, lists and dicts. A host array
    among device arrays is a TypeError unless ``host_ok`` (CuPy converts nothing implicitly)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, tuple):
        return tuple(_unwrap(v, host_ok) for v in value)
    if isinstance(value, list):
        return [_unwrap(v, host_ok) for v in value]
    if isinstance(value, dict):
        return {k: _unwrap(v, host_ok) for k, v in value.items()}
    if not host_ok and isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {type(value)}: the CUDA simulator's cupy, as CuPy, "
                        "does not mix host (NumPy) arrays into device computations; move it "
                        "with cupy.asarray first")
    return value


def _wrap_result(value, scalars: bool = False):
    """NumPy results -> device arrays (fresh results 256-byte aligned, views as they are)."""
    if isinstance(value, np.ndarray):
        if value.base is None and value.__array_interface__["data"][0] % ALIGN:
            return _to_device(value)
        return ndarray._wrap(value)
    if scalars and isinstance(value, np.generic):
        return _to_device(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap_result(v, scalars) for v in value)
    if isinstance(value, list):
        return [_wrap_result(v, scalars) for v in value]
    return value


# --- module-level functions --------------------------------------------------------------------

def asarray(a, dtype=None, order=None, blocking=False):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    _refuse_tensor(a)
    return _to_device(np.asarray(a, dtype=dtype))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, blocking=False):
    if isinstance(obj, ndarray):
        out = obj.astype(dtype or obj.dtype) if copy or dtype is not None else obj
    else:
        _refuse_tensor(obj)
        out = _to_device(np.array(obj, dtype=dtype, ndmin=ndmin))
    return out


def ascontiguousarray(a, dtype=None):
    a = asarray(a)
    dtype = np.dtype(dtype) if dtype is not None else a.dtype
    if a.flags.c_contiguous and a.dtype == dtype and a.ndim >= 1:
        return a
    return _to_device(np.ascontiguousarray(a._a, dtype=dtype))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    if out is not None:
        np.copyto(out, a)
        return out
    return np.asarray(a, order=order)


def _filled(shape, dtype, value, order="C"):
    a = _aligned_empty(shape, dtype, order)
    if value is not None:
        a.fill(value)
    elif a.size:
        a.reshape(-1).view(np.uint8).fill(0xFF)  # what nobody writes reads as NaN (or -1)
    return ndarray._wrap(a)


def empty(shape, dtype=float, order="C"):
    return _filled(shape, dtype, None, order)


def zeros(shape, dtype=float, order="C"):
    return _filled(shape, dtype, 0, order)


def ones(shape, dtype=float, order="C"):
    return _filled(shape, dtype, 1, order)


def full(shape, fill_value, dtype=None, order="C"):
    if dtype is None:
        dtype = np.asarray(_unwrap(fill_value)).dtype
    a = _filled(shape, dtype, None, order)
    a._a[...] = _unwrap(fill_value)
    return a


def _like(a, dtype, shape):
    return (a.shape if shape is None else shape), (a.dtype if dtype is None else dtype)


def empty_like(a, dtype=None, order="K", subok=None, shape=None):
    return empty(*_like(a, dtype, shape))


def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    return zeros(*_like(a, dtype, shape))


def ones_like(a, dtype=None, order="K", subok=None, shape=None):
    return ones(*_like(a, dtype, shape))


def full_like(a, fill_value, dtype=None, order="K", subok=None, shape=None):
    shape, dtype = _like(a, dtype, shape)
    return full(shape, fill_value, dtype)


def from_dlpack(x, *args, **kwargs):
    _refuse_tensor(x)
    raise TypeError(f"the CUDA simulator cannot import {type(x).__name__} through DLPack")


def _refuse_tensor(x):
    if type(x).__module__.split(".")[0] == "torch":
        raise TypeError("the CUDA simulator has no CUDA torch tensors: its device memory is "
                        "host memory that only gpunn's simulated cupy arrays address")


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def _numpy_function(name, function):
    """A NumPy function as a cupy one: device arrays in, device arrays out (host arrays in
    are refused, as CuPy does)."""

    def run(*args, **kwargs):
        return _wrap_result(function(*_unwrap(args, host_ok=False),
                                     **_unwrap(kwargs, host_ok=False)), scalars=True)

    run.__name__ = name
    return run


class _Namespace(types.ModuleType):
    """A NumPy namespace (numpy, numpy.linalg, ...) whose functions return device arrays."""

    def __init__(self, name, source):
        super().__init__(name)
        self.__source = source
        self.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(self, name):
        attr = getattr(self.__source, name)
        if isinstance(attr, type) or not callable(attr):
            if isinstance(attr, types.ModuleType):
                return _Namespace(f"{self.__name__}.{name}", attr)
            return attr
        wrapped = _numpy_function(name, attr)
        setattr(self, name, wrapped)
        return wrapped


# --- cupy.cuda ----------------------------------------------------------------------------------

class Device:
    def __init__(self, device=None):
        device = 0 if device is None else int(device)
        if device != 0:
            raise SimulatorError(f"the CUDA simulator has one device (0), not {device}")
        self.id = 0

    @property
    def attributes(self):
        return dict(PROPERTIES)

    compute_capability = "90"

    def use(self):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("gpunn-sim-device", self.id))

    def __repr__(self):
        return "<CUDA Device 0 (gpunn simulator)>"


class Stream:
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=0, device_id=0):
        self.ptr = 0
        self.device_id = 0

    def synchronize(self):
        pass

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ExternalStream(Stream):
    def __init__(self, ptr, device_id=-1):
        super().__init__()


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass

    done = property(lambda self: True)


def get_elapsed_time(start: Event, end: Event) -> float:
    return (end.time - start.time) * 1e3


def _runtime_module():
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.getDevice = lambda: 0
    runtime.runtimeGetVersion = lambda: 13000
    runtime.driverGetVersion = lambda: 13000
    runtime.deviceSynchronize = lambda: None
    runtime.getDeviceProperties = lambda device=0: {
        "name": NAME.encode(), "multiProcessorCount": PROPERTIES["MultiProcessorCount"],
        "totalGlobalMem": 80 * 2**30, "major": 9, "minor": 0,
        "maxThreadsPerBlock": 1024, "warpSize": 32, "sharedMemPerBlock": 49152,
        "regsPerMultiprocessor": 65536, "maxThreadsPerMultiProcessor": 2048,
        "l2CacheSize": PROPERTIES["L2CacheSize"]}
    runtime.CUDARuntimeError = RuntimeError
    return runtime


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass

    def set_limit(self, size=None, fraction=None):
        pass


_POOL = _MemoryPool()


#: Compiles a RawModule's kernels: (name, code, name expressions) -> {expression: kernel}.
#: gpunn.cuda_sim sets it when it loads (this module imports none of the simulator's others).
compile_module = None


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=...)`` on the simulator:
    the code is compiled for the host (include lines are not resolved: pass self-contained
    text, as gpunn.cuda.Family.text gives)."""

    def __init__(self, code=None, options=(), name_expressions=(), name="module", **kwargs):
        self._kernels = compile_module(name, code, tuple(name_expressions or ()))

    def get_function(self, name):
        try:
            return self._kernels[name]
        except KeyError:
            raise KeyError(f"{name} is not one of this module's name_expressions") from None


def build_modules() -> dict[str, types.ModuleType]:
    """The modules to put in sys.modules: cupy, cupy.cuda, cupy.cuda.runtime, cupyx, ..."""
    cupy = _Namespace("cupy", np)
    me = sys.modules[__name__]
    for name in ("ndarray", "asarray", "array", "ascontiguousarray", "asnumpy", "empty", "zeros",
                 "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like",
                 "from_dlpack", "get_array_module", "RawModule"):
        setattr(cupy, name, getattr(me, name))
    cupy.get_default_memory_pool = lambda: _POOL
    cupy.get_default_pinned_memory_pool = lambda: _POOL
    cupy.__version__ = "14.0.0+gpunn.sim"
    cupy.GPUNN_SIMULATOR = True
    cuda = types.ModuleType("cupy.cuda")
    cuda.__spec__ = importlib.machinery.ModuleSpec("cupy.cuda", None)
    runtime = _runtime_module()
    runtime.__spec__ = importlib.machinery.ModuleSpec("cupy.cuda.runtime", None)
    cuda.runtime = runtime
    cuda.Device = Device
    cuda.Stream = Stream
    cuda.ExternalStream = ExternalStream
    cuda.Event = Event
    cuda.get_elapsed_time = get_elapsed_time
    cuda.get_current_stream = lambda device=None: Stream()
    cuda.is_available = lambda: True
    cupy.cuda = cuda
    cupy.cuda.MemoryPointer = MemoryPointer
    cupy.cuda.Stream.null = Stream()
    cupyx = types.ModuleType("cupyx")
    cupyx.__spec__ = importlib.machinery.ModuleSpec("cupyx", None)
    scipy = types.ModuleType("cupyx.scipy")
    scipy.__spec__ = importlib.machinery.ModuleSpec("cupyx.scipy", None)
    import scipy.special as host_special

    special = _Namespace("cupyx.scipy.special", host_special)
    cupyx.scipy = scipy
    scipy.special = special
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime, "cupyx": cupyx,
            "cupyx.scipy": scipy, "cupyx.scipy.special": special}


@contextlib.contextmanager
def sm_count(n: int):
    """Report ``n`` SMs inside the block (launch sizes derived from it change)."""
    saved = PROPERTIES["MultiProcessorCount"]
    PROPERTIES["MultiProcessorCount"] = int(n)
    try:
        yield
    finally:
        PROPERTIES["MultiProcessorCount"] = saved
