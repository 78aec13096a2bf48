"""Memory safety of the ops (DESIGN.md, Safety): what a call writes is checked before the first
write. An ``out=`` partly overlapping an input, a read-only output or running statistic, and
input in non-native byte order are refused with an error naming the argument, and nothing is
written (exact in place stays allowed where it was); no bad input reaches a Numba kernel as a
typing error; and no op writes a byte outside its arrays (canary-guarded buffers, fuzzed)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba.core.errors import NumbaError

import gpunn.ops as ops
from conftest import HOST_BACKENDS, assert_close

f32 = np.float32


# --- the ops, as cases ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One op with its inputs: ``make(rng, shape)`` draws them (a dict; float32 unless said),
    ``call(a, out, backend)`` runs the op. ``like``: the input ``out`` is shaped like (None:
    the op takes no out=); ``same``: the inputs of out's shape; ``in_place``: those out may be
    exactly; ``written``: inputs the op updates in place (checked unchanged after an error)."""

    name: str
    make: Callable
    call: Callable
    like: str | None = "x"
    same: tuple = ("x",)
    in_place: tuple = ("x",)
    written: tuple = ()
    shape: tuple = (6, 8)


def _normal(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(f32)


def _unary(rng, shape):
    return {"x": _normal(rng, shape, 3.0)}


def _pair(v):
    def make(rng, shape):
        return {"dy": _normal(rng, shape), v: _normal(rng, shape, 3.0)}
    return make


ACTIVATIONS = {"sigmoid": "y", "tanh": "y", "relu": "x", "leaky_relu": "x", "elu": "x",
               "gelu": "x", "silu": "x"}


def _activation_cases():
    for name, v in ACTIVATIONS.items():
        f, g = getattr(ops, name), getattr(ops, name + "_backward")
        yield Case(name, _unary, lambda a, out, b, f=f: f(a["x"], out=out, backend=b))
        yield Case(f"{name}_backward", _pair(v),
                   lambda a, out, b, g=g, v=v: g(a["dy"], a[v], out=out, backend=b),
                   like="dy", same=("dy", v), in_place=("dy", v))
    yield Case("gelu_tanh", _unary,
               lambda a, out, b: ops.gelu(a["x"], "tanh", out=out, backend=b))
    yield Case("gelu_tanh_backward", _pair("x"),
               lambda a, out, b: ops.gelu_backward(a["dy"], a["x"], "tanh", out=out, backend=b),
               like="dy", same=("dy", "x"), in_place=("dy", "x"))


def _softmax_cases():
    for name in ("softmax", "log_softmax"):
        f, g = getattr(ops, name), getattr(ops, name + "_backward")
        for axis in (-1, 0):
            yield Case(f"{name}_axis{axis}", _unary,
                       lambda a, out, b, f=f, axis=axis: f(a["x"], axis, out=out, backend=b))
            yield Case(f"{name}_backward_axis{axis}", _pair("y"),
                       lambda a, out, b, g=g, axis=axis: g(a["dy"], a["y"], axis, out=out,
                                                           backend=b),
                       like="dy", same=("dy", "y"), in_place=("dy", "y"))


def _dropout_cases():
    yield Case("dropout", _unary,
               lambda a, out, b: ops.dropout(a["x"], 0.3, seed=5, offset=3, out=out, backend=b))
    yield Case("dropout_mask", _unary,
               lambda a, out, b: ops.dropout(a["x"], 0.3, seed=5, offset=3, out=out, backend=b,
                                             return_mask=True)[0])
    yield Case("dropout_eval", _unary,
               lambda a, out, b: ops.dropout(a["x"], 0.3, False, out=out, backend=b))
    yield Case("dropout_backward", lambda rng, shape: {"dy": _normal(rng, shape)},
               lambda a, out, b: ops.dropout_backward(a["dy"], 0.3, 5, 3, out=out, backend=b),
               like="dy", same=("dy",), in_place=("dy",))


def _channels(shape, channels_last=False):
    return shape[-1] if channels_last else shape[1]


def _bn_make(rng, shape, channels_last=False):
    C = _channels(shape, channels_last)
    return {"x": _normal(rng, shape, 3.0) + f32(1), "running_mean": _normal(rng, C),
            "running_var": (0.5 + rng.random(C)).astype(f32),
            "weight": (0.5 + rng.random(C)).astype(f32), "bias": _normal(rng, C)}


def _bn_call(relu, training, channels_last=False):
    f = ops.batch_norm_relu if relu else ops.batch_norm

    def call(a, out, b):
        return f(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], training,
                 channels_last=channels_last, out=out, backend=b)
    return call


