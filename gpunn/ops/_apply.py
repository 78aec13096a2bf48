"""The call path every op shares: resolve the backend, view inputs natively, check or make
the output, run the backend's implementation on the data's device, hand the result back."""

from __future__ import annotations

from ..backend import compute_dtype_name, dtype_name, resolve


def apply(op: str, backend: str | None, out, run, **inputs):
    """Run ``run(backend_name, *native_inputs, native_out)``; the output is shaped like the
    first input. Inputs are checked (dtype, device, shape of ``out``) before anything is
    written, so a bad call changes nothing.

    Host implementations pick their Numba kernel by size (:func:`gpunn.backend.host_kernel`),
    so host calls need no context (no thread-count change); cuda calls run in
    :meth:`Call.context <gpunn.backend.Call.context>`, on the data's device."""
    call = resolve(op, backend, **inputs, out=out)
    if call.backend != "cuda":
        return call.wrap(_checked_run(call, op, out, run, inputs), out)
    with call.context():  # copies and outputs are made on the data's device
        y = _checked_run(call, op, out, run, inputs)
    return call.wrap(y, out)


def _checked_run(call, op: str, out, run, inputs: dict):
    """The checks, then ``run``; returns the native output."""
    natives = [call.native(a, name) for name, a in inputs.items()]
    first = natives[0]
    names = list(inputs)
    for name, a in zip(names[1:], natives[1:]):
        if a.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {a.shape}, expected {first.shape} "
                             f"(the shape of {names[0]})")
        if a.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {dtype_name(a)}, "
                            f"expected {dtype_name(first)}")
    y = call.output(out, first, inputs=dict(zip(inputs, natives)) if out is not None else None)
    run(call.backend, *natives, y)
    return y


def compute_dtype(xp, a):
    """``a`` in the dtype the reference computes in (:func:`gpunn.backend.compute_dtype_name`:
    float32 for 16-bit inputs, the rest in their own dtype); ``a`` itself where that is its
    dtype."""
    return a.astype(xp.dtype(compute_dtype_name(dtype_name(a))), copy=False)
