"""Augmentation: the affine warp against PyTorch's affine_grid + grid_sample, the matrices
against the documented Philox stream (parameters recovered from the matrices), the fused op
against warp(random_affine), determinism and batch independence, the geometry's directions,
statistics of the draws, torch tensors, bad input, and the GPU in every dtype."""

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn import philox
from gpunn.ops.augment import affine_warp, augment, random_affine
from conftest import HOST_BACKENDS, TOLERANCE, assert_close, rel_err

A = importlib.import_module("gpunn.ops.augment")

SEED = 0x0123456789ABCDEF
#: Every transformation on.
OPTIONS = dict(degrees=30.0, translate=(0.1, 0.2), scale=(0.8, 1.25), stretch=0.2, shear=10.0,
               flip_p=0.5)
SHAPES = [(0, 3, 5, 7), (1, 1, 1, 1), (3, 1, 1, 1), (4, 3, 17, 23), (5, 31, 29), (2, 3, 8, 40),
          (3, 2, 37, 6), (2, 1, 1, 13), (6, 1, 13), (2, 2, 9, 300)]


def torch_warp(x, theta):
    """PyTorch's affine_grid + grid_sample (align_corners=False), on the CPU (which refuses
    empty batches: their result is the empty array of x's shape)."""
    if x.size == 0:
        return np.empty_like(x)
    xt, tt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(theta)
    x4 = xt if xt.ndim == 4 else xt[:, None]
    grid = F.affine_grid(tt, list(x4.shape), align_corners=False)
    y = F.grid_sample(x4, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (y if xt.ndim == 4 else y[:, 0]).numpy()


def assert_warp_close(out, ref, dtype, shape):
    """assert_close, with float32's bound widened for large images: float32 coordinates are
    rounded to about 2^-24 max(H, W) pixels, which on images of independent values (gradients
    of order 1) is a relative error of the same order (measured: 1.8e-5 at W = 300 between
    torch and gpunn, either way of computing the grid)."""
    bound = TOLERANCE[dtype]
    if dtype == "float32":
        bound = max(bound, 2e-7 * max(shape[-2:]))
    err = rel_err(out, ref)
    assert err <= bound, f"relative error {err:.3g} > {bound:g} ({dtype}, {shape})"


def random_thetas(rng, n, dtype, spread=0.4):
    return (np.eye(2, 3) + spread * rng.standard_normal((n, 2, 3))).astype(dtype)


# --- The warp against PyTorch -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_warp_matches_torch(backend, dtype, shape, rng):
    x = rng.standard_normal(shape).astype(dtype)
    theta = random_thetas(rng, shape[0], dtype)
    y = affine_warp(x, theta, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_warp_close(y, torch_warp(x, theta), dtype, shape)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_random_affine_matrices_warp_as_torch(backend, dtype, rng):
    for shape in [(64, 3, 12, 12), (40, 2, 9, 21), (40, 16, 5)]:
        x = rng.standard_normal(shape).astype(dtype)
        h, w = shape[-2:]
        theta = random_affine(shape[0], SEED, 5, aspect=w / h, **OPTIONS).astype(dtype)
        assert_close(affine_warp(x, theta, backend=backend), torch_warp(x, theta), dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_identity_returns_x(backend, rng):
    x = rng.standard_normal((3, 2, 11, 17)).astype(np.float32)
    theta = np.tile(np.eye(2, 3, dtype=np.float32), (3, 1, 1))
    y = affine_warp(x, theta, backend=backend)
    assert_close(y, x, "float32")
    if backend == "cpu":  # the pixel map of the identity is exact: every weight is 0 or 1
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_moved_out_gives_zeros_and_half_out_is_half_zero(backend, rng):
    x = rng.standard_normal((4, 3, 10, 12)) + 5.0
    theta = np.tile(np.eye(2, 3), (4, 1, 1))
    theta[0, 0, 2], theta[1, 0, 2], theta[2, 1, 2], theta[3, 1, 2] = 2.0, -2.5, 2.0, -7.0
    assert not np.any(affine_warp(x, theta, backend=backend))
    theta[:, 0, 2], theta[:, 1, 2] = 1.0, 0.0  # half the width: samples x[..., 6:] into the left
    y = affine_warp(x, theta, backend=backend)
    np.testing.assert_allclose(y[..., :6], x[..., 6:], rtol=1e-12)
    np.testing.assert_allclose(y[..., 6:], 0.0, atol=1e-12)  # i_x = 12 up to rounding
    theta[0, 0, 2], theta[1, 1, 1], theta[2, 0, 0], theta[3, 1, 2] = np.nan, np.inf, -np.inf, 1e30
    y = affine_warp(x, theta, backend=backend)  # non-finite coordinates: NaN, as torch's
    assert np.isnan(y[:3]).all() and not np.any(y[3])
    np.testing.assert_array_equal(y, torch_warp(x, theta))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 4), c=st.integers(1, 3), h=st.integers(1, 19), w=st.integers(1, 19),
       spread=st.floats(0.0, 2.0), seed=st.integers(0, 2**32 - 1))
def test_numpy_and_cpu_agree_with_torch(n, c, h, w, spread, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    theta = random_thetas(rng, n, np.float32, spread)
    ref = torch_warp(x, theta)
    for backend in HOST_BACKENDS:
        assert rel_err(affine_warp(x, theta, backend=backend), ref) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 3, 33, 20), (5, 2, 8, 9), (2, 1, 1, 5)])
