"""The fused optimizer step over a table of tensors, on the cpu (Numba) and cuda backends.

A :class:`Table` holds, for every parameter of a step, the addresses of the parameter, its
gradient, its states, its float32 master copy and its step count (:data:`ROW`, which
``kernels/optim.cu`` gets with CHUNK and the flag bits as constants), and a chunk list of (row, first element) pairs of ``CHUNK`` elements.
One step is then two launches whatever the number of tensors:

1. the prologue: the gradients' global L2 norm and inf/NaN check when clipping or AMP asks
   for it (one pass over the gradients), the factor gmul = clip / grad_scale, the skip
   decision, and the step counts advanced (not when skipped);
2. the update: every element of every tensor, in one pass (Adam float32: 28 bytes/parameter).

Nothing is synchronised with the host on the GPU: the skip decision stays on the device
(``Table.run`` returns it as a 0-d array) and a skipped step writes nothing.
Building a table checks every array before anything runs, so a bad call changes nothing:
kind, device, dtype, shape, a dense layout shared with the parameter, native byte order,
memory that holds every element; what the step writes (parameters, states, step counts,
master copies) must be writeable and no two of those may share memory; gradients must not
share memory with them. Optimizers keep their table between steps: :meth:`Table.matches`
says whether it still addresses exactly the arrays a step would see (address, shape,
strides, dtype and writeability of each, from :func:`backend.array_signatures`), and
:meth:`Table.bind_grads` re-checks the gradients whenever theirs change.
"""

from __future__ import annotations

import math
from itertools import chain
from operator import itemgetter

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from .. import cuda
from ..backend import array_signatures, check_writable, describe, host_threads, resolve
from ..cpu_jit import threaded
from .functional import ALGORITHMS, AMSGRAD, CENTERED, DECOUPLED, MAXIMIZE, MOMENTUM, NESTEROV
from .functional import Hyper, grad_norm, host_scale, needs_grad_pass, prologue, reference_step

#: The words of a table row, in order (kernels/optim.cu reads them as COLUMN_<name>).
ROW = ("P", "G", "S0", "S1", "S2", "MASTER", "STEP", "N")
P, G, S0, S1, S2, MASTER, STEP, N = range(len(ROW))
COLUMNS = len(ROW)
#: Elements per chunk: the unit of work of one thread (cpu) or one block (cuda).
CHUNK = 16384
#: dtypes the fused backends take for parameters.
PARAM_DTYPES = {"numpy": ("float32", "float64"), "cpu": ("float32", "float64"),
                "cuda": ("float16", "bfloat16", "float32", "float64")}


def state_dtype(param_dtype: str) -> str:
    """States (and master weights) of 16-bit parameters are float32."""
    return "float32" if param_dtype in ("float16", "bfloat16") else param_dtype


