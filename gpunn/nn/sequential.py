"""Sequential: layers applied in order, with neighbouring layers fused where a layer offers it.

Each layer is asked :meth:`~gpunn.nn.Module.fused_with` about the layer after it; a step it
returns runs both layers as one op (a BatchNorm then a ReLU runs as ``batch_norm_relu``: one
pass for the output, the ReLU mask recomputed in the backward, the same numbers as the two
layers). Sequential itself knows no layer class.
"""

from __future__ import annotations

from .module import Module, ShapeError, check_array


class Sequential(Module):
    """Layers applied in order; packs its parameters into one arena."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {i} must be a gpunn.nn.Module, got "
                                f"{type(layer).__name__}")
            setattr(self, str(i), layer)
        self.layers = tuple(layers)
        self._plan = self._fused_plan()
        trainable = [i for i, layer in enumerate(self.layers) if layer.parameters()]
        self._first_trainable = trainable[0] if trainable else len(self.layers)
        self.flatten_parameters()

    def _fused_plan(self):
        """(index, layer, step) in order: ``step`` is the layer itself, or the fused step that
        :meth:`Module.fused_with` returned for it and the next layer (which it then covers)."""
        plan, i = [], 0
        while i < len(self.layers):
            layer = self.layers[i]
            fused = layer.fused_with(self.layers[i + 1]) if i + 1 < len(self.layers) else None
            plan.append((i, layer, layer if fused is None else fused))
            i += 1 if fused is None else 2
        return plan

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def forward(self, x):
        check_array("Sequential", "x", x, self.device)
        self._saved = None  # until every layer has run: a failed forward has no backward
        for i, layer, step in self._plan:
            try:
                x = step.forward(x)
            except ShapeError as e:
                raise ShapeError(f"Sequential layer {i} ({type(layer).__name__}): {e}") from None
        self._saved = (tuple(x.shape), x.dtype)
        return x

    def backward(self, dy, input_grad: bool = True):
        """dy is checked against the forward's output (array kind, dtype, shape) before any
        layer accumulates a gradient."""
        shape, dtype = self._forward_state()
        check_array("Sequential backward", "dy", dy, self.device)
        if tuple(dy.shape) != shape:
            raise ShapeError(f"Sequential backward: dy has shape {tuple(dy.shape)}, expected "
                             f"{shape} (the forward's output)")
        if dy.dtype != dtype:
            raise TypeError(f"Sequential backward: dy has dtype {dy.dtype}, expected {dtype} "
                            f"(the forward's output)")
        for i, _, step in reversed(self._plan):
            needed = input_grad or i > self._first_trainable
            if not needed and i < self._first_trainable:
                return None
            dy = step.backward(dy, needed)
        return dy