def test_cpu_kernel_keeps_inf_and_nan_where_the_reference_does(shape, dtype, rng):
    """The bordered-plane kernel (taps never bounds-tested) against the reference, which adds
    only the taps inside the image: inf and NaN pixels on the border must reach exactly the
    same outputs (a tap outside the image is not 0 * inf), with a NaN matrix and a sample
    moved out; one sample is split over the threads (on a machine with more than one)."""
    x = rng.standard_normal(shape).astype(dtype)
    x[:, :, 0, 0], x[:, :, -1, -1] = np.inf, np.nan
    theta = random_thetas(rng, shape[0], dtype, spread=0.6)
    if shape[0] > 2:
        theta[1, 0, 0] = np.nan
        theta[2, :, 2] = 5.0
    got = affine_warp(x, theta, backend="cpu")
    want = affine_warp(x, theta, backend="numpy")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(got)], want[np.isinf(got)])
    finite = np.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[dtype]
    if shape[0] > 2:
        assert np.isnan(got[1]).all() and (got[2] == 0).all()


def test_float32_theta_for_float64_images_and_float64_theta_for_float32(rng):
    x = rng.standard_normal((3, 2, 9, 9))
    theta = random_thetas(rng, 3, np.float32)
    assert_close(affine_warp(x, theta), torch_warp(x, theta.astype(np.float64)), "float64")
    x32 = x.astype(np.float32)
    assert_close(affine_warp(x32, theta.astype(np.float64)), torch_warp(x32, theta), "float32")


def test_torch_tensors_and_out(rng):
    x = torch.from_numpy(rng.standard_normal((3, 3, 8, 10)).astype(np.float32))
    theta = torch.from_numpy(random_thetas(rng, 3, np.float32))
    y = affine_warp(x, theta)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert_close(y.numpy(), torch_warp(x.numpy(), theta.numpy()), "float32")
    out = torch.full_like(x, 7.0)
    assert affine_warp(x, theta, out=out) is out and torch.equal(out, y)
    z = augment(x, 3, **OPTIONS)
    assert isinstance(z, torch.Tensor)
    np.testing.assert_array_equal(z.numpy(), augment(x.numpy(), 3, **OPTIONS))
    # a non-contiguous x is copied, not misread
    xt = torch.from_numpy(rng.standard_normal((3, 8, 10, 3)).astype(np.float32)).permute(0, 3,
                                                                                        1, 2)
    assert_close(affine_warp(xt, theta).numpy(), torch_warp(xt.contiguous().numpy(),
                                                            theta.numpy()), "float32")


# --- The matrices: the documented stream, recovered parameters --------------------------------