def chunk_list(sizes: np.ndarray) -> np.ndarray:
    """(row, start) pairs covering every element of every row in CHUNK pieces."""
    counts = -(-sizes // CHUNK)
    rows = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    starts = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * CHUNK
    return np.ascontiguousarray(np.stack([rows, starts], axis=1), dtype=np.int64)


class Table:
    """The tensors of one optimizer step (one dtype, one device), checked and addressed.

    The kernels walk dense arrays of one compute dtype. A parameter they cannot address
    directly is staged: a non-dense one (a strided view), and a float16/bfloat16 one on
    the host backends (float32 math there), is updated through a dense work copy (its
    float32 master copy when it has one), copied in before the step and back after it.
    A gradient that is staged, non-dense or laid out unlike its parameter is copied into a
    buffer shaped like the parameter's row first."""

    def __init__(self, op: str, h: Hyper, params, states: dict, steps, masters=None,
                 backend=None):
        if not params:
            raise ValueError(f"{op}: no parameters")
        self.op, self.slots = op, h.slots
        self.call = call = resolve(op, backend, **{"params[0]": params[0]})
        first = describe(params[0], "params[0]")
        self.kind, self.param_dtype, self.device = first[0], first[2], first[1]
        host_16bit = call.backend != "cuda" and self.param_dtype in ("float16", "bfloat16")
        #: what the kernels compute on: float32 for 16-bit parameters on the host
        self.dtype = "float32" if host_16bit else self.param_dtype
        if self.dtype not in PARAM_DTYPES[call.backend]:
            raise TypeError(f"{op}: params[0] has dtype {self.param_dtype}, which the "
                            f"{call.backend!r} backend does not support (supported: "
                            f"{', '.join(sorted({*PARAM_DTYPES[call.backend], *_HALF}))})")
        self.state_dtype = state_dtype(self.param_dtype)
        n = len(params)
        for slot in h.slots:
            if states.get(slot) is None or len(states[slot]) != n:
                raise ValueError(f"{op}: the {slot} states need one array per parameter ({n})")
        if len(steps) != n:
            raise ValueError(f"{op}: state_steps needs one array per parameter ({n})")
        if masters is not None and len(masters) != n:
            raise ValueError(f"{op}: master_params needs one array per parameter ({n})")

        self.rows = rows = np.zeros((n, COLUMNS), np.int64)
        self.shapes, self.layouts, self.stages = [], [], []
        kernel_params, kernel_masters = list(params), None if host_16bit else masters
        written = []  # (name, address, bytes) of everything the step writes
        for i, p in enumerate(params):
            info = self._check(p, f"params[{i}]", self.param_dtype, None, layout=None,
                               write=True, dense=False)
            shape, layout = info[3], info[4]
            count = math.prod(shape)
            master = None if masters is None else masters[i]
            if master is not None:
                if self.state_dtype == self.param_dtype:
                    raise ValueError(f"{op}: master_params are for float16/bfloat16 parameters, "
                                     f"params[{i}] is {self.param_dtype}")
                self._check(master, f"master_params[{i}]", "float32", shape, write=True)
            if layout is None or host_16bit:  # staged: the kernel updates a dense copy
                work = master if host_16bit and master is not None else self._empty(
                    p, self.dtype, dense=True)
                self.stages.append((p, work, work is not master))
                kernel_params[i], layout = work, "C"
            else:
                written.append((f"params[{i}]", info[5], count * _ITEMSIZE[self.dtype]))
            self.shapes.append(shape)
            self.layouts.append(layout)
            rows[i, P], rows[i, N] = describe(kernel_params[i], f"params[{i}]")[5], count
            state_bytes = count * _ITEMSIZE[self.state_dtype]
            for slot in h.slots:
                column = S0 + ALGORITHMS[h.algorithm][1].index(slot)
                rows[i, column] = self._check(states[slot][i], f"{slot}[{i}]", self.state_dtype,
                                              shape, layout=layout, write=True)[5]
                written.append((f"{slot}[{i}]", rows[i, column], state_bytes))
            rows[i, STEP] = self._check(steps[i], f"state_steps[{i}]", "float32", None, 1,
                                        layout=None, write=True)[5]
            written.append((f"state_steps[{i}]", rows[i, STEP], 4))
            if master is not None:
                address = describe(master, f"master_params[{i}]")[5]
                written.append((f"master_params[{i}]", address, state_bytes))
                if kernel_masters is not None:
                    rows[i, MASTER] = address
        self.written = _Spans(op, written)
        self.chunks = chunk_list(rows[:, N])
        self.natives = (kernel_params, states, steps, kernel_masters)  # the numpy backend's
        # what the rows address, to revalidate at every step (the arrays are kept alive)
        self.signature = self._signature(params, states, steps, masters)
        self._device_rows = None
        self.grads = self.grad_refs = self.grad_signature = None
        self.grad_stages = []  # (row, buffer) of gradients copied before each step
        self._scratch = None  # cuda: the norm pass's partials and last-block counter

    def matches(self, params, owned) -> bool:
        """Whether the rows still address exactly these arrays, as the caller sees them now
        (``params``; ``owned``: the states, master copies and step counts, in the order of
        :func:`owned_arrays`): nothing swapped, moved, resized or made read-only since."""
        return (array_signatures(params), array_signatures(owned, "owned")) == self.signature

    def _signature(self, params, states, steps, masters):
        """The parameters' full signatures, the states' (owned by the optimizer) addresses."""
        owned = [a for slot in self.slots for a in states[slot]]
        if masters is not None:
            owned += [m for m in masters if m is not None]  # one per 16-bit parameter
        return array_signatures(params), array_signatures(owned + list(steps), "owned")

    def _check(self, a, name, dtype, shape, size=None, layout="C", write=False, dense=True):
        """describe(a), after checking it against the parameters (kind, device, dtype, shape,
        and, with ``dense``, the layout: the parameter's own, which states share), and that
        it is writeable if the step writes it."""
        if write:
            check_writable(self.op, name, a)
        info = describe(a, name)
        kind, device, dt, sh, a_layout, _ = info
        if kind != self.kind:
            raise TypeError(f"{self.op}: {name} is a {kind} array, the parameters are {self.kind}")
        if device != self.device:
            raise ValueError(f"{self.op}: {name} is on {device}, the parameters on {self.device}")
        if dt != dtype:
            raise TypeError(f"{self.op}: {name} has dtype {dt}, expected {dtype}")
        if shape is not None and tuple(sh) != tuple(shape):
            raise ValueError(f"{self.op}: {name} has shape {tuple(sh)}, expected {tuple(shape)}")
        if size is not None and math.prod(sh) != size:
            raise ValueError(f"{self.op}: {name} must hold {size} element(s), has shape {tuple(sh)}")
        if dense and (a_layout is None or (layout is not None and a_layout != layout
                                           and math.prod(sh) > 1)):
            raise ValueError(f"{self.op}: {name} must be dense with the parameter's layout "
                             f"({'C-contiguous' if layout in ('C', None) else f'strides {layout}'})")
        return info

    def _empty(self, like, dtype: str, dense: bool = False):
        """A new array of ``like``'s kind, device and shape in ``dtype``: C-contiguous with
        ``dense``, else (torch) with ``like``'s dense layout."""
        if self.kind != "torch":
            return self.call.xp.empty(like.shape, dtype)
        import torch

        if dense:
            return torch.empty(like.shape, dtype=getattr(torch, dtype), device=like.device)
        return torch.empty_like(like, dtype=getattr(torch, dtype))

    def bind_grads(self, grads) -> "Table":
        """Check the gradients (one per parameter, same shape, dtype and device) and record
        them; a gradient the kernel cannot read in place is copied into a buffer laid out
        like its row."""
        if len(grads) != len(self.shapes):
            raise ValueError(f"{self.op}: {len(grads)} gradients for {len(self.shapes)} parameters")
        signature = array_signatures(grads, "read")
        if signature is None or signature != self.grad_signature:
            self._bind_new_grads(grads)
            self.grad_signature = signature
        self.grad_refs = grads = list(grads)  # keeps NumPy ids (in the signature) theirs
        if self.grad_stages:
            grads = list(grads)
            for i, buffer in self.grad_stages:
                _copy(buffer, grads[i])
                grads[i] = buffer
        self.grads = grads
        return self

    def _bind_new_grads(self, grads) -> None:
        stages, rows, direct = [], [], []
        addresses = self.rows[:, G].copy()
        kernel_params = self.natives[0]
        for i, g in enumerate(grads):
            info = self._check(g, f"grads[{i}]", self.param_dtype, self.shapes[i], dense=False)
            if (info[2] != self.dtype or info[4] is None
                    or (info[4] != self.layouts[i] and math.prod(self.shapes[i]) > 1)):
                buffer = self._empty(kernel_params[i], self.dtype)
                stages.append((i, buffer))
                addresses[i] = describe(buffer, f"grads[{i}]")[5]
            else:
                rows.append(i)
                direct.append(info[5])
                addresses[i] = info[5]
        self.written.check_disjoint("grads", direct, self.rows[rows, N] * _ITEMSIZE[self.dtype],
                                    rows)
        if self._device_rows is not None and not np.array_equal(self.rows[:, G], addresses):
            self._device_rows = None
        self.rows[:, G] = addresses
        self.grad_stages = stages

    def grad_norm(self) -> tuple[float, bool]:
        """(L2 norm, any inf/NaN) of this table's gradients, on the host (numpy, cpu); the
        norm of finite gradients never overflows (see :func:`functional.grad_norm`)."""
        if self.call.backend == "numpy":
            return grad_norm(self.call.xp, [_view(g) for g in self.grads])
        with host_threads(int(self.rows[:, N].sum())):
            return _cpu_grad_norm(self.rows, self.chunks, np.empty(0, self.dtype))

    def add_grad_sumsq(self, totals):
        """cuda: accumulate this table's gradients' sum of squares and inf/NaN count into
        the device array ``totals`` (stream-ordered, deterministic)."""
        with self.call.context():
            _cuda_grad_norm(self, -1.0, 1.0, 0, 0, None, totals)
        return totals

    def _device_tables(self):
        import cupy

        if self._device_rows is None:
            self._device_rows = cupy.asarray(self.rows)
            self._device_chunks = cupy.asarray(self.chunks)
        return self._device_rows, self._device_chunks

    def run(self, h: Hyper, grad_scale=None, found_inf=None, totals=None):
        """One step; returns a 0-d float64 array on the data's device, 1 if the step was
        skipped. ``totals``: the step's gradient norm and inf/NaN flag over every table (from
        :func:`grad_totals`), used instead of this table's own for clipping and the check."""
        call = self.call
        with call.context():
            for p, work, copy_in in self.stages:
                if copy_in:
                    _copy(work, p)
            if call.backend == "numpy":
                xp = call.xp
                params, states, steps, masters = self.natives
                views = lambda arrays: [_view(a) for a in arrays]
                skipped = xp.asarray(float(reference_step(
                    xp, views(params), views(self.grads),
                    {k: views(v) for k, v in states.items() if k in self.slots}, views(steps),
                    [None if m is None else _view(m) for m in masters] if masters else None,
                    h, grad_scale, found_inf, totals)))
            elif call.backend == "cpu":
                skipped = _cpu_run(self, h, grad_scale, found_inf, totals)
            else:
                skipped = _cuda_run(self, h, grad_scale, found_inf, totals)
            if self.stages and (call.backend == "cuda" or not float(skipped)):
                for p, work, _ in self.stages:  # a skipped cuda step left work == p
                    _copy(p, work)
            return skipped


def grad_totals(tables: list[Table]):
    """The gradients of every table of a step (one device): (norm, any inf/NaN) on the host
    (numpy, cpu; norms combined by ``math.hypot``, which does not overflow), or a device
    array [sum of squares, inf/NaN count] (cuda). With it, clipping uses the norm over all
    parameter groups and one inf/NaN skips every group."""
    if tables[0].call.backend != "cuda":
        parts = [t.grad_norm() for t in tables]
        return math.hypot(*(norm for norm, _ in parts)), any(bad for _, bad in parts)
    import cupy

    with tables[0].call.context():
        totals = cupy.zeros(2, np.float64)
    for t in tables:
        t.add_grad_sumsq(totals)
    return totals


def _view(a):
    """A NumPy/CuPy view of an array or tensor, any strides (the reference updates in place)."""
    if type(a).__module__.split(".")[0] != "torch":
        return a
    a = a.detach()
    if a.device.type == "cpu":
        return a.numpy()
    import cupy

    return cupy.from_dlpack(a)


#: bytes per element of the dtypes a table holds.
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_HALF = ("float16", "bfloat16")


def _copy(dst, src) -> None:
    """dst[...] = src for arrays of one kind (the array library casts and follows strides)."""
    if hasattr(dst, "copy_"):
        dst.detach().copy_(src)
    else:
        dst[...] = src


class _Spans:
    """The memory a step writes, as sorted [start, stop) byte ranges; refuses overlaps (a
    parameter listed twice, a state aliasing a parameter) when built."""

    def __init__(self, op: str, spans: list):
        self.op = op
        spans = sorted((addr, addr + size, name) for name, addr, size in spans if size > 0)
        for (_, stop, name), (start, _, other) in zip(spans, spans[1:]):
            if start < stop:
                raise ValueError(f"{op}: {name} and {other} share memory; every parameter, "
                                 "state and step count the step writes must have its own "
                                 "(is a parameter listed twice?)")
        self.starts = np.array([a for a, _, _ in spans], np.int64)
        self.stops = np.array([b for _, b, _ in spans], np.int64)
        self.names = [name for _, _, name in spans]

    def check_disjoint(self, what: str, addresses, sizes, index) -> None:
        """Refuse arrays (``what``[index[i]] at addresses[i], sizes[i] bytes) that share a
        byte with anything the step writes."""
        starts = np.asarray(addresses, np.int64)
        stops = starts + np.asarray(sizes, np.int64)
        # the last written range starting before each array's end must end before its start
        k = np.searchsorted(self.starts, stops, side="left") - 1
        hit = (k >= 0) & (stops > starts)
        hit[hit] = self.stops[k[hit]] > starts[hit]
        if hit.any():
            i = int(np.argmax(hit))
            raise ValueError(f"{self.op}: {what}[{index[i]}] shares memory with "
                             f"{self.names[k[i]]}, which the step writes")


def owned_arrays(states: list, keys: tuple, steps=None) -> list:
    """The arrays under ``keys`` of every parameter's state dict, grouped by key (KeyError
    if one is missing), then ``steps`` if the step counts are kept elsewhere: the order in
    which :meth:`Table.matches` takes them (keys: the slots, 'master_param', 'step')."""
    if len(keys) > 1:
        owned = list(chain.from_iterable(zip(*map(itemgetter(*keys), states))))
    else:
        owned = list(map(itemgetter(*keys), states)) if keys else []
    return owned if steps is None else owned + steps


def step_lists(h: Hyper, params, grads, states, steps, masters=None, grad_scale=None,
               found_inf=None, backend=None):
    """The functional step over lists: build, check and run a table."""
    return Table(f"{h.algorithm} step", h, params, states, steps, masters, backend) \
        .bind_grads(grads).run(h, grad_scale, found_inf)


# --- CPU: Numba kernels over the table ---------------------------------------------------------

@intrinsic
def _pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to ``like``'s element type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(parallel=True, cache=True)
def _cpu_grad_sumsq(rows, chunks, like, scale):
    """Per-chunk (sum of (scale g)^2 in float64, inf/NaN count, max |g|)."""
    partial = np.zeros((chunks.shape[0], 3))
    for c in prange(chunks.shape[0]):
        g = _chunk(rows, chunks, c, G, like)
        acc, bad, big = 0.0, 0.0, 0.0
        for i in range(g.size):
            v = np.float64(g[i])  # float() would keep float32 and overflow at 1.8e19
            acc += (v * scale) * (v * scale)
            bad += 0.0 if math.isfinite(v) else 1.0
            big = max(big, abs(v))
        partial[c, 0], partial[c, 1], partial[c, 2] = acc, bad, big
    return partial


def _cpu_grad_norm(rows, chunks, like) -> tuple[float, bool]:
    """(norm, any inf/NaN) of a table's gradients (functional.grad_norm's rule)."""
    partial = threaded(_cpu_grad_sumsq)(rows, chunks, like, 1.0)
    sumsq, bad = float(np.sum(partial[:, 0])), bool(np.any(partial[:, 1]))
    if bad or math.isfinite(sumsq):
        return math.sqrt(sumsq), bad
    m = float(np.max(partial[:, 2]))
    rescaled = threaded(_cpu_grad_sumsq)(rows, chunks, like, 1.0 / m)
    return m * math.sqrt(float(np.sum(rescaled[:, 0]))), False


@njit(cache=True)
def _cpu_advance(rows, step_like):
    """Advance every step count; first, without writing, return the first row whose count
    is not a whole number >= 0 (-1 if none)."""
    for r in range(rows.shape[0]):
        t = carray(_pointer(rows[r, STEP], step_like), 1)[0]
        if not (t >= 0 and t == math.floor(t)):
            return r
    for r in range(rows.shape[0]):
        carray(_pointer(rows[r, STEP], step_like), 1)[0] += np.float32(1.0)
    return -1


# One kernel per algorithm (kernels/optim.cu: step, the same math). ``k`` holds the
# scalars in the compute type: (gmul, sign, weight_decay, l1, lr, beta1, beta2,
# 1 - beta1, 1 - beta2, eps, decay); flags pick loops outside the element loops, so
# every loop is branch-free and vectorizes.


@njit(inline="always")
def _chunk(rows, chunks, c, column, like):
    """Elements [start, stop) of one column of chunk c's row, and its step count."""
    r, start = chunks[c, 0], chunks[c, 1]
    return carray(_pointer(rows[r, column], like), rows[r, N])[
        start:min(start + CHUNK, rows[r, N])]


@njit(inline="always")
def _step_count(rows, chunks, c, step_like):
    return float(carray(_pointer(rows[chunks[c, 0], STEP], step_like), 1)[0])


@njit(parallel=True, cache=True)
def _cpu_adam(rows, chunks, like, step_like, k, k64, amsgrad):
    """``k64``: (lr, beta1, beta2, eps) in float64, for the bias corrections."""
    gm, sign, wd, l1, lr, beta1, beta2, omb1, omb2, eps, decay = k
    for c in prange(chunks.shape[0]):
        t = _step_count(rows, chunks, c, step_like)
        # lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) with one division, not two:
        # lr sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2)) (the same value)
        bc2_sqrt = math.sqrt(1.0 - k64[2] ** t)
        step_size = type(lr)(k64[0] / (1.0 - k64[1] ** t) * bc2_sqrt)
        eps_hat = type(lr)(k64[3] * bc2_sqrt)
        p, g = _chunk(rows, chunks, c, P, like), _chunk(rows, chunks, c, G, like)
        m, v = _chunk(rows, chunks, c, S0, like), _chunk(rows, chunks, c, S1, like)
        if amsgrad:
            vmax = _chunk(rows, chunks, c, S2, like)
            for i in range(p.size):
                gi = _gradient(p[i], g[i], gm, sign, wd, l1)
                mi = m[i] + omb1 * (gi - m[i])
                vi = v[i] * beta2 + omb2 * gi * gi
                vm = max(vmax[i], vi)
                m[i], v[i], vmax[i] = mi, vi, vm
                p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vm) + eps_hat))
        else:
            for i in range(p.size):
                gi = _gradient(p[i], g[i], gm, sign, wd, l1)
                mi = m[i] + omb1 * (gi - m[i])
                vi = v[i] * beta2 + omb2 * gi * gi
                m[i], v[i] = mi, vi
                p[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi) + eps_hat))


