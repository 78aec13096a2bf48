"""Optimizer classes: torch.optim's interface (param_groups, state, step, zero_grad,
state_dict, load_state_dict) over the fused step of :mod:`gpunn.optim.fused`.

:class:`FusedStep` is the step itself, shared by gpunn's own :class:`Optimizer` (parameters
are objects with ``.data`` and ``.grad`` NumPy/CuPy arrays, e.g. :class:`gpunn.nn.Parameter`)
and by the PyTorch adapter :mod:`gpunn.torch` (subclasses of ``torch.optim.Optimizer``).
Each algorithm's module (:mod:`gpunn.optim.algorithms`) has a small mixin naming its options
(PyTorch's names and defaults) once; the classes of both are made here and in gpunn.torch
from the registry. On top of torch's options every optimizer takes ``l1``, ``max_grad_norm``,
``skip_nonfinite`` and ``master_weights`` (see :mod:`gpunn.optim.prologue`).

State per parameter uses torch's keys ('step' is a 0-d float32 array on the parameter's
device), so state dicts move between gpunn, gpunn.torch and torch.optim (:func:`to_torch`).
"""

from __future__ import annotations

import math
import operator
from itertools import repeat
from operator import attrgetter

import numpy as np

from ..backend import (_dense_strides, _dtype_name, _numpy_dtype, array_kind, array_module,
                       compute_dtype_name, describe, dtype_name)
from .algorithms import ALGORITHMS
from .fused import Table, grad_totals, owned_arrays
from .hyper import checked, plain_options
from .prologue import needs_grad_pass


# --- Arrays of any kind: the few constructors the state needs ----------------------------------


def _full(like, shape, dtype: str, value: float):
    """A new array of ``like``'s kind and device; with ``like``'s shape also its layout
    (channels_last torch parameters get channels_last states)."""
    shape = tuple(shape)
    if array_kind(like, "param") == "torch":
        import torch

        if shape == tuple(like.shape):
            return torch.full_like(like, value, dtype=getattr(torch, dtype))
        return torch.full(shape, value, dtype=getattr(torch, dtype), device=like.device)
    return array_module(like).full(shape, value, dtype=dtype)


