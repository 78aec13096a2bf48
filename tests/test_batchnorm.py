"""Batch normalization and BN + ReLU: forward (training and eval, running statistics, momentum
None) and backward against PyTorch's float64 autograd, the NumPy reference against finite
differences, the CPU kernels against the reference, a large mean, odd shapes, channels last,
fused vs unfused ReLU, bad input; GPU tests for every dtype mirror them."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn.ops import batchnorm as bn
from gpunn.ops.batchnorm import cuda as bn_cuda
from conftest import HOST_BACKENDS, TOLERANCE, assert_close, rel_err

# (shape, channels_last): rows and columns reductions, pieces that split rows, one channel
# (collapsed to one row), C = 4096 with N = 2, 1x1 and 7x13 spatial, N = 2.
SHAPES = [
    ((8, 3, 100), False),
    ((16, 5, 7, 13), False),
    ((2, 3, 1, 1), False),
    ((2, 1, 1, 1), False),
    ((5, 4, 3, 3), False),
    ((33, 7), False),
    ((2, 4096), False),
    ((3, 1, 7, 13), False),
    ((3, 2, 30001), False),
    ((200, 1100), False),
    ((4, 6, 5, 7), True),
    ((3, 5, 4, 64), True),
]
IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}" for s, cl in SHAPES]


def channels_of(shape, channels_last):
    return shape[-1] if channels_last else shape[1]


def per_channel(v, shape, channels_last):
    """A per-channel array broadcast against x."""
    v = np.asarray(v)
    if channels_last:
        return v
    return v.reshape((1, -1) + (1,) * (len(shape) - 2))


def make_inputs(rng, shape, channels_last, dtype="float32", affine=True, running=True,
                mean=1.0, spread=3.0):
    C = channels_of(shape, channels_last)
    x = (mean + spread * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (0.5 + rng.random(C)).astype(dtype) if affine else None
    b = rng.standard_normal(C).astype(dtype) if affine else None
    rm = rng.standard_normal(C).astype(dtype) if running else None
    rv = (0.5 + rng.random(C)).astype(dtype) if running else None
    return x, dy, w, b, rm, rv


def oracle(x, dy, w, b, rm, rv, training, momentum=0.1, eps=1e-5, channels_last=False,
           relu=False):
    """PyTorch in float64 on the same values: y, saved mean and invstd, running statistics
    after the call, and dx, dweight, dbias by autograd (weight/bias of ones/zeros when None:
    the gradients gpunn returns for them)."""
    shape = x.shape
    C = channels_of(shape, channels_last)
    xt = torch.tensor(np.asarray(x, np.float64))
    dyt = torch.tensor(np.asarray(dy, np.float64))
    if channels_last:
        xt, dyt = xt.movedim(-1, 1), dyt.movedim(-1, 1)
    xt.requires_grad_(True)
    wt = torch.tensor(np.ones(C) if w is None else np.asarray(w, np.float64), requires_grad=True)
    bt = torch.tensor(np.zeros(C) if b is None else np.asarray(b, np.float64), requires_grad=True)
    rmt = None if rm is None else torch.tensor(np.asarray(rm, np.float64))
    rvt = None if rv is None else torch.tensor(np.asarray(rv, np.float64))
    use_batch = training or rm is None
    y = F.batch_norm(xt, rmt, rvt, wt, bt, use_batch, momentum, eps)
    if relu:
        y = torch.relu(y)
    y.backward(dyt)
    axes = [0] + list(range(2, xt.ndim))
    with torch.no_grad():
        if use_batch:
            mean = xt.mean(axes)
            invstd = 1 / torch.sqrt(xt.var(axes, unbiased=False) + eps)
        else:
            mean = torch.tensor(np.asarray(rm, np.float64))
            invstd = 1 / torch.sqrt(torch.tensor(np.asarray(rv, np.float64)) + eps)
    back = (lambda t: t.movedim(1, -1)) if channels_last else (lambda t: t)
    out = dict(y=back(y.detach()).numpy(), mean=mean.numpy(), invstd=invstd.numpy(),
               dx=back(xt.grad).numpy(), dw=wt.grad.numpy(), db=bt.grad.numpy())
    if rmt is not None:
        out["rm"], out["rv"] = rmt.numpy(), rvt.numpy()
    # scales for the sums, whose results may cancel: the same sums of absolute values
    xhat = (np.asarray(x, np.float64) - per_channel(out["mean"], shape, channels_last)) \
        * per_channel(out["invstd"], shape, channels_last)
    red = tuple(i for i in range(len(shape)) if i != (len(shape) - 1 if channels_last else 1))
    ady = np.abs(np.asarray(dy, np.float64))
    k1 = np.abs(out["invstd"] * (1.0 if w is None else np.asarray(w, np.float64)))
    out["dx_scale"] = per_channel(k1, shape, channels_last) * ady
    out["dw_scale"] = (ady * np.abs(xhat)).sum(axis=red)
    out["db_scale"] = ady.sum(axis=red)
    return out


def scaled_err(out, ref, scale):
    """||out - ref|| / max(||ref||, ||scale||): the error of a result that may cancel, against
    the size of what was summed."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if np.isnan(out).any() != np.isnan(ref).any():
        return np.inf
    den = max(np.linalg.norm(ref), np.linalg.norm(scale), 1e-300)
    return float(np.linalg.norm(out - ref) / den)


def check_backward(got, ref, dtype):
    dx, dw, db = (np.asarray(a, np.float64) for a in got)
    tol = TOLERANCE[dtype]
    assert scaled_err(dx, ref["dx"], ref["dx_scale"]) <= tol, "dx"
    assert scaled_err(dw, ref["dw"], ref["dw_scale"]) <= tol, "dweight"
    assert scaled_err(db, ref["db"], ref["db_scale"]) <= tol, "dbias"