@njit(parallel=True, cache=True)
def _cpu_sgd(rows, chunks, like, step_like, k, momentum, nesterov):
    gm, sign, wd, l1, lr, beta1, beta2, omb1, omb2, eps, decay = k  # beta1 = momentum
    for c in prange(chunks.shape[0]):  # omb2 = 1 - dampening
        p, g = _chunk(rows, chunks, c, P, like), _chunk(rows, chunks, c, G, like)
        if not momentum:
            for i in range(p.size):
                p[i] = p[i] - lr * _gradient(p[i], g[i], gm, sign, wd, l1)
            continue
        b = _chunk(rows, chunks, c, S0, like)
        if _step_count(rows, chunks, c, step_like) == 1.0:  # b = g at step 1
            for i in range(p.size):
                gi = _gradient(p[i], g[i], gm, sign, wd, l1)
                b[i] = gi
                p[i] = p[i] - lr * (gi + beta1 * gi if nesterov else gi)
        elif nesterov:
            for i in range(p.size):
                gi = _gradient(p[i], g[i], gm, sign, wd, l1)
                bi = b[i] * beta1 + omb2 * gi
                b[i] = bi
                p[i] = p[i] - lr * (gi + beta1 * bi)
        else:
            for i in range(p.size):
                gi = _gradient(p[i], g[i], gm, sign, wd, l1)
                bi = b[i] * beta1 + omb2 * gi
                b[i] = bi
                p[i] = p[i] - lr * bi


