"""PyTorch adapter: gpunn's fused optimizers as ``torch.optim.Optimizer`` subclasses.

``gpunn.torch.Adam(model.parameters(), lr=1e-3)`` (likewise every algorithm of
:mod:`gpunn.optim.algorithms`: SGD, Adagrad, RMSprop, AdamW, ...) takes torch 2.13's
signature where torch has the optimizer (positions, keyword-only options, defaults;
``foreach`` and ``fused`` are accepted and change nothing, ``capturable``/``differentiable``
must be False)
plus gpunn's keyword-only options (``l1``, ``max_grad_norm``, ``skip_nonfinite``,
``master_weights``, ``backend``), and works with ``torch.optim.lr_scheduler`` and
``torch.amp.GradScaler`` unchanged: the scaler hands its scale and found-inf flag to the step
(``_step_supports_amp_scaling``), which unscales and skips on the device, without a host
sync. CPU tensors run the Numba kernels, CUDA tensors the CUDA kernels. Under FSDP2
(``fully_shard``: DTensor parameters) the step updates each rank's local shards and
``max_grad_norm`` clips by the norm over all shards of all ranks. Param groups, state
and state dicts hold torch's keys, so checkpoints move to and from ``torch.optim``; the
optimizers deep-copy, pickle and ``torch.save`` as torch's do.
"""

from __future__ import annotations

import math
from operator import attrgetter

import torch
import torch.optim.optimizer as torch_optimizer

from ..optim.fused import grad_totals
from ..optim.optimizer import FusedStep, check_new_params, checked_load, optimizer_classes

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_OR_NONE = {torch.Tensor, torch.nn.Parameter, type(None)}


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t):
    """A DTensor's local shard, its memory itself (not a copy); any other tensor (or None)
    as it is."""
    if t is None or type(t) in _PLAIN or not isinstance(t, _dtensor()):
        return t
    return t._local_tensor


def _locals(tensors) -> list:
    """:func:`_local` of each tensor; at once (type checks in C) where all are plain tensors
    or None, as in every step without FSDP2 (200 parameters: ~50 us a step less)."""
    if set(map(type, tensors)) <= _PLAIN_OR_NONE:
        return list(tensors)
    return list(map(_local, tensors))


def _shard_groups(params) -> list:
    """The process groups over which the DTensor ``params`` are sharded (one per sharded
    mesh dimension; replicated dimensions hold copies); [] without DTensors. All must be
    sharded over the same groups, and none may be a plain tensor (its norm would be counted
    once per rank): ValueError otherwise."""
    layouts, plain = {}, 0
    for p in params:
        if type(p) in _PLAIN or not isinstance(p, _dtensor()):
            plain += 1
            continue
        groups = [p.device_mesh.get_group(i) for i, placement in enumerate(p.placements)
                  if placement.is_shard()]
        layouts[tuple(g.group_name for g in groups)] = groups
    if not layouts:
        return []
    if len(layouts) > 1 or plain:
        raise ValueError("max_grad_norm/skip_nonfinite over DTensor parameters needs every "
                         "parameter of the step sharded alike (over the same process groups; "
                         f"found {len(layouts)} shardings and {plain} plain tensors)")
    return next(iter(layouts.values()))


def _combine_totals(totals, groups):
    """Gradient totals of every rank of ``groups``: host totals (norm, any inf/NaN) are
    gathered and combined (hypot, any); device totals [sum of squares, inf/NaN count] are
    summed in place by an all-reduce."""
    import torch.distributed as dist

    if isinstance(totals, tuple):
        norm, bad = totals
        for group in groups:
            mine = torch.tensor([norm, float(bad)], dtype=torch.float64)
            every = mine.new_empty(2 * dist.get_world_size(group))
            dist.all_gather_into_tensor(every, mine, group=group)
            norm, bad = math.hypot(*every[0::2].tolist()), bool(every[1::2].any())
        return norm, bad
    shared = torch.from_dlpack(totals)
    for group in groups:
        dist.all_reduce(shared, group=group)
    return totals


