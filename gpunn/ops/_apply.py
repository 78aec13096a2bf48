"""The call path every op shares: resolve the backend, view inputs natively, check or make
the output, run the backend's implementation on the data's device, hand the result back."""

from __future__ import annotations

from ..backend import compute_dtype_name, dtype_name, resolve


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
    """``a`` in the dtype the reference computes in (:func:`gpunn.backend.compute_dtype_name`:
    float32 for 16-bit inputs, the rest in their own dtype); ``a`` itself where that is its
    dtype."""
    return a.astype(xp.dtype(compute_dtype_name(dtype_name(a))), copy=False)