def _bn_backward_make(rng, shape, relu=False):
    C = _channels(shape)
    a = {"dy": _normal(rng, shape), "x": _normal(rng, shape, 3.0), "mean": _normal(rng, C),
         "invstd": (0.5 + rng.random(C)).astype(f32), "weight": (0.5 + rng.random(C)).astype(f32)}
    return {**a, "bias": _normal(rng, C)} if relu else a


def _bn_backward_call(relu, training):
    def call(a, out, b):
        if relu:
            return ops.batch_norm_relu_backward(a["dy"], a["x"], a["mean"], a["invstd"],
                                                a["weight"], a["bias"], training=training,
                                                out=out, backend=b)[0]
        return ops.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                                       training=training, out=out, backend=b)[0]
    return call


def _batchnorm_cases():
    stats = ("running_mean", "running_var")
    yield Case("batch_norm_train", _bn_make, _bn_call(False, True), written=stats)
    yield Case("batch_norm_relu_train", _bn_make, _bn_call(True, True), written=stats,
               shape=(5, 3, 7))
    yield Case("batch_norm_eval", _bn_make, _bn_call(False, False), shape=(4, 3, 70))
    yield Case("batch_norm_channels_last", lambda rng, s: _bn_make(rng, s, True),
               _bn_call(False, True, True), written=stats, shape=(3, 4, 5))
    for relu in (False, True):
        for training in (True, False):
            yield Case(f"batch_norm{'_relu' if relu else ''}_backward"
                       f"{'' if training else '_eval'}",
                       lambda rng, shape, relu=relu: _bn_backward_make(rng, shape, relu),
                       _bn_backward_call(relu, training), like="dy", same=("dy", "x"),
                       in_place=("dy", "x"), shape=(5, 3, 7) if relu else (6, 8))


def _labels(rng, rows, n):
    labels = rng.integers(0, max(n, 1), rows).astype(np.int64)
    labels[::4] = -100  # ignored rows
    return labels


def _ce_make(rng, shape, dloss=True):
    a = {"logits": _normal(rng, shape, 3.0), "labels": _labels(rng, shape[0], shape[1])}
    return {**a, "dloss": _normal(rng, shape[0])} if dloss else a


def _nll_make(rng, shape, dloss=True):
    a = _ce_make(rng, shape, dloss)
    a["log_probs"] = a.pop("logits")
    return a


def _loss_cases():
    yield Case("cross_entropy_backward", _ce_make,
               lambda a, out, b: ops.cross_entropy_backward(
                   a["dloss"], a["logits"], a["labels"], "none", 0.1, out=out, backend=b),
               like="logits", same=("logits",), in_place=("logits",))
    yield Case("cross_entropy_backward_lse",
               lambda rng, shape: {**_ce_make(rng, shape, False), "lse": None},
               lambda a, out, b: ops.cross_entropy_backward(
                   1.0, a["logits"], a["labels"], "mean", out=out, backend=b,
                   lse=ops.cross_entropy_forward(a["logits"], a["labels"], backend=b)[1]
                   if a["lse"] is None else a["lse"]),
               like="logits", same=("logits",), in_place=("logits",))
    yield Case("nll_loss_backward", _nll_make,
               lambda a, out, b: ops.nll_loss_backward(
                   a["dloss"], a["log_probs"], a["labels"], "none", out=out, backend=b),
               like="log_probs", same=("log_probs",), in_place=("log_probs",))
    yield Case("mse_loss_backward",
               lambda rng, shape: {"input": _normal(rng, shape), "target": _normal(rng, shape),
                                   "dloss": _normal(rng, shape)},
               lambda a, out, b: ops.mse_loss_backward(a["dloss"], a["input"], a["target"],
                                                       "none", out=out, backend=b),
               like="input", same=("input", "target", "dloss"),
               in_place=("input", "target", "dloss"))
    yield Case("mse_loss_backward_mean",
               lambda rng, shape: {"input": _normal(rng, shape), "target": _normal(rng, shape)},
               lambda a, out, b: ops.mse_loss_backward(1.0, a["input"], a["target"], "mean",
                                                       out=out, backend=b),
               like="input", same=("input", "target"), in_place=("input", "target"))
    # forward losses (no out=): for the byte order and typing checks
    yield Case("cross_entropy", lambda rng, shape: _ce_make(rng, shape, False),
               lambda a, out, b: ops.cross_entropy(a["logits"], a["labels"], "mean", 0.1,
                                                   backend=b), like=None, same=("logits",))
    yield Case("nll_loss", lambda rng, shape: _nll_make(rng, shape, False),
               lambda a, out, b: ops.nll_loss(a["log_probs"], a["labels"], "sum", backend=b),
               like=None, same=("log_probs",))
    yield Case("mse_loss",
               lambda rng, shape: {"input": _normal(rng, shape), "target": _normal(rng, shape)},
               lambda a, out, b: ops.mse_loss(a["input"], a["target"], "sum", backend=b),
               like=None, same=("input", "target"))


