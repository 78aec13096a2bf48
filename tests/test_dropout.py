"""Dropout and its generator: Philox4x32-10 known answers, the stream mapping element by element,
bit-equal masks across backends, keep-rate statistics, scaling, the backward against PyTorch's
with the same mask, finite differences, torch tensors, bad input, and the GPU in every dtype."""

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpunn import philox
from gpunn.ops.dropout import dropout, dropout_backward, dropout_mask
from conftest import HOST_BACKENDS, SIZES

# the module (gpunn.ops.dropout is the function once gpunn.ops exports it, like softmax)
D = importlib.import_module("gpunn.ops.dropout")

# Random123 kat_vectors, philox4x32_10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
#: Offsets: aligned, each remainder mod 4, a block number above 2^32 (counter word 1 in use).
OFFSETS = (0, 1, 2, 3, (5 << 34) + 3)
SEED = 0x0123456789ABCDEF


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _words_by_hand(n, seed, offset):
    """u_i straight from the module docstring's definition, one Philox block per element."""
    d = offset + np.arange(n, dtype=object)
    b = d // 4
    counters = np.array([[int(v) & 0xFFFFFFFF, int(v) >> 32, 0, 0] for v in b], dtype=np.uint64)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    out = philox.philox4x32_10(counters.reshape(-1, 4), key)
    return out[np.arange(n), (d % 4).astype(np.int64)] if n else np.zeros(0, np.uint32)


# --- The generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers_numpy(counter, key, expected):
    out = philox.philox4x32_10(np.array(counter, np.uint64), np.array(key, np.uint64))
    assert out.dtype == np.uint32
    assert [int(v) for v in out] == list(expected)


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers_numba(counter, key, expected):
    u = np.uint64
    words = philox.cpu_rounds(*(u(c) for c in counter), *(u(k) for k in key))
    assert [int(v) for v in words] == list(expected)


def test_philox_vectorized_matches_one_at_a_time(rng):
    counters = rng.integers(0, 2**32, size=(50, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(50, 2), dtype=np.uint64)
    together = philox.philox4x32_10(counters, keys)
    u = np.uint64
    for c, k, row in zip(counters, keys, together):
        words = philox.cpu_rounds(*(u(x) for x in c), *(u(x) for x in k))
        assert list(row) == [int(v) for v in words]


def test_stream_starts_with_the_known_answer():
    """seed 0, offset 0 is Philox block 0 under key 0: the first known-answer vector. A
    threshold of 0xA0000000 (p = 0.375) keeps words 0 and 3 of it, drops 1 and 2."""
    assert D.keep_threshold(0.375) == 0xA0000000
    mask = dropout_mask(8, 0.375, seed=0, offset=0, backend="numpy")
    assert list(mask[:4]) == [True, False, False, True]
    assert list(D._ref_words(np, 4, 0, 0)) == list(KAT[0][2])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**32 * 4 + 1, 2**64 - 40])
def test_mask_is_the_documented_mapping(backend, offset, rng):
    """Element i: word (offset + i) % 4 of block (offset + i) // 4, key = seed's halves."""
    seed = int(rng.integers(0, 2**63)) * 2 + 1
    n = 37
    for p in (0.1, 0.5, 0.73):
        expected = _words_by_hand(n, seed, offset) < D.keep_threshold(p)
        np.testing.assert_array_equal(dropout_mask(n, p, seed, offset, backend=backend), expected)


def test_threshold_and_scale():
    assert D.keep_threshold(0.0) == 2**32 and D.keep_threshold(1.0) == 0
    assert D.keep_threshold(0.5) == 2**31 and D.keep_threshold(0.25) == 3 * 2**30
    assert D.keep_threshold(1e-12) == 2**32  # keeps everything: p below 2^-33
    assert D.keep_threshold(1 - 2**-40) == 0
    for p in (0.1, 0.3, 0.9, 1e-6):
        assert abs(D.keep_threshold(p) / 2**32 - (1 - p)) <= 2**-33 + 1e-16
    assert D.scale_of(0.5) == 2.0 and D.scale_of(1.0) == 0.0


