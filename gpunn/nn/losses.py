"""Loss layers: ``loss = criterion(output, target)``, then ``criterion.backward()`` returns
dL/doutput (times ``dloss``, 1 by default) for the model's backward."""

from __future__ import annotations

from .. import ops
from ..backend import array_module


class _Loss:
    """``backend``: where the loss runs (None: follows the data, as the ops do; a model's
    ``device`` names its backend)."""

    def __init__(self, reduction="mean", backend=None):
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'none', 'mean' or "
                             f"'sum', got {reduction!r}")
        self.reduction, self.backend = reduction, backend
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
    is one pass). ``check_labels=False`` skips the range check of the labels (on CUDA it
    synchronizes every call), for labels already known to be valid."""

    def __init__(self, reduction="mean", label_smoothing=0.0, ignore_index=-100, *,
                 backend=None, check_labels=True):
        super().__init__(reduction, backend)
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self.check_labels = bool(check_labels)

    def _options(self):
        return dict(reduction=self.reduction, label_smoothing=self.label_smoothing,
                    ignore_index=self.ignore_index, backend=self.backend)

    def __call__(self, logits, labels):
        loss, lse = ops.cross_entropy_forward(logits, labels, check_labels=self.check_labels,
                                              **self._options())
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
        loss = ops.mse_loss(output, target, reduction=self.reduction, backend=self.backend)
        self._saved = (output, target)  # once the op accepted them
        return loss

    def backward(self, dloss=1.0):
        output, target = self._saved_inputs()
        return ops.mse_loss_backward(dloss, output, target, reduction=self.reduction,
                                     backend=self.backend)