def _augment_make(rng, shape):
    theta = np.tile(np.eye(2, 3, dtype=f32), (shape[0], 1, 1))
    theta[:, :, :2] += _normal(rng, (shape[0], 2, 2), 0.2)
    theta[:, :, 2] = _normal(rng, (shape[0], 2), 0.3)
    return {"x": _normal(rng, shape), "theta": theta}


def _augment_cases():
    kw = dict(degrees=20.0, translate=(0.1, 0.2), scale=(0.8, 1.2), flip_p=0.5)
    yield Case("augment", lambda rng, shape: {"x": _normal(rng, shape)},
               lambda a, out, b: ops.augment(a["x"], 7, 2, out=out, backend=b, **kw),
               in_place=(), shape=(3, 2, 5, 6))
    yield Case("affine_warp", _augment_make,
               lambda a, out, b: ops.affine_warp(a["x"], a["theta"], out=out, backend=b),
               in_place=(), shape=(3, 2, 5, 6))


CASES = {c.name: c for c in (*_activation_cases(), *_softmax_cases(), *_dropout_cases(),
                             *_batchnorm_cases(), *_loss_cases(), *_augment_cases())}
OUT_CASES = [c for c in CASES.values() if c.like is not None]


def inputs(case, seed=0, shape=None):
    """Fresh inputs of a case (the same for the same seed)."""
    return case.make(np.random.default_rng(seed), shape or case.shape)


def _arrays(a):
    return {k: v for k, v in a.items() if isinstance(v, np.ndarray)}


def _snapshot(*arrays):
    return [a.copy() for a in arrays]


def _unchanged(before, after):
    return all(b.tobytes() == a.tobytes() for b, a in zip(before, after))


# --- partial overlap ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shift", ["row", "element"])
@pytest.mark.parametrize("case,name", [(c.name, n) for c in OUT_CASES for n in c.same])
def test_out_partly_overlapping_an_input_is_refused(case, name, shift, backend):
    """out = the input shifted by a row or by one element: softmax and the
    activations gave wrong values on the cpu backend; now a ValueError on every op, and
    nothing is written (running statistics included)."""
    case = CASES[case]
    a = inputs(case)
    x = a[name]
    if shift == "element":
        flat = np.concatenate([x.reshape(-1), f32([1.5])])
        a[name], out = flat[:-1].reshape(x.shape), flat[1:].reshape(x.shape)
        buf = flat
    else:
        buf = np.concatenate([x, x[:1]])
        a[name], out = buf[:-1], buf[1:]
    before = _snapshot(buf, *_arrays(a).values())
    with pytest.raises(ValueError, match=f"out partly overlaps {name}"):
        case.call(a, out, backend)
    assert _unchanged(before, [buf, *_arrays(a).values()])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case,name", [(c.name, n) for c in OUT_CASES for n in c.in_place])