def documented_parameters(n, seed, offset, degrees, translate, scale, stretch, shear, flip_p):
    """The parameters of samples offset .. offset + n - 1 straight from the module docstring,
    through gpunn.philox's public generator."""
    d = offset + np.arange(n, dtype=np.uint64)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    words = []
    for b in (0, 1):
        counter = np.stack([d & np.uint64(0xFFFFFFFF), d >> np.uint64(32),
                            np.full(n, b, np.uint64), np.full(n, 0x41554730, np.uint64)], axis=-1)
        words.append(philox.philox4x32_10(counter, key))
    u = np.concatenate(words, axis=-1).astype(np.float64)
    u = np.floor(u / 256) / 2**24
    return dict(angle=degrees * (2 * u[:, 0] - 1), fx=translate[0] * (2 * u[:, 1] - 1),
                fy=translate[1] * (2 * u[:, 2] - 1),
                scale=scale[0] + (scale[1] - scale[0]) * u[:, 3],
                stretch=stretch * (2 * u[:, 4] - 1), shear=shear * (2 * u[:, 5] - 1),
                flip=u[:, 6] < flip_p)


def recovered_parameters(theta, aspect=1.0):
    """Invert the composition: theta = [A diag(f, 1) | -A (2fx, 2fy)],
    A = P^-1 diag(e^-e/s, e^e/s) Sh(-k) R(-a) P, P = diag(aspect, 1)."""
    theta = theta.astype(np.float64)
    lin = theta[:, :, :2]
    flip = np.linalg.det(lin) < 0
    lin = lin.copy()
    lin[:, :, 0] *= np.where(flip, -1.0, 1.0)[:, None]  # A = theta's columns with f undone
    m = lin * np.array([[1.0, aspect], [1.0 / aspect, 1.0]])  # P A P^-1
    angle = np.arctan2(m[:, 1, 0], m[:, 1, 1])
    ey = np.hypot(m[:, 1, 0], m[:, 1, 1])
    c, s = np.cos(angle), np.sin(angle)
    ex = m[:, 0, 0] * c - m[:, 0, 1] * s  # row 0 times R(-a)^T = ex (1, -k)
    k = -(m[:, 0, 0] * s + m[:, 0, 1] * c) / ex
    t = -np.linalg.solve(lin, theta[:, :, 2:])[..., 0]
    return dict(angle=np.degrees(angle), fx=t[:, 0] / 2, fy=t[:, 1] / 2,
                scale=1 / np.sqrt(ex * ey), stretch=np.log(ey / ex) / 2,
                shear=np.degrees(np.arctan(k)), flip=flip)


@pytest.mark.parametrize("aspect", [1.0, 0.5, 7 / 3])
def test_matrices_follow_the_documented_stream(aspect):
    n, offset = 500, (3 << 32) + 11  # counter word 1 in use
    theta = random_affine(n, SEED, offset, aspect=aspect, **OPTIONS)
    assert theta.shape == (n, 2, 3) and theta.dtype == np.float32
    expected = documented_parameters(n, SEED, offset, **OPTIONS)
    got = recovered_parameters(theta, aspect)
    np.testing.assert_array_equal(got["flip"], expected["flip"])
    for name in ("angle", "fx", "fy", "scale", "stretch", "shear"):
        np.testing.assert_allclose(got[name], expected[name], atol=2e-5, err_msg=name)


def test_cpu_kernel_draws_the_same_matrices():
    params = A._params("t", **OPTIONS, aspect=1.5)
    for offset in (0, 2**40 + 1, 2**64 - 300):
        ref = random_affine(300, SEED, offset, aspect=1.5, **OPTIONS)
        cpu = A._cpu_thetas(300, np.uint64(offset), *philox.key_words(SEED),
                            np.asarray(params, np.float64))
        np.testing.assert_array_max_ulp(cpu, ref, maxulp=1)


