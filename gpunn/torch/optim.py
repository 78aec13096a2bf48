"""PyTorch adapter: gpunn's fused optimizers as ``torch.optim.Optimizer`` subclasses.

``gpunn.torch.Adam(model.parameters(), lr=1e-3)`` (likewise SGD, Adagrad, RMSprop, AdamW)
takes torch 2.13's signature (positions, keyword-only options, defaults; ``foreach`` and
``fused`` are accepted and change nothing, ``capturable``/``differentiable`` must be False)
plus gpunn's keyword-only options (``l1``, ``max_grad_norm``, ``skip_nonfinite``,
``master_weights``, ``backend``), and works with ``torch.optim.lr_scheduler`` and
``torch.amp.GradScaler`` unchanged: the scaler hands its scale and found-inf flag to the step
(``_step_supports_amp_scaling``), which unscales and skips on the device, without a host
sync. CPU tensors run the Numba kernels, CUDA tensors the CUDA kernels. Param groups, state
and state dicts hold torch's keys, so checkpoints move to and from ``torch.optim``; the
optimizers deep-copy, pickle and ``torch.save`` as torch's do.
"""

from __future__ import annotations

import torch

from ..optim.optimizer import (AdagradOptions, AdamOptions, AdamWOptions, FusedStep,
                               RMSpropOptions, SGDOptions, check_new_params, checked_load)


class Optimizer(FusedStep, torch.optim.Optimizer):
    """torch.optim.Optimizer running gpunn's fused step."""

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
        return p

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

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step; under GradScaler, gradients are unscaled and an inf/NaN step is
        skipped on the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is not None:  # GradScaler's scale: the gradients are divided by it
            grad_scale = grad_scale.to(torch.float32)
        self.fused_step(grad_scale, found_inf)
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


class SGD(SGDOptions, Optimizer):
    """torch.optim.SGD, fused. torch's SGD state has no 'step', nor has this one's: the
    kernels' step counts (momentum's first step copies the gradient) are kept apart
    (``steps_in_state``), and without them a momentum buffer means the first step is
    behind it."""

    steps_in_state = False

    def _hide_steps(self) -> None:
        self._steps = {}
        for p, state in list(self.state.items()):
            step = state.pop("step", None)
            if step is not None:
                self._steps[p] = step
            if not state:
                del self.state[p]

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._hide_steps()


class Adagrad(AdagradOptions, Optimizer):
    """torch.optim.Adagrad, fused."""


class RMSprop(RMSpropOptions, Optimizer):
    """torch.optim.RMSprop, fused."""


class Adam(AdamOptions, Optimizer):
    """torch.optim.Adam, fused (``decoupled_weight_decay=True`` is AdamW)."""


class AdamW(AdamWOptions, Adam):
    """torch.optim.AdamW, fused."""


__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop"]