def test_exact_in_place_gives_the_out_of_place_result(case, name, backend):
    """out=x (dy, ...) as documented; log_softmax on the cpu backend gave wrong values (its sum
    pass wrote exp(x - max) into y, then read x = y again)."""
    case = CASES[case]
    expected = case.call(inputs(case), None, backend)
    a = inputs(case)
    assert case.call(a, a[name], backend) is a[name]
    assert_close(a[name], expected, "float32")  # sums may vectorize otherwise over aliases


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", ["augment", "affine_warp"])
def test_warps_refuse_out_equal_to_x(case, backend):
    case = CASES[case]
    a = inputs(case)
    before = _snapshot(*_arrays(a).values())
    with pytest.raises(ValueError, match="out must not overlap x"):
        case.call(a, a["x"], backend)
    assert _unchanged(before, _arrays(a).values())


def _inside(out_shape, other, at=8):
    """(out, the other array's values viewed inside out's memory at byte ``at``, the buffer):
    an input of another shape and dtype that shares bytes with out."""
    nbytes = math.prod(out_shape) * 4
    buf = np.zeros(nbytes + other.nbytes + at, np.uint8)
    out = buf[:nbytes].view(f32).reshape(out_shape)
    inner = buf[at:at + other.nbytes].view(other.dtype).reshape(other.shape)
    inner[...] = other
    return out, inner, buf


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case,name", [
    ("cross_entropy_backward", "labels"), ("cross_entropy_backward", "dloss"),
    ("cross_entropy_backward_lse", "lse"), ("nll_loss_backward", "labels"),
    ("nll_loss_backward", "dloss"), ("affine_warp", "theta"), ("batch_norm_backward", "mean"),
    ("batch_norm_backward", "invstd"), ("batch_norm_backward", "weight"),
    ("batch_norm_relu_backward", "bias"), ("batch_norm_train", "weight"),
    ("batch_norm_train", "bias"), ("batch_norm_train", "running_mean"),
    ("batch_norm_eval", "running_var")])
def test_out_sharing_bytes_with_an_input_of_another_shape_is_refused(case, name, backend):
    case = CASES[case]
    a = inputs(case)
    if name == "lse":
        a["lse"] = ops.cross_entropy_forward(a["logits"], a["labels"], backend=backend)[1]
    out, a[name], buf = _inside(a[case.like].shape, a[name])
    before = _snapshot(buf, *_arrays(a).values())
    with pytest.raises(ValueError, match=f"out partly overlaps {name}"):
        case.call(a, out, backend)
    assert _unchanged(before, [buf, *_arrays(a).values()])


# --- batch norm's running statistics ------------------------------------------------------------


def _bn(a, backend, training=True, out=None, **kw):
    return ops.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                          training, out=out, backend=backend, **kw)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("where", ["running_var", "weight", "bias", "x"])
def test_running_mean_sharing_memory_with_another_argument_is_refused(where, backend):
    """running_mean is written after x, weight and bias are read (and before they are read
    again): any shared byte is refused, even the same array as running_var or weight."""
    a = inputs(CASES["batch_norm_train"])
    a["running_mean"] = a[where] if where != "x" else a["x"][1]  # row 1 of (N, C): C values
    before = _snapshot(*_arrays(a).values())
    with pytest.raises(ValueError, match=f"running_mean must not overlap {where}"):
        _bn(a, backend)
    assert _unchanged(before, _arrays(a).values())


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_running_var_sharing_memory_with_x_is_refused(backend):
    a = inputs(CASES["batch_norm_train"])
    buf = np.concatenate([a["x"].reshape(-1), a["running_var"]])
    a["x"] = buf[:a["x"].size].reshape(a["x"].shape)
    a["running_var"] = buf[a["x"].size - 2:-2]  # its first two values are x's last two
    before = _snapshot(buf, *_arrays(a).values())
    with pytest.raises(ValueError, match="running_var must not overlap x"):
        _bn(a, backend)
    assert _unchanged(before, [buf, *_arrays(a).values()])