# --- Backends agree bit for bit ---------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_and_cpu_agree_bit_for_bit(n, offset, dtype, rng):
    if n == 10**6 and offset not in (0, 3):
        pytest.skip("the large size at two offsets is enough")
    x = rng.standard_normal(n).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    results = {}
    for b in HOST_BACKENDS:
        y, mask = dropout(x, 0.3, seed=SEED, offset=offset, backend=b, return_mask=True)
        y2 = dropout(x, 0.3, seed=SEED, offset=offset, backend=b)
        dx = dropout_backward(dy, 0.3, SEED, offset, backend=b)
        alone = dropout_mask(n, 0.3, SEED, offset, backend=b)
        assert y.dtype == dx.dtype == np.dtype(dtype) and mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, alone)
        np.testing.assert_array_equal(_bits(y), _bits(y2))
        results[b] = (y, mask, dx)
    (y0, m0, dx0), (y1, m1, dx1) = results["numpy"], results["cpu"]
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(_bits(y0), _bits(y1))
    np.testing.assert_array_equal(_bits(dx0), _bits(dx1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shift", [0, 1, 2])
def test_streamed_outputs_agree_bit_for_bit(dtype, shift, rng):
    """Outputs of STREAM_MIN_BYTES and more take the non-temporal stores, aligned by doing a
    block or two first when they can be (shift 0, 1 of float32) and plain stores when not."""
    n = D.STREAM_MIN_BYTES // np.dtype(dtype).itemsize + 37
    dy = rng.standard_normal(n).astype(dtype)
    dx = np.empty(n + 2, dtype)[shift:shift + n]
    dropout_backward(dy, 0.3, SEED, 5, out=dx, backend="cpu")
    ref = dropout_backward(dy, 0.3, SEED, 5, backend="numpy")
    np.testing.assert_array_equal(_bits(dx), _bits(ref))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), offset=st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 301)),
       seed=st.integers(0, 2**64 - 1), p=st.floats(0, 1))
def test_cpu_mask_equals_reference(n, offset, seed, p):
    np.testing.assert_array_equal(dropout_mask(n, p, seed, offset, backend="cpu"),
                                  dropout_mask(n, p, seed, offset, backend="numpy"))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_offsets_slide_along_one_stream(backend):
    """mask(n, o)[k:] == mask(n - k, o + k), and offset += n continues the same stream."""
    full = dropout_mask(1000, 0.5, SEED, 17, backend=backend)
    for k in range(9):
        np.testing.assert_array_equal(full[k:], dropout_mask(1000 - k, 0.5, SEED, 17 + k,
                                                             backend=backend))
    parts = [dropout_mask(n, 0.5, SEED, 17 + a, backend=backend)
             for a, n in ((0, 333), (333, 1), (334, 666))]
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_mask_depends_on_the_shape_only_through_the_size():
    np.testing.assert_array_equal(dropout_mask((6, 7, 11), 0.4, 9, 5).reshape(-1),
                                  dropout_mask(462, 0.4, 9, 5))