def backward_oracle(dy, x, y, mean, invstd, w, channels_last=False, relu=False):
    """torch's native_batch_norm_backward (training) in float64 given OUR saved mean and
    invstd (and, for BN + ReLU, dy masked by OUR y > 0): what batch_norm_backward must return
    for exactly these inputs, free of the forward's rounding. With the scales of oracle()."""
    f64 = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731
    shape = x.shape
    C = channels_of(shape, channels_last)
    xt, dyt, yt = f64(x), f64(dy), f64(y)
    if channels_last:
        xt, dyt, yt = xt.movedim(-1, 1), dyt.movedim(-1, 1), yt.movedim(-1, 1)
    if relu:
        dyt = torch.ops.aten.threshold_backward(dyt, yt, 0)  # 0 where y <= 0 (NaN passes)
    wt = f64(np.ones(C) if w is None else w)
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(
        dyt, xt, wt, None, None, f64(mean), f64(invstd), True, 1e-5, [True, True, True])
    if channels_last:
        dx = dx.movedim(1, -1)
    m64, s64 = np.asarray(mean, np.float64), np.asarray(invstd, np.float64)
    xhat = (np.asarray(x, np.float64) - per_channel(m64, shape, channels_last)) \
        * per_channel(s64, shape, channels_last)
    red = tuple(i for i in range(len(shape)) if i != (len(shape) - 1 if channels_last else 1))
    ady = np.abs(np.asarray(dy, np.float64))
    k1 = np.abs(s64 * (1.0 if w is None else np.asarray(w, np.float64)))
    return dict(dx=dx.numpy(), dw=dw.numpy(), db=db.numpy(),
                dx_scale=per_channel(k1, shape, channels_last) * ady,
                dw_scale=(ady * np.abs(xhat)).sum(axis=red), db_scale=ady.sum(axis=red))


def run(backend, x, dy, w, b, rm, rv, training, channels_last=False, relu=False, **kw):
    """gpunn's forward then backward; returns (y, mean, invstd), (dx, dw, db)."""
    fwd = bn.batch_norm_relu_forward if relu else bn.batch_norm_forward
    y, mean, invstd = fwd(x, rm, rv, w, b, training, channels_last=channels_last,
                          backend=backend, **kw)
    train_bwd = training or rm is None
    if relu:
        grads = bn.batch_norm_relu_backward(dy, x, mean, invstd, w, b, training=train_bwd,
                                            channels_last=channels_last, backend=backend)
    else:
        grads = bn.batch_norm_backward(dy, x, mean, invstd, w, training=train_bwd,
                                       channels_last=channels_last, backend=backend)
    return (y, mean, invstd), grads


# --- against PyTorch ----------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", SHAPES, ids=IDS)
def test_training_matches_torch(shape, channels_last, backend, dtype, relu, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, dtype)
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last, relu=relu)
    (y, mean, invstd), grads = run(backend, x, dy, w, b, rm, rv, True, channels_last, relu)
    assert y.dtype == mean.dtype == invstd.dtype == np.dtype(dtype) and y.shape == x.shape
    for name, got in (("y", y), ("mean", mean), ("invstd", invstd), ("rm", rm), ("rv", rv)):
        assert rel_err(got, ref[name]) <= TOLERANCE[dtype], name
    # the backward of these saved statistics, exactly
    check_backward(grads, backward_oracle(dy, x, y, mean, invstd, w, channels_last, relu), dtype)
    # and end to end, against autograd through torch's forward, where every channel has
    # enough values that the float32 rounding of the saved mean cannot dominate dx
    if x.size // channels_of(shape, channels_last) >= 16:
        check_backward(grads, ref, dtype)


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", [SHAPES[1], SHAPES[5], SHAPES[10]],
                         ids=[IDS[1], IDS[5], IDS[10]])
def test_eval_uses_running_stats_and_leaves_them(shape, channels_last, backend, relu, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last)
    rm0, rv0 = rm.copy(), rv.copy()
    ref = oracle(x, dy, w, b, rm, rv, False, channels_last=channels_last, relu=relu)
    (y, mean, invstd), grads = run(backend, x, dy, w, b, rm, rv, False, channels_last, relu)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)
    assert_close(y, ref["y"], "float32")
    assert_close(mean, rm0, "float32")
    assert_close(invstd, 1 / np.sqrt(rv0.astype(np.float64) + 1e-5), "float32")
    check_backward(grads, ref, "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_affine_false_and_no_running_stats(backend, training, rng):
    """weight = bias = None (affine=False); running stats None use the batch statistics in eval
    too (track_running_stats=False), as torch.nn.BatchNorm does."""
    shape = (6, 4, 9, 5)
    x, dy, w, b, rm, rv = make_inputs(rng, shape, False, affine=False, running=False)
    ref = oracle(x, dy, None, None, None, None, training)
    (y, mean, invstd), grads = run(backend, x, dy, None, None, None, None, training)
    assert_close(y, ref["y"], "float32")
    assert_close(mean, ref["mean"], "float32")
    assert_close(invstd, ref["invstd"], "float32")
    check_backward(grads, ref, "float32")
    # the same through the module-style call of torch
    m = torch.nn.BatchNorm2d(4, affine=False, track_running_stats=False).double()
    m.train(training)
    assert_close(y, m(torch.tensor(x, dtype=torch.float64)).detach(), "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_running_stats_over_steps_match_torch_module(backend, rng):
    """Three training steps with momentum 0.3, then momentum None (the cumulative average with
    num_batches_tracked as torch's counter), against torch.nn.BatchNorm2d in float64."""
    C = 5
    for momentum in (0.3, None):
        m = torch.nn.BatchNorm2d(C, momentum=momentum).double()
        with torch.no_grad():
            m.weight.copy_(torch.tensor(0.5 + rng.random(C)))
            m.bias.copy_(torch.tensor(rng.standard_normal(C)))
        w = m.weight.detach().numpy().astype(np.float32)
        b = m.bias.detach().numpy().astype(np.float32)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        for step in range(1, 4):
            x = (rng.standard_normal((4, C, 6, 7)) * step + step).astype(np.float32)
            y_ref = m(torch.tensor(x, dtype=torch.float64)).detach()
            y = bn.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum,
                              num_batches_tracked=step, backend=backend)
            assert int(m.num_batches_tracked) == step
            assert_close(y, y_ref, "float32")
            assert_close(rm, m.running_mean, "float32")
            assert_close(rv, m.running_var, "float32")
        m.eval()
        x = rng.standard_normal((3, C, 2, 2)).astype(np.float32)
        assert_close(bn.batch_norm(x, rm, rv, w, b, backend=backend),
                     m(torch.tensor(x, dtype=torch.float64)).detach(), "float32")


def test_torch_tensors_in_and_out(rng):
    """torch CPU tensors come back as tensors; running statistics are updated in place."""
    x = torch.tensor(rng.standard_normal((8, 3, 5, 5)), dtype=torch.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y, mean, invstd = bn.batch_norm_forward(x, rm, rv, w, b, True)
    assert all(isinstance(t, torch.Tensor) for t in (y, mean, invstd))
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    y_t = F.batch_norm(x, rm_t, rv_t, w, b, True)
    assert_close(y, y_t, "float32")
    assert_close(rm, rm_t, "float32")
    assert_close(rv, rv_t, "float32")
    dx, dw, db = bn.batch_norm_backward(torch.ones_like(x), x, mean, invstd, w)
    assert isinstance(dx, torch.Tensor) and dw.shape == (3,)


# --- the reference against finite differences ---------------------------------------------------


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_backward_matches_finite_differences(training, relu, channels_last, rng):
    """<dy, d f> along random directions of x, weight and bias (float64, central
    differences), f = the forward output with the batch (or running) statistics."""
    shape = (5, 3, 4, 6) if not channels_last else (5, 4, 6, 3)
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, "float64")
    fwd = bn.batch_norm_relu if relu else bn.batch_norm

    def f(xx, ww, bb):
        return np.sum(dy * fwd(xx, rm.copy(), rv.copy(), ww, bb, training,
                               channels_last=channels_last, backend="numpy"))

    _, mean, invstd = bn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training,
                                            channels_last=channels_last, backend="numpy")
    back = bn.batch_norm_relu_backward if relu else bn.batch_norm_backward
    args = (w, b) if relu else (w,)
    dx, dw, db = back(dy, x, mean, invstd, *args, training=training,
                      channels_last=channels_last, backend="numpy")
    h = 1e-6
    vx, vw, vb = rng.standard_normal(x.shape), rng.standard_normal(w.shape), \
        rng.standard_normal(b.shape)
    for grad, d in ((dx, (vx, 0, 0)), (dw, (0, vw, 0)), (db, (0, 0, vb))):
        fd = (f(x + h * d[0], w + h * d[1], b + h * d[2])
              - f(x - h * d[0], w - h * d[1], b - h * d[2])) / (2 * h)
        v = next(a for a in d if not np.isscalar(a))
        assert abs(np.sum(grad * v) - fd) <= 1e-6 * max(1.0, abs(fd))