def _read_only(a):
    """A read-only copy of ``a`` over bytes (what np.frombuffer(bytes) gives)."""
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_statistic_is_refused_in_training(name, relu, backend):
    """Named, and nothing changes: not the other statistic (checked and written first), not
    out. Without training they are only read: accepted."""
    a = inputs(CASES["batch_norm_train"])
    expected = _bn(inputs(CASES["batch_norm_train"]), backend, training=False)
    a[name] = _read_only(a[name])
    out = np.full_like(a["x"], 7.0)
    before = _snapshot(out, *_arrays(a).values())
    f = ops.batch_norm_relu if relu else ops.batch_norm
    with pytest.raises(ValueError, match=f"{name} is read-only"):
        f(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], True, out=out,
          backend=backend)
    assert _unchanged(before, [out, *_arrays(a).values()])
    np.testing.assert_array_equal(_bn(a, backend, training=False), expected)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_memory_mapped_read_only_statistics(backend, tmp_path):
    """np.load(mmap_mode='r'): read in eval, refused (named) in training."""
    a = inputs(CASES["batch_norm_train"])
    np.save(tmp_path / "rm.npy", a["running_mean"])
    expected = _bn(inputs(CASES["batch_norm_train"]), backend, training=False)
    a["running_mean"] = np.load(tmp_path / "rm.npy", mmap_mode="r")
    np.testing.assert_array_equal(_bn(a, backend, training=False), expected)
    rv = a["running_var"].copy()
    with pytest.raises(ValueError, match="running_mean is read-only"):
        _bn(a, backend)
    assert np.array_equal(a["running_var"], rv)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("bad", ["out read-only", "out shape", "eps", "weight dtype",
                                 "out big-endian"])
def test_running_statistics_unchanged_when_a_later_argument_is_bad(bad, backend):
    a = inputs(CASES["batch_norm_train"])
    out = np.full_like(a["x"], 7.0)
    kw = {}
    if bad == "out read-only":
        out = _read_only(out)
    elif bad == "out shape":
        out = out[1:]
    elif bad == "eps":
        kw["eps"] = "1e-5"
    elif bad == "weight dtype":
        a["weight"] = a["weight"].astype(np.float64)
    else:
        out = out.astype(">f4")
    before = _snapshot(out, *_arrays(a).values())
    with pytest.raises((ValueError, TypeError)):
        _bn(a, backend, out=out, **kw)
    assert _unchanged(before, [out, *_arrays(a).values()])


# --- read-only outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", [c.name for c in OUT_CASES])
def test_read_only_out_is_refused(case, backend):
    """A read-only out (np.frombuffer over bytes) was a Numba TypingError on the cpu backend:
    now a ValueError naming out, before anything is written."""
    case = CASES[case]
    a = inputs(case)
    out = _read_only(np.zeros_like(a[case.like]))
    before = _snapshot(*_arrays(a).values())
    with pytest.raises(ValueError, match="out is read-only"):
        case.call(a, out, backend)
    assert _unchanged(before, _arrays(a).values())
    assert not out.any()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", ["sigmoid", "softmax_axis-1", "dropout", "batch_norm_train",
                                  "cross_entropy_backward", "augment"])
def test_memory_mapped_read_only_out_is_refused(case, backend, tmp_path):
    case = CASES[case]
    a = inputs(case)
    np.save(tmp_path / "out.npy", np.zeros_like(a[case.like]))
    out = np.load(tmp_path / "out.npy", mmap_mode="r")
    with pytest.raises(ValueError, match="out is read-only"):
        case.call(a, out, backend)
    assert not np.load(tmp_path / "out.npy").any()


# --- byte order ------------------------------------------------------------------------------------


def _swapped(a):
    return a.astype(a.dtype.newbyteorder("S"))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case,name", [
    (c.name, n) for c in CASES.values() for n in ({**inputs(c), "out": None} if c.like else
                                                  inputs(c))
    if n != "lse"])