@njit(parallel=True, cache=True)
def _cpu_adagrad(rows, chunks, like, step_like, k, k64):
    """``k64``: (lr, lr_decay, _, _) in float64."""
    gm, sign, wd, l1, lr, beta1, beta2, omb1, omb2, eps, decay = k  # beta1 = lr_decay
    for c in prange(chunks.shape[0]):
        t = _step_count(rows, chunks, c, step_like)
        clr = type(lr)(k64[0] / (1.0 + (t - 1.0) * k64[1]))
        p, g = _chunk(rows, chunks, c, P, like), _chunk(rows, chunks, c, G, like)
        s = _chunk(rows, chunks, c, S0, like)
        for i in range(p.size):
            gi = _gradient(p[i], g[i], gm, sign, wd, l1)
            si = s[i] + gi * gi
            s[i] = si
            p[i] = p[i] - clr * (gi / (math.sqrt(si) + eps))


@njit(parallel=True, cache=True)
def _cpu_rmsprop(rows, chunks, like, step_like, k, centered, momentum):
    for c in prange(chunks.shape[0]):  # one loop per (centered, momentum)
        p, g = _chunk(rows, chunks, c, P, like), _chunk(rows, chunks, c, G, like)
        v = _chunk(rows, chunks, c, S0, like)
        b = _chunk(rows, chunks, c, S1, like) if momentum else v
        a = _chunk(rows, chunks, c, S2, like) if centered else v
        if centered:
            if momentum:
                _rmsprop_chunk(p, g, v, a, b, True, True, k)
            else:
                _rmsprop_chunk(p, g, v, a, b, True, False, k)
        elif momentum:
            _rmsprop_chunk(p, g, v, a, b, False, True, k)
        else:
            _rmsprop_chunk(p, g, v, a, b, False, False, k)