# --- CPU kernels against the reference ----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(A=st.integers(2, 9), C=st.integers(1, 12), B=st.integers(1, 150),
       channels_last=st.booleans(), training=st.booleans(), relu=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_cpu_kernels_agree_with_reference(A, C, B, channels_last, training, relu, seed):
    rng = np.random.default_rng(seed)
    shape = (A, B, C) if channels_last else (A, C, B)
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last)
    results = {}
    for backend in HOST_BACKENDS:
        r_m, r_v = rm.copy(), rv.copy()
        (y, mean, invstd), grads = run(backend, x, dy, w, b, r_m, r_v, training, channels_last,
                                       relu)
        results[backend] = (y, mean, invstd, r_m, r_v, *grads)
    for got, ref in zip(results["cpu"], results["numpy"]):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,channels_last", [SHAPES[0], SHAPES[8], SHAPES[9], SHAPES[11]],
                         ids=[IDS[0], IDS[8], IDS[9], IDS[11]])
def test_cpu_deterministic(shape, channels_last, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last)
    runs = [run("cpu", x, dy, w, b, rm.copy(), rv.copy(), True, channels_last, True)
            for _ in range(3)]
    for other in runs[1:]:
        for a, c in zip(runs[0][0] + tuple(runs[0][1]), other[0] + tuple(other[1])):
            assert np.array_equal(a, c)


# --- numerics, layouts, fusion --------------------------------------------------------------------


#: Bounds on the statistics at mean 1e4, spread 1: a few float32 roundings of the spread-sized
#: partial sums (measured 1e-8 to 1.1e-7 on every backend; the CUDA kernel's float32 merge gave
#: 1.4-1.7e-5 before it shifted by a per-channel pivot).
LARGE_MEAN_STATS = {"float32": 5e-7, "float64": 1e-12}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", [((64, 3, 1000), False), ((4096, 5), False),
                                                 ((64, 4, 16), False), ((40, 30, 6), True)],
                         ids=["rows", "2d", "cols", "channels_last"])
def test_large_mean_stays_accurate(shape, channels_last, backend, dtype, rng):
    """Mean 1e4, spread 1: the statistics keep the dtype's accuracy (a naive E[x^2] - E[x]^2
    loses all of it in float32). y uses the mean rounded to the dtype, as torch's does: exact
    given the saved statistics, and within that rounding (ulp(1e4)/2 * invstd) of exact."""
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, dtype, mean=1e4, spread=1.0)
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last)
    y, mean, invstd = bn.batch_norm_forward(x, rm, rv, w, b, True, channels_last=channels_last,
                                            backend=backend)
    for name, got in (("mean", mean), ("invstd", invstd), ("rm", rm), ("rv", rv)):
        assert rel_err(got, ref[name]) <= LARGE_MEAN_STATS[dtype], name
    # y from the saved (rounded) statistics, in float64
    m64 = per_channel(np.asarray(mean, np.float64), shape, channels_last)
    s64 = per_channel(np.asarray(invstd, np.float64) * w, shape, channels_last)
    y_saved = (x.astype(np.float64) - m64) * s64 + per_channel(b, shape, channels_last)
    assert rel_err(y, y_saved) <= TOLERANCE[dtype]
    ulp = np.spacing(np.asarray(1e4, dtype))
    assert np.max(np.abs(y - ref["y"])) <= ulp * np.max(ref["invstd"] * w) + 1e-5


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", [((300, 3, 200), False), ((300, 7), False),
                                                 ((300, 4, 5), False), ((100, 6, 70), True)],
                         ids=["rows", "2d", "cols", "channels_last"])
def test_outliers_do_not_spoil_the_variance(shape, channels_last, backend, rng):
    """Mean 1e4, spread 1, and in every block position a far value (1e3 off): in the first
    row (the first shift of the columns reduction), and every 37th row."""
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, "float32", mean=1e4, spread=1.0)
    x[::37] += np.float32(1e3)
    x[0] -= np.float32(2e3)
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last)
    _, mean, invstd = bn.batch_norm_forward(x, rm, rv, w, b, True, channels_last=channels_last,
                                            backend=backend)
    for name, got in (("mean", mean), ("invstd", invstd), ("rm", rm), ("rv", rv)):
        assert rel_err(got, ref[name]) <= TOLERANCE["float32"], name


#: Shapes for huge values: rows reduction, (N, C), columns, channels last, one channel.
HUGE_SHAPES = [((4, 3, 300), False), ((40, 8), False), ((6, 4, 5), False), ((8, 5, 7), True),
               ((2, 1, 3000), False)]
HUGE_IDS = ["rows", "2d", "cols", "channels_last", "one_channel"]


