"""PyTorch adapter: gpunn's fused optimizers as ``torch.optim.Optimizer`` subclasses.

``gpunn.torch.Adam(model.parameters(), lr=1e-3)`` (likewise SGD, Adagrad, RMSprop, AdamW)
takes torch's options and defaults plus gpunn's (``l1``, ``max_grad_norm``,
``skip_nonfinite``, ``master_weights``), and works with ``torch.optim.lr_scheduler`` and
``torch.amp.GradScaler`` unchanged: the scaler hands its scale and found-inf flag to the step
(``_step_supports_amp_scaling``), which unscales and skips on the device, without a host
sync. CPU tensors run the Numba kernels, CUDA tensors the CUDA kernels. State and state dicts
are torch's own (same keys), so checkpoints move to and from ``torch.optim``.
"""

from __future__ import annotations

import torch

from .optim.optimizer import (AdagradOptions, AdamOptions, AdamWOptions, FusedStep,
                              RMSpropOptions, SGDOptions)


class Optimizer(FusedStep, torch.optim.Optimizer):
    """torch.optim.Optimizer running gpunn's fused step."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf to step()

    def _setup(self, params, defaults):
        self._tables = {}
        torch.optim.Optimizer.__init__(self, params, defaults)

    @staticmethod
    def _array(p):
        return p

    def add_param_group(self, param_group: dict) -> None:
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
        """torch's load, except that float32 states (and master copies) of float16/bfloat16
        parameters stay float32: torch would round them to the parameter's dtype."""
        super().load_state_dict(state_dict)
        self._tables = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for index, p in zip(saved["params"], group["params"]):
                entry = state_dict["state"].get(index, {})
                if p.dtype not in (torch.float16, torch.bfloat16):
                    continue
                for key, value in entry.items():
                    if (key != "step" and isinstance(value, torch.Tensor)
                            and value.dtype == torch.float32):
                        self.state[p][key] = torch.empty_like(p, dtype=torch.float32).copy_(value)


class TorchOptions:
    """torch's implementation switches, accepted so that code written for torch.optim runs
    unchanged: ``foreach`` and ``fused`` change nothing (the step is always fused);
    ``capturable`` and ``differentiable`` are not supported."""

    def __init__(self, params, *args, foreach=None, fused=None, capturable=False,
                 differentiable=False, **kwargs):
        for name, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"{type(self).__name__}: {name}=True is not supported")
        super().__init__(params, *args, **kwargs)


class SGD(TorchOptions, SGDOptions, Optimizer):
    """torch.optim.SGD, fused."""


class Adagrad(TorchOptions, AdagradOptions, Optimizer):
    """torch.optim.Adagrad, fused."""


class RMSprop(TorchOptions, RMSpropOptions, Optimizer):
    """torch.optim.RMSprop, fused."""


class Adam(TorchOptions, AdamOptions, Optimizer):
    """torch.optim.Adam, fused."""


class AdamW(TorchOptions, AdamWOptions, Optimizer):
    """torch.optim.AdamW, fused."""


__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop"]