class _NewStates:
    """The states a table's build makes. Beside torch parameters, views of one zeroed block
    per (device, dtype), allocated once all are known (:meth:`make`), instead of one
    allocation each: a step checks every state's address, and views of one block share its
    storage, so those checks miss the cache once per block rather than once per state (600
    states of a 200-tensor Adam: the step's checks 0.71 -> 0.39 ms right after a 16M step).
    Each view starts on a 64-byte boundary, is laid out as ``_full`` lays out a new state
    (a dense parameter's strides for a state of its shape, else C order) and holds its
    initial value. As with any view, saving one state alone (``torch.save(
    state['exp_avg'])``) saves its whole block. NumPy and CuPy states are made one by one
    (``_full``): their checks read no storage, and a view could not be resized in place."""

    def __init__(self):
        self._wanted = []  # (state dict, key, torch parameter, shape, dtype name, value)

    def add(self, state: dict, key: str, like, shape, dtype: str, value: float) -> None:
        """``state[key]`` = a new array as ``_full(like, shape, dtype, value)`` (beside a
        torch parameter, once :meth:`make` runs)."""
        if array_kind(like, "param") == "torch":
            self._wanted.append((state, key, like, tuple(shape), dtype, value))
        else:
            state[key] = _full(like, shape, dtype, value)

    def make(self) -> None:
        """Allocate the blocks and put each new torch state in its dict."""
        ends: dict = {}  # (device, dtype) -> elements so far
        offsets = []
        for _, _, like, shape, dtype, _ in self._wanted:
            offsets.append(ends.get((like.device, dtype), 0))
            align = 64 // np.dtype(_numpy_dtype(dtype)).itemsize
            ends[like.device, dtype] = offsets[-1] + -(-math.prod(shape) // align) * align
        blocks = {}
        for (state, key, like, shape, dtype, value), offset in zip(self._wanted, offsets):
            block = blocks.get((like.device, dtype))
            if block is None:
                block = blocks[like.device, dtype] = _full(
                    like, (ends[like.device, dtype],), dtype, 0.0)
            view = block.as_strided(shape, _strides_like(like, shape), offset)
            if value != 0.0:
                view.fill_(value)
            state[key] = view


def _strides_like(like, shape) -> tuple:
    """The strides a new torch state of ``shape`` gets beside the parameter ``like``: like's
    own where like is dense and of that shape (channels_last stays channels_last), else C
    order."""
    if tuple(like.shape) == shape:
        dense = _dense_strides(shape, like.stride())
        if dense is not None:
            return dense
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _converted(value, like, shape, dtype: str, name: str):
    """A fresh copy of ``value`` (any array type, e.g. from a torch checkpoint, or a number)
    as ``like``'s kind, device and (for its shape) layout, with ``dtype``; ValueError if the
    shape differs, TypeError for a value that is not real (complex, bool, object...)."""
    if isinstance(value, (int, float, np.generic)):  # e.g. an old checkpoint's step
        value = np.asarray(value)
    kind = array_kind(value, name)
    if not dtype_name(value).startswith(("float", "bfloat", "int", "uint")):
        raise TypeError(f"{name} has dtype {dtype_name(value)}; optimizer states are real "
                        "numbers")
    if kind == "torch":
        value = value.detach()
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if array_kind(like, "param") == "torch":
            return _full(like, shape, dtype, 0.0).copy_(value)
        value = value.cpu().float().numpy() if dtype_name(value) == "bfloat16" else \
            value.cpu().numpy()
    host = np.asarray(value.get() if kind == "cupy" else value)
    if host.shape != tuple(shape):
        raise ValueError(f"{name} has shape {host.shape}, expected {tuple(shape)}")
    out = _full(like, shape, dtype, 0.0)
    if array_kind(like, "param") == "torch":
        import torch

        out.copy_(torch.from_numpy(np.ascontiguousarray(host.astype(np.float64))))
    else:
        out[...] = array_module(like).asarray(host.astype(dtype))
    return out


class FusedStep:
    """The step of every gpunn optimizer. Needs ``param_groups``, ``state`` and
    :meth:`_array` (the array of a parameter) from the class it is mixed into."""

    algorithm: str  # a key of gpunn.optim.algorithms.ALGORITHMS
    #: the step's caches: its tables by (group index, dtype name), and the checked options
    #: of each group by (group index, "options") (:meth:`_kept_hyper`)
    _tables: dict
    #: False where the state shows no step count (torch's SGD): the counts the kernels need
    #: are kept in ``_steps`` instead, by parameter
    steps_in_state = True

    @staticmethod
    def _array(p):
        return p.data

    @classmethod
    def _arrays(cls, params) -> list:
        """:meth:`_array` of each parameter (hook: gpunn.torch maps a list at once)."""
        return list(map(cls._array, params))

    @staticmethod
    def _grads(params) -> list:
        """The gradient the step reads for each parameter (hook: gpunn.torch reads the
        local shard of a DTensor's, FSDP2)."""
        return list(map(attrgetter("grad"), params))

    def _totals(self, tables):
        """The totals of every gradient of the step (:func:`grad_totals`) that clipping and
        the inf/NaN check use, or None where one table's own suffice. Hook: gpunn.torch
        combines them over the ranks holding shards of DTensor parameters (FSDP2)."""
        return grad_totals(tables) if len(tables) > 1 else None

    def _hyper(self, group):
        return checked(ALGORITHMS[self.algorithm], group)

    def _kept_hyper(self, index: int, group: dict):
        """:meth:`_hyper` of the group at ``index``, kept while the group holds the very
        same option objects, all plain values (:func:`plain_options`): a step then reads the
        group dict but none of its options (~60 us of cold-cache checks a step less)."""
        names, values = tuple(group), tuple(group.values())
        kept = self._tables.get((index, "options"))
        if (kept is not None and kept[0] is group and len(kept[1]) == len(names)
                and all(map(operator.is_, names, kept[1]))
                and all(map(operator.is_, values, kept[2]))):
            return kept[3]
        h = self._hyper(group)
        if plain_options(group):
            self._tables[(index, "options")] = (group, names, values, h)
        return h

    def _make_states(self) -> None:
        """Every parameter's state, made now (as torch's Adagrad does at construction)."""
        initial, new = ALGORITHMS[self.algorithm].initial, _NewStates()
        for group in self.param_groups:
            for p in group["params"]:
                data = self._array(p)
                state = self.state[p] = {}
                new.add(state, "step", data, (), "float32", 0.0)
                for slot in self._hyper(group).slots:
                    new.add(state, slot, data, data.shape, compute_dtype_name(dtype_name(data)),
                            initial(slot, group))
        new.make()

    def _prepared_state(self, p, group, h, new: _NewStates) -> dict:
        """The state of ``p`` as the kernels need it: a new dict (``self.state`` is not
        touched) with missing slots and step asked of ``new``, the master copy created, and
        loaded values converted (states float32 for 16-bit parameters, everything on p's
        device)."""
        data = self._array(p)
        state = dict(self.state.get(p, {}))
        shape, dtype = tuple(data.shape), dtype_name(data)
        sdt = compute_dtype_name(dtype)
        stepped = any(state.get(slot) is not None for slot in h.slots)  # before new slots
        for slot in h.slots:
            value = state.get(slot)
            if value is None:
                new.add(state, slot, data, shape, sdt, h.algorithm.initial(slot, group))
            elif (dtype_name(value) != sdt or not _same_place(value, data)
                  or not _same_layout(value, data)):
                state[slot] = _converted(value, data, shape, sdt, f"state {slot!r}")
        step = state.get("step") if self.steps_in_state else self._steps.get(p)
        if not self.steps_in_state and h.slots and not stepped:
            step = None  # a set-aside count is void once its states are gone (torch restarts)
        if step is None:  # a torch SGD checkpoint has no step: its buffer means t >= 1
            new.add(state, "step", data, (), "float32", 1.0 if stepped else 0.0)
        elif dtype_name(step) != "float32" or not _same_place(step, data):
            state["step"] = _converted(step, data, (), "float32", "state 'step'")
        else:
            state["step"] = step
        if group.get("master_weights") and sdt != dtype:
            master = state.get("master_param")
            if master is None:
                state["master_param"] = _converted(data, data, shape, "float32", "param")
            elif (dtype_name(master) != "float32" or not _same_place(master, data)
                  or not _same_layout(master, data)):
                state["master_param"] = _converted(master, data, shape, "float32",
                                                   "state 'master_param'")
        return state

    def _cached(self, key, group, h, params, arrays):
        """The cached table of ``key`` if it addresses exactly what this step would (same
        parameters, their current memory ``arrays``, the current state arrays:
        :meth:`Table.matches`), else None."""
        table = self._tables.get(key)
        if (table is None or table.options != (h.algorithm, h.slots,
                                                bool(group.get("master_weights")))
                or len(table.params) != len(params)
                or not all(map(operator.is_, params, table.params))):
            return None
        try:
            owned = owned_arrays(
                list(map(self.state.get, params)), table.owned_keys,
                None if self.steps_in_state else list(map(self._steps.__getitem__, params)))
        except (KeyError, TypeError):  # a state, or a state entry, is gone
            return None
        return table if table.matches(arrays, owned) else None

    def _table(self, key, group, h, params, arrays):
        """(table, new states): the cached table of ``key`` (group index, dtype) while it
        addresses exactly what this step would (same parameters, their current memory
        ``arrays``, the current state arrays: :meth:`Table.matches`); else a new one, fully
        checked, and the states it needs (committed by the caller once every group's
        gradients have passed the checks)."""
        table = self._cached(key, group, h, params, arrays)
        if table is not None:
            return table, None
        master = bool(group.get("master_weights"))
        for p, a in zip(params, arrays):  # what the step cannot address: refused by position
            position = next(i for i, q in enumerate(group["params"]) if q is p)
            array_kind(a, f"param_groups[{key[0]}]['params'][{position}]")
        new = _NewStates()
        states = [self._prepared_state(p, group, h, new) for p in params]
        new.make()
        masters = [s.get("master_param") for s in states]
        table = Table(f"{type(self).__name__}.step", h, arrays,
                      {slot: [s[slot] for s in states] for slot in h.slots},
                      [s["step"] for s in states],
                      masters if any(m is not None for m in masters) else None,
                      group.get("backend"))
        table.options, table.params = (h.algorithm, h.slots, master), list(params)
        table.owned_keys = (*h.slots,
                            *(("master_param",) if any(m is not None for m in masters) else ()),
                            *(("step",) if self.steps_in_state else ()))
        return table, (key, dict(zip(params, states)))

    def fused_step(self, grad_scale=None, found_inf=None):
        """Update every parameter that has a gradient: one table and two launches per group
        and dtype. Every group's options and gradients are checked before anything changes.
        With clipping or the inf/NaN check over several tables, one pass first sums every
        gradient's square: the norm is that of all gradients of the step (as
        clip_grad_norm_ over all parameters) and one inf/NaN skips every group.
        Returns the groups' skip flags (0-d arrays on the device, 1 where skipped)."""
        hypers = [self._kept_hyper(i, group) for i, group in enumerate(self.param_groups)]
        ready, pending = [], []
        for index, (group, h) in enumerate(zip(self.param_groups, hypers)):
            params = group["params"]
            grads = self._grads(params)
            arrays = self._arrays(params)
            every_grad = all(map(operator.is_not, grads, repeat(None)))
            # the common case: every parameter has a gradient, and the group's cached table
            # (its dtypes among what it checks) still addresses them all
            if every_grad and arrays:
                table = self._cached((index, _dtype_name(arrays[0].dtype)), group, h, params,
                                     arrays)
                if table is not None:
                    ready.append((table.bind_grads(grads), h))
                    continue
            dtypes = set(map(attrgetter("dtype"), arrays))
            if len(dtypes) == 1 and every_grad:
                by_dtype = {dtypes.pop(): (params, arrays, grads)}
            else:  # one table per dtype (a kernel has one), parameters with a gradient
                by_dtype = {}
                for p, a, grad in zip(params, arrays, grads):
                    if grad is not None:
                        entry = by_dtype.setdefault(a.dtype, ([], [], []))
                        entry[0].append(p)
                        entry[1].append(a)
                        entry[2].append(grad)
            for dtype, (params, arrays, grads) in by_dtype.items():
                table, new = self._table((index, _dtype_name(dtype)), group, h, params, arrays)
                ready.append((table.bind_grads(grads), h))
                if new is not None:
                    pending.append((table, new))
        for table, (key, states) in pending:  # all checks passed: commit new states
            if not self.steps_in_state:
                for p, state in states.items():
                    self._steps[p] = state.pop("step")
                states = {p: state for p, state in states.items() if state}
            self.state.update(states)
            self._tables[key] = table
        totals = None
        if ready and any(needs_grad_pass(h, grad_scale, found_inf) for _, h in ready):
            totals = self._totals([t for t, _ in ready])
        flags = [table.run(h, grad_scale, found_inf, totals) for table, h in ready]
        self.skip_flags = flags
        return flags

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step skipped a group for inf/NaN gradients (reads the device)."""
        return any(float(f) != 0.0 for f in getattr(self, "skip_flags", []))


def _same_layout(state, param) -> bool:
    """Whether a state is laid out as the step needs it: with the parameter's strides (a
    parameter moved to channels_last, or transposed, after some steps gets its states
    re-laid once); C-contiguous for a parameter that is not dense (its update is staged)."""
    if tuple(state.shape) != tuple(param.shape) or math.prod(param.shape) <= 1:
        return True  # a shape mismatch is the step's error to report
    if array_kind(param, "param") != "torch":
        return bool(state.flags.c_contiguous)
    if describe(param, "param")[4] is None:
        return state.is_contiguous()
    return state.stride() == param.stride()


def _same_place(a, b) -> bool:
    """Same array kind and device (states loaded from a checkpoint may be elsewhere)."""
    ka, kb = array_kind(a, "state"), array_kind(b, "param")
    if ka != kb:
        return False
    if ka == "torch":
        return a.device == b.device
    if ka == "cupy":
        return a.device.id == b.device.id
    return True


def check_new_params(params: list, groups: list, array, names=None) -> None:
    """A new group's parameters: each listed once (torch.optim would warn and step a repeated
    one twice) and in none of ``groups``; ValueError naming the repeated one."""
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        j = first.setdefault(id(p), i)
        if j != i:
            shape = getattr(array(p), "shape", None)
            raise ValueError(
                f"params[{i}]{f' {names[i]!r}' if names and names[i] else ''}"
                f"{'' if shape is None else f' (shape {tuple(shape)})'} is params[{j}] listed "
                "again; a parameter may appear once, not twice in a group nor in more than one "
                "parameter group")
    if any(id(p) in first for g in groups for p in g["params"]):
        raise ValueError("some parameters appear in more than one parameter group")


def checked_load(opt, state_dict) -> tuple[list, dict]:
    """(param groups, state by parameter) that loading ``state_dict`` (gpunn's, gpunn.torch's
    or torch.optim's layout) into ``opt`` gives, every check done before ``opt`` changes:
    group and parameter counts; each saved group holds the options the algorithm needs, and
    they are valid (saved options win; others, e.g. gpunn's own, stay as they are); state
    keys the algorithm uses; shapes; real dtypes. States are fresh copies on each
    parameter's device (float32 for 16-bit parameters, as the step keeps them)."""
    cls = type(opt).__name__
    try:
        groups, states = state_dict["param_groups"], state_dict["state"]
    except (KeyError, TypeError):
        raise ValueError(f"{cls}.load_state_dict: state_dict must be a dict with 'state' and "
                         "'param_groups'") from None
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer "
                         f"has {len(opt.param_groups)}")
    for i, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"state_dict's parameter group {i} has {len(saved['params'])} "
                             f"parameters, the optimizer's has {len(group['params'])}")
    algorithm = ALGORITHMS[opt.algorithm]
    new_groups = []
    for i, (saved, group) in enumerate(zip(groups, opt.param_groups)):
        missing = [key for key in algorithm.required if key not in saved]
        if missing:
            raise ValueError(f"state_dict's param_groups[{i}] lacks {missing}, which {cls} "
                             "needs (is it another optimizer's state dict?)")
        new = {**group, **{k: v for k, v in saved.items() if k != "params"},
               **algorithm.forced}  # as torch's AdamW.__setstate__
        try:
            opt._hyper(new)
        except (TypeError, ValueError) as e:
            raise type(e)(f"state_dict's param_groups[{i}]: {e}") from None
        new_groups.append(new)
    known = {"step", "master_param", *algorithm.states}
    new_state = {}
    for saved, group in zip(groups, opt.param_groups):
        for index, p in zip(saved["params"], group["params"]):
            entry = states.get(index)
            if entry is None:
                continue
            unknown = [key for key in entry if key not in known]
            if unknown:
                raise ValueError(f"state_dict's state[{index}] has {unknown}, which {cls} "
                                 "does not use (is it another optimizer's state dict?)")
            data = opt._array(p)
            sdt = compute_dtype_name(dtype_name(data))
            new_state[p] = {
                key: _converted(v, data, () if key == "step" else data.shape,
                                "float32" if key in ("step", "master_param") else sdt,
                                f"state[{index}][{key!r}]")
                for key, v in entry.items() if v is not None}
    return new_groups, new_state