def check_huge(x, dy, w, b, rm, rv, backend, channels_last, relu):
    """Forward and backward finite and within float32 tolerance of torch in float64."""
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last, relu=relu)
    (y, mean, invstd), grads = run(backend, x, dy, w, b, rm, rv, True, channels_last, relu)
    for name, got in (("y", y), ("mean", mean), ("invstd", invstd), ("rm", rm)):
        assert np.isfinite(got).all(), name
        assert rel_err(got, ref[name]) <= TOLERANCE["float32"], name
    # the unbiased running variance may exceed float32's range: inf exactly where it does
    with np.errstate(over="ignore"):
        rv_ref = ref["rv"].astype(np.float32)
    assert rel_err(rv, rv_ref) <= TOLERANCE["float32"], "rv"
    assert all(np.isfinite(g).all() for g in grads)
    check_backward(grads, backward_oracle(dy, x, y, mean, invstd, w, channels_last, relu),
                   "float32")
    check_backward(grads, ref, "float32")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 1e37])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", HUGE_SHAPES, ids=HUGE_IDS)
def test_huge_values_give_finite_accurate_results(shape, channels_last, backend, magnitude, relu,
                                                   rng):
    """Finite float32 x of magnitude 1e19 and beyond: squares of deviations overflow float32
    (the cpu backend gave NaN everywhere, the cuda one y = 0). Against torch in float64 on
    the same values: torch's own float32 CPU kernel overflows there too (var inf, y = 0)."""
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, mean=0.5 * magnitude,
                                      spread=magnitude)
    check_huge(x, dy, w, b, rm, rv, backend, channels_last, relu)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", HUGE_SHAPES, ids=HUGE_IDS)
def test_huge_gradients_give_finite_accurate_results(shape, channels_last, backend, rng):
    """dy and x both of magnitude 1e19: the products dy * (x - mean) overflow float32."""
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, mean=1e19, spread=1e19)
    dy *= np.float32(1e19)
    check_huge(x, dy, w, b, rm, rv, backend, channels_last, False)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", HUGE_SHAPES, ids=HUGE_IDS)
def test_magnitude_1e19_matches_torch_float32(shape, channels_last, backend, rng):
    """Mean 1e19, spread 1e17 (where torch's float32 kernel does not overflow): y, the
    statistics and dx agree with torch's float32 results."""
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, mean=1e19, spread=1e17)
    C = channels_of(shape, channels_last)
    move = (lambda t: t.movedim(-1, 1)) if channels_last else (lambda t: t)
    back = (lambda t: t.movedim(1, -1)) if channels_last else (lambda t: t)
    xt = move(torch.tensor(x)).requires_grad_(True)
    rmt, rvt = torch.tensor(rm), torch.tensor(rv)
    yt = F.batch_norm(xt, rmt, rvt, torch.tensor(w), torch.tensor(b), True)
    yt.backward(move(torch.tensor(dy)))
    (y, _, _), (dx, _, _) = run(backend, x, dy, w, b, rm, rv, True, channels_last)
    assert torch.isfinite(yt).all() and torch.isfinite(rvt).all()  # torch is accurate here
    assert_close(y, back(yt.detach()).numpy(), "float32")
    assert_close(rm, rmt.numpy(), "float32")
    assert_close(rv, rvt.numpy(), "float32")
    assert_close(dx, back(xt.grad).numpy(), "float32")
    assert C == rm.size


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape", [(6, 5, 7, 13), (4, 3, 2, 2), (5, 6, 70)], ids=str)
def test_channels_last_equals_nchw(shape, backend, relu, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, False)
    to_last = lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1))  # noqa: E731
    rm2, rv2 = rm.copy(), rv.copy()
    (y, m, s), g = run(backend, x, dy, w, b, rm, rv, True, False, relu)
    (y2, m2, s2), g2 = run(backend, to_last(x), to_last(dy), w, b, rm2, rv2, True, True, relu)
    for a, c in ((to_last(y), y2), (m, m2), (s, s2), (rm, rm2), (rv, rv2), (to_last(g[0]), g2[0]),
                 (g[1], g2[1]), (g[2], g2[2])):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape,channels_last", [SHAPES[0], SHAPES[4], SHAPES[10]],
                         ids=[IDS[0], IDS[4], IDS[10]])
