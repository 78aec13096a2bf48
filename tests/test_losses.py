"""Losses (cross-entropy, NLL, MSE), forward and backward: against PyTorch (CPU, float64
autograd), the NumPy reference, float64 finite differences; every reduction, label smoothing,
ignore_index, extreme logits, odd shapes, bad input; GPU tests for every dtype."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn.bench import harness
from gpunn.bench import losses as bench_losses
from gpunn.ops.losses import (cross_entropy, cross_entropy_backward, cross_entropy_forward,
                              mse_loss, mse_loss_backward, nll_loss, nll_loss_backward)
from conftest import HOST_BACKENDS, TOLERANCE, assert_close, rel_err, sim_size

REDUCTIONS = ("none", "mean", "sum")
CE_SHAPES = [(0, 5), (1, 1), (4, 1), (7, 13), (3, 7), (33, 100), (5, 1021), (2, 32768)]
IGNORE = -100


# --- helpers ----------------------------------------------------------------------------------


def make_labels(rng, rows, n, dtype="int64", ignore=IGNORE, ignored=0.25):
    """Labels in [0, n) with about a quarter of the rows set to ``ignore``."""
    y = rng.integers(0, max(n, 1), rows)
    y[rng.random(rows) < ignored] = ignore
    if n == 0:
        y[:] = ignore
    return y.astype(dtype)


def make_dloss(rng, reduction, rows, dtype, one_d=False):
    if reduction == "none":
        shape = () if one_d else (rows,)
        return ((1 + rng.random(shape)) * np.where(rng.random(shape) < 0.5, -1, 1)).astype(dtype)
    return np.asarray(rng.uniform(0.5, 2.0), dtype=dtype)


def torch_ce(x, y, reduction, eps, ignore, dloss):
    """PyTorch's loss and d loss / d x (float64 autograd on the same values)."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    loss = F.cross_entropy(xt, torch.tensor(np.asarray(y, np.int64)), reduction=reduction,
                           label_smoothing=eps, ignore_index=ignore)
    (dx,) = torch.autograd.grad(loss, xt, torch.tensor(np.asarray(dloss, np.float64)))
    return loss.detach().numpy(), dx.numpy()


def torch_nll(v, y, reduction, ignore, dloss):
    vt = torch.tensor(np.asarray(v, np.float64), requires_grad=True)
    loss = F.nll_loss(vt, torch.tensor(np.asarray(y, np.int64)), reduction=reduction,
                      ignore_index=ignore)
    (dv,) = torch.autograd.grad(loss, vt, torch.tensor(np.asarray(dloss, np.float64)))
    return loss.detach().numpy(), dv.numpy()


def torch_mse(x, t, reduction, dloss):
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    loss = F.mse_loss(xt, torch.tensor(np.asarray(t, np.float64)), reduction=reduction)
    (dx,) = torch.autograd.grad(loss, xt, torch.tensor(np.asarray(dloss, np.float64)))
    return loss.detach().numpy(), dx.numpy()


def check_loss(out, ref, dtype):
    """A loss (any shape) against the oracle: same shape, NaN where it is NaN, else close."""
    out = np.asarray(out)
    assert out.shape == np.shape(ref) and out.dtype == np.dtype(dtype)
    assert_close(out, ref, dtype)


# --- cross-entropy against torch --------------------------------------------------------------


@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_cross_entropy_matches_torch(backend, dtype, shape, rng):
    """Every reduction, with and without label smoothing, both label dtypes; the backward with
    and without the forward's lse."""
    rows, n = shape
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    for k, reduction in enumerate(REDUCTIONS):
        eps = (0.0, 0.1)[k % 2] if n > 1 else 0.0
        y = make_labels(rng, rows, n, ("int32", "int64")[k % 2])
        dloss = make_dloss(rng, reduction, rows, dtype)
        loss_ref, dx_ref = torch_ce(x, y, reduction, eps, IGNORE, dloss)

        loss = cross_entropy(x, y, reduction, eps, backend=backend)
        check_loss(loss, loss_ref, dtype)
        loss2, lse = cross_entropy_forward(x, y, reduction, eps, backend=backend)
        assert np.array_equal(loss2, loss, equal_nan=True)
        assert lse.dtype == np.float64 and lse.shape == (rows,)
        if n:
            lse_ref = torch.logsumexp(torch.tensor(x, dtype=torch.float64), 1).numpy()
            assert_close(lse, lse_ref, dtype)

        dx = cross_entropy_backward(dloss, x, y, reduction, eps, backend=backend)
        assert dx.dtype == np.dtype(dtype) and dx.shape == shape
        assert_close(dx, dx_ref, dtype)
        dx_lse = cross_entropy_backward(dloss, x, y, reduction, eps, backend=backend, lse=lse)
        assert_close(dx_lse, dx_ref, dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0])