@njit(inline="always")
def _rmsprop_chunk(p, g, v, a, b, centered, momentum, k):
    """RMSprop over one chunk; ``centered`` and ``momentum`` are literals at each call,
    so each of the four loops compiles without branches."""
    gm, sign, wd, l1, lr, beta1, beta2, omb1, omb2, eps, decay = k  # beta1 = momentum,
    for i in range(p.size):  # beta2 = alpha
        gi = _gradient(p[i], g[i], gm, sign, wd, l1)
        vi = v[i] * beta2 + omb2 * gi * gi
        v[i] = vi
        if centered:
            ai = a[i] + omb2 * (gi - a[i])
            a[i] = ai
            d = math.sqrt(vi - ai * ai) + eps
        else:
            d = math.sqrt(vi) + eps
        if momentum:
            bi = b[i] * beta1 + gi / d
            b[i] = bi
            p[i] = p[i] - lr * bi
        else:
            p[i] = p[i] - lr * (gi / d)


@njit(inline="always")
def _gradient(p, g, gmul, sign, weight_decay, l1):
    """g * gmul, negated to maximize, plus L2 and L1 penalty gradients."""
    g = g * gmul * sign
    if weight_decay != 0:
        g = g + weight_decay * p
    if l1 != 0:  # l1 * sign(p), as selects (np.sign is a call that stops vectorizing)
        g = g + (l1 if p > 0 else (-l1 if p < 0 else l1 - l1))
    return g