def test_statistics_of_the_draws():
    n = 4000
    opts = dict(degrees=25.0, translate=(0.3, 0.1), scale=(0.7, 1.4), stretch=0.3, shear=15.0,
                flip_p=0.5)
    got = recovered_parameters(random_affine(n, 99, 0, **opts))
    assert abs(got["flip"].mean() - 0.5) < 0.05
    bounds = dict(angle=(-25, 25), fx=(-0.3, 0.3), fy=(-0.1, 0.1), scale=(0.7, 1.4),
                  stretch=(-0.3, 0.3), shear=(-15, 15))
    for name, (lo, hi) in bounds.items():
        v = got[name]
        span = hi - lo
        assert v.min() >= lo - 1e-4 * span and v.max() <= hi + 1e-4 * span, name
        assert v.min() < lo + 0.01 * span and v.max() > hi - 0.01 * span, name  # fills it
        # uniform: mean and spread of a uniform on [lo, hi] within 5 standard errors
        assert abs(v.mean() - (lo + hi) / 2) < 5 * span / math.sqrt(12 * n), name
        assert abs(v.std() - span / math.sqrt(12)) < 0.05 * span, name
    assert random_affine(n, 99, 0, flip_p=0.0).sum() == 2 * n  # identity: 1 + 1 per matrix
    assert np.all(np.linalg.det(random_affine(50, 1, 0, flip_p=1.0)[:, :, :2]) < 0)


def test_options_do_not_change_each_others_draws():
    base = recovered_parameters(random_affine(200, 5, 0, degrees=40.0))
    more = recovered_parameters(random_affine(200, 5, 0, degrees=40.0, translate=0.2,
                                              flip_p=0.3))
    np.testing.assert_allclose(more["angle"], base["angle"], atol=1e-4)


def test_random_affine_seed_none_uses_numpy_global_generator():
    np.random.seed(4)
    a = random_affine(5, None, degrees=10)
    np.random.seed(4)
    np.testing.assert_array_equal(random_affine(5, None, degrees=10), a)
    assert random_affine(0, 1).shape == (0, 2, 3)


# --- The geometry's directions ----------------------------------------------------------------


def blob(h, w, cy, cx, sigma=1.5):
    i, j = np.mgrid[0:h, 0:w]
    return np.exp(-((i - cy) ** 2 + (j - cx) ** 2) / (2 * sigma**2))


def centroid(img):
    i, j = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return (img * i).sum() / img.sum(), (img * j).sum() / img.sum()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_content_moves_as_documented(backend):
    """A blob right of the centre: positive angles turn it up (counter-clockwise on screen);
    positive translations move it right and down; scale > 1 moves it away from the centre;
    flips mirror it."""
    h, w, n = 41, 61, 400
    img = np.tile(blob(h, w, 20, 40)[None], (n, 1, 1))  # centre (20, 30): blob 10 px right
    for opts, check in [
        (dict(degrees=60.0), "angle"), (dict(translate=(0.2, 0.2)), "translate"),
        (dict(scale=(0.8, 1.3)), "scale"), (dict(flip_p=0.5), "flip")]:
        y = augment(img, 17, 0, backend=backend, **opts)
        p = documented_parameters(n, 17, 0, **(dict(degrees=0.0, translate=(0, 0),
                                                     scale=(1, 1), stretch=0.0, shear=0.0,
                                                     flip_p=0.0) | opts))
        for k in range(0, n, 23):
            cy, cx = centroid(y[k])
            if check == "angle":
                a = math.radians(p["angle"][k])
                ey, ex = 20 - 10 * math.sin(a), 30 + 10 * math.cos(a)
            elif check == "translate":
                ey, ex = 20 + p["fy"][k] * h, 40 + p["fx"][k] * w
            elif check == "scale":
                ey, ex = 20, 30 + 10 * p["scale"][k]
            else:
                ey, ex = 20, (20 if p["flip"][k] else 40)
            assert abs(cy - ey) < 0.2 and abs(cx - ex) < 0.2, (check, k, cy, cx, ey, ex)


