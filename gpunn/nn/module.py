"""Module, the base of every layer.

There is no autograd engine: every module has an explicit ``forward(x)`` that keeps what its
``backward`` needs, and ``backward(dy, input_grad=True)`` that adds the gradients of its
parameters into their ``.grad`` (accumulating, as torch does until ``zero_grad``) and returns
dL/dx (None when ``input_grad`` is False: the first layer of a model skips that product).

Models hold NumPy arrays (computed by the ``cpu`` Numba kernels, or by the ``numpy`` reference)
or CuPy arrays (``cuda``); :meth:`Module.to` moves them. ``state_dict`` keys and layouts are
torch's (``"0.weight"``, ``"1.running_mean"``, ...), so weights move both ways.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .. import backend as _backend
from ..backend import array_kind, check_writable, to_host
from .arena import Arena, transfer
from .parameter import Parameter

#: where a model can live: NumPy arrays with the Numba kernels or the NumPy reference, or CuPy
DEVICES = ("cpu", "numpy", "cuda")


class ShapeError(ValueError):
    """An input whose shape does not fit the layer it is given to."""


def array_module_of(device: str):
    """numpy for "cpu"/"numpy", cupy for "cuda" (with a clear error when CuPy sees no GPU)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device != "cuda":
        return np
    if not _backend.has_cupy():
        raise RuntimeError("device='cuda' needs CuPy, which is not installed: "
                           'pip install "gpunn[cuda13]" (CUDA 13) or "gpunn[cuda12]" (CUDA 12)')
    if _backend.cuda_device_count() == 0:
        raise RuntimeError("device='cuda' needs a CUDA device, and CuPy sees none")
    import cupy

    return cupy


def check_array(owner: str, name: str, a, device: str) -> None:
    """``a`` must be an array of ``device``'s kind (NumPy for cpu/numpy, CuPy for cuda) in
    native byte order; a TypeError naming ``owner`` and the argument otherwise."""
    if isinstance(a, np.ndarray):
        if device != "cuda":
            try:
                array_kind(a, name)  # native byte order
            except TypeError as e:
                raise TypeError(f"{owner}: {e}") from None
            return
        found = "a NumPy array"
    else:
        module = type(a).__module__.split(".")[0]
        if module == "cupy" and device == "cuda":
            return
        if module == "torch":
            raise TypeError(f"{owner}: {name} is a torch tensor; gpunn.nn layers take NumPy or "
                            f"CuPy arrays (for torch models use gpunn.torch)")
        found = "a CuPy array" if module == "cupy" else f"a {type(a).__name__}"
    expected = "CuPy arrays" if device == "cuda" else "NumPy arrays"
    raise TypeError(f"{owner}: {name} is {found}; the layer is on {device!r} and takes "
                    f"{expected}")


