"""Where an op runs: the one place in gpunn that tells arrays apart.

Backends
    numpy  the reference: plain array code, readable and unfused. On CuPy data it runs the
           same code through CuPy (this is the "unfused CuPy" baseline of the benchmarks).
    cpu    fused Numba kernels on host memory.
    cuda   fused CUDA kernels (``kernels/*.cu`` compiled through CuPy) on device memory.

Numba is a required dependency (every op module compiles its CPU kernels with it), so ``cpu``
is always available; CuPy is optional and only ``cuda`` needs it.

The backend follows the data: NumPy arrays and CPU torch tensors run on ``cpu``, CuPy arrays
and CUDA torch tensors on ``cuda``. ``backend=`` on an
op, or else the ``GPUNN_BACKEND`` environment variable, overrides that choice; a request
that cannot be met raises. Data never moves between host and device behind the user's back.

Results come back in the caller's array type: torch tensors are viewed as NumPy/CuPy arrays
without a copy (``Tensor.numpy`` / DLPack) and the result is viewed back the same way.
CUDA work on torch tensors is queued on torch's current stream.

Ops never tell arrays apart themselves: the :class:`Call` that :func:`resolve` returns gives
them the caller's arrays as NumPy/CuPy arrays (``view``, ``native``), new arrays of the
caller's kind on its device (``empty``, ``output``), the check of an array written in place
(``check_in_place``) and the result in the caller's type (``wrap``); :func:`to_host` copies
any array to host memory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import operator
import os
import sys
from dataclasses import dataclass
from functools import cache
from operator import attrgetter, methodcaller

import numba
import numpy as np

from .cpu_jit import serial, threaded

BACKENDS = ("numpy", "cpu", "cuda")
ENV_VAR = "GPUNN_BACKEND"

#: The dtypes each backend takes (the one dtype table of gpunn: ops, optimizers and layers).
DTYPES = {
    "numpy": ("float32", "float64"),
    "cpu": ("float32", "float64"),
    "cuda": ("float16", "bfloat16", "float32", "float64"),
}
#: The 16-bit storage types, computed in float32.
HALF_DTYPES = ("float16", "bfloat16")


def compute_dtype_name(dtype: str) -> str:
    """The dtype the math on data of dtype ``dtype`` (a name) runs in: float32 for the 16-bit
    types, else the dtype itself (float64 math for float64). Also the dtype of optimizer
    states and master weights of 16-bit parameters, and of BN statistics of 16-bit data."""
    return "float32" if dtype in HALF_DTYPES else dtype


@cache
def has_cupy() -> bool:
    return importlib.util.find_spec("cupy") is not None


@cache
def cuda_device_count() -> int:
    """Devices CuPy can see (0 without CuPy or without a driver)."""
    if not has_cupy():
        return 0
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, or a driver older than CuPy's runtime
        return 0


def available() -> tuple[str, ...]:
    """The backends this machine can run."""
    return tuple(b for b in BACKENDS if b != "cuda" or cuda_device_count() > 0)


def array_kind(a, name: str) -> str:
    """'numpy', 'cupy' or 'torch', for an array gpunn can address directly (plain memory in
    native byte order); anything else is a TypeError naming the argument."""
    if isinstance(a, np.ndarray):
        if type(a) is not np.ndarray and type(a) is not np.memmap:
            raise TypeError(f"{name} is a {type(a).__name__}, a NumPy array subclass whose "
                            "indexing or data gpunn cannot treat as a plain array; pass "
                            f"np.asarray({name})")
        if not a.dtype.isnative:
            raise TypeError(f"{name} has non-native byte order (dtype {a.dtype.str}); gpunn "
                            f"computes in native order: pass {name}.astype("
                            f"{name}.dtype.newbyteorder('='))")
        return "numpy"
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return module
    torch = sys.modules.get("torch")
    if module == "torch" or (torch is not None and isinstance(a, torch.Tensor)):
        _check_plain_tensor(a, name)
        return "torch"
    raise TypeError(f"{name} must be a NumPy array, a CuPy array or a torch tensor, "
                    f"got {type(a).__name__}")


def _check_plain_tensor(t, name: str) -> None:
    """A torch tensor whose elements are plain strided memory (what a kernel addresses):
    not a subclass (DTensor, ...), not sparse, quantized or meta. TypeError otherwise."""
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"{name} is a {type(t).__name__}, a torch.Tensor subclass whose memory "
                        "gpunn cannot address directly; pass plain tensors (for a DTensor, "
                        "its .to_local() shard)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; gpunn takes dense (torch.strided) "
                        "tensors")
    if t.is_quantized or t.is_meta:
        raise TypeError(f"{name} is a {'quantized' if t.is_quantized else 'meta'} tensor; "
                        "gpunn takes tensors holding plain floating-point data")


def array_module(a):
    """numpy for a NumPy array, cupy for a CuPy array (the native arrays ops compute on)."""
    if isinstance(a, np.ndarray):
        return np
    import cupy

    return cupy


def dtype_name(a) -> str:
    """The element type's short name: 'float32', 'bfloat16', ... (torch's too)."""
    return _dtype_name(a.dtype)


@cache
def _dtype_name(dtype) -> str:
    # cached: numpy's dtype.name costs ~10 us, a third of a small op's whole call
    if type(dtype).__module__.startswith("torch"):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def describe(a, name: str) -> tuple:
    """(kind, device, dtype name, shape, layout, data address) of one array: what the
    multi-tensor optimizer step checks and records for every tensor it touches. ``layout``
    is "C" for C-contiguous data, the strides of other dense layouts of torch tensors (such
    as channels_last), and None for anything else."""
    kind = array_kind(a, name)
    if kind == "numpy":
        return (kind, "cpu", _dtype_name(a.dtype), a.shape, "C" if a.flags.c_contiguous else None,
                a.__array_interface__["data"][0])
    if kind == "cupy":
        return (kind, f"cuda:{a.device.id}", _dtype_name(a.dtype), a.shape,
                "C" if a.flags.c_contiguous else None, a.data.ptr)
    shape = tuple(a.shape)
    layout = "C" if a.is_contiguous() else _dense_strides(shape, a.stride())
    if layout is not None and a.numel() and not storages_hold([a]):
        raise ValueError(f"{name}: its storage ({a.untyped_storage().nbytes()} bytes) no longer "
                         f"holds its {a.numel()} elements (freed or resized storage)")
    return (kind, _device(a, kind, name), _dtype_name(a.dtype), shape, layout, a.data_ptr())


def storages_hold(tensors: list) -> bool:
    """Whether the storage of every torch tensor in ``tensors`` still holds the bytes up to
    its last element in a dense layout (a storage freed or resized to fewer bytes does not):
    0.3 us a tensor, a C-level pass over a list (:func:`describe` checks one this way)."""
    import torch

    T = torch.Tensor
    ends = map(operator.mul, map(operator.add, map(T.storage_offset, tensors),
                                 map(T.numel, tensors)), map(T.element_size, tensors))
    return all(map(operator.le, ends, map(methodcaller("nbytes"),
                                          map(T.untyped_storage, tensors))))


def array_signatures(arrays: list, role: str = "written") -> tuple | None:
    """What a kernel handed these arrays' addresses relies on, cheaply (C-level getters, no
    Python call per array), to be compared with the signatures taken when the addresses
    were recorded; None if one is not an array of the first one's kind. ``role``:

    - "written" (what a step writes and the caller may swap: parameters) and "read"
      (gradients): for torch tensors the address, strides, shape and dtype (``.data`` can
      swap the memory, the shape or the strides under the same tensor object); for
      NumPy/CuPy arrays the object id, shape, and writeability of written ones: an array's
      memory moves only with its shape (``resize``), the caller keeps the objects alive so
      that their ids stay theirs, and a new dtype or strides set in place (deprecated) still
      spans the same bytes;
    - "owned" (arrays the caller made and holds, such as optimizer states): a tensor's
      address and element count (``resize_`` keeps the address; a storage resize
      reallocates; the count, unlike the shape, makes no object: 600 states cost 100 us
      less a step with cold caches), an array's id, shape and writeability, as for
      written ones."""
    if not arrays:
        return ()
    getters = _SIGNATURES[role].get(type(arrays[0]))
    try:
        if getters is None:
            getters = _register_signatures(arrays[0], role)
        return tuple(list(map(get, arrays)) for get in getters)
    except (AttributeError, TypeError, RuntimeError):  # another kind, no storage (sparse)
        return None


def _register_signatures(a, role: str):
    """The signature getters of a type seen for the first time (registered here: torch and
    CuPy are imported by the caller's data, not by gpunn)."""
    kind = array_kind(a, "array")
    if kind == "torch":
        import torch

        # the unbound methods: half the cost of methodcaller (200 tensors: 18 us, not 38)
        full = (torch.Tensor.data_ptr, torch.Tensor.stride, attrgetter("shape", "dtype"))
        for plain in (torch.Tensor, torch.nn.Parameter):
            _SIGNATURES["written"][plain] = _SIGNATURES["read"][plain] = full
            _SIGNATURES["owned"][plain] = (torch.Tensor.data_ptr, torch.Tensor.numel)
    else:  # cupy
        _SIGNATURES["written"][type(a)] = _SIGNATURES["read"][type(a)] = (id, attrgetter("shape"))
        _SIGNATURES["owned"][type(a)] = (id, attrgetter("shape"))
    return _SIGNATURES[role][type(a)]


_SIGNATURES = {
    "written": {np.ndarray: (id, attrgetter("shape", "flags.writeable"))},
    "read": {np.ndarray: (id, attrgetter("shape"))},
    "owned": {np.ndarray: (id, attrgetter("shape", "flags.writeable"))},
}


def _dense_strides(shape, strides):
    """The strides if they lay the elements out densely (a permutation of C order), else None."""
    expected = 1
    for size, stride in sorted(zip(shape, strides), key=lambda d: (d[1], d[0])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return tuple(strides)


def _device(a, kind: str, name: str) -> str:
    """Where an array lives: 'cpu' or 'cuda:<id>'."""
    if kind == "numpy":
        return "cpu"
    if kind == "cupy":
        return f"cuda:{a.device.id}"
    if a.device.type == "cpu":
        return "cpu"
    if a.device.type == "cuda":
        return f"cuda:{a.device.index or 0}"
    raise TypeError(f"{name} is a torch tensor on {a.device}; gpunn runs on cpu and cuda tensors")


def check_writable(op: str, name: str, a) -> None:
    """Before the first write: ``a`` must be writeable memory (a NumPy array with
    ``flags.writeable``, e.g. not from ``np.frombuffer(bytes)`` or a read-only memmap).
    ValueError naming the argument otherwise; CuPy arrays and torch tensors are writeable."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{op}: {name} is read-only (flags.writeable is False) and gpunn "
                         "would write it; pass a writeable array (e.g. a copy)")


def byte_span(a) -> tuple[int, int]:
    """[first, last) byte addresses a NumPy/CuPy array's elements lie in (any strides)."""
    if isinstance(a, np.ndarray):
        lo, hi = np.lib.array_utils.byte_bounds(a)
        return lo, hi
    lo = hi = a.data.ptr
    for size, stride in zip(a.shape, a.strides):
        if size == 0:
            return lo, lo
        (lo, hi) = (lo + (size - 1) * stride, hi) if stride < 0 else (lo, hi + (size - 1) * stride)
    return lo, hi + a.itemsize


def check_no_overlap(op: str, name: str, a, others: dict, why: str = "", *,
                     in_place: bool = False) -> None:
    """Before the first write: the native array ``a`` shares no byte with any of the native
    ``others`` (None entries skipped); with ``in_place`` it may also be exactly one of them
    (same memory, shape and strides). A partial overlap (an input shifted by a row, say) is
    a ValueError naming both."""
    if a is None or a.size == 0:
        return
    if type(a) is np.ndarray:  # host arrays: disjoint byte spans, compared by NumPy in C
        for b in others.values():
            if b is not None and not (in_place and b is a) and (
                    type(b) is not np.ndarray or np.may_share_memory(a, b)):
                break
        else:
            return
    span = None
    for other, b in others.items():
        if b is None or b.size == 0:
            continue
        if in_place and b is a:
            continue
        if span is None:
            span = byte_span(a)
        lo, hi = span
        b_lo, b_hi = byte_span(b)
        if b_lo >= hi or lo >= b_hi:
            continue
        if in_place and (b_lo, b_hi) == (lo, hi) and b.shape == a.shape \
                and b.strides == a.strides:
            continue
        hint = f"; pass {name}={other} itself (in place) or memory that shares nothing with it"
        raise ValueError(f"{op}: {name} {'partly overlaps' if in_place else 'must not overlap'} "
                         f"{other}{why or (hint if in_place else '')}")


def _requested(backend: str | None) -> str | None:
    """The explicit choice: the ``backend=`` argument, else GPUNN_BACKEND, else None."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None
    if env not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} or empty, got {env!r}")
    return env


#: host work on fewer elements than this runs on one Numba thread. Waking the thread pool costs
#: more than it saves there, and on a loaded machine far more: a (64, 256) dropout took 45 us on
#: one thread and 3.5 ms on two while another process kept one of the 2 cores busy.
SERIAL_BELOW = 1 << 16


@contextlib.contextmanager
def numba_threads(n: int):
    """Run the Numba kernels of this block on ``n`` threads."""
    saved = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(saved)


def host_kernel(kernel, size: int):
    """The Numba kernel to run for a host call over ``size`` elements: its serial twin below
    SERIAL_BELOW (one thread without changing Numba's thread count: :func:`numba_threads`
    cost 6 us of a 29 us relu of (64, 256)), else :func:`gpunn.cpu_jit.threaded`. Every host
    call picks its kernels so, by the size of its work."""
    return serial(kernel) if size < SERIAL_BELOW else threaded(kernel)


def host_thread_count(size: int) -> int:
    """The Numba threads :func:`host_kernel`'s kernel runs on, for kernels that plan their
    pieces by it."""
    return 1 if size < SERIAL_BELOW else numba.get_num_threads()


@dataclass(slots=True)
class Call:
    """One op call, resolved: where it runs and how to convert its arrays in and out. Read
    only once made (not frozen: a frozen dataclass took 2 us to make, this one 0.3 us, in a
    small op's 12 us call)."""

    op: str
    backend: str
    kind: str  # the caller's array type: 'numpy', 'cupy' or 'torch'
    device: str  # 'cpu' or 'cuda:<id>'

    @property
    def xp(self):
        """The array module of the native arrays (numpy or cupy)."""
        if self.device == "cpu":
            return np
        import cupy

        return cupy

    def check_dtype(self, a, name: str) -> None:
        supported = DTYPES[self.backend]
        dt = _dtype_name(a.dtype)
        if dt not in supported:
            raise TypeError(f"{self.op}: {name} has dtype {dt}, which the {self.backend!r} "
                            f"backend does not support (supported: {', '.join(supported)})")

    def view(self, a):
        """The caller's array as a NumPy/CuPy array over the same memory, any strides, with no
        check (a torch tensor detached; NumPy data on the CUDA simulator as device memory)."""
        if self.kind == "torch":
            a = a.detach()
            if self.device == "cpu":
                return a.numpy()
            import cupy

            return cupy.from_dlpack(a)
        if self.kind == "numpy" and self.device != "cpu":
            return _simulator().device_view(a)
        return a

    def contiguous(self, a):
        """A native array as a C-contiguous one: itself, or a copy on its device."""
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    def native(self, a, name: str):
        """The caller's array as a C-contiguous NumPy/CuPy array (a view when possible), after
        checking its dtype and that no gradient is cut."""
        if a is None:
            return None
        self.check_dtype(a, name)
        if type(a) is np.ndarray and self.device == "cpu":  # no view needed
            return self.contiguous(a)
        if self.kind == "torch" and a.requires_grad and sys.modules["torch"].is_grad_enabled():
            raise RuntimeError(_no_grad_message(self.op, name))
        return self.contiguous(self.view(a))

    def empty(self, shape, dtype):
        """A new native array of ``shape`` and ``dtype`` (a NumPy dtype, or a name: 'float32',
        'bfloat16', 'int64', 'bool', ...) on the call's device; for torch callers from
        torch's allocator, so device memory stays in torch's pool (:meth:`wrap` gives it back
        as a tensor)."""
        if self.kind != "torch":
            return self.xp.empty(shape, _numpy_dtype(dtype))
        import torch

        name = dtype if isinstance(dtype, str) else _dtype_name(dtype)
        if name == "bool":  # as bytes, which DLPack carries everywhere
            return self.view(torch.empty(shape, dtype=torch.uint8,
                                         device=self.device)).view(self.xp.bool_)
        return self.view(torch.empty(shape, dtype=getattr(torch, name), device=self.device))

    def check_in_place(self, a, name: str) -> None:
        """Before the first write: the caller's array ``a``, which the call writes in place
        (``out``, a running statistic), is C-contiguous (a copy would lose the writes) and
        writeable; ValueError naming it otherwise."""
        contiguous = a.is_contiguous() if self.kind == "torch" else a.flags.c_contiguous
        if not contiguous:
            raise ValueError(f"{self.op}: {name} must be C-contiguous (it is written in place)")
        check_writable(self.op, name, a)

    def output(self, out, like, name: str = "out", inputs: dict | None = None):
        """A native array to write the result into: ``out`` checked against ``like`` (shape,
        dtype, C-contiguous, writeable, no partial overlap with the native ``inputs``), or
        new (:meth:`empty`)."""
        if out is None:
            return self.empty(like.shape, like.dtype)
        if tuple(out.shape) != like.shape:
            raise ValueError(f"{self.op}: {name} has shape {tuple(out.shape)}, "
                             f"expected {like.shape}")
        if dtype_name(out) != dtype_name(like):
            raise TypeError(f"{self.op}: {name} has dtype {dtype_name(out)}, "
                            f"expected {dtype_name(like)}")
        self.check_in_place(out, name)
        # a host NumPy out is its own native array (its dtype, layout checked just above)
        native = out if type(out) is np.ndarray and self.device == "cpu" else \
            self.native(out, name)
        check_no_overlap(self.op, name, native, inputs or {}, in_place=True)
        return native

    def wrap(self, a, out=None):
        """Give a native result back in the caller's array type (``out`` itself if given)."""
        if out is not None:
            return out
        if self.kind == "numpy" and self.device != "cpu":  # NumPy data on the CUDA simulator
            return _simulator().host_view(a)
        if self.kind != "torch":
            return a
        import torch

        if self.device == "cpu":
            return torch.from_numpy(a)
        if a.dtype.kind == "b":  # as bytes (see empty)
            return torch.from_dlpack(a.view(self.xp.uint8)).view(torch.bool)
        return torch.from_dlpack(a)

    def context(self):
        """Make the data's device current; for torch tensors also torch's current stream.
        Nothing for host calls: they pick their Numba kernels by size (:func:`host_kernel`)."""
        if self.backend != "cuda":
            return contextlib.nullcontext()
        import cupy

        stack = contextlib.ExitStack()
        device_id = int(self.device.split(":")[1])
        stack.enter_context(cupy.cuda.Device(device_id))
        if self.kind == "torch":
            import torch

            handle = torch.cuda.current_stream(device_id).cuda_stream
            stack.enter_context(cupy.cuda.ExternalStream(handle, device_id))
        return stack


def _numpy_dtype(dtype):
    """A dtype NumPy and CuPy take: ``dtype`` itself, or for a name its NumPy dtype (bfloat16
    from ml_dtypes, as CuPy's bfloat16 arrays hold)."""
    if not isinstance(dtype, str):
        return dtype
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def to_host(a) -> np.ndarray:
    """A NumPy array of ``a``'s values (NumPy array or scalar, CuPy array, torch tensor): a
    NumPy array itself; a CuPy array copied on the current stream once the work queued there
    is done (a plain ``.get()`` may copy on another stream than the one the kernels ran on); a
    torch tensor detached and copied to the host where it is on a device, bfloat16 widened to
    float32 (NumPy has no bfloat16)."""
    if isinstance(a, np.generic):
        return np.asarray(a)
    kind = array_kind(a, "array")
    if kind == "numpy":
        return a
    if kind == "torch":
        a = a.detach().cpu()
        return a.float().numpy() if _dtype_name(a.dtype) == "bfloat16" else a.numpy()
    import cupy

    stream = cupy.cuda.get_current_stream()
    host = a.get(stream=stream)
    stream.synchronize()
    return host


def _no_grad_message(op: str, name: str) -> str:
    """Why a tensor that requires grad (grad mode on) is refused: gpunn.ops results have no
    grad_fn, so handing one back would silently cut the graph; the differentiable op of
    gpunn.torch.nn.functional is named where there is one."""
    base = op.removesuffix("_forward")
    base = "gelu" if base == "gelu_tanh" else base
    where = "gpunn.torch.nn.functional"
    try:
        functional = importlib.import_module(where)
        if base in functional.__all__:
            where = f"{where}.{base}"
    except ImportError:
        pass
    return (f"{op}: {name} requires grad and grad mode is on, but gpunn.ops results carry no "
            f"gradient (the graph would be cut silently); use {where}, whose ops are "
            f"differentiable, or pass {name}.detach() or call under torch.no_grad()")


def _simulator():
    """gpunn.cuda_sim when the CUDA simulator is on (NumPy arrays then run on ``cuda``)."""
    from .cuda import simulator

    return simulator()


def resolve(op: str, backend: str | None = None, **arrays) -> Call:
    """Decide where ``op`` runs for these arrays (None entries are ignored).

    All arrays must be of one array type on one device. Raises ValueError or RuntimeError
    when the explicit choice cannot run on this data or this machine.
    """
    call = _host_call(op, backend, arrays)
    if call is not None:
        return call
    given = {name: a for name, a in arrays.items() if a is not None}
    if not given:
        raise ValueError(f"{op}: no input array")
    kinds = {name: array_kind(a, name) for name, a in given.items()}
    devices = {name: _device(a, kinds[name], name) for name, a in given.items()}
    first = next(iter(given))
    for name in given:
        if devices[name] != devices[first]:
            raise ValueError(f"{op}: {first} is on {devices[first]} but {name} is on "
                             f"{devices[name]}; gpunn does not move data between devices")
        if kinds[name] != kinds[first]:
            raise TypeError(f"{op}: {first} is a {kinds[first]} array but {name} is a "
                            f"{kinds[name]} array; pass one array type per call")
    kind, device = kinds[first], devices[first]
    if device != "cpu" and not has_cupy():
        raise RuntimeError(f"{op}: {first} is on {device}; gpunn runs device data through CuPy, "
                           "which is not installed (pip install 'gpunn[cuda12]' or 'gpunn[cuda13]')")

    requested = _requested(backend)
    if requested is None:
        chosen = "cpu" if device == "cpu" else "cuda"
    else:
        chosen = requested
    if chosen == "cuda":
        if not has_cupy():
            raise RuntimeError(f"{op}: the cuda backend needs CuPy "
                               "(pip install 'gpunn[cuda12]' or 'gpunn[cuda13]')")
        if cuda_device_count() == 0:
            raise RuntimeError(f"{op}: the cuda backend needs a CUDA device, and CuPy sees none")
        if device == "cpu" and kind == "numpy" and _simulator() is not None:
            device = "cuda:0"  # the CUDA simulator (gpunn/cuda_sim): host memory is device memory
        elif device == "cpu":
            raise ValueError(f"{op}: backend 'cuda' needs device arrays, but {first} is in host "
                             "memory; move it first (cupy.asarray, tensor.cuda())")
    elif chosen == "cpu" and device != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs host arrays, but {first} is on {device}")
    return Call(op=op, backend=chosen, kind=kind, device=device)


def _host_call(op: str, backend: str | None, arrays: dict) -> Call | None:
    """What :func:`resolve` decides for host arrays of one type, NumPy arrays in native byte
    order or plain strided CPU torch tensors, and a host backend (requested, else cpu), with
    the same checks, done inline (small calls are dominated by such fixed costs: relu of
    (64, 256) torch tensors 16 -> 13 us); None for anything else (other arrays, mixed types,
    no array, a cuda request), which resolve's full path decides or refuses."""
    torch = sys.modules.get("torch")
    kind = None
    for a in arrays.values():
        if a is None:
            continue
        t = type(a)
        if t is np.ndarray:
            if not a.dtype.isnative:
                return None
            found = "numpy"
        elif (torch is not None and (t is torch.Tensor or t is torch.nn.Parameter) and a.is_cpu
              and a.layout is torch.strided and not a.is_quantized):
            found = "torch"
        else:
            return None
        if kind is None:
            kind = found
        elif found != kind:
            return None
    if kind is None:
        return None
    requested = _requested(backend)
    if requested == "cuda":
        return None
    return Call(op, requested or "cpu", kind, "cpu")
