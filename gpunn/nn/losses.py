"""Loss layers: ``loss = criterion(output, target)``, then ``criterion.backward()`` returns
dL/doutput (times ``dloss``, 1 by default) for the model's backward."""

from __future__ import annotations

from .. import ops
from ..backend import array_module


class _Loss:
    def __init__(self, reduction="mean"):
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'none', 'mean' or "
                             f"'sum', got {reduction!r}")
        self.reduction = reduction
        self._saved = None

    def _saved_inputs(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before a forward")
        return self._saved

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits (N, C) against class indices (N,)
    (:func:`gpunn.ops.cross_entropy`; the forward keeps each row's log-sum-exp so the backward
    is one pass)."""

    def __init__(self, reduction="mean", label_smoothing=0.0, ignore_index=-100):
        super().__init__(reduction)
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)

    def _options(self):
        return dict(reduction=self.reduction, label_smoothing=self.label_smoothing,
                    ignore_index=self.ignore_index)

    def __call__(self, logits, labels):
        loss, lse = ops.cross_entropy_forward(logits, labels, **self._options())
        self._saved = (logits, labels, lse)
        return loss

    def backward(self, dloss=1.0):
        logits, labels, lse = self._saved_inputs()
        return ops.cross_entropy_backward(dloss, logits, labels, lse=lse, check_labels=False,
                                          **self._options())


class MSELoss(_Loss):
    """Mean (or summed, or elementwise) squared error (:func:`gpunn.ops.mse_loss`)."""

    def __call__(self, output, target):
        target = array_module(output).asarray(target, dtype=output.dtype)
        self._saved = (output, target)
        return ops.mse_loss(output, target, reduction=self.reduction)

    def backward(self, dloss=1.0):
        output, target = self._saved_inputs()
        return ops.mse_loss_backward(dloss, output, target, reduction=self.reduction)