class Module:
    """A layer or a model: parameters, buffers and submodules registered by assignment."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "device", "cpu")
        object.__setattr__(self, "arena", None)

    # --- registration -------------------------------------------------------------------------

    def __setattr__(self, name, value):
        if name in self._buffers:
            self._buffers[name] = value
        elif isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array) -> None:
        """A state array that is not trained (e.g. running statistics): in ``state_dict``,
        moved by ``to``."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    # --- traversal ----------------------------------------------------------------------------

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self):
        seen = set()
        for path, m in self.named_modules():
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for path, m in self.named_modules():
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{path}.{name}" if path else name), b

    # --- modes and gradients ------------------------------------------------------------------

    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        """Every gradient to zero (one fill of the arena when the model is packed)."""
        params = self.parameters()
        if self.arena is not None and self.arena.owns(params):
            grad = self.arena.grad
            grad.fill(0)
            if any(p.grad is None or p.grad.base is not grad for p in params):
                # dropped (optimizer.zero_grad(set_to_none=True)) or replaced: back into the
                # arena (views are made only then, not on every step)
                for p, view in zip(params, self.arena._views(grad)):
                    p.grad = view
            return
        for name, p in self.named_parameters():
            if p.grad is not None:
                check_writable("zero_grad", f"{name}.grad", p.grad)
        for p in params:
            if p.grad is None:
                p.grad = array_module_of(self.device).zeros_like(p.data)
            else:
                p.grad.fill(0)

    def flatten_parameters(self):
        """Pack every parameter (and gradient) into one arena (see :mod:`gpunn.nn.arena`)."""
        for m in self.modules():
            object.__setattr__(m, "arena", None)
        object.__setattr__(self, "arena", Arena(self.parameters(), array_module_of(self.device)))
        return self

    # --- devices ------------------------------------------------------------------------------

    def to(self, device: str):
        """Move parameters, gradients and buffers to ``device`` ("cpu": NumPy arrays and the
        Numba kernels, "numpy": the NumPy reference, "cuda": CuPy); the arena moves as one
        block. Build optimizers after moving a model, as with torch."""
        xp = array_module_of(device)
        params = self.parameters()
        if self.arena is not None and self.arena.owns(params):
            self.arena.to(xp)
        else:
            for p in params:
                p.data = transfer(p.data, xp)
                p.grad = None if p.grad is None else transfer(p.grad, xp)
        for m in self.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    setattr(m, name, transfer(b, xp))
            object.__setattr__(m, "device", device)
        return self

    @property
    def xp(self):
        return np if self.device != "cuda" else array_module_of("cuda")

    # --- state --------------------------------------------------------------------------------

    def state_dict(self) -> OrderedDict:
        """Parameters and buffers by torch's dotted names (the arrays themselves, not copies)."""
        state = OrderedDict()
        for path, m in self.named_modules():  # torch's order: each module's parameters, then
            prefix = f"{path}." if path else ""  # its buffers, module after module
            for name, p in m._parameters.items():
                if p is not None:
                    state[prefix + name] = p.data
            for name, b in m._buffers.items():
                if b is not None:
                    state[prefix + name] = b
        return state

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Copy arrays (NumPy, CuPy or torch) into this model's, by name (copies: the model
        never aliases the given arrays, read-only ones included). Every key, shape and dtype
        is checked, and every value converted, before anything is written; ``strict`` refuses
        missing and unexpected keys."""
        values = self.checked_state_dict(state_dict, strict)
        own = self.state_dict()
        for key, value in values.items():
            own[key][...] = value

    def checked_state_dict(self, state_dict, strict: bool = True) -> dict:
        """{key: value converted to the model's array's dtype and device}: what
        :meth:`load_state_dict` writes, checked (changes nothing)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict: the state must be a dict of arrays, got "
                            f"{type(state_dict).__name__}")
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: the state does not fit this model (a checkpoint of "
                           f"another architecture?): missing {missing}, unexpected {unexpected}")
        values = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            check_writable("load_state_dict", key, target)
            try:
                value = to_host(state_dict[key])
            except TypeError as e:
                raise TypeError(f"load_state_dict: {key}: {e}") from None
            if value.shape != tuple(target.shape):
                raise ShapeError(f"load_state_dict: {key} has shape {value.shape} in the state, "
                                 f"the model's is {tuple(target.shape)} (a checkpoint of "
                                 f"another architecture?)")
            if value.dtype.kind not in "biuf":
                raise TypeError(f"load_state_dict: {key} has dtype {value.dtype} in the state; "
                                f"expected real numbers (the model's is {target.dtype})")
            values[key] = transfer(value.astype(target.dtype, copy=False), self.xp)
        return values

    def extra_state(self) -> dict:
        """Non-array state a resumed run needs (dropout streams), by module path."""
        return {path: m._extra_state() for path, m in self.named_modules()
                if m._extra_state() is not None}

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state`; everything is checked before anything changes."""
        for module, value in self.checked_extra_state(state):
            module._load_extra_state(value)

    def checked_extra_state(self, state) -> list:
        """[(module, value)] that :meth:`load_extra_state` applies, checked (changes
        nothing): ValueError/KeyError naming the module path."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_extra_state: the state must be a dict by module path, got "
                            f"{type(state).__name__}")
        modules = dict(self.named_modules())
        checked = []
        for path, value in state.items():
            if path not in modules or modules[path]._extra_state() is None:
                raise KeyError(f"load_extra_state: no module at {path!r} keeps extra state")
            try:
                checked.append((modules[path], modules[path]._check_extra_state(value)))
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"load_extra_state: module {path!r}: {e}") from None
        return checked

    def _extra_state(self):
        return None

    def _check_extra_state(self, value):
        """``value`` as :meth:`_load_extra_state` takes it, or an error (changes nothing)."""
        raise NotImplementedError

    def _load_extra_state(self, value) -> None:
        raise NotImplementedError

    def _forward_state(self):
        """What the last forward kept for the backward; RuntimeError before any forward."""
        saved = getattr(self, "_saved", None)
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before a forward: "
                               f"call forward first")
        return saved

    # --- compute ------------------------------------------------------------------------------

    def fused_with(self, following: Module):
        """A step (``forward(x)``, ``backward(dy, input_grad)``) that runs this layer and then
        ``following`` as one op, or None: :class:`~gpunn.nn.Sequential` asks each layer about
        the next one, so it knows no layer class."""
        return None

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def backward(self, dy, input_grad: bool = True):
        raise NotImplementedError(f"{type(self).__name__}.backward")

    def __call__(self, x):
        return self.forward(x)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): {m!r}".replace("\n", "\n  ") for name, m in self._modules.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