# --- The fused op -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 1, 1, 1), (9, 3, 16, 24), (7, 20, 11)])
def test_augment_is_warp_of_random_affine(shape, backend, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    h, w = shape[-2:]
    offset = 2**33 + 3
    y = augment(x, SEED, offset, backend=backend, **OPTIONS)
    theta = random_affine(shape[0], SEED, offset, aspect=w / h, **OPTIONS).astype(dtype)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, affine_warp(x, theta, backend=backend), dtype)
    assert_close(y, torch_warp(x, theta), dtype)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_augment_determinism_and_batch_independence(backend, rng):
    x = rng.standard_normal((12, 3, 15, 15)).astype(np.float32)
    y = augment(x, 11, 100, backend=backend, **OPTIONS)
    np.testing.assert_array_equal(augment(x, 11, 100, backend=backend, **OPTIONS), y)
    # sample n depends on offset + n only, not on the batch it is in
    np.testing.assert_array_equal(augment(x[4:9], 11, 104, backend=backend, **OPTIONS), y[4:9])
    for other in (augment(x, 11, 101, backend=backend, **OPTIONS),
                  augment(x, 12, 100, backend=backend, **OPTIONS)):
        assert all(not np.array_equal(other[k], y[k]) for k in range(12))
    out = np.full_like(x, np.nan)
    assert augment(x, 11, 100, out=out, backend=backend, **OPTIONS) is out
    np.testing.assert_array_equal(out, y)


def test_augment_backends_agree(rng):
    x = rng.standard_normal((16, 3, 20, 28)).astype(np.float32)
    ys = [augment(x, 5, 7, backend=b, **OPTIONS) for b in HOST_BACKENDS]
    assert_close(ys[1], ys[0], "float32")


def test_augment_defaults_are_the_identity(rng):
    x = rng.standard_normal((3, 2, 7, 9)).astype(np.float32)
    np.testing.assert_array_equal(augment(x, 1, backend="cpu"), x)


# --- Bad input --------------------------------------------------------------------------------


def test_bad_input_is_refused_before_anything_is_written(rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    x0 = x.copy()
    theta = random_thetas(rng, 2, np.float32)
    out = np.full_like(x, 5.0)
    bad = [
        (ValueError, "degrees must be", dict(degrees=-1.0)),
        (ValueError, "degrees must be", dict(degrees=math.inf)),
        (TypeError, "degrees must be a real", dict(degrees="10")),
        (ValueError, "scale must be", dict(scale=(0.0, 1.0))),
        (ValueError, "scale must be", dict(scale=(-1.0, 1.0))),
        (ValueError, r"scale must be \(min, max\)", dict(scale=(1.2, 0.9))),
        (ValueError, "scale must be a pair", dict(scale=(1.0, 1.0, 1.0))),
        (ValueError, "translate must be", dict(translate=(0.1, 1.5))),
        (ValueError, "translate must be", dict(translate=(-0.1, 0.0))),
        (TypeError, "translate must be a pair", dict(translate=None)),
        (ValueError, "flip_p must be", dict(flip_p=1.5)),
        (ValueError, "flip_p must be", dict(flip_p=np.nan)),
        (ValueError, "stretch must be", dict(stretch=-0.1)),
        (ValueError, "shear must be", dict(shear=90.0)),
        (TypeError, "seed must be", dict(seed=1.5)),
        (ValueError, "seed must be in", dict(seed=-1)),
        (ValueError, "offset must be in", dict(offset=-1)),
        (ValueError, r"offset \+ size", dict(offset=2**64 - 1)),
        (ValueError, "backend must be one of", dict(backend="gpu")),
    ]
    for error, match, kwargs in bad:
        kw = dict(seed=1, out=out) | kwargs
        with pytest.raises(error, match=match):
            augment(x, **kw)
        assert np.all(out == 5.0) and np.array_equal(x, x0), kwargs
    with pytest.raises(ValueError, match="x must have shape"):
        augment(x[0, 0], 1)
    with pytest.raises(ValueError, match="x must have shape"):
        affine_warp(x[None], theta)
    with pytest.raises(TypeError, match="x has dtype int64"):
        augment(np.zeros((2, 3, 4, 4), dtype=np.int64), 1)
    with pytest.raises(TypeError, match="x has dtype float16"):
        affine_warp(x.astype(np.float16), theta)
    with pytest.raises(ValueError, match="theta must have shape"):
        affine_warp(x, theta[:1], out=out)
    with pytest.raises(ValueError, match="theta must have shape"):
        affine_warp(x, theta.reshape(2, 6), out=out)
    with pytest.raises(TypeError, match="theta has dtype int64"):
        affine_warp(x, theta.astype(np.int64), out=out)
    with pytest.raises(ValueError, match="out must not overlap x"):
        affine_warp(x, theta, out=x)
    with pytest.raises(ValueError, match="out must not overlap x"):
        augment(x, 1, out=x, degrees=5)
    with pytest.raises(ValueError, match="out has shape"):
        augment(x, 1, out=out[:1])
    with pytest.raises(TypeError, match="out has dtype"):
        augment(x, 1, out=out.astype(np.float64))
    assert np.all(out == 5.0) and np.array_equal(x, x0)
    with pytest.raises(ValueError, match=r"n must be in \[0, inf\)"):
        random_affine(-1, 1)
    with pytest.raises(TypeError, match="n must be an integer"):
        random_affine(2.0, 1)
    with pytest.raises(ValueError, match="aspect must be"):
        random_affine(2, 1, aspect=0.0)


# --- GPU --------------------------------------------------------------------------------------

GPU_DTYPES = ["float16", "bfloat16", "float32", "float64"]
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}
GPU_SHAPES = [(0, 3, 5, 7), (1, 1, 1, 1), (5, 3, 17, 23), (4, 31, 29), (2, 3, 8, 300),
              (3, 1, 257, 5), (70000, 1, 2, 3)]  # the last: more samples than grid y holds


