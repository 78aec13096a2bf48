"""Simulated kernels: a compiled instantiation, its argument checks and its launch.

:class:`Kernel` stands in for the ``cupy.RawKernel`` that ``gpunn.cuda.Family.function``
returns on a GPU: ``kernel(grid, block, args)`` with the same arguments (CuPy arrays as
pointers, NumPy scalars as values), checked against the kernel's C++ parameter types before
anything runs.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections import Counter
from functools import cache

import numpy as np

from . import build
from .device import SimulatorError, ndarray

#: Launches per (family, name expression) in this process (the coverage count).
LAUNCHES: Counter = Counter()

ORDERS = {"in order": 0, "reversed": 1, "random": 2}


class _Spec(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("kernel", ctypes.c_void_p),
                ("args", ctypes.POINTER(ctypes.c_void_p)), ("grid", ctypes.c_uint * 3),
                ("block", ctypes.c_uint * 3), ("shared_lo", ctypes.c_void_p),
                ("shared_hi", ctypes.c_void_p), ("thread_order", ctypes.c_int),
                ("block_order", ctypes.c_int), ("seed", ctypes.c_ulonglong),
                ("guards", ctypes.POINTER(ctypes.c_ulonglong)), ("n_guards", ctypes.c_int)]


@cache
def runtime():
    lib = ctypes.CDLL(str(build.runtime_library()))
    lib.gpunn_sim_launch.argtypes = [ctypes.POINTER(_Spec)]
    lib.gpunn_sim_launch.restype = ctypes.c_int
    lib.gpunn_sim_error.restype = ctypes.c_char_p
    return lib


#: Type code of an array's elements (see TypeCode in sim.cuh).
_ELEMENT = {"float16": "h2", "bfloat16": "B2", "bool": "b1"}
#: ctypes type of each scalar code.
_CTYPE = {"b1": ctypes.c_bool, "i1": ctypes.c_int8, "i2": ctypes.c_int16, "i4": ctypes.c_int32,
          "i8": ctypes.c_int64, "u1": ctypes.c_uint8, "u2": ctypes.c_uint16,
          "u4": ctypes.c_uint32, "u8": ctypes.c_uint64, "f4": ctypes.c_float,
          "f8": ctypes.c_double}
_CNAME = {"b1": "bool", "i1": "signed char", "i2": "short", "i4": "int", "i8": "long long",
          "u1": "unsigned char", "u2": "unsigned short", "u4": "unsigned", "u8": "unsigned long long",
          "f4": "float", "f8": "double", "h2": "gpunn::half", "B2": "gpunn::bfloat16", "v": "void"}


def element_code(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.name in _ELEMENT:
        return _ELEMENT[dtype.name]
    return f"{dtype.kind.replace('c', 'x')}{dtype.itemsize}"


def scalar_code(value) -> str | None:
    """The type code CuPy would pass a scalar argument as (Python int: int64, float: double),
    or None for something that is not a scalar."""
    if isinstance(value, (bool, np.bool_)):
        return "b1"
    if isinstance(value, np.generic):
        return element_code(value.dtype)
    if isinstance(value, int):
        return "i8"
    if isinstance(value, float):
        return "f8"
    return None


def c_name(code: str) -> str:
    if code.startswith("*"):
        return f"{c_name(code[1:])}*"
    return _CNAME.get(code, f"a {code[1:]}-byte struct" if code.startswith("S") else code)


def _describe(value) -> str:
    if hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, np.generic):
        return f"a {type(value).__module__.split('.')[0]} {value.dtype} array of shape {value.shape}"
    return f"{type(value).__name__} {value!r}"


class _Guard:
    """A sanitizer copy of a span of device memory: PROT_NONE pages around it, and canary
    bytes (0xFB) between the pages and the data that must be unchanged after the launch.
    (Not 0xFF: a kernel that reads a 0xFF canary as NaN and writes it back would go unseen.)"""

    CANARY = 0xFB

    PAD = 256

    def __init__(self, lo: int, hi: int):
        page = mmap.PAGESIZE
        self.lo, self.hi = lo, hi
        head = self.PAD + lo % self.PAD  # keeps the address modulo 256 (the vector paths)
        body = -(-(head + (hi - lo) + self.PAD) // page) * page
        self.map = mmap.mmap(-1, page + body + page)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.data = self.base + page + head
        ctypes.memset(self.base + page, self.CANARY, body)
        ctypes.memmove(self.data, lo, hi - lo)
        self.ranges = [(self.base, self.base + page), (self.base + page + body,
                                                       self.base + 2 * page + body)]
        self.body = (self.base + page, self.base + page + body)
        for start, _ in self.ranges:
            _mprotect(start, page, 0)

    def check(self) -> list[tuple[int, int]]:
        """[first, last] byte offsets (relative to the span's start) of changed canaries."""
        start, stop = self.body
        raw = np.frombuffer((ctypes.c_char * (stop - start)).from_address(start), np.uint8)
        offset = self.data - start
        bad = np.flatnonzero(raw != self.CANARY)
        bad = bad[(bad < offset) | (bad >= offset + self.hi - self.lo)] - offset
        if bad.size == 0:
            return []
        runs, first, last = [], bad[0], bad[0]
        for b in bad[1:]:
            if b != last + 1:
                runs.append((int(first), int(last)))
                first = b
            last = b
        runs.append((int(first), int(last)))
        return runs

    def close(self, copy_back: bool) -> None:
        page = mmap.PAGESIZE
        for start, _ in self.ranges:
            _mprotect(start, page, 3)
        if copy_back:
            ctypes.memmove(self.lo, self.data, self.hi - self.lo)
        del self.base
        self.map.close()


@cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _mprotect(address: int, size: int, prot: int) -> None:
    if _libc().mprotect(address, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed for a sanitizer guard page")


class Kernel:
    """One compiled instantiation of a family (what ``Family.function`` returns under the
    simulator)."""

    #: Registers per thread reported to the launchers' occupancy math (ptxas's count is
    #: not known on the host; 32 lets 8 blocks of 256 threads share an SM).
    num_regs = 32

    def __init__(self, family: str, expression: str, library: ctypes.CDLL, index: int,
                 settings):
        self.family, self.expression, self.settings = family, expression, settings
        self.name = expression
        text = ctypes.create_string_buffer(1024)
        getattr(library, f"gpunn_sim_signature_{index}")(text, ctypes.c_ulong(len(text)))
        self.params = [p for p in text.value.decode().split(",") if p]
        self._entry = ctypes.cast(getattr(library, f"gpunn_sim_kernel_{index}"),
                                  ctypes.c_void_p).value
        lo, hi = ctypes.c_void_p(), ctypes.c_void_p()
        library.gpunn_sim_shared_bounds(ctypes.byref(lo), ctypes.byref(hi))
        self._shared = (lo.value, hi.value)
        self._library = library  # keeps the module loaded
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<simulated kernel {self.expression} ({', '.join(map(c_name, self.params))})>"

    def _argument(self, i: int, code: str, value):
        """(ctypes value, address span or None) of argument i, checked against its parameter."""
        where = f"{self.expression}: argument {i} ({c_name(code)})"
        if code.startswith("*"):
            if scalar_code(value) in ("u8", "i8") and not isinstance(value, (bool, float)):
                return ctypes.c_void_p(int(value) & (2**64 - 1)), None  # a raw address or NULL
            ptr = _device_pointer(value)
            if ptr is None:
                raise TypeError(f"{where} must be a device array or a 64-bit integer address, "
                                f"got {_describe(value)}")
            want, got = code[1:], element_code(value.dtype)
            if want != "v" and want != got and {want, got} != {"u1", "b1"}:
                raise TypeError(f"{where} points to {c_name(want)}, but the argument is "
                                f"{_describe(value)} ({c_name(got)} elements)")
            lo = ptr
            return ctypes.c_void_p(ptr), (lo, lo + value.nbytes)
        got = scalar_code(value)
        if got is None:
            raise TypeError(f"{where} takes a scalar, got {_describe(value)}")
        if got != code:
            raise TypeError(f"{where} takes {c_name(code)}, but the argument is {_describe(value)}"
                            f" ({c_name(got)}, {got[1:]} bytes): pass np."
                            f"{_NUMPY_NAME.get(code, code)}(...)")
        return _CTYPE[code](value.item() if isinstance(value, np.generic) else value), None

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None):
        grid, block = _dims(grid, "grid"), _dims(block, "block")
        if shared_mem:
            raise SimulatorError(f"{self.expression}: the simulator has no dynamic shared "
                                 f"memory (shared_mem={shared_mem})")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.expression} takes {len(self.params)} arguments "
                            f"({', '.join(map(c_name, self.params))}), got {len(args)}")
        values, spans = [], []
        for i, (code, value) in enumerate(zip(self.params, args)):
            c_value, span = self._argument(i, code, value)
            values.append(c_value)
            spans.append(span)
        settings = self.settings
        guards = _guard(spans, values) if settings.sanitize else []
        pointers = (ctypes.c_void_p * max(1, len(values)))(
            *(ctypes.addressof(v) for v in values))
        triples = [t for g, indices in guards for r in g.ranges for t in (*r, indices[0])]
        guard_array = (ctypes.c_ulonglong * max(1, len(triples)))(*triples)
        spec = _Spec(self.expression.encode(), self._entry,
                     ctypes.cast(pointers, ctypes.POINTER(ctypes.c_void_p)),
                     (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                     self._shared[0], self._shared[1], ORDERS[settings.thread_order],
                     ORDERS[settings.block_order], settings.seed, guard_array, len(triples) // 3)
        LAUNCHES[self.family, self.expression] += 1
        failed = runtime().gpunn_sim_launch(ctypes.byref(spec))
        error = runtime().gpunn_sim_error().decode(errors="replace") if failed else ""
        if guards:
            error = _unguard(self.expression, guards, spans, failed) or error
        if error:
            raise SimulatorError(error)


_NUMPY_NAME = {"b1": "bool_", "i1": "int8", "i2": "int16", "i4": "int32", "i8": "int64",
               "u1": "uint8", "u2": "uint16", "u4": "uint32", "u8": "uint64", "f4": "float32",
               "f8": "float64"}


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if any(d < 0 or d >= 2**32 for d in dims):
        raise ValueError(f"{what} {dims} is out of range")
    return dims


def _device_pointer(value):
    """The address of a simulated device array's first element, else None."""
    if isinstance(value, ndarray):
        return value.data.ptr
    return None


def _guard(spans, values):
    """Sanitizer copies: one per group of overlapping argument spans; the pointer values are
    redirected into the copies. Returns [(guard, argument indices)]."""
    order = sorted((s for s in enumerate(spans) if s[1] is not None and s[1][1] > s[1][0]),
                   key=lambda s: s[1])
    groups: list[list] = []
    for i, (lo, hi) in order:
        if groups and lo < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], hi)
            groups[-1][2].append(i)
        else:
            groups.append([lo, hi, [i]])
    out = []
    for lo, hi, indices in groups:
        guard = _Guard(lo, hi)
        for i in indices:
            values[i].value = guard.data + (spans[i][0] - lo)
        out.append((guard, indices))
    return out


def _unguard(name, guards, spans, failed) -> str:
    """Copy the guarded data back and report canaries the kernel overwrote."""
    problems = []
    for guard, indices in guards:
        size = guard.hi - guard.lo
        args = "argument" + ("s " if len(indices) > 1 else " ") + ", ".join(map(str, indices))
        for first, last in guard.check():
            side = (f"{-first} bytes before its start" if first < 0 else
                    f"{first - size} bytes past its end")
            problems.append(f"{args} ({size} bytes): bytes {first}..{last} written, {side}")
        guard.close(copy_back=not failed)
    if problems:
        return f"{name}: out-of-bounds write: " + "; ".join(problems)
    return ""