def _cpu_run(table: Table, h: Hyper, grad_scale, found_inf, totals=None):
    with host_threads(int(table.rows[:, N].sum())):
        return _cpu_step_run(table, h, grad_scale, found_inf, totals)


def _cpu_step_run(table: Table, h: Hyper, grad_scale, found_inf, totals):
    like = np.empty(0, table.dtype)
    gmul, skip = prologue(h, grad_scale, found_inf, totals,
                          lambda: _cpu_grad_norm(table.rows, table.chunks, like))
    if not skip:
        step_like = np.empty(0, np.float32)
        bad = _cpu_advance(table.rows, step_like)
        if bad >= 0:
            value = float(table.natives[2][bad])
            raise ValueError(f"{table.op}: state_steps[{bad}] is {value}; step counts are "
                             "whole numbers >= 0")
        f = like.dtype.type
        decoupled = bool(h.flags & DECOUPLED)
        k = tuple(map(f, (gmul, -1.0 if h.flags & MAXIMIZE else 1.0,
                          0.0 if decoupled else h.weight_decay, h.l1, h.lr, h.beta1, h.beta2,
                          1.0 - h.beta1, 1.0 - h.beta2, h.eps,
                          1.0 - h.lr * h.weight_decay if decoupled else 1.0)))
        args = (table.rows, table.chunks, like, step_like, k)
        k64 = (float(h.lr), float(h.beta1), float(h.beta2), float(h.eps))
        if h.algorithm == "adam":
            threaded(_cpu_adam)(*args, k64, bool(h.flags & AMSGRAD))
        elif h.algorithm == "sgd":
            threaded(_cpu_sgd)(*args, bool(h.flags & MOMENTUM), bool(h.flags & NESTEROV))
        elif h.algorithm == "adagrad":
            threaded(_cpu_adagrad)(*args, k64)
        else:
            threaded(_cpu_rmsprop)(*args, bool(h.flags & CENTERED), bool(h.flags & MOMENTUM))
    return np.asarray(float(skip))