def test_cross_entropy_ignore_index_and_smoothing(backend, eps, rng):
    """ignore_index a real class (2), and the default; smoothing up to 1; float scalar dloss."""
    x = rng.standard_normal((50, 6)).astype(np.float32)
    for ignore in (2, IGNORE):
        y = make_labels(rng, 50, 6, ignore=ignore, ignored=0.3)
        for reduction in ("mean", "sum"):
            loss_ref, dx_ref = torch_ce(x, y, reduction, eps, ignore, 0.75)
            loss = cross_entropy(x, y, reduction, eps, ignore, backend=backend)
            check_loss(loss, loss_ref, "float32")
            dx = cross_entropy_backward(0.75, x, y, reduction, eps, ignore, backend=backend)
            assert_close(dx, dx_ref, "float32")
            assert np.all(dx[y == ignore] == 0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_rows_ignored(backend, eps, rng):
    """mean is 0/0 = NaN, sum 0, "none" zeros; gradients 0 (as torch); NaN logits in ignored
    rows are not read."""
    x = rng.standard_normal((4, 5)).astype(np.float32)
    y = np.full(4, IGNORE)
    for reduction in REDUCTIONS:
        dloss = make_dloss(rng, reduction, 4, "float32")
        loss_ref, dx_ref = torch_ce(x, y, reduction, eps, IGNORE, dloss)
        loss = cross_entropy(x, y, reduction, eps, backend=backend)
        check_loss(loss, loss_ref, "float32")
        dx = cross_entropy_backward(dloss, x, y, reduction, eps, backend=backend)
        assert np.array_equal(dx, dx_ref) and np.all(dx == 0)
    assert np.isnan(cross_entropy(x, y, backend=backend))
    x[1, 2] = np.nan
    assert cross_entropy(x, y, "sum", eps, backend=backend) == 0
    assert np.all(cross_entropy_backward(1.0, x, y, "sum", eps, backend=backend) == 0)
    y[0] = 3  # one used row: the NaN row is still ignored
    assert np.isfinite(cross_entropy(x, y, backend=backend))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_no_classes(backend):
    """C = 0 with every row ignored, as torch: sum 0, mean NaN, lse -inf, empty gradient."""
    x = np.empty((3, 0), np.float32)
    y = np.full(3, IGNORE)
    for reduction in REDUCTIONS:
        loss_ref, _ = torch_ce(x, y, reduction, 0.0, IGNORE, make_dloss(
            np.random.default_rng(0), reduction, 3, "float32"))
        loss, lse = cross_entropy_forward(x, y, reduction, backend=backend)
        check_loss(loss, loss_ref, "float32")
        assert np.all(lse == -np.inf)
    assert cross_entropy_backward(1.0, x, y, "sum", backend=backend).shape == (3, 0)
    with pytest.raises(IndexError, match=r"labels\[0\] = 0 is out of range \[0, 0\)"):
        cross_entropy(x, np.zeros(3, np.int64), backend=backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_extreme_logits_match_torch(backend, dtype, eps):
    """Logits near +-1e4 (no cancellation), -inf entries (at the label: loss inf), +-1e30,
    rows of all -inf and rows with +inf or NaN (NaN, as torch)."""
    x = np.array([
        [1e4, 1e4 - 1, 1e4 + 2, 1e4 - 30],
        [-1e4, -1e4 + 3, -1e4 - 1, -1e4 + 0.5],
        [1e4, -1e4, 0.0, 1.0],
        [0.0, -np.inf, 1.0, 2.0],
        [-np.inf, 0.0, 1.0, 2.0],
        [1e30, -1e30, 0.0, 1.0],
        [-np.inf, -np.inf, -np.inf, -np.inf],
        [np.inf, 0.0, 1.0, 2.0],
        [np.nan, 0.0, 1.0, 2.0],
    ]).astype(dtype)
    y = np.array([2, 0, 1, 2, 0, 1, 3, 1, 2])
    dloss = np.linspace(0.5, 1.5, len(y)).astype(dtype)
    loss_ref, dx_ref = torch_ce(x, y, "none", eps, IGNORE, dloss)
    loss, lse = cross_entropy_forward(x, y, "none", eps, backend=backend)
    dx = cross_entropy_backward(dloss, x, y, "none", eps, backend=backend)
    dx_lse = cross_entropy_backward(dloss, x, y, "none", eps, backend=backend, lse=lse)
    rtol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(loss, loss_ref, rtol=rtol, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(dx_lse, dx_ref, rtol=rtol, atol=1e-6, equal_nan=True)
    assert np.isfinite(loss[:3]).all() and np.isnan(loss[6:]).all()
    assert loss[4] == np.inf  # -inf at the label


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_one_dimensional_logits(backend, rng):
    x = rng.standard_normal(9).astype(np.float32)
    for reduction in REDUCTIONS:
        y = np.array(4)
        dloss = make_dloss(rng, reduction, 1, "float32", one_d=True)
        loss_ref, dx_ref = torch_ce(x, y, reduction, 0.1, IGNORE, dloss)
        loss = cross_entropy(x, y, reduction, 0.1, backend=backend)
        check_loss(loss, loss_ref, "float32")
        dx = cross_entropy_backward(dloss, x, y, reduction, 0.1, backend=backend)
        assert dx.shape == (9,)
        assert_close(dx, dx_ref, "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_accumulation_over_a_million_rows(backend, rng):
    """float32 mean over 10^6 rows stays at float32 accuracy (float64 partial sums)."""
    x = (4 * rng.standard_normal((10**6, 3))).astype(np.float32)
    y = rng.integers(0, 3, 10**6)
    exact, _ = torch_ce(x, y, "mean", 0.0, IGNORE, 1.0)
    assert rel_err(cross_entropy(x, y, backend=backend), exact) < 1e-6
    t = rng.standard_normal(x.shape).astype(np.float32)
    exact = np.mean((x.astype(np.float64) - t) ** 2)
    assert rel_err(mse_loss(x, t, backend=backend), exact) < 1e-6


def test_deterministic_cpu(rng):
    x = rng.standard_normal((2000, 300)).astype(np.float32)
    y = make_labels(rng, 2000, 300)
    t = rng.standard_normal(x.shape).astype(np.float32)
    for f in (lambda: cross_entropy(x, y, "sum", 0.1), lambda: mse_loss(x, t, "sum"),
              lambda: cross_entropy_backward(1.0, x, y, "mean")):
        runs = [f() for _ in range(3)]
        assert all(np.array_equal(r, runs[0]) for r in runs)


def test_backward_in_place_and_out(rng):
    x = rng.standard_normal((6, 11)).astype(np.float32)
    y = make_labels(rng, 6, 11)
    ref = cross_entropy_backward(1.0, x, y, "sum", backend="numpy")
    out = np.empty_like(x)
    assert cross_entropy_backward(1.0, x, y, "sum", out=out) is out
    assert_close(out, ref, "float32")
    loss, lse = cross_entropy_forward(x, y, "sum")
    xc = x.copy()
    assert cross_entropy_backward(1.0, xc, y, "sum", out=xc, lse=lse) is xc  # dx over x
    assert_close(xc, ref, "float32")


# --- NLL and MSE against torch ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 13), (40, 1000)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nll_matches_torch(backend, dtype, shape, rng):
    rows, n = shape
    v = rng.standard_normal(shape).astype(dtype)
    for k, reduction in enumerate(REDUCTIONS):
        y = make_labels(rng, rows, n, ("int32", "int64")[k % 2])
        dloss = make_dloss(rng, reduction, rows, dtype)
        loss_ref, dv_ref = torch_nll(v, y, reduction, IGNORE, dloss)
        check_loss(nll_loss(v, y, reduction, backend=backend), loss_ref, dtype)
        dv = nll_loss_backward(dloss, v, y, reduction, backend=backend)
        assert dv.dtype == np.dtype(dtype)
        assert_close(dv, dv_ref, dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_log_softmax_then_nll_is_cross_entropy(backend, rng):
    from gpunn.ops.softmax import log_softmax, log_softmax_backward

    x = rng.standard_normal((20, 30))
    y = make_labels(rng, 20, 30)
    logp = log_softmax(x, backend=backend)
    assert_close(nll_loss(logp, y, backend=backend), cross_entropy(x, y, backend=backend),
                 "float64")
    dlogp = nll_loss_backward(1.0, logp, y, backend=backend)
    assert_close(log_softmax_backward(dlogp, logp, backend=backend),
                 cross_entropy_backward(1.0, x, y, backend=backend), "float64")


@pytest.mark.parametrize("n", [0, 1, 7, 1021, 65537, (3, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_mse_matches_torch(backend, dtype, n, rng):
    x = rng.standard_normal(n).astype(dtype)
    t = rng.standard_normal(n).astype(dtype)
    for reduction in REDUCTIONS:
        dloss = ((1 + rng.random(x.shape)).astype(dtype) if reduction == "none"
                 else np.asarray(1.5, dtype))
        loss_ref, dx_ref = torch_mse(x, t, reduction, dloss)
        check_loss(mse_loss(x, t, reduction, backend=backend), loss_ref, dtype)
        dx = mse_loss_backward(dloss, x, t, reduction, backend=backend)
        assert dx.shape == x.shape and dx.dtype == np.dtype(dtype)
        assert_close(dx, dx_ref, dtype)
    assert_close(mse_loss_backward(2.0, x, t, "sum", backend=backend),
                 torch_mse(x, t, "sum", 2.0)[1], dtype)


# --- finite differences (float64, the reference backward) -------------------------------------


def _fd_check(f, backward_dx, x, rng, h=1e-6):
    """<dx, v> equals the directional derivative of f along random v."""
    v = rng.standard_normal(x.shape)
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert abs(np.sum(backward_dx * v) - fd) <= 1e-7 * max(1.0, abs(fd))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_reference_cross_entropy_backward_matches_finite_differences(reduction, eps, rng):
    x = 2 * rng.standard_normal((8, 17))
    y = make_labels(rng, 8, 17)
    dloss = make_dloss(rng, reduction, 8, "float64")

    def f(z):
        return float(np.sum(dloss * cross_entropy(z, y, reduction, eps, backend="numpy")))

    dx = cross_entropy_backward(dloss, x, y, reduction, eps, backend="numpy")
    _fd_check(f, dx, x, rng)
    _, lse = cross_entropy_forward(x, y, reduction, eps, backend="numpy")
    _fd_check(f, cross_entropy_backward(dloss, x, y, reduction, eps, backend="numpy", lse=lse),
              x, rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_nll_and_mse_backward_match_finite_differences(reduction, rng):
    v = rng.standard_normal((8, 5))
    y = make_labels(rng, 8, 5)
    dloss = make_dloss(rng, reduction, 8, "float64")
    _fd_check(lambda z: float(np.sum(dloss * nll_loss(z, y, reduction, backend="numpy"))),
              nll_loss_backward(dloss, v, y, reduction, backend="numpy"), v, rng)
    x, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    g = rng.standard_normal(x.shape) if reduction == "none" else np.asarray(0.7)
    _fd_check(lambda z: float(np.sum(g * mse_loss(z, t, reduction, backend="numpy"))),
              mse_loss_backward(g, x, t, reduction, backend="numpy"), x, rng)


# --- the CPU kernels against the reference (property tests) -----------------------------------


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 12), n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([0.1, 3.0, 100.0]), reduction=st.sampled_from(REDUCTIONS),
       eps=st.sampled_from([0.0, 0.05, 0.5, 1.0]), ignore=st.sampled_from([IGNORE, 0, 5]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_cpu_agrees_with_reference(rows, n, seed, scale, reduction, eps, ignore, dtype):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((rows, n))).astype(dtype)
    y = make_labels(rng, rows, n, ignore=ignore)
    dloss = make_dloss(rng, reduction, rows, dtype)
    tol = 50 * TOLERANCE[dtype]
    loss_cpu, lse_cpu = cross_entropy_forward(x, y, reduction, eps, ignore, backend="cpu")
    loss_ref, lse_ref = cross_entropy_forward(x, y, reduction, eps, ignore, backend="numpy")
    assert rel_err(loss_cpu, loss_ref) <= tol
    assert rel_err(lse_cpu, lse_ref) <= tol
    dx_ref = cross_entropy_backward(dloss, x, y, reduction, eps, ignore, backend="numpy")
    for lse in (None, lse_cpu):
        dx = cross_entropy_backward(dloss, x, y, reduction, eps, ignore, backend="cpu", lse=lse)
        assert rel_err(dx, dx_ref) <= tol
    if rows:  # softmax rows of the gradient: sum_j dx_ij = 0 (sum of p - q)
        used = y != ignore
        w = np.abs(np.asarray(dloss, np.float64)).max()
        assert np.all(np.abs(dx_ref[used].sum(axis=1)) <= 1e-4 * w * max(1, n) ** 0.5)
    assert rel_err(nll_loss(x, y, reduction, ignore, backend="cpu"),
                   nll_loss(x, y, reduction, ignore, backend="numpy")) <= tol
    assert rel_err(nll_loss_backward(dloss, x, y, reduction, ignore, backend="cpu"),
                   nll_loss_backward(dloss, x, y, reduction, ignore, backend="numpy")) <= tol


@settings(max_examples=30, deadline=None)
@given(size=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1),
       reduction=st.sampled_from(REDUCTIONS), dtype=st.sampled_from(["float32", "float64"]))
def test_cpu_mse_agrees_with_reference(size, seed, reduction, dtype):
    rng = np.random.default_rng(seed)
    x, t = (rng.standard_normal((2, size)) * 10).astype(dtype)
    g = rng.standard_normal(size).astype(dtype) if reduction == "none" else np.asarray(-0.5, dtype)
    tol = 10 * TOLERANCE[dtype]
    assert rel_err(mse_loss(x, t, reduction, backend="cpu"),
                   mse_loss(x, t, reduction, backend="numpy")) <= tol
    assert rel_err(mse_loss_backward(g, x, t, reduction, backend="cpu"),
                   mse_loss_backward(g, x, t, reduction, backend="numpy")) <= tol


# --- array types ------------------------------------------------------------------------------


def test_torch_tensors_in_and_out(rng):
    x = torch.randn(6, 10)
    y = torch.tensor([1, 2, -100, 9, 0, 3])
    loss = cross_entropy(x, y, label_smoothing=0.1)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, F.cross_entropy(x.double(), y, label_smoothing=0.1), "float32")
    loss, lse = cross_entropy_forward(x, y.int(), "none")
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float64
    dx = cross_entropy_backward(torch.ones(6), x, y, "none", lse=lse)
    assert isinstance(dx, torch.Tensor) and dx.shape == x.shape
    t = torch.randn(6, 10)
    assert isinstance(mse_loss(x, t), torch.Tensor)
    assert isinstance(nll_loss_backward(torch.tensor(1.0), x, y), torch.Tensor)


def test_zero_dimensional_outputs_are_arrays(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = np.array([0, 1, 2])
    for f in (lambda r: cross_entropy(x, y, r), lambda r: nll_loss(x, y, r),
              lambda r: mse_loss(x, x + 1, r)):
        for r in ("mean", "sum"):
            out = f(r)
            assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.float32


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bad_labels_raise_and_change_nothing(backend, rng):
    x = rng.standard_normal((5, 4)).astype(np.float32)
    out = np.full_like(x, 7.0)
    for bad in (4, -1, -101):
        y = np.array([0, IGNORE, 3, bad, 1])
        with pytest.raises(IndexError, match=rf"labels\[3\] = {bad} is out of range \[0, 4\)"):
            cross_entropy(x, y, backend=backend)
        with pytest.raises(IndexError, match="labels"):
            cross_entropy_backward(1.0, x, y, out=out, backend=backend)
        with pytest.raises(IndexError, match="labels"):
            nll_loss(x, y, backend=backend)
        with pytest.raises(IndexError, match="labels"):
            nll_loss_backward(1.0, x, y, out=out, backend=backend)
    assert np.all(out == 7.0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_unchecked_bad_labels_give_nan_rows(backend, rng):
    """check_labels=False: the bad row's loss and gradient are NaN, the others exact."""
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = np.array([1, 9, IGNORE, 5])
    loss = cross_entropy(x, y, "none", check_labels=False, backend=backend)
    assert np.isnan(loss[1]) and loss[2] == 0 and np.isfinite(loss[[0, 3]]).all()
    assert np.isnan(cross_entropy(x, y, check_labels=False, backend=backend))
    dx = cross_entropy_backward(1.0, x, y, "sum", check_labels=False, backend=backend)
    assert np.isnan(dx[1]).all() and np.all(dx[2] == 0) and np.isfinite(dx[[0, 3]]).all()
    assert np.isnan(nll_loss(x, y, "none", check_labels=False, backend=backend)[1])
    dv = nll_loss_backward(1.0, x, y, "sum", check_labels=False, backend=backend)
    assert np.isnan(dv[1]).all() and np.isfinite(dv[[0, 2, 3]]).all()


def test_bad_arguments_name_themselves(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = np.array([0, 1, 2])
    out = np.full_like(x, 7.0)
    cases = [
        (TypeError, "labels must be int32 or int64",
         lambda: cross_entropy(x, y.astype(np.float32))),
        (TypeError, "labels must be int32 or int64", lambda: nll_loss(x, y.astype(np.int16))),
        (ValueError, r"labels has shape \(2,\), expected \(3,\)", lambda: cross_entropy(x, y[:2])),
        (ValueError, r"labels has shape \(3,\), expected \(\)",
         lambda: cross_entropy(x[0], y)),
        (ValueError, r"logits must have shape \(N, C\) or \(C,\)",
         lambda: cross_entropy(x[None], y)),
        (ValueError, "label_smoothing must be in",
         lambda: cross_entropy(x, y, label_smoothing=1.5)),
        (ValueError, "label_smoothing must be in",
         lambda: cross_entropy(x, y, label_smoothing=-0.1)),
        (ValueError, "label_smoothing must be in",
         lambda: cross_entropy(x, y, label_smoothing=float("nan"))),
        (TypeError, "label_smoothing must be a real number",
         lambda: cross_entropy(x, y, "mean", "0.1")),
        (ValueError, "reduction must be one of", lambda: cross_entropy(x, y, "avg")),
        (ValueError, "reduction must be one of", lambda: mse_loss(x, x, "elementwise_mean")),
        (TypeError, "ignore_index must be an int", lambda: cross_entropy(x, y, ignore_index=1.5)),
        (ValueError, r"dloss has shape \(\), expected \(3,\)",
         lambda: cross_entropy_backward(np.asarray(1.0, np.float32), x, y, "none", out=out)),
        (ValueError, r"dloss has shape \(3,\), expected \(\)",
         lambda: cross_entropy_backward(np.ones(3, np.float32), x, y, "mean", out=out)),
        (TypeError, "dloss has dtype float64, expected float32",
         lambda: cross_entropy_backward(np.ones(3), x, y, "none", out=out)),
        (ValueError, "lse must be the float64 array",
         lambda: cross_entropy_backward(1.0, x, y, out=out, lse=np.zeros(2))),
        (ValueError, r"out has shape \(4, 3\)",
         lambda: cross_entropy_backward(1.0, x, y, out=np.empty((4, 3), np.float32))),
        (ValueError, r"target has shape \(3, 3\), expected \(3, 4\)",
         lambda: mse_loss(x, x[:, :3])),
        (TypeError, "target has dtype float64, expected float32",
         lambda: mse_loss_backward(1.0, x, x.astype(np.float64), out=out)),
        (TypeError, "logits has dtype int64", lambda: cross_entropy(y[:, None], y)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    assert np.all(out == 7.0)


def test_nan_in_logits_propagates(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    x[1, 4] = np.nan
    y = np.array([0, 1, 2])
    for backend in HOST_BACKENDS:
        assert np.isnan(cross_entropy(x, y, backend=backend))
        dx = cross_entropy_backward(1.0, x, y, backend=backend)
        assert np.isnan(dx[1]).all() and np.isfinite(dx[[0, 2]]).all()


# --- the benchmark suite ---------------------------------------------------------------------


def test_bench_suite_runs_and_checks(rng):
    """Quick mode on tiny cases: every contender runs, passes its check against the
    reference, and the records carry bytes, bandwidth and the speed-up over torch."""
    records = bench_losses.run(bench_losses.Options(quick=True, shapes=[(16, 50)],
                                                    sizes=[2048], progress=False))
    groups = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    assert {(k[2], k[3]) for k in groups} == {(op, d) for op in bench_losses.OPS
                                              for d in ("forward", "backward")}
    for key, group in groups.items():
        impls = {r.impl: r for r in group}
        assert {"gpunn cpu", "numpy", "torch", "limit"} <= set(impls), key
        for r in group:
            assert r.status == "ok", (key, r.impl, r.note)
            assert r.median_s > 0 and r.bytes > 0
            if r.role != "limit":
                assert harness.passes(r.error, 1e-3)
                assert r.speedup_vs_torch == pytest.approx(impls["torch"].median_s / r.median_s)
    ce_backward = groups[("losses", "cpu", "cross_entropy", "backward", (16, 50), "float32")]
    assert "gpunn cpu lse" in {r.impl for r in ce_backward}
    assert ce_backward[0].bytes == 2 * 16 * 50 * 4 + 16 * 8
    assert bench_losses.parse_shapes("4096x1000, 2x32K") == [(4096, 1000), (2, 32768)]


# --- GPU: every dtype, every launch shape -----------------------------------------------------

GPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]
#: Rows of every launch: 4, 8, 16 and 32 held items per thread (n = 7, 200, 1000, 32768), the
#: long-row kernel (32769 and more), several blocks per row set (4000 rows).
GPU_SHAPES = [(1, 1), (3, 7), (33, 100), (6, 200), (9, 1000), (17, 1024), (5, 1025), (8, 4096),
              (3, 8193), (2, 32768), (2, 32769), (1, 200003), (4000, 64)]


def _device(cupy, a, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return cupy.asarray(np.asarray(a).astype(ml_dtypes.bfloat16))
    return cupy.asarray(np.asarray(a).astype(dtype))


def _host64(cupy, a):
    return cupy.asnumpy(a).astype(np.float64)


def _rounded(ref, dtype):
    """A float64 reference loss rounded to the output dtype (a float16 sum of 10^6 squares
    overflows to inf, as torch's does)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(ref, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
    with np.errstate(over="ignore"):
        return np.asarray(ref, np.float64).astype(dtype).astype(np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_cross_entropy_matches_reference(dtype, shape, rng):
    """Every reduction, smoothing and ignore, both label dtypes, with and without lse, against
    the float64 reference on the same (rounded) inputs; the four held-items kernels and the
    long-row kernel."""
    cupy = pytest.importorskip("cupy")
    rows, n = shape
    x = _device(cupy, 4 * rng.standard_normal(shape), dtype)
    xh = _host64(cupy, x)
    for k, reduction in enumerate(REDUCTIONS):
        eps = (0.0, 0.1, 0.3)[k]
        yh = make_labels(rng, rows, n, ("int32", "int64")[k % 2])
        y = cupy.asarray(yh)
        dh = make_dloss(rng, reduction, rows, "float32")
        d = _device(cupy, dh, dtype)
        dh = _host64(cupy, d)
        loss, lse = cross_entropy_forward(x, y, reduction, eps, backend="cuda")
        loss_ref, lse_ref = cross_entropy_forward(xh, yh, reduction, eps, backend="numpy")
        assert loss.dtype == x.dtype and loss.shape == np.shape(loss_ref)
        assert_close(_host64(cupy, loss), _rounded(loss_ref, dtype), dtype)
        assert_close(cupy.asnumpy(lse), lse_ref, "float32" if dtype != "float64" else dtype)
        assert_close(_host64(cupy, cross_entropy(x, y, reduction, eps)), _rounded(loss_ref, dtype),
                     dtype)
        dx_ref = cross_entropy_backward(dh, xh, yh, reduction, eps, backend="numpy")
        for saved in (None, lse):
            out = cupy.full(x.shape, np.nan, x.dtype)
            cross_entropy_backward(d, x, y, reduction, eps, out=out, lse=saved)
            assert_close(_host64(cupy, out), dx_ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_cross_entropy_scalar_dloss_and_ignored(dtype, rng):
    cupy = pytest.importorskip("cupy")
    x = _device(cupy, rng.standard_normal((300, 50)), dtype)
    xh = _host64(cupy, x)
    for ignore in (2, IGNORE):
        yh = make_labels(rng, 300, 50, ignore=ignore, ignored=0.5)
        y = cupy.asarray(yh)
        for reduction in ("mean", "sum"):
            dx = cross_entropy_backward(0.75, x, y, reduction, 0.1, ignore)
            ref = cross_entropy_backward(0.75, xh, yh, reduction, 0.1, ignore, backend="numpy")
            assert_close(_host64(cupy, dx), ref, dtype)
            assert bool((_host64(cupy, dx)[yh == ignore] == 0).all())
    y = cupy.full(300, IGNORE)
    assert np.isnan(_host64(cupy, cross_entropy(x, y)))
    assert _host64(cupy, cross_entropy(x, y, "sum")) == 0
    assert not _host64(cupy, cross_entropy_backward(1.0, x, y)).any()


@pytest.mark.gpu
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cuda_extreme_logits_match_torch(eps):
    x = torch.tensor([
        [1e4, 1e4 - 1, 1e4 + 2, 1e4 - 30],
        [-1e4, -1e4 + 3, -1e4 - 1, -1e4 + 0.5],
        [0.0, -np.inf, 1.0, 2.0],
        [-np.inf, 0.0, 1.0, 2.0],
        [1e30, -1e30, 0.0, 1.0],
        [-np.inf, -np.inf, -np.inf, -np.inf],
        [np.inf, 0.0, 1.0, 2.0],
        [np.nan, 0.0, 1.0, 2.0],
    ], dtype=torch.float32, device="cuda")
    y = torch.tensor([2, 0, 2, 0, 1, 3, 1, 2], device="cuda")
    dloss = torch.linspace(0.5, 1.5, 8, device="cuda")
    loss, lse = cross_entropy_forward(x, y, "none", eps)
    assert isinstance(loss, torch.Tensor) and loss.is_cuda
    loss_ref, dx_ref = torch_ce(x.cpu().numpy(), y.cpu().numpy(), "none", eps, IGNORE,
                                dloss.cpu().numpy())
    np.testing.assert_allclose(loss.cpu(), loss_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    for saved in (None, lse):
        dx = cross_entropy_backward(dloss, x, y, "none", eps, lse=saved)
        np.testing.assert_allclose(dx.cpu(), dx_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
    for n in (40000,):  # the long-row kernel on 1e4-scale logits
        xl = (1e4 + torch.randn(3, n, device="cuda", dtype=torch.float64)).float()
        yl = torch.tensor([0, 5, n - 1], device="cuda")
        ref, _ = torch_ce(xl.cpu().numpy(), yl.cpu().numpy(), "none", eps, IGNORE, np.ones(3))
        assert_close(cross_entropy(xl, yl, "none", eps).cpu(), ref, "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (7, 13), (100, 1000), (3, 50000)], ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_nll_matches_reference(dtype, shape, rng):
    cupy = pytest.importorskip("cupy")
    rows, n = shape
    v = _device(cupy, rng.standard_normal(shape), dtype)
    vh = _host64(cupy, v)
    for k, reduction in enumerate(REDUCTIONS):
        yh = make_labels(rng, rows, n, ("int32", "int64")[k % 2])
        y = cupy.asarray(yh)
        d = _device(cupy, make_dloss(rng, reduction, rows, "float32"), dtype)
        loss = nll_loss(v, y, reduction)
        loss_ref = nll_loss(vh, yh, reduction, backend="numpy")
        assert loss.dtype == v.dtype
        assert_close(_host64(cupy, loss), _rounded(loss_ref, dtype), dtype)
        out = cupy.full(v.shape, np.nan, v.dtype)
        nll_loss_backward(d, v, y, reduction, out=out)
        assert_close(_host64(cupy, out),
                     nll_loss_backward(_host64(cupy, d), vh, yh, reduction, backend="numpy"),
                     dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 7, 1021, 16384, 65537, 10**6 + 3], ids=str)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_mse_matches_reference(dtype, n, rng):
    cupy = pytest.importorskip("cupy")
    x = _device(cupy, 3 * rng.standard_normal(n), dtype)
    t = _device(cupy, rng.standard_normal(n), dtype)
    xh, th = _host64(cupy, x), _host64(cupy, t)
    for reduction in REDUCTIONS:
        gh = rng.standard_normal(n) if reduction == "none" else np.asarray(1.5)
        g = _device(cupy, gh, dtype)
        gh = _host64(cupy, g)
        loss = mse_loss(x, t, reduction)
        assert loss.dtype == x.dtype
        assert_close(_host64(cupy, loss),
                     _rounded(mse_loss(xh, th, reduction, backend="numpy"), dtype), dtype)
        for dloss, dloss_h in ((g, gh), (1.5, 1.5)) if reduction != "none" else ((g, gh),):
            out = cupy.full(x.shape, np.nan, x.dtype)
            mse_loss_backward(dloss, x, t, reduction, out=out)
            # against the reference rounded to the dtype: a float16 mean's gradient at a
            # million elements is subnormal (spacing 6e-8 on values of ~3e-6)
            assert_close(_host64(cupy, out), _rounded(
                mse_loss_backward(dloss_h, xh, th, reduction, backend="numpy"), dtype), dtype)
    if n > 1:  # unaligned views: the scalar paths
        xs, ts = x[1:], t[1:]
        assert_close(_host64(cupy, mse_loss(xs, ts, "sum")),
                     _rounded(mse_loss(xh[1:], th[1:], "sum", backend="numpy"), dtype), dtype)


@pytest.mark.gpu
def test_cuda_bad_labels(rng):
    cupy = pytest.importorskip("cupy")
    x = cupy.asarray(rng.standard_normal((5, 4)).astype(np.float32))
    out = cupy.full(x.shape, 7.0, cupy.float32)
    for ltype in (cupy.int32, cupy.int64):
        y = cupy.asarray([0, IGNORE, 3, 4, -1], dtype=ltype)
        with pytest.raises(IndexError, match=r"labels\[3\] = 4 is out of range \[0, 4\)"):
            cross_entropy(x, y)
        with pytest.raises(IndexError, match=r"labels\[3\] = 4"):
            cross_entropy_backward(1.0, x, y, out=out)
        with pytest.raises(IndexError, match=r"labels\[3\] = 4"):
            nll_loss_backward(1.0, x, y, out=out)
        assert bool((out == 7.0).all())
        loss = cupy.asnumpy(cross_entropy(x, y, "none", check_labels=False))
        assert np.isnan(loss[[3, 4]]).all() and loss[1] == 0 and np.isfinite(loss[[0, 2]]).all()
        dx = cupy.asnumpy(cross_entropy_backward(1.0, x, y, "sum", check_labels=False))
        assert np.isnan(dx[[3, 4]]).all() and np.all(dx[1] == 0) and np.isfinite(dx[[0, 2]]).all()
        dv = cupy.asnumpy(nll_loss_backward(1.0, x, y, "sum", check_labels=False))
        assert np.isnan(dv[[3, 4]]).all() and np.isfinite(dv[[0, 1, 2]]).all()


@pytest.mark.gpu
def test_cuda_deterministic_and_accurate(rng):
    cupy = pytest.importorskip("cupy")
    from gpunn.ops.losses.cuda import ROW_CHUNK

    n = sim_size(10**6, 5 * ROW_CHUNK + 11)  # simulated: still 6 partial sums of row losses
    x = cupy.asarray((4 * rng.standard_normal((n, 5))).astype(np.float32))
    y = cupy.asarray(make_labels(rng, n, 5))
    t = cupy.asarray(rng.standard_normal((n, 5)).astype(np.float32))
    for f in (lambda: cross_entropy(x, y, "mean", 0.1), lambda: mse_loss(x, t),
              lambda: cross_entropy_backward(1.0, x, y)):
        runs = [f() for _ in range(3)]
        assert all(bool((r == runs[0]).all()) for r in runs)
    exact = cross_entropy(cupy.asnumpy(x).astype(np.float64), cupy.asnumpy(y), "mean", 0.1,
                          backend="numpy")
    assert rel_err(cupy.asnumpy(cross_entropy(x, y, "mean", 0.1)), exact) < 1e-6


@pytest.mark.gpu
def test_cuda_torch_tensors_and_float_dloss():
    x = torch.randn(64, 3000, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 3000, (64,), device="cuda")
    loss = cross_entropy(x, y, label_smoothing=0.1)
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.bfloat16 and loss.shape == ()
    ref = F.cross_entropy(x.double(), y, label_smoothing=0.1)
    assert abs(float(loss) - float(ref)) <= 1e-2 * abs(float(ref))
    xr = x.double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.cross_entropy(xr, y, label_smoothing=0.1), xr)
    for dloss in (1.0, torch.tensor(1.0, device="cuda", dtype=torch.bfloat16)):
        dx = cross_entropy_backward(dloss, x, y, label_smoothing=0.1)
        assert dx.dtype == torch.bfloat16
        assert rel_err(dx.double().cpu(), dx_ref.cpu()) < 1e-2
