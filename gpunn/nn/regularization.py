r"""L2 and L1 penalties as loss terms, with their gradients.

    L2:  R = (lambda / 2) * sum w^2,   dR/dw = lambda * w
    L1:  R = lambda * sum |w|,         dR/dw = lambda * sign(w)   (0 at w = 0, as torch)

Add the returned value to the loss and call with ``grad=True`` after the model's backward
(or before: gradients accumulate). The same penalties inside the fused optimizer step are the
``weight_decay`` (L2; decoupled in AdamW) and ``l1`` options of :mod:`gpunn.optim`.
``params`` is any iterable of :class:`~gpunn.nn.Parameter` (e.g. only the weight matrices:
``[m.weight for m in model.modules() if isinstance(m, Linear)]``).
"""

from __future__ import annotations

from ..backend import array_module, check_writable


def _grads(name: str, params: list) -> list:
    """The parameters' gradients, existing ones checked writeable before any is created or
    written (zeros for a parameter outside a packed model, before its first backward)."""
    for i, p in enumerate(params):
        if p.grad is not None:
            check_writable(name, f"params[{i}].grad", p.grad)
    for p in params:
        if p.grad is None:
            p.grad = array_module(p.data).zeros_like(p.data)
    return [p.grad for p in params]


def _strength(name: str, value) -> float:
    value = float(value)
    if not value >= 0.0:
        raise ValueError(f"{name}: strength must be >= 0, got {value!r}")
    return value


def l2_penalty(params, strength: float, *, grad: bool = True) -> float:
    """(strength / 2) * sum of squares of ``params``; adds strength * w to each gradient."""
    strength = _strength("l2_penalty", strength)
    params = list(params)
    grads = _grads("l2_penalty", params) if grad and strength else None
    total = 0.0
    for i, p in enumerate(params):
        total += float(array_module(p.data).vdot(p.data.ravel(), p.data.ravel()))
        if grads is not None:
            grads[i][...] += strength * p.data
    return 0.5 * strength * total


def l1_penalty(params, strength: float, *, grad: bool = True) -> float:
    """strength * sum of absolute values of ``params``; adds strength * sign(w) to gradients."""
    strength = _strength("l1_penalty", strength)
    params = list(params)
    grads = _grads("l1_penalty", params) if grad and strength else None
    total = 0.0
    for i, p in enumerate(params):
        xp = array_module(p.data)
        total += float(xp.abs(p.data).sum(dtype=xp.float64))
        if grads is not None:
            grads[i][...] += strength * xp.sign(p.data)
    return strength * total