# --- CUDA: kernels/optim.cu ----------------------------------------------------------------------

BLOCK = 256
#: Loads in flight per thread in the update kernel.
UNROLL = 4
_STEP_TYPES = {"float16": ("gpunn::half", "float"), "bfloat16": ("gpunn::bfloat16", "float"),
               "float32": ("float", "float"), "float64": ("double", "double")}
KERNELS = cuda.Family("optim", ["gpunn::optim::prologue"] + [
    f"gpunn::optim::grad_norm<{t}>" for t, _ in _STEP_TYPES.values()] + [
    f"gpunn::optim::step<{t}, {s}, {a}>" for t, s in _STEP_TYPES.values()
    for a in range(len(ALGORITHMS))], constants={
        **{f"COLUMN_{name}": i for i, name in enumerate(ROW)}, "COLUMNS": COLUMNS,
        "CHUNK": CHUNK, "UNROLL": UNROLL, "MAXIMIZE": MAXIMIZE, "NESTEROV": NESTEROV,
        "AMSGRAD": AMSGRAD, "CENTERED": CENTERED, "DECOUPLED": DECOUPLED, "MOMENTUM": MOMENTUM})


def _device_scalar(value, name, device):
    """(host value, device float32 pointer) of grad_scale / found_inf: a number, or a
    one-element float32 array on the parameters' device."""
    if value is None or isinstance(value, (int, float)):
        return value, 0
    kind, dev, dtype, shape, _, address = describe(value, name)
    if dev != device or dtype != "float32" or math.prod(shape) != 1:
        raise ValueError(f"{name} must be a number or a one-element float32 array on {device}, "
                         f"got {dtype} {tuple(shape)} on {dev}")
    return None, address