def _host_reference(x_dev, theta64, dtype):
    """The warp on the host in the compute type (float32, float64 for float64) of the rounded
    device input, and torch's on the same values."""
    ctype = np.float64 if dtype == "float64" else np.float32
    x = x_dev.double().cpu().numpy().astype(ctype)
    theta = theta64.astype(ctype)
    return affine_warp(x, theta, backend="numpy"), torch_warp(x, theta)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_warp_matches_reference_and_torch(dtype, shape, rng):
    x = torch.from_numpy(rng.standard_normal(shape)).to(TORCH_DTYPES[dtype]).cuda()
    theta64 = np.eye(2, 3) + 0.4 * rng.standard_normal((shape[0], 2, 3))
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    theta = torch.from_numpy(theta64).to(tdtype).cuda()
    y = affine_warp(x, theta)
    assert y.device == x.device and y.dtype == x.dtype and y.shape == x.shape
    ref, ref_torch = _host_reference(x, theta.cpu().numpy().astype(np.float64), dtype)
    got = y.double().cpu().numpy()
    assert_warp_close(got, ref, dtype, shape)
    assert_warp_close(got, ref_torch, dtype, shape)
    # torch's own CUDA grid_sample on the same data (its 16-bit grids are too coarse to compare)
    if shape[0] and len(shape) == 4 and dtype in ("float32", "float64"):
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        y_t = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        assert_warp_close(got, y_t.double().cpu().numpy(), dtype, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_identity_and_moved_out(dtype, rng):
    x = torch.from_numpy(rng.standard_normal((3, 2, 11, 17))).to(TORCH_DTYPES[dtype]).cuda()
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    theta = torch.eye(2, 3, dtype=tdtype).repeat(3, 1, 1).cuda()
    assert torch.equal(affine_warp(x, theta), x)
    theta[:, 0, 2] = 2.5
    assert not torch.any(affine_warp(x, theta))
    theta[:, 0, 2] = float("nan")
    assert torch.isnan(affine_warp(x, theta)).all()
    theta[:, 0, 2] = float("inf")
    assert torch.isnan(affine_warp(x, theta)).all()
    theta[:, 0, 2] = 1e30
    assert not torch.any(affine_warp(x, theta))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 1, 1, 1), (33, 3, 16, 24), (7, 20, 11),
                                   (70000, 1, 2, 2)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_augment_is_warp_of_random_affine(dtype, shape, rng):
    cupy = pytest.importorskip("cupy")
    x = torch.from_numpy(rng.standard_normal(shape)).to(TORCH_DTYPES[dtype]).cuda()
    h, w = shape[-2:]
    offset = 2**33 + 3
    y = augment(x, SEED, offset, **OPTIONS)
    assert y.device == x.device and y.dtype == x.dtype
    theta = random_affine(shape[0], SEED, offset, aspect=w / h, **OPTIONS)
    theta_dev = random_affine(shape[0], SEED, offset, aspect=w / h, xp=cupy, **OPTIONS)
    assert isinstance(theta_dev, cupy.ndarray)
    np.testing.assert_array_max_ulp(cupy.asnumpy(theta_dev), theta, maxulp=1)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    warped = affine_warp(x, torch.from_numpy(theta).to(tdtype).cuda())
    got = y.double().cpu().numpy()
    assert_warp_close(got, warped.double().cpu().numpy(), dtype, shape)
    ref, ref_torch = _host_reference(x, theta.astype(np.float64), dtype)
    assert_warp_close(got, ref, dtype, shape)
    assert_warp_close(got, ref_torch, dtype, shape)
    if dtype in ("float32", "float64") and shape[0] < 1000:  # the CPU kernel's result
        host = augment(x.cpu().numpy(), SEED, offset, backend="cpu", **OPTIONS)
        assert_warp_close(got, host, dtype, shape)
    # bit-identical when repeated; the same per sample in a smaller batch
    assert torch.equal(augment(x, SEED, offset, **OPTIONS), y)
    if shape[0] > 5:
        assert torch.equal(augment(x[2:5], SEED, offset + 2, **OPTIONS), y[2:5])
        assert not torch.equal(augment(x, SEED, offset + 1, **OPTIONS), y)