def test_fused_relu_equals_batch_norm_then_relu(shape, channels_last, backend, training, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, mean=0.0)
    kw = dict(channels_last=channels_last, backend=backend)
    y, mean, invstd = bn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, training, **kw)
    yr, mean_r, invstd_r = bn.batch_norm_relu_forward(x, rm.copy(), rv.copy(), w, b, training,
                                                      **kw)
    assert np.array_equal(yr, np.where(y < 0, 0, y))  # the same z, so exactly relu(y)
    assert np.array_equal(mean, mean_r) and np.array_equal(invstd, invstd_r)
    assert (yr == 0).mean() > 0.2  # the mask matters
    fused = bn.batch_norm_relu_backward(dy, x, mean, invstd, w, b, training=training, **kw)
    unfused = bn.batch_norm_backward(np.where(y > 0, dy, 0).astype(dy.dtype), x, mean, invstd,
                                     w, training=training, **kw)
    for a, c in zip(fused, unfused):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_and_in_place(backend, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, (4, 3, 10), False)
    expect = bn.batch_norm(x, rm.copy(), rv.copy(), w, b, True, backend=backend)
    out = np.full_like(x, np.nan)
    assert bn.batch_norm(x, rm.copy(), rv.copy(), w, b, True, out=out, backend=backend) is out
    np.testing.assert_array_equal(out, expect)
    xc = x.copy()
    bn.batch_norm(xc, rm.copy(), rv.copy(), w, b, True, out=xc, backend=backend)  # in place
    np.testing.assert_array_equal(xc, expect)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nan_propagates_like_torch(backend, rng):
    x, dy, w, b, rm, rv = make_inputs(rng, (5, 3, 4), False)
    x[2, 0, 1] = np.nan
    ref = oracle(x, dy, w, b, rm, rv, True)
    (y, mean, invstd), (dx, dw, db) = run(backend, x, dy, w, b, rm, rv, True)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    assert np.isnan(rm[0]) and np.isnan(rv[0]) and np.isfinite(rm[1:]).all()
    assert np.isnan(ref["y"][:, 0]).all() and np.isnan(ref["rm"][0])
    assert np.isnan(dx[:, 0]).all() and np.isnan(dw[0]) and np.isfinite(dx[:, 1:]).all()
    assert_close(y[:, 1:], ref["y"][:, 1:], "float32")
    # NaN running variance in eval: NaN out, no crash
    rv[1] = np.nan
    y = bn.batch_norm(x, rm, rv, w, b, False, backend=backend)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, 2]).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_batch(backend):
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = bn.batch_norm_forward(x, rm, rv, training=True, backend=backend)
    assert y.shape == x.shape and np.isnan(mean).all() and np.isnan(invstd).all()
    assert (rm == 0).all() and (rv == 1).all()  # untouched, as torch
    dx, dw, db = bn.batch_norm_backward(x, x, mean, invstd, backend=backend)
    assert dx.shape == x.shape and (dw == 0).all() and (db == 0).all()


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_raises_and_changes_nothing(rng):
    x, dy, w, b, rm, rv = make_inputs(rng, (4, 3, 5), False)
    rm0, rv0 = rm.copy(), rv.copy()
    out = np.full_like(x, 7.0)
    cases = [
        (ValueError, "at least 2 dimensions", lambda: bn.batch_norm(x[0, 0], rm, rv, w, b, True)),
        (ValueError, "weight should contain 3 elements", lambda: bn.batch_norm(
            x, rm, rv, w[:2], b, True, out=out)),
        (ValueError, "running_var should contain 3", lambda: bn.batch_norm(
            x, rm, rv[:2], w, b, True, out=out)),
        (ValueError, "running_mean should contain 5", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, channels_last=True, out=out)),
        (ValueError, "both be None or neither", lambda: bn.batch_norm(x, rm, None, w, b, True)),
        (ValueError, "Expected more than 1 value per channel when training", lambda: bn.batch_norm(
            x[:1, :, :1], rm, rv, w, b, True)),
        (ValueError, "Expected more than 1 value per channel when training", lambda: bn.batch_norm(
            x[:1, :, 0], None, None, w, b, False)),
        (TypeError, "weight has dtype float64, expected float32", lambda: bn.batch_norm(
            x, rm, rv, w.astype(np.float64), b, True, out=out)),
        (TypeError, "x has dtype int64", lambda: bn.batch_norm(
            x.astype(np.int64), None, None)),
        (ValueError, "needs num_batches_tracked", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, momentum=None, out=out)),
        (ValueError, "num_batches_tracked must be >= 1", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, momentum=None, num_batches_tracked=0, out=out)),
        (TypeError, "momentum must be a real number", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, momentum="0.1", out=out)),
        (TypeError, "eps must be a real number", lambda: bn.batch_norm(
            x, rm, rv, w, b, True, eps=None, out=out)),
        (ValueError, "out has shape", lambda: bn.batch_norm(x, rm, rv, w, b, True, out=out[:2])),
        (ValueError, "running_mean must be C-contiguous", lambda: bn.batch_norm(
            x, np.zeros(6, np.float32)[::2], rv, w, b, True, out=out)),
    ]
    frozen = rm.copy()
    frozen.flags.writeable = False
    cases.append((ValueError, "running_mean is read-only", lambda: bn.batch_norm(
        x, frozen, rv, w, b, True, out=out)))
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
        assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), match
        assert (out == 7.0).all(), match
    # eval with running statistics takes a single value per channel
    assert bn.batch_norm(x[:1, :, 0], rm, rv, w, b, False).shape == (1, 3)

    _, mean, invstd = bn.batch_norm_forward(x, rm.copy(), rv.copy(), w, b, True)
    back_cases = [
        (ValueError, "dy has shape", lambda: bn.batch_norm_backward(dy[:2], x, mean, invstd, w)),
        (ValueError, "mean should contain 3", lambda: bn.batch_norm_backward(
            dy, x, mean[:2], invstd, w, out=out)),
        (TypeError, "invstd has dtype float64, expected float32", lambda: bn.batch_norm_backward(
            dy, x, mean, invstd.astype(np.float64), w, out=out)),
        (TypeError, "dy has dtype float64", lambda: bn.batch_norm_backward(
            dy.astype(np.float64), x, mean, invstd, w, out=out)),
        (ValueError, "bias should contain 3", lambda: bn.batch_norm_relu_backward(
            dy, x, mean, invstd, w, b[:1], out=out)),
    ]
    for error, match, call in back_cases:
        with pytest.raises(error, match=match):
            call()
        assert (out == 7.0).all(), match