class Optimizer(FusedStep):
    """gpunn's optimizer base: parameters are objects with ``.data`` and ``.grad`` arrays."""

    def _setup(self, params, defaults):
        self.defaults = dict(defaults)
        self.state: dict = {}
        self.param_groups: list[dict] = []
        self._tables = {}
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for group in params if isinstance(params[0], dict) else [{"params": params}]:
            self.add_param_group(group)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the cached step tables (they address this
        optimizer's arrays); the copy builds its own at its first step."""
        return {k: v for k, v in self.__dict__.items() if k != "_tables"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tables = {}

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (a dict with 'params' and any options overriding the defaults)."""
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if hasattr(params, "data") else list(params)
        for i, p in enumerate(group["params"]):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(f"params[{i}] must have .data and .grad (a gpunn.nn.Parameter), "
                                f"got {type(p).__name__}")
        check_new_params(group["params"], self.param_groups, self._array)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._hyper(group)  # checks the options
        self.param_groups.append(group)

    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One fused step for every group; ``closure`` (re-evaluates the loss) as in torch.
        With ``grad_scale`` the gradients are divided by it and inf/NaN skips the step."""
        loss = closure() if closure is not None else None
        self.fused_step(grad_scale, found_inf)
        return loss

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient in place (or drop it with ``set_to_none``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad[...] = 0

    def state_dict(self) -> dict:
        """{'state': {index: {key: array}}, 'param_groups': [{..., 'params': [index]}]}, the
        layout of torch.optim's state dicts (arrays are the live state, not copies)."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        params = {id(p): p for g in self.param_groups for p in g["params"]}
        state = {index[i]: dict(self.state[params[i]]) for i in index
                 if params[i] in self.state}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, of gpunn.torch's or of torch.optim's (torch
        tensors are copied onto the parameters' device), checked fully before anything
        changes (:func:`checked_load`)."""
        groups, state = checked_load(self, state_dict)
        self.param_groups[:] = groups
        self.state = state
        self._tables = {}


def to_torch(state_dict: dict) -> dict:
    """A copy of a gpunn state dict with torch tensors, for ``torch.optim`` optimizers'
    ``load_state_dict``."""
    import torch

    def tensor(a):
        kind = array_kind(a, "state")
        if kind == "torch":
            return a.detach().clone()
        return torch.from_dlpack(a.copy()) if kind == "cupy" else torch.tensor(np.array(a))

    return {"state": {i: {k: tensor(v) for k, v in s.items()}
                      for i, s in state_dict["state"].items()},
            "param_groups": [dict(g) for g in state_dict["param_groups"]]}


# --- The classes: one per registered algorithm -----------------------------------------------


def optimizer_classes(base: type, module: str, attributes=lambda algorithm: {}) -> dict:
    """{title: class} of every algorithm: its options mixin over ``base`` (over the class of
    its ``parent``, as torch's AdamW is an Adam), named as in ``module``, with
    ``attributes(algorithm)`` on top."""
    classes = {}
    for algorithm in ALGORITHMS.values():
        parent = classes[ALGORITHMS[algorithm.parent].title] if algorithm.parent else base
        classes[algorithm.title] = type(algorithm.title, (algorithm.options, parent), {
            "__doc__": algorithm.doc, "__module__": module, "__qualname__": algorithm.title,
            **attributes(algorithm)})
    return classes


#: gpunn.optim's optimizers (SGD, Adagrad, RMSprop, Adam, AdamW...), by class name.
OPTIMIZERS = optimizer_classes(Optimizer, __name__)
globals().update(OPTIMIZERS)