def test_non_native_byte_order_is_refused(case, name, backend):
    """Big-endian (">f4", ">i8") input gave ctypes/Numba errors or misleading ones (batch_norm:
    KeyError dtype('>f4'); mse_loss: "target has dtype float32, expected float32"): now a
    TypeError naming the argument, and nothing is written."""
    case = CASES[case]
    a = inputs(case)
    out = np.full_like(a[case.like], 7.0) if case.like else None
    if name == "out":
        out = _swapped(out)
    else:
        a[name] = _swapped(a[name])
    before = _snapshot(*_arrays(a).values(), *([] if out is None else [out]))
    with pytest.raises(TypeError, match=f"{name} has non-native byte order"):
        case.call(a, out, backend)
    assert _unchanged(before, [*_arrays(a).values(), *([] if out is None else [out])])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [">i4", ">i8"])
def test_big_endian_labels_are_refused(dtype, backend):
    logits = _normal(np.random.default_rng(1), (5, 4))
    labels = np.array([0, 3, 1, 2, -100]).astype(dtype)
    for call in (lambda: ops.cross_entropy(logits, labels, backend=backend),
                 lambda: ops.nll_loss(logits, labels, backend=backend),
                 lambda: ops.cross_entropy_backward(1.0, logits, labels, backend=backend),
                 lambda: ops.nll_loss_backward(1.0, logits, labels, backend=backend)):
        with pytest.raises(TypeError, match="labels has non-native byte order"):
            call()


# --- no Numba typing error reaches the user --------------------------------------------------


#: Read-only inputs (valid) per op: Numba compiles each op once more for them (the batch norm
#: kernels take minutes), so one input per family, and batch norm's statistics in eval (a
#: TypingError before: the kernel is typed for writing them).
READ_ONLY_INPUTS = {"sigmoid_backward": ("y",), "softmax_axis-1": ("x",),
                    "log_softmax_backward_axis-1": ("dy", "y"), "dropout": ("x",),
                    "batch_norm_eval": ("running_mean", "running_var"),
                    "cross_entropy_backward": ("labels", "dloss"),
                    "mse_loss_backward": ("target",), "augment": ("x",)}


def _variants(case):
    """(label, mutate(a, out) -> (a, out), expected): one bad or unusual input; expected is
    "error" (a TypeError or ValueError), "ok" (the result of plain input) or "any"."""
    first = case.same[0]

    def on(name, f):
        def mutate(a, out):
            if name == "out":
                return a, f(out)
            a[name] = f(a[name])
            return a, out
        return mutate

    for dtype in (np.int32, np.bool_, np.float16, np.complex64):
        yield np.dtype(dtype).name, on(first, lambda v, d=dtype: v.astype(d)), "error"
    yield "0-d", on(first, lambda v: v.reshape(-1)[:1].reshape(())), "any"
    yield "1-d", on(first, lambda v: v.reshape(-1)), "any"
    yield "float64 beside float32", on(first, lambda v: v.astype(np.float64)), "any"
    for name, v in inputs(case).items():
        if isinstance(v, np.ndarray) and v.ndim:
            expected = "error" if name in case.written else "ok"
            if name in case.written or name in READ_ONLY_INPUTS.get(case.name, ()):
                yield f"read-only {name}", on(name, _read_only), expected
            yield (f"strided {name}", on(name, lambda v: np.repeat(v, 2, axis=-1)[..., ::2]),
                   expected)
    if case.like:
        yield "strided out", on("out", lambda o: np.repeat(o, 2, axis=-1)[..., ::2]), "error"
        yield "fortran out", on("out", np.asfortranarray), "error"
        yield "float64 out", on("out", lambda o: o.astype(np.float64)), "error"
        yield "0-d out", on("out", lambda o: o.reshape(-1)[:1].reshape(())), "error"


@pytest.mark.parametrize("case,variant", [(c.name, v[0]) for c in CASES.values()
                                          for v in _variants(c)])
def test_no_numba_error_reaches_the_user(case, variant):
    """On the cpu backend bad input is a TypeError, ValueError or IndexError from gpunn, never
    a Numba TypingError (a read-only out was one; so were read-only running statistics in
    eval), and unusual valid input (read-only, strided) gives the result of plain input."""
    case = CASES[case]
    mutate, expected = next((m, e) for label, m, e in _variants(case) if label == variant)
    out = np.full_like(inputs(case)[case.like], 7.0) if case.like else None
    a, out = mutate(inputs(case), out)
    try:
        result = case.call(a, out, "cpu")
    except NumbaError as e:
        pytest.fail(f"a Numba error reached the user: {type(e).__name__}: {e}")
    except (TypeError, ValueError, IndexError):
        assert expected != "ok", "valid input refused"
        return
    assert expected != "error", "bad input accepted"
    if expected == "ok":
        assert_close(result, case.call(inputs(case), None, "cpu"), "float32")


