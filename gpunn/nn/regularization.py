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
from ..validation import real


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


def _penalty(name: str, params, strength, grad: bool, term, slope) -> float:
    """strength * sum over params of term(w) (a float64 sum), and with ``grad`` adds
    strength * slope(w) to each gradient; strength a finite number >= 0, checked first."""
    strength = real(name, "strength", strength, 0.0)
    params = list(params)
    grads = _grads(name, params) if grad and strength else None
    total = 0.0
    for i, p in enumerate(params):
        xp = array_module(p.data)
        total += term(xp, p.data)
        if grads is not None:
            grads[i][...] += strength * slope(xp, p.data)
    return strength * total


def l2_penalty(params, strength: float, *, grad: bool = True) -> float:
    """(strength / 2) * sum of squares of ``params``; adds strength * w to each gradient."""
    return _penalty("l2_penalty", params, strength, grad,
                    lambda xp, w: 0.5 * float(xp.vdot(w.ravel(), w.ravel())),
                    lambda xp, w: w)


def l1_penalty(params, strength: float, *, grad: bool = True) -> float:
    """strength * sum of absolute values of ``params``; adds strength * sign(w) to gradients."""
    return _penalty("l1_penalty", params, strength, grad,
                    lambda xp, w: float(xp.abs(w).sum(dtype=xp.float64)),
                    lambda xp, w: xp.sign(w))