def test_torch_raises_where_we_raise():
    """The one-value-per-channel rule is torch's: same message, same cases."""
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(torch.zeros(1, 3, 1, 1), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn.batch_norm(np.zeros((1, 3, 1, 1), np.float32), np.zeros(3, np.float32),
                      np.ones(3, np.float32), training=True)


# --- the benchmark suite, quick, on small CPU cases ------------------------------------------


def test_bench_suite_runs_and_checks():
    from gpunn.bench import batchnorm as suite

    records = suite.run(suite.Options(quick=True, shapes=[(4, 8, 6, 6)], layouts=["nchw", "nhwc"],
                                      progress=False))
    impls = {r.impl for r in records}
    assert {"numpy", "gpunn cpu", "torch", "limit"} <= impls
    assert len({(r.op, r.direction) for r in records}) == 8  # 2 ops x 2 layouts x 2 directions
    assert all(r.status == "ok" for r in records), [(r.op, r.impl, r.note) for r in records
                                                     if r.status != "ok"]
    assert all(r.error < 1e-5 for r in records if r.role != "limit")
    for r in records:
        assert r.bytes == (3 if r.direction == "forward" else 5) * 4 * 4 * 8 * 36
    with pytest.raises(Exception, match="not a shape"):
        suite.parse_shapes("4x8xq")


# --- launch plans and kernel index arithmetic, without a GPU ----------------------------------
# Python mirrors of the loops of kernels/batchnorm.cu (same names), run on the plans the
# launcher computes: every element must be read exactly once, by a block of its channel, in
# whole vectors.


def mirror_reduce_rows(A, C, B, V, capacity):
    s_a, s_b, b_chunk, tpr = bn_cuda.rows_plan(A, C, B, V, capacity)
    assert b_chunk % V == 0 and tpr & (tpr - 1) == 0 and tpr <= bn_cuda.THREADS
    S, U, T = s_a * s_b, bn_cuda.UNROLL, bn_cuda.THREADS
    counts = np.zeros((A, C, B), int)
    for block in range(C * S):
        c, s = divmod(block, S)
        sa, sb = divmod(s, s_b)
        a0, a1 = sa * A // s_a, (sa + 1) * A // s_a
        b0, b1 = sb * b_chunk, min(B, sb * b_chunk + b_chunk)
        assert a0 < a1 and b0 < b1
        rpp, span = T // tpr, tpr * V
        for t in range(T):
            r_off, lane = divmod(t, tpr)
            if b1 - b0 <= span:
                b = b0 + lane * V
                for a in range(a0 + r_off, a1, U * rpp):
                    for u in range(U):
                        au = a + u * rpp
                        if b < b1 and au < a1:
                            assert b + V <= b1
                            counts[au, c, b:b + V] += 1
            else:
                for a in range(a0 + r_off, a1, rpp):
                    for b in range(b0 + lane * V, b1, U * span):
                        for u in range(U):
                            bu = b + u * span
                            if bu < b1:
                                assert bu + V <= b1
                                counts[a, c, bu:bu + V] += 1
    return counts


def mirror_cols(A, K, V, capacity, rows_per_thread, step_rows):
    """bn_reduce_cols (step_rows = UNROLL rows at once) and bn_{normalize,dx}_cols (2)."""
    tx_count, tiles, S = bn_cuda.cols_plan(A, K, V, capacity, rows_per_thread)
    assert tx_count & (tx_count - 1) == 0 and S <= 65535
    T = bn_cuda.THREADS
    TY = T // tx_count
    counts = np.zeros((A, K), int)
    written = np.zeros((S, K), int)
    for tile in range(tiles):
        for s in range(S):
            for t in range(T):
                tx, ty = t % tx_count, t // tx_count
                k = (tile * tx_count + tx) * V
                if k >= K:
                    continue
                assert k + V <= K
                if step_rows == bn_cuda.UNROLL:  # reduce: row slice s of S
                    a0, a1, stride = s * A // S, (s + 1) * A // S, TY
                    if ty == 0:
                        written[s, k:k + V] += 1
                else:  # elementwise: rows s*TY + ty, stepping S*TY
                    a0, a1, stride = s * TY, A, S * TY
                for a in range(a0 + ty, a1, step_rows * stride):
                    for u in range(step_rows):
                        if a + u * stride < a1:
                            counts[a + u * stride, k:k + V] += 1
    return counts, written


def mirror_flat(A, C, B, V, grid):
    """bn_{normalize,dx}_flat: vectors i, i + G, ... of each thread (two per step), the channel
    tracked by Cursor.advance; returns visits per vector, and checks every channel."""
    nvec, bv, G = A * C * B // V, B // V, grid * bn_cuda.THREADS
    Gb, Gc = G % bv, (G // bv) % C
    i = np.arange(G)
    b, c = i % bv, (i // bv) % C
    counts = np.zeros(nvec, int)

    def advance(i, b, c):
        i, b, c = i + G, b + Gb, c + Gc
        carry = b >= bv
        b, c = np.where(carry, b - bv, b), np.where(carry, c + 1, c)
        return i, b, np.where(c >= C, c - C, c)

    while (i < nvec).any():
        qi, qb, qc = advance(i, b, c)
        for vi, vc in ((i, c), (qi, qc)):
            live = vi < nvec
            assert (vc[live] == (vi[live] // bv) % C).all()
            np.add.at(counts, vi[live], 1)
        i, b, c = advance(qi, qb, qc)
    return counts


@pytest.mark.parametrize("A,C,B,V,capacity", [
    (8, 3, 32, 4, 16),        # a row per 8 threads, 32 rows at once
    (5, 2, 91, 1, 64),        # scalar, rows not a multiple of the vector
    (3, 1, 9000, 4, 40),      # one channel: a long row split in column chunks
    (3, 1, 9002, 2, 40),      # ... whose chunk (1801) is rounded up to whole vectors
    (2, 2, 4096, 8, 6),       # rows longer than a block's vectors: grouped along the row
    (40, 4096 // 64, 49, 1, 132 * 4),  # many channels
    (700, 1, 64, 2, 50),      # split in rows only
])
def test_reduce_rows_plan_reads_each_element_once(A, C, B, V, capacity):
    assert (mirror_reduce_rows(A, C, B, V, capacity) == 1).all()


@pytest.mark.parametrize("A,K,V,capacity", [(33, 7, 1, 64), (64, 4096, 4, 528), (2, 4096, 8, 528),
                                            (200, 48, 4, 100), (9, 3, 1, 7), (1000, 24, 8, 64)])
def test_cols_plans_read_each_element_once(A, K, V, capacity):
    counts, written = mirror_cols(A, K, V, capacity, bn_cuda.UNROLL, bn_cuda.UNROLL)
    assert (counts == 1).all() and (written == 1).all()
    counts, _ = mirror_cols(A, K, V, capacity, 2, 2)
    assert (counts == 1).all()


@pytest.mark.parametrize("A,C,B,V,grid", [(7, 3, 16, 4, 1), (5, 13, 7, 1, 3), (64, 5, 64, 8, 2),
                                          (3, 1, 5000, 2, 5), (2, 4096, 4, 4, 7)])
def test_flat_cursor_tracks_channels(A, C, B, V, grid):
    assert (mirror_flat(A, C, B, V, grid) == 1).all()


def test_kernel_family_declares_every_launch():
    names = set(bn_cuda.KERNELS.expressions)
    for ctype in ("float", "double", "gpunn::half", "gpunn::bfloat16"):
        assert f"gpunn::bn_finalize_forward<{ctype}>" in names
        assert f"gpunn::bn_reduce_rows<{ctype}, 1, true>" in names
    assert "gpunn::bn_normalize_flat<gpunn::half, 8>" in names
    assert "gpunn::bn_dx_cols<double, 2>" in names


# --- GPU ----------------------------------------------------------------------------------------

GPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]
# rows (vector / scalar rows, long rows split in columns, C = 4096), columns (B < 32, 2-D,
# channels last with and without whole vectors), one channel, 1x1 spatial
GPU_SHAPES = [
    ((8, 3, 32), False),
    ((4, 5, 7, 13), False),
    ((16, 64, 32, 32), False),
    ((64, 16, 8, 8), False),
    ((2, 1, 700, 999), False),
    ((2, 4096, 7, 7), False),
    ((33, 7), False),
    ((64, 4096), False),
    ((2, 4096), False),
    ((5, 3, 4, 4), False),
    ((2, 3, 1, 1), False),
    ((4, 6, 5, 64), True),
    ((3, 7, 9, 13), True),
    ((200, 24), True),
]
GPU_IDS = [f"{'x'.join(map(str, s))}{'-cl' if cl else ''}" for s, cl in GPU_SHAPES]


def _device(cupy, a, dtype):
    if a is None:
        return None
    if dtype == "bfloat16":
        import ml_dtypes

        return cupy.asarray(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16))
    return cupy.asarray(np.asarray(a).astype(dtype))


def _host64(cupy, a):
    return None if a is None else cupy.asnumpy(a).astype(np.float64)


def _gpu_case(cupy, rng, shape, channels_last, dtype, param_dtype, **kw):
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, "float64", **kw)
    pdt = dtype if param_dtype == "same" else param_dtype
    dev = [_device(cupy, x, dtype), _device(cupy, dy, dtype)] + [
        _device(cupy, a, pdt) for a in (w, b, rm, rv)]
    host = [_host64(cupy, a) for a in dev]  # the rounded values, in float64
    return dev, host


def _check_gpu(cupy, dtype, pdt, got, ref, rm, rv, bwd_ref=None):
    (y, mean, invstd), grads = got
    tol, stat_tol = TOLERANCE[dtype], TOLERANCE["float64" if dtype == "float64" else "float32"]
    assert y.dtype == np.dtype(dtype) or dtype == "bfloat16"
    assert rel_err(_host64(cupy, y), ref["y"]) <= tol, "y"
    assert rel_err(_host64(cupy, mean), ref["mean"]) <= stat_tol, "mean"
    assert rel_err(_host64(cupy, invstd), ref["invstd"]) <= stat_tol, "invstd"
    if rm is not None and "rm" in ref:
        p_tol = TOLERANCE[pdt] if pdt != "float32" else stat_tol
        assert rel_err(_host64(cupy, rm), ref["rm"]) <= max(p_tol, stat_tol), "running_mean"
        assert rel_err(_host64(cupy, rv), ref["rv"]) <= max(p_tol, stat_tol), "running_var"
    check_backward([_host64(cupy, a) for a in grads], bwd_ref or ref, dtype)


def _saved_ref(cupy, host, got, channels_last, relu):
    """backward_oracle on the device results (for training-mode backwards)."""
    (y, mean, invstd), _ = got
    x, dy, w = host[0], host[1], host[2]
    return backward_oracle(dy, x, _host64(cupy, y), _host64(cupy, mean), _host64(cupy, invstd),
                           w, channels_last, relu)


@pytest.mark.gpu
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,channels_last", GPU_SHAPES, ids=GPU_IDS)
def test_cuda_training_matches_torch(shape, channels_last, dtype, relu, rng):
    """Every dtype and launch shape, training, against float64 torch on the rounded inputs."""
    cupy = pytest.importorskip("cupy")
    dev, host = _gpu_case(cupy, rng, shape, channels_last, dtype, "same")
    x, dy, w, b, rm, rv = dev
    ref = oracle(*host, True, channels_last=channels_last, relu=relu)
    got = run("cuda", x, dy, w, b, rm, rv, True, channels_last, relu)
    _check_gpu(cupy, dtype, dtype, got, ref, rm, rv,
               _saved_ref(cupy, host, got, channels_last, relu))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape,channels_last", [GPU_SHAPES[1], GPU_SHAPES[9], GPU_SHAPES[11]],
                         ids=[GPU_IDS[1], GPU_IDS[9], GPU_IDS[11]])
def test_cuda_float32_params_with_16_bit_x(shape, channels_last, dtype, training, rng):
    """float32 weight, bias and running statistics beside float16/bfloat16 x (mixed precision):
    they stay float32, and dweight/dbias come back float32."""
    cupy = pytest.importorskip("cupy")
    dev, host = _gpu_case(cupy, rng, shape, channels_last, dtype, "float32")
    x, dy, w, b, rm, rv = dev
    ref = oracle(*host, training, channels_last=channels_last, relu=True)
    got = run("cuda", x, dy, w, b, rm, rv, training, channels_last, True)
    assert rm.dtype == np.float32 and got[1][1].dtype == np.float32
    _check_gpu(cupy, dtype, "float32", got, ref, rm, rv,
               _saved_ref(cupy, host, got, channels_last, True) if training else None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", ["eval", "affine_false_no_running", "momentum_none"])
def test_cuda_modes(case, dtype, rng):
    cupy = pytest.importorskip("cupy")
    shape = (6, 5, 9, 11)
    kw = dict(affine=False, running=False) if case == "affine_false_no_running" else {}
    dev, host = _gpu_case(cupy, rng, shape, False, dtype, "same", **kw)
    x, dy, w, b, rm, rv = dev
    training = case != "eval"
    if case == "momentum_none":
        ref = oracle(*host, True, momentum=1 / 3)
        fwd = bn.batch_norm_forward(x, rm, rv, w, b, True, momentum=None, num_batches_tracked=3,
                                    backend="cuda")
        got = fwd, bn.batch_norm_backward(dy, x, fwd[1], fwd[2], w, backend="cuda")
    else:
        ref = oracle(*host, training)
        got = run("cuda", x, dy, w, b, rm, rv, training)
    _check_gpu(cupy, dtype, dtype, got, ref, rm, rv,
               _saved_ref(cupy, host, got, False, False) if training else None)
    if case == "eval":
        assert rel_err(_host64(cupy, rm), host[4]) == 0 and rel_err(_host64(cupy, rv), host[5]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,channels_last", [((64, 3, 1000), False), ((4096, 5), False),
                                                 ((64, 4, 16), False), ((40, 30, 6), True)],
                         ids=["rows", "2d", "cols", "channels_last"])
def test_cuda_large_mean_stays_accurate(shape, channels_last, dtype, rng):
    cupy = pytest.importorskip("cupy")
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, dtype, mean=1e4, spread=1.0)
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last)
    d = [cupy.asarray(a) for a in (x, w, b, rm, rv)]
    y, mean, invstd = bn.batch_norm_forward(d[0], d[3], d[4], d[1], d[2], True,
                                            channels_last=channels_last)
    for name, got in (("mean", mean), ("invstd", invstd), ("rm", d[3]), ("rv", d[4])):
        assert rel_err(cupy.asnumpy(got), ref[name]) <= LARGE_MEAN_STATS[dtype], name
    m64 = per_channel(cupy.asnumpy(mean).astype(np.float64), shape, channels_last)
    s64 = per_channel(cupy.asnumpy(invstd).astype(np.float64) * w, shape, channels_last)
    y_saved = (x.astype(np.float64) - m64) * s64 + per_channel(b, shape, channels_last)
    assert rel_err(cupy.asnumpy(y), y_saved) <= TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("magnitude", [1e19, 1e30])