def _cuda_grad_norm(table: Table, max_norm, scale, scale_ptr, found_ptr, control, totals):
    """The gradient pass: ends in finish() (control, step counts), or with ``totals``
    adds the table's sums to them instead (the first phase of a multi-table step)."""
    import cupy

    rows, chunks = table._device_tables()
    kernel = KERNELS.function(f"gpunn::optim::grad_norm<{_STEP_TYPES[table.dtype][0]}>")
    grid = cuda.grid_for(len(table.chunks) * BLOCK, BLOCK, kernel)
    if table._scratch is None or len(table._scratch[0]) < 2 * grid:
        # per table: two optimizers on two streams must not share the partials
        table._scratch = (cupy.empty(2 * grid, np.float64), cupy.zeros(1, np.uint32))
    partials, counter = table._scratch
    null = np.uint64(0)
    kernel((grid,), (BLOCK,), (rows, np.int64(len(table.rows)), chunks,
                               np.int64(len(table.chunks)), np.float64(max_norm),
                               np.float64(scale), np.uint64(scale_ptr), np.uint64(found_ptr),
                               partials, counter, null if control is None else control,
                               null if totals is None else totals))


def _cuda_run(table: Table, h: Hyper, grad_scale, found_inf, totals=None):
    import cupy

    scale, scale_ptr = _device_scalar(grad_scale, "grad_scale", table.device)
    found, found_ptr = _device_scalar(found_inf, "found_inf", table.device)
    if scale is not None:
        host_scale(scale, None)  # a number must be finite and > 0 (a device one skips if not)
    control = cupy.empty(2, np.float64)
    if found:  # a host-side found_inf: nothing to launch
        control.fill(1.0)
        return control[1]
    rows, chunks = table._device_tables()
    t, s = _STEP_TYPES[table.dtype]
    scale = 1.0 if scale is None else float(scale)
    max_norm = -1.0 if h.max_grad_norm is None else h.max_grad_norm
    if totals is None and needs_grad_pass(h, grad_scale, found_inf):
        _cuda_grad_norm(table, max_norm, scale, scale_ptr, found_ptr, control, None)
    else:  # the step's totals are known (or not needed): one block
        kernel = KERNELS.function("gpunn::optim::prologue")
        kernel((1,), (BLOCK,), (rows, np.int64(len(table.rows)),
                                np.uint64(0) if totals is None else totals,
                                np.float64(max_norm), np.float64(scale), np.uint64(scale_ptr),
                                np.uint64(found_ptr), control))
    kernel = KERNELS.function(f"gpunn::optim::step<{t}, {s}, {h.kernel_id}>")
    grid = cuda.grid_for(len(table.chunks) * BLOCK, BLOCK, kernel)
    kernel((grid,), (BLOCK,), (rows, chunks, np.int64(len(table.chunks)), control,
                               np.float64(h.lr), np.float64(h.beta1), np.float64(h.beta2),
                               np.float64(h.eps), np.float64(h.weight_decay), np.float64(h.l1),
                               np.int32(h.flags)))
    return control[1]