# --- Statistics and scaling -------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_exact_scaling(backend, p, rng):
    n = 400_000
    x = rng.standard_normal(n).astype(np.float32)
    y, mask = dropout(x, p, seed=int(rng.integers(2**63)), backend=backend, return_mask=True)
    kept = int(mask.sum())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sd, (kept, n * (1 - p), sd)  # 5 sigma
    np.testing.assert_array_equal(y[mask], x[mask] * np.float32(1 / (1 - p)))
    assert np.all(y[~mask] == 0)
    # different offsets and seeds give independent masks: agreement near p^2 + (1-p)^2
    other = dropout_mask(n, p, SEED, n, backend=backend)
    same = dropout_mask(n, p, SEED + 1, 0, backend=backend)
    for m in (other, same):
        agree = float(np.mean(m == mask))
        assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_blocks_words_are_unbiased(backend):
    """Each of the four words of a block is kept at the rate 1 - p (no word is special)."""
    n = 400_000
    mask = dropout_mask(n, 0.5, 2024, 0, backend=backend).reshape(-1, 4)
    for w in range(4):
        assert abs(mask[:, w].mean() - 0.5) < 5 * math.sqrt(0.25 / (n // 4))
    # and neighbours are uncorrelated
    a = mask.reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01


@settings(max_examples=30, deadline=None)
@given(p=st.floats(0.02, 0.98), seed=st.integers(0, 2**64 - 1))
def test_keep_rate_property(p, seed):
    n = 20_000
    kept = int(dropout_mask(n, p, seed, 0, backend="cpu").sum())
    assert abs(kept - n * (1 - p)) < 5.5 * math.sqrt(n * p * (1 - p))


def test_statistics_match_torch(rng):
    """torch's F.dropout draws other bits; its keep rate and its scaling of kept values must
    agree with ours."""
    n = 400_000
    x = rng.uniform(0.5, 2.0, n).astype(np.float32)  # no zeros: y == 0 means dropped
    for p in (0.2, 0.5, 0.8):
        torch.manual_seed(0)
        yt = torch.nn.functional.dropout(torch.from_numpy(x), p, training=True).numpy()
        y, mask = dropout(x, p, seed=11, return_mask=True)
        kept_t, kept = yt != 0, mask
        bound = 5 * math.sqrt(n * p * (1 - p))
        assert abs(kept_t.sum() - n * (1 - p)) < bound and abs(kept.sum() - n * (1 - p)) < bound
        both = kept_t & kept
        np.testing.assert_allclose(y[both], yt[both], rtol=2e-7, atol=0)


# --- Special values of p, training, NaN ----------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_identity_cases(backend, rng):
    x = rng.standard_normal(1001).astype(np.float32)
    x[::7] = np.nan
    x.view(np.uint32)[3] = 0x7FC01234  # a NaN with a payload
    for kwargs in (dict(p=0.0), dict(p=0.7, training=False), dict(p=0.0, training=False)):
        assert dropout(x, **kwargs, seed=1, backend=backend) is x  # as PyTorch: x itself
        out = np.full_like(x, 5.0)
        assert dropout(x, **kwargs, seed=1, out=out, backend=backend) is out
        np.testing.assert_array_equal(_bits(out), _bits(x))
        y, mask = dropout(x, **kwargs, seed=1, backend=backend, return_mask=True)
        assert y is x and mask.dtype == np.bool_ and mask.shape == x.shape and mask.all()
    np.testing.assert_array_equal(_bits(dropout_backward(x, 0.0, 1, backend=backend)), _bits(x))
    assert dropout_mask(10, 0.0, 1, backend=backend).all()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_p_one_gives_x_times_zero(backend, rng):
    x = rng.standard_normal(103).astype(np.float32)
    x[:3] = [np.nan, np.inf, -np.inf]
    y, mask = dropout(x, 1.0, seed=3, backend=backend, return_mask=True)
    assert not mask.any()
    expected = torch.nn.functional.dropout(torch.from_numpy(x), 1.0).numpy()  # input * 0
    np.testing.assert_array_equal(_bits(y), _bits(expected))
    assert np.all(y[3:] == 0) and np.isnan(y[:3]).all()
    assert np.all(dropout_backward(x[3:], 1.0, 3, backend=backend) == 0)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nan_and_inf_propagate_as_in_torch(backend, rng):
    x = rng.standard_normal(5000).astype(np.float32)
    x[::5] = np.nan
    x[1::5] = np.inf
    y, mask = dropout(x, 0.5, seed=4, backend=backend, return_mask=True)
    scale = torch.tensor(2.0)
    expected = (torch.from_numpy(x) * torch.from_numpy(mask) * scale).numpy()
    np.testing.assert_array_equal(_bits(y), _bits(expected))
    assert np.isnan(y[::5]).all()
    assert np.isposinf(y[1::5][mask[1::5]]).all() and np.isnan(y[1::5][~mask[1::5]]).all()


# --- Backward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.95])
def test_backward_is_torchs_with_the_same_mask(backend, dtype, p, rng):
    """dx = dy * mask / (1 - p): torch's native_dropout_backward given our mask, and the
    gradient torch's autograd computes through x * mask * scale."""
    shape = (37, 129)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, mask = dropout(x, p, seed=77, offset=5, backend=backend, return_mask=True)
    dx = dropout_backward(dy, p, 77, 5, backend=backend)
    scale = np.dtype(dtype).type(1 / (1 - p))
    ref = torch.ops.aten.native_dropout_backward(torch.from_numpy(dy), torch.from_numpy(mask),
                                                 float(scale)).numpy()
    np.testing.assert_array_equal(dx, ref)
    np.testing.assert_array_equal(dx, dy * np.where(mask, scale, 0).astype(dtype))
    xt = torch.from_numpy(x).requires_grad_()
    yt = xt * (torch.from_numpy(mask).to(xt.dtype) * float(scale))
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6 if dtype == "float32" else 1e-15)


def test_reference_backward_matches_finite_differences(rng):
    """<dy, dx> equals the directional derivative of <dy, dropout(x)> along v (float64)."""
    x = rng.standard_normal((40, 30))
    dy, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    h = 1e-6
    f = lambda z: np.sum(dy * dropout(z, 0.3, seed=5, offset=9, backend="numpy"))  # noqa: E731
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    dx = dropout_backward(dy, 0.3, 5, 9, backend="numpy")
    assert abs(np.sum(dx * v) - fd) <= 1e-8 * max(1.0, abs(fd))


# --- Seeds, arrays, outputs -------------------------------------------------------------------


def test_seed_none_draws_from_numpys_global_generator(rng):
    x = rng.standard_normal(4000).astype(np.float32)
    np.random.seed(123)
    a = dropout(x, 0.5)
    b = dropout(x, 0.5)
    np.random.seed(123)
    c = dropout(x, 0.5)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    # identity calls and failing calls draw nothing
    np.random.seed(123)
    dropout(x, 0.5, training=False)
    dropout(x, 0.0, out=np.empty_like(x))
    with pytest.raises(ValueError):
        dropout(x, 0.5, out=np.empty(3, np.float32))
    np.testing.assert_array_equal(dropout(x, 0.5), a)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_out_and_in_place(backend, rng):
    x = rng.standard_normal((13, 31)).astype(np.float32)
    expected = dropout(x, 0.4, seed=8, offset=2, backend=backend)
    out = np.empty_like(x)
    assert dropout(x, 0.4, seed=8, offset=2, out=out, backend=backend) is out
    np.testing.assert_array_equal(out, expected)
    inplace = x.copy()
    y, mask = dropout(inplace, 0.4, seed=8, offset=2, out=inplace, backend=backend,
                      return_mask=True)
    assert y is inplace
    np.testing.assert_array_equal(inplace, expected)
    dy = x.copy()
    assert dropout_backward(dy, 0.4, 8, 2, out=dy, backend=backend) is dy
    np.testing.assert_array_equal(dy, expected)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_non_contiguous_input(backend, rng):
    x = rng.standard_normal((20, 30)).astype(np.float64)
    np.testing.assert_array_equal(dropout(x.T, 0.5, seed=2, backend=backend),
                                  dropout(np.ascontiguousarray(x.T), 0.5, seed=2, backend=backend))


def test_torch_tensors(rng):
    x = torch.randn(7, 300)
    y, mask = dropout(x, 0.25, seed=6, offset=1, return_mask=True)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == x.shape
    ref, ref_mask = dropout(x.numpy(), 0.25, seed=6, offset=1, backend="numpy", return_mask=True)
    np.testing.assert_array_equal(y.numpy(), ref)
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    dx = dropout_backward(torch.ones_like(x), 0.25, 6, 1)
    assert isinstance(dx, torch.Tensor)
    np.testing.assert_array_equal(dx.numpy(), ref_mask / np.float32(0.75))
    like = dropout_mask((7, 300), 0.25, 6, 1, like=x)
    assert isinstance(like, torch.Tensor) and like.dtype == torch.bool
    assert torch.equal(like, mask)
    x.requires_grad_()  # no silent detach: gpunn.torch.nn.functional.dropout is differentiable
    with pytest.raises(RuntimeError, match=r"gpunn\.torch\.nn\.functional\.dropout"):
        dropout(x, 0.5, seed=1)
    with torch.no_grad():
        assert isinstance(dropout(x, 0.5, seed=1), torch.Tensor)
        assert dropout(x, 0.5, training=False) is x


def test_mask_shapes_and_like():
    assert dropout_mask(5, 0.5, 1).shape == (5,)
    assert dropout_mask((), 0.5, 1).shape == ()
    assert dropout_mask((2, 0, 3), 0.5, 1).shape == (2, 0, 3)
    assert dropout_mask(np.int64(4), 0.5, 1).shape == (4,)
    m = dropout_mask((3, 4), 0.5, 1, like=np.zeros(1, np.float32))
    assert isinstance(m, np.ndarray) and m.dtype == np.bool_


def test_zero_dimensional(rng):
    x = np.array(3.0, np.float32)
    for b in HOST_BACKENDS:
        y = dropout(x, 0.5, seed=2, backend=b)
        assert y.shape == () and float(y) in (0.0, 6.0)
        assert float(y) == (6.0 if dropout_mask((), 0.5, 2, backend=b) else 0.0)


# --- Bad input --------------------------------------------------------------------------------


def test_bad_input_raises_and_changes_nothing(rng):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    x0 = x.copy()
    out = np.full_like(x, 5.0)
    bad = [
        (ValueError, r"p must be in \[0, 1\], got 1.5", dict(p=1.5)),
        (ValueError, r"p must be in \[0, 1\], got -0.1", dict(p=-0.1)),
        (ValueError, r"p must be in \[0, 1\], got nan", dict(p=float("nan"))),
        (TypeError, "p must be a real number", dict(p="0.5")),
        (TypeError, "p must be a real number", dict(p=True)),
        (ValueError, "seed must be in", dict(seed=-1)),
        (ValueError, "seed must be in", dict(seed=2**64)),
        (TypeError, "seed must be an integer", dict(seed=1.5)),
        (TypeError, "seed must be an integer", dict(seed=True)),
        (ValueError, "offset must be in", dict(offset=-3)),
        (TypeError, "offset must be an integer", dict(offset=2.0)),
        (ValueError, "offset \\+ size must be at most 2\\^64", dict(offset=2**64 - 5)),
        (TypeError, "training must be True or False", dict(training="yes")),
        (TypeError, "return_mask must be True or False", dict(return_mask=1)),
        (ValueError, "out has shape", dict(out=np.empty((4, 3), np.float32))),
        (TypeError, "out has dtype float64", dict(out=np.empty((3, 4)))),
        (ValueError, "backend must be one of", dict(backend="gpu")),
    ]
    for error, match, kwargs in bad:
        kw = dict(p=0.5, seed=1, out=out) | kwargs
        with pytest.raises(error, match=match):
            dropout(x, **kw)
        assert np.all(out == 5.0) and np.array_equal(x, x0), kwargs
    with pytest.raises(TypeError, match="x has dtype float16"):
        dropout(x.astype(np.float16), 0.5, seed=1)
    with pytest.raises(TypeError, match="seed must be the forward's seed"):
        dropout_backward(x, 0.5, None, out=out)
    with pytest.raises(ValueError, match=r"dropout_backward: p must be in \[0, 1\]"):
        dropout_backward(x, 2.0, 1, out=out)
    with pytest.raises(ValueError, match="offset \\+ size"):
        dropout_backward(x, 0.5, 1, 2**64 - 11, out=out)
    assert np.all(out == 5.0)
    with pytest.raises(ValueError, match="negative sizes"):
        dropout_mask((2, -1), 0.5, 1)
    with pytest.raises(TypeError, match="shape must be an int or a sequence"):
        dropout_mask(2.5, 0.5, 1)
    with pytest.raises(TypeError, match="seed must be the forward's seed"):
        dropout_mask(3, 0.5, None)


def test_largest_offset_is_accepted():
    m = dropout_mask(8, 0.5, 1, 2**64 - 8)
    np.testing.assert_array_equal(m, _words_by_hand(8, 1, 2**64 - 8) < 2**31)


# --- GPU ----------------------------------------------------------------------------------------

GPU_DTYPES = ["float16", "bfloat16", "float32", "float64"]
GPU_SIZES = [0, 1, 7, 13, 65537, 10**6 + 3]


def _host_reference(x64, dtype, p, seed, offset):
    """y as the CUDA kernel must produce it: x * factor in float32 (float64 for float64),
    rounded to the storage dtype, with the reference mask."""
    mask = dropout_mask(x64.shape, p, seed, offset, backend="numpy")
    ctype = np.float64 if dtype == "float64" else np.float32
    y = x64.astype(ctype) * np.where(mask, ctype(D.scale_of(p)), ctype(0))
    return y, mask


def _cupy_to_f64(cupy, a):
    if np.dtype(a.dtype).name == "bfloat16":
        return (cupy.asnumpy(a.view(cupy.uint16)).astype(np.uint32) << 16).view(
            np.float32).astype(np.float64)
    return cupy.asnumpy(a).astype(np.float64)


def _rounded(y, dtype):
    """y (float32/64) rounded to dtype, back as float64 (ml_dtypes rounds to nearest even)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return y.astype(ml_dtypes.bfloat16).astype(np.float64)
    return y.astype(dtype).astype(np.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("counter, key, expected", KAT)
def test_cuda_philox_known_answers(counter, key, expected):
    cupy = pytest.importorskip("cupy")
    out = D.cuda_philox4x32_10(cupy.asarray([counter], dtype=cupy.uint32),
                               cupy.asarray([key], dtype=cupy.uint32))
    assert [int(v) for v in cupy.asnumpy(out)[0]] == list(expected)


@pytest.mark.gpu
def test_cuda_philox_matches_numpy_on_random_blocks(rng):
    cupy = pytest.importorskip("cupy")
    counters = rng.integers(0, 2**32, size=(10007, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(10007, 2), dtype=np.uint64)
    out = D.cuda_philox4x32_10(cupy.asarray(counters.astype(np.uint32)),
                               cupy.asarray(keys.astype(np.uint32)))
    np.testing.assert_array_equal(cupy.asnumpy(out), philox.philox4x32_10(counters, keys))


@pytest.mark.gpu
@pytest.mark.parametrize("n", GPU_SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_matches_reference_bit_for_bit(n, offset, dtype, rng):
    """Mask identical to NumPy's; y and dx as the float32 (float64) product rounded once."""
    cupy = pytest.importorskip("cupy")
    from test_activations import _device_array

    p = 0.3
    x = _device_array(cupy, 3 * rng.standard_normal(n), dtype)
    dy = _device_array(cupy, rng.standard_normal(n), dtype)
    y, mask = dropout(x, p, seed=SEED, offset=offset, backend="cuda", return_mask=True)
    y_plain = cupy.full(x.shape, np.nan, x.dtype)
    dropout(x, p, seed=SEED, offset=offset, out=y_plain, backend="cuda")
    dx = dropout_backward(dy, p, SEED, offset, backend="cuda")
    alone = dropout_mask(n, p, SEED, offset, backend="cuda")
    assert isinstance(alone, cupy.ndarray) and alone.dtype == cupy.bool_
    assert y.dtype == x.dtype and dx.dtype == x.dtype and mask.dtype == cupy.bool_
    y_ref, mask_ref = _host_reference(_cupy_to_f64(cupy, x), dtype, p, SEED, offset)
    dx_ref, _ = _host_reference(_cupy_to_f64(cupy, dy), dtype, p, SEED, offset)
    np.testing.assert_array_equal(cupy.asnumpy(mask), mask_ref)
    np.testing.assert_array_equal(cupy.asnumpy(alone), mask_ref)
    np.testing.assert_array_equal(_cupy_to_f64(cupy, y), _rounded(y_ref, dtype))
    np.testing.assert_array_equal(_cupy_to_f64(cupy, y_plain), _rounded(y_ref, dtype))
    np.testing.assert_array_equal(_cupy_to_f64(cupy, dx), _rounded(dx_ref, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("start", [1, 2, 3])
def test_cuda_unaligned_views_and_in_place(dtype, start, rng):
    """Views starting inside a vector: the scalar path (offset 0) and the vector path with a
    shifted block boundary (offset == start); in place; NaN propagates."""
    cupy = pytest.importorskip("cupy")
    from test_activations import _device_array

    n = 4099
    values = rng.standard_normal(n + start)
    values[5] = np.nan
    base = _device_array(cupy, values, dtype)
    x = base[start:]
    for offset in (0, start, 4 + start):
        y_ref, mask_ref = _host_reference(_cupy_to_f64(cupy, x), dtype, 0.5, 3, offset)
        y, mask = dropout(x, 0.5, seed=3, offset=offset, backend="cuda", return_mask=True)
        np.testing.assert_array_equal(cupy.asnumpy(mask), mask_ref)
        np.testing.assert_array_equal(_cupy_to_f64(cupy, y), _rounded(y_ref, dtype))
        inplace = x.copy()
        dropout(inplace, 0.5, seed=3, offset=offset, out=inplace, backend="cuda")
        np.testing.assert_array_equal(_cupy_to_f64(cupy, inplace), _rounded(y_ref, dtype))
        assert np.isnan(_cupy_to_f64(cupy, y)[5 - start])
        m = cupy.zeros(n + start, dtype=cupy.bool_)[start:]
        D._cuda_mask_run(m, 0.5, 3, offset)
        np.testing.assert_array_equal(cupy.asnumpy(m), mask_ref)


@pytest.mark.gpu
def test_cuda_torch_tensors_and_statistics():
    x = torch.randn(1000, 1003, device="cuda")
    y, mask = dropout(x, 0.2, seed=21, offset=4, return_mask=True)
    assert y.device == x.device and mask.device == x.device and mask.dtype == torch.bool
    ref_mask = dropout_mask(x.shape, 0.2, 21, 4)  # host NumPy
    np.testing.assert_array_equal(mask.cpu().numpy(), ref_mask)
    like = dropout_mask(x.shape, 0.2, 21, 4, like=x)
    assert like.device == x.device and torch.equal(like, mask)
    np.testing.assert_array_equal(y.cpu().numpy(), x.cpu().numpy() * np.where(
        ref_mask, np.float32(1 / 0.8), np.float32(0)))
    kept = int(mask.sum())
    assert abs(kept - 0.8 * x.numel()) < 5 * math.sqrt(x.numel() * 0.16)
    dx = dropout_backward(torch.ones_like(x), 0.2, 21, 4)
    assert torch.equal(dx, torch.ops.aten.native_dropout_backward(torch.ones_like(x), mask, 1.25))
    assert dropout(x, 0.2, training=False) is x


@pytest.mark.gpu
def test_cuda_mask_without_like_and_identity():
    cupy = pytest.importorskip("cupy")
    m = dropout_mask((3, 5), 0.5, 8, 1, backend="cuda")
    assert isinstance(m, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(m), dropout_mask((3, 5), 0.5, 8, 1))
    x = cupy.asarray(np.array([np.nan, 1.0, -2.0], np.float32))
    out = cupy.zeros_like(x)
    dropout(x, 0.0, seed=1, out=out)
    np.testing.assert_array_equal(cupy.asnumpy(out).view(np.uint32),
                                  cupy.asnumpy(x).view(np.uint32))


# --- The benchmark suite ----------------------------------------------------------------------


def test_bench_suite_quick():
    """The dropout suite on a tiny size: every contender checks out, a wrong one is flagged,
    bytes are the fewest (two arrays per pass)."""
    from gpunn.bench import dropout as suite
    from gpunn.bench import harness
    from gpunn.bench.harness import Contender

    def wrong(case):  # a "torch-like" contender that keeps everything
        x, dy = case.inputs
        out = x * 2 if case.direction == "forward" else None
        return Contender("keeps all", "torch", lambda: (lambda: out)) if out is not None else None

    records = suite.run(suite.Options(quick=True, sizes=[4099], ps=[0.25], progress=False),
                        extra_contenders=[wrong])
    groups = {}
    for r in records:
        groups.setdefault(r.direction, {})[r.impl] = r
    assert set(groups) == {"forward", "backward", "fwd+bwd"}
    for direction, by_impl in groups.items():
        for name in ("numpy", "gpunn cpu", "torch", "limit"):
            r = by_impl[name]
            assert r.status == "ok", (direction, name, r.note)
            assert r.median_s > 0 and r.bytes == (4 if direction == "fwd+bwd" else 2) * 4099 * 4
        assert by_impl["gpunn cpu"].error == 0.0
        assert by_impl["torch"].error < 1e-6 and "statistics" in by_impl["torch"].note
    bad = groups["forward"]["keeps all"]
    assert bad.status == "wrong" and "keep rate" in bad.note
    assert all(r.suite == "dropout" for r in records)
    assert harness.finalize(records) is records