@pytest.mark.parametrize("shape,channels_last", HUGE_SHAPES[:4] + [((2, 3, 64), False)],
                         ids=HUGE_IDS[:4] + ["rows_32"])
def test_cuda_huge_values_give_finite_accurate_results(shape, channels_last, magnitude, dtype,
                                                        relu, rng):
    """As test_huge_values_give_finite_accurate_results: float sums that overflow are summed
    again in double (the kernel gave y = 0 and running_var inf from 1e19)."""
    cupy = pytest.importorskip("cupy")
    dev, host = _gpu_case(cupy, rng, shape, channels_last, dtype, "float32",
                          mean=0.5 * magnitude, spread=magnitude)
    x, dy, w, b, rm, rv = dev
    ref = oracle(*host, True, channels_last=channels_last, relu=relu)
    with np.errstate(over="ignore"):  # inf where it leaves float32's range, as ours
        ref["rv"] = ref["rv"].astype(np.float32)
    got = run("cuda", x, dy, w, b, rm, rv, True, channels_last, relu)
    (y, mean, invstd), grads = got
    for a in (y, mean, invstd, rm, *grads):
        assert bool(cupy.isfinite(a.astype(cupy.float32)).all())
    _check_gpu(cupy, dtype, "float32", got, ref, rm, rv,
               _saved_ref(cupy, host, got, channels_last, relu))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,channels_last", [((300, 3, 200), False), ((300, 7), False),
                                                 ((300, 4, 5), False), ((100, 6, 70), True)],
                         ids=["rows", "2d", "cols", "channels_last"])
