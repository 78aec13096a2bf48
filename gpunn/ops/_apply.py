"""The call path every op shares: resolve the backend, view inputs natively, check or make
the output, run the backend's implementation on the data's device, hand the result back."""

from __future__ import annotations

from ..backend import byte_span, dtype_name, resolve


def apply(op: str, backend: str | None, out, run, **inputs):
    """Run ``run(backend_name, *native_inputs, native_out)``; the output is shaped like the
    first input. Inputs are checked (dtype, device, shape of ``out``) before anything is
    written, so a bad call changes nothing."""
    call = resolve(op, backend, **inputs, out=out)
    with call.context():  # copies and outputs are made on the data's device
        natives = [call.native(a, name) for name, a in inputs.items()]
        first = natives[0]
        for name, a in zip(list(inputs)[1:], natives[1:]):
            if a.shape != first.shape:
                raise ValueError(f"{op}: {name} has shape {a.shape}, expected {first.shape} "
                                 f"(the shape of {next(iter(inputs))})")
            if a.dtype != first.dtype:
                raise TypeError(f"{op}: {name} has dtype {dtype_name(a)}, "
                                f"expected {dtype_name(first)}")
        y = call.output(out, first, inputs=dict(zip(inputs, natives)))
        run(call.backend, *natives, y)
    return call.wrap(y, out)


def compute_dtype(xp, a):
    """The reference computes 16-bit inputs in float32 and the rest in their own dtype."""
    return a.astype(xp.float32) if a.dtype.itemsize < 4 else a


def check_disjoint(op: str, name: str, a, others: dict, why: str = "") -> None:
    """Before the first write: the native array ``a`` shares no byte with any of the native
    ``others`` (None entries skipped). For arrays that cannot be written in place, not even
    exactly over an input (``backend.check_no_partial_overlap`` allows that). ValueError
    naming both otherwise."""
    if a is None or a.size == 0:
        return
    lo, hi = byte_span(a)
    for other, b in others.items():
        if b is None or b.size == 0:
            continue
        b_lo, b_hi = byte_span(b)
        if b_lo < hi and lo < b_hi:
            raise ValueError(f"{op}: {name} must not overlap {other}{why}")