def _cupy_array(cupy, x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return cupy.asarray(x.astype(ml_dtypes.bfloat16))
    return cupy.asarray(x.astype(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_every_dtype_on_cupy_arrays(dtype, rng):
    """Both kernels in every dtype on CuPy arrays (no torch tensor: the CUDA simulator runs it
    too) against the host reference of the same rounded input, in the compute type."""
    cupy = pytest.importorskip("cupy")
    shape = (5, 3, 17, 23)
    x = _cupy_array(cupy, rng.standard_normal(shape), dtype)
    ctype = np.float64 if dtype == "float64" else np.float32
    xh = cupy.asnumpy(x).astype(np.float64).astype(ctype)
    theta = random_thetas(rng, shape[0], ctype)
    y = affine_warp(x, cupy.asarray(theta))
    assert isinstance(y, cupy.ndarray) and y.dtype == x.dtype and y.shape == x.shape
    got = cupy.asnumpy(y).astype(np.float64)
    assert_warp_close(got, affine_warp(xh, theta, backend="numpy"), dtype, shape)
    assert_warp_close(got, torch_warp(xh, theta), dtype, shape)
    z = augment(x, SEED, 7, **OPTIONS)
    assert isinstance(z, cupy.ndarray) and z.dtype == x.dtype
    ref = augment(xh, SEED, 7, backend="numpy", **OPTIONS)
    assert_warp_close(cupy.asnumpy(z).astype(np.float64), ref, dtype, shape)


@pytest.mark.gpu
def test_cuda_cupy_arrays_out_and_bad_input(rng):
    cupy = pytest.importorskip("cupy")
    x = cupy.asarray(rng.standard_normal((4, 3, 9, 13)).astype(np.float32))
    theta = cupy.asarray(random_thetas(rng, 4, np.float32))
    y = affine_warp(x, theta)
    assert isinstance(y, cupy.ndarray)
    assert_close(cupy.asnumpy(y), torch_warp(cupy.asnumpy(x), cupy.asnumpy(theta)), "float32")
    ref = cupy.asnumpy(affine_warp(x, theta, backend="numpy"))  # the reference on CuPy arrays
    assert_close(cupy.asnumpy(y), ref, "float32")
    out = cupy.full_like(x, 5.0)
    assert affine_warp(x, theta, out=out) is out and bool(cupy.all(out == y))
    z = augment(x, 3, **OPTIONS)
    assert_close(cupy.asnumpy(z), cupy.asnumpy(augment(x, 3, backend="numpy", **OPTIONS)),
                 "float32")
    out[...] = 5.0
    with pytest.raises(ValueError, match="out must not overlap x"):
        augment(x, 1, out=x)
    with pytest.raises(ValueError, match="degrees must be"):
        augment(x, 1, degrees=-3, out=out)
    with pytest.raises(TypeError, match="theta has dtype float16"):
        affine_warp(x, theta.astype(cupy.float16), out=out)
    assert bool(cupy.all(out == 5.0))
