"""The fused optimizer step's table of tensors: built, checked, kept between steps, run.

A :class:`Table` holds, for every parameter of a step, the addresses of the parameter, its
gradient, its states, its float32 master copy and its step count (one row of
:data:`walker.ROW <gpunn.optim.walker.ROW>`), and a chunk list of (row, first element)
pairs of ``CHUNK`` elements. :mod:`gpunn.optim.walker` runs one step over it, whatever the
number of tensors: a prologue and one fused update (on the GPU: two launches).

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
import operator
from itertools import chain, repeat
from operator import itemgetter

import numpy as np

from ..backend import (DTYPES, HALF_DTYPES, array_signatures, check_writable,
                       compute_dtype_name, describe, resolve, storages_hold)
from .hyper import Hyper
from .prologue import grad_norm, reference_step
from .walker import CHUNK, COLUMNS, G, MASTER, N, P, S0, STEP, cpu_grad_norm, cpu_run, \
    cuda_grad_norm, cuda_run


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
        if self.dtype not in DTYPES[call.backend]:
            raise TypeError(f"{op}: params[0] has dtype {self.param_dtype}, which the "
                            f"{call.backend!r} backend does not support (supported: "
                            f"{', '.join(sorted({*DTYPES[call.backend], *HALF_DTYPES}))})")
        self.state_dtype = compute_dtype_name(self.param_dtype)
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
                column = S0 + h.algorithm.states.index(slot)
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
        #: elements of the step: its host kernels are picked by this (backend.host_kernel)
        self.size = int(rows[:, N].sum())
        self.natives = (kernel_params, states, steps, kernel_masters)  # the numpy backend's
        # what the rows address, to revalidate at every step (the arrays are kept alive)
        self.signature = self._signature(params, states, steps, masters)
        self.device_rows = None
        self.grads = self.grad_refs = self.grad_signature = None
        self.grad_stages = []  # (row, buffer) of gradients copied before each step
        self.scratch = None  # cuda: the norm pass's partials and last-block counter

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
            if not self._bind_grads_like_params(grads, signature):
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

    def _bind_grads_like_params(self, grads, signature) -> bool:
        """Bind torch gradients laid out exactly like their parameters (strides, shape,
        dtype, device), the common case, from their signature: the storage check and the
        disjointness test over all of them at once, no per-gradient checks (torch's
        zero_grad makes new gradients every step: 200 of them cost 0.9 ms a step the long
        way). False, binding nothing, for anything else (then :meth:`_bind_new_grads`)."""
        if (signature is None or self.kind != "torch" or self.stages
                or self.dtype != self.param_dtype or signature[1:] != self.signature[0][1:]):
            return False
        device = -1 if self.device == "cpu" else int(self.device.split(":")[1])
        import torch

        if any(map(operator.ne, map(torch.Tensor.get_device, grads), repeat(device))) \
                or not storages_hold(grads):
            return False
        addresses = np.array(signature[0], np.int64)
        self.written.check_disjoint("grads", addresses, self.rows[:, N] * _ITEMSIZE[self.dtype],
                                    range(len(grads)))
        self._set_grads(addresses, [])
        return True

    def _set_grads(self, addresses, stages) -> None:
        """Record the gradient addresses (the device copy of the rows made again if they
        moved) and the gradients copied into buffers before each step."""
        if self.device_rows is not None and not np.array_equal(self.rows[:, G], addresses):
            self.device_rows = None
        self.rows[:, G] = addresses
        self.grad_stages = stages

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
        self._set_grads(addresses, stages)

    def grad_norm(self) -> tuple[float, bool]:
        """(L2 norm, any inf/NaN) of this table's gradients, on the host (numpy, cpu); the
        norm of finite gradients never overflows (see :func:`prologue.grad_norm`)."""
        if self.call.backend == "numpy":
            return grad_norm(self.call.xp, list(map(self.call.view, self.grads)))
        return cpu_grad_norm(self.rows, self.chunks, np.empty(0, self.dtype), self.size)

    def add_grad_sumsq(self, totals):
        """cuda: accumulate this table's gradients' sum of squares and inf/NaN count into
        the device array ``totals`` (stream-ordered, deterministic)."""
        with self.call.context():
            cuda_grad_norm(self, -1.0, 1.0, 0, 0, None, totals)
        return totals

    def device_tables(self):
        """cuda: the rows and chunks on the device (copied when they change)."""
        import cupy

        if self.device_rows is None:
            self.device_rows = cupy.asarray(self.rows)
            self.device_chunks = cupy.asarray(self.chunks)
        return self.device_rows, self.device_chunks

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
                views = lambda arrays: list(map(call.view, arrays))  # in place, any strides
                skipped = xp.asarray(float(reference_step(
                    xp, views(params), views(self.grads),
                    {k: views(v) for k, v in states.items() if k in self.slots}, views(steps),
                    [None if m is None else call.view(m) for m in masters] if masters else None,
                    h, grad_scale, found_inf, totals)))
            elif call.backend == "cpu":
                skipped = cpu_run(self, h, grad_scale, found_inf, totals)
            else:
                skipped = cuda_run(self, h, grad_scale, found_inf, totals)
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


#: bytes per element of the dtypes a table holds.
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


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
    return Table(f"{h.algorithm.name} step", h, params, states, steps, masters, backend) \
        .bind_grads(grads).run(h, grad_scale, found_inf)