def test_numpy_matrix_is_refused_not_written_out_of_bounds():
    """An np.matrix stays 2-D when flattened (reshape(-1) is (1, n)), so the cpu kernels'
    flat loops indexed rows: a backward wrote far past its output (a segfault). Crash
    reproducer in a subprocess; the fix belongs to backend.array_kind (refuse ndarray
    subclasses other than np.memmap)."""
    code = textwrap.dedent("""
        import numpy as np
        import gpunn.ops as ops
        x = np.asmatrix(np.linspace(-1, 1, 30, dtype=np.float32).reshape(6, 5))
        for _ in range(20):
            try:
                ops.sigmoid_backward(x, x, backend="cpu")
            except TypeError as e:
                print("refused:", e)
                break
        import gc
        gc.collect()
        print("done")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    assert "refused:" in proc.stdout and "done" in proc.stdout


# --- canaries, fuzzed ----------------------------------------------------------------------------

#: The canary word: a float32 NaN with a payload no op computes.
CANARY = np.uint32(0x7FC0DEAD)
DIMS = st.sampled_from([1, 2, 3, 5, 7, 13, 17, 31, 0])


class Guarded:
    """An array at ``lead`` items into a buffer of canary words, ``tail`` items before its
    end (aligned for its dtype)."""

    def __init__(self, values, lead, tail):
        per = values.dtype.itemsize // 4
        self.lo, self.hi = lead * per, (lead + values.size) * per
        self.buf = np.full(self.hi + tail * per, CANARY, np.uint32)
        self.array = self.buf[self.lo:self.hi].view(values.dtype).reshape(values.shape)
        self.array[...] = values

    def intact(self) -> bool:
        return bool((self.buf[:self.lo] == CANARY).all() and (self.buf[self.hi:] == CANARY).all())


@st.composite
def fuzz_calls(draw, case):
    shape = tuple(draw(DIMS) for _ in case.shape)
    if case.name.startswith("batch_norm"):  # training takes 2+ values per channel
        shape = (max(shape[0], 2),) + shape[1:]
    return shape, draw(st.integers(0, 9)), draw(st.integers(1, 9)), draw(st.integers(0, 3))


@pytest.mark.parametrize("case", [c.name for c in OUT_CASES])
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_no_op_writes_outside_its_arrays(case, data):
    """Random shapes (0, 1, primes), every array (inputs, out, running statistics) at a
    random offset inside a buffer of canaries: after the call every canary is intact, the
    inputs are unchanged (but the statistics the op updates), and the cpu results (out and
    updated statistics) equal the reference's. (10 draws per op, every op.)"""
    case = CASES[case]
    shape, lead, tail, seed = data.draw(fuzz_calls(case))
    results = {}
    for backend in HOST_BACKENDS:
        a = inputs(case, seed, shape)
        guards = {name: Guarded(v, lead, tail) for name, v in _arrays(a).items()}
        a.update({name: g.array for name, g in guards.items()})
        out = Guarded(np.full(a[case.like].shape, 7.0, f32), lead + 1, tail)
        before = {k: a[k].copy() for k in guards if k not in case.written}
        try:
            y = case.call(a, out.array, backend)
        except (ValueError, IndexError) as e:  # labels of no classes
            assert 0 in shape, e
            y = None
        for name, g in guards.items():
            assert g.intact(), f"{case.name} ({backend}) wrote around {name}"
        assert out.intact(), f"{case.name} ({backend}) wrote around out"
        for name, v in before.items():
            assert v.tobytes() == a[name].tobytes(), f"{case.name} ({backend}) wrote {name}"
        if y is not None:
            assert y is out.array
            results[backend] = [out.array.copy()] + [a[k].copy() for k in case.written]
    if len(results) == 2:
        for ref, got in zip(results["numpy"], results["cpu"]):
            assert_close(got, ref, "float32")