def test_cuda_outliers_do_not_spoil_the_variance(shape, channels_last, rng):
    cupy = pytest.importorskip("cupy")
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last, "float32", mean=1e4, spread=1.0)
    x[::37] += np.float32(1e3)
    x[0] -= np.float32(2e3)
    ref = oracle(x, dy, w, b, rm, rv, True, channels_last=channels_last)
    d = [cupy.asarray(a) for a in (x, w, b, rm, rv)]
    _, mean, invstd = bn.batch_norm_forward(d[0], d[3], d[4], d[1], d[2], True,
                                            channels_last=channels_last)
    for name, got in (("mean", mean), ("invstd", invstd), ("rm", d[3]), ("rv", d[4])):
        assert rel_err(cupy.asnumpy(got), ref[name]) <= TOLERANCE["float32"], name


@pytest.mark.gpu
@pytest.mark.parametrize("shape,channels_last", [GPU_SHAPES[2], GPU_SHAPES[4], GPU_SHAPES[7],
                                                 GPU_SHAPES[12]],
                         ids=[GPU_IDS[2], GPU_IDS[4], GPU_IDS[7], GPU_IDS[12]])
def test_cuda_deterministic_and_agrees_with_cpu(shape, channels_last, rng):
    cupy = pytest.importorskip("cupy")
    x, dy, w, b, rm, rv = make_inputs(rng, shape, channels_last)
    d = [cupy.asarray(a) for a in (x, dy, w, b)]
    runs = []
    for _ in range(3):
        rmd, rvd = cupy.asarray(rm), cupy.asarray(rv)
        (y, m, s), g = run("cuda", d[0], d[1], d[2], d[3], rmd, rvd, True, channels_last, True)
        runs.append([cupy.asnumpy(a) for a in (y, m, s, rmd, rvd, *g)])
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert np.array_equal(a, c)
    rmc, rvc = rm.copy(), rv.copy()
    (y, m, s), g = run("cpu", x, dy, w, b, rmc, rvc, True, channels_last, True)
    for a, c in zip(runs[0], (y, m, s, rmc, rvc, *g)):
        np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_unaligned_views_use_the_scalar_path(dtype, rng):
    """x and out offset by one element from a 16-byte boundary (the scalar kernels)."""
    cupy = pytest.importorskip("cupy")
    shape = (4, 6, 8, 8)
    n = int(np.prod(shape))
    host = rng.standard_normal(n + 1)
    x = cupy.asarray(host.astype(dtype))[1:].reshape(shape)
    out = cupy.empty(n + 1, dtype)[1:].reshape(shape)
    w, b = cupy.ones(6, dtype), cupy.zeros(6, dtype)
    y = bn.batch_norm(x, None, None, w, b, out=out)
    assert y is out
    ref = bn.batch_norm(cupy.asnumpy(x).astype(np.float64), None, None, backend="numpy")
    assert rel_err(cupy.asnumpy(out).astype(np.float64), ref) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_cuda_nan_propagates(rng):
    cupy = pytest.importorskip("cupy")
    x = rng.standard_normal((5, 3, 40)).astype(np.float32)
    x[2, 0, 1] = np.nan
    rm, rv = cupy.zeros(3, np.float32), cupy.ones(3, np.float32)
    y, mean, invstd = bn.batch_norm_forward(cupy.asarray(x), rm, rv, training=True)
    y = cupy.asnumpy(y)
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
    assert np.isnan(float(rm[0])) and bool(cupy.isfinite(rm[1:]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_torch_tensors_match_torch(dtype, rng):
    """torch CUDA tensors in and out (on torch's stream), against torch's own batch_norm."""
    tdt = getattr(torch, dtype)
    x = torch.randn(16, 32, 14, 14, device="cuda").to(tdt)
    w, b = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    rm_t, rv_t = rm.clone(), rv.clone()
    y = bn.batch_norm_relu(x, rm, rv, w, b, training=True)
    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.device == x.device
    y_t = torch.relu(F.batch_norm(x.double(), rm_t.double(), rv_t.double(), w.double(),
                                  b.double(), True))
    assert rel_err(y.double().cpu(), y_t.cpu()) <= TOLERANCE[dtype]
    assert rel_err(rm.cpu(), rm_t.cpu()) <= 1e-5 and rel_err(rv.cpu(), rv_t.cpu()) <= 1e-5


@pytest.mark.gpu
def test_cuda_bad_input_changes_nothing():
    cupy = pytest.importorskip("cupy")
    x = cupy.ones((1, 3, 1, 1), cupy.float32)
    rm, rv = cupy.zeros(3, cupy.float32), cupy.ones(3, cupy.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.batch_norm(x, rm, rv, training=True)
    with pytest.raises(TypeError, match="weight has dtype float16"):
        bn.batch_norm(cupy.ones((2, 3), cupy.float32), rm, rv, cupy.ones(3, cupy.float16))
    assert bool((rm == 0).all()) and bool((rv == 1).all())