class Optimizer(FusedStep, torch.optim.Optimizer):
    """torch.optim.Optimizer running gpunn's fused step. Where torch's state has no 'step'
    (SGD: ``steps_in_state`` False), neither has this one's: the kernels' step counts
    (momentum's first step copies the gradient) are kept apart, and without them a momentum
    buffer means the first step is behind it."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()

    def _setup(self, params, defaults):
        self._tables, self._steps = {}, {}
        torch.optim.Optimizer.__init__(self, params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Unpickling, deepcopy and load_state_dict: torch's ``__getstate__`` keeps only
        defaults, state and param_groups; the cached step tables start empty, and so do
        step counts kept apart (SGD's: its momentum buffers say the first step is done)."""
        super().__setstate__(state)
        self._tables, self._steps = {}, {}

    @staticmethod
    def _array(p):
        """The memory the step updates: a DTensor parameter's (FSDP2) local shard."""
        return _local(p)

    @staticmethod
    def _arrays(params) -> list:
        return _locals(params)

    @staticmethod
    def _grads(params) -> list:
        return _locals(list(map(attrgetter("grad"), params)))

    def _totals(self, tables):
        """With DTensor parameters sharded over a process group (FSDP2), the step's gradient
        norm and inf/NaN flag are those of all shards of all ranks (as ``clip_grad_norm_``
        on DTensors): each rank's totals are combined over the mesh dimensions the
        parameters are sharded on. Plain parameters: the base class's."""
        groups = _shard_groups([p for t in tables for p in t.params])
        if not groups:
            return super()._totals(tables)
        return _combine_totals(grad_totals(tables), groups)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, but a parameter listed twice is refused (torch warns and steps it twice)
        and so is a group whose options the step would refuse: nothing is added."""
        # torch raises for a group that is not a dict, a set of parameters, and a parameter
        # already in another group
        params = param_group["params"] if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            param_group["params"] = params = list(params)
            check_new_params([p[1] if isinstance(p, tuple) else p for p in params], [],
                             self._array, [p[0] if isinstance(p, tuple) else None for p in params])
        super().add_param_group(param_group)
        try:
            self._hyper(self.param_groups[-1])  # checks the new group's options
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def step(self, closure=None):
        """One fused step, run inside torch's step hooks and profiler label
        (``Optimizer.profile_hook_step``) where a hook is registered or a profiler records;
        else directly: that wrapper enters ``record_function`` every step, ~200 us of
        cold-cache op dispatch after a large step (16M parameters in 200 tensors)."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _GLOBAL_STEP_HOOKS is None or any(_GLOBAL_STEP_HOOKS)
                or torch.autograd._profiler_enabled()):
            return _HOOKED_STEP(self) if closure is None else _HOOKED_STEP(self, closure)
        return self._step(closure)

    step.hooked = True  # torch's __init__ wraps a step without this mark in its hooks

    def _step(self, closure=None):
        """The step, under no_grad (set directly: ``torch.no_grad()``'s decorator cost
        ~100 us of cold-cache Python a step); under GradScaler, gradients are unscaled and
        an inf/NaN step is skipped on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:  # GradScaler's scale: the gradients are divided by it
                grad_scale = grad_scale.to(torch.float32)
            self.fused_step(grad_scale, getattr(self, "found_inf", None))
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load (its hooks, param_names), checked fully first (ValueError/TypeError,
        nothing changed: :func:`gpunn.optim.optimizer.checked_load`); gpunn's options absent
        from a torch state dict keep their values, and float32 states (and master copies) of
        float16/bfloat16 parameters stay float32 where torch would round them."""
        groups, states = checked_load(self, state_dict)
        super().load_state_dict(state_dict)
        for group, checked in zip(self.param_groups, groups):
            group.update(checked)
        for p, entry in states.items():
            self.state[p] = entry
        self._tables = {}
        if not self.steps_in_state:
            self._hide_steps()

    def _hide_steps(self) -> None:
        self._steps = {}
        for p, state in list(self.state.items()):
            step = state.pop("step", None)
            if step is not None:
                self._steps[p] = step
            if not state:
                del self.state[p]


#: torch's global step hooks (pre, post), None where this torch keeps them elsewhere (then
#: every step runs inside torch's wrapper).
_GLOBAL_STEP_HOOKS = tuple(getattr(torch_optimizer, f"_global_optimizer_{kind}_hooks", None)
                           for kind in ("pre", "post"))
if None in _GLOBAL_STEP_HOOKS:
    _GLOBAL_STEP_HOOKS = None
#: Optimizer._step inside torch's hooks and profiler label.
_HOOKED_STEP = torch.optim.Optimizer.profile_hook_step(Optimizer._step)

#: gpunn.torch's optimizers (SGD, Adagrad, RMSprop, Adam, AdamW...), by class name.
OPTIMIZERS = optimizer_classes(Optimizer, __name__,
                               lambda a: {"steps_in_state": a.torch_steps_in_state})
globals().update(OPTIMIZERS)

__all__ = [*OPTIMIZERS, "Optimizer"]
