"""gpunn.nn: every layer, loss and penalty against torch (float64 oracle with copied weights),
Sequential (fused BatchNorm+ReLU, input_grad, accumulation, the arena), whole training runs
against torch.optim, state dicts both ways, devices, bad input and dropout streams.

Each device test runs on "cpu" (Numba kernels) and "numpy" (the reference); the "cuda" copies
carry the gpu marker and run where CuPy sees a device."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from conftest import HOST_BACKENDS, TOLERANCE, assert_close, has_gpu, rel_err

from gpunn import nn, ops, optim
from gpunn.nn.arena import ALIGN

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = [*HOST_BACKENDS, pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = ["float32", "float64"]
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64}


# --- helpers ----------------------------------------------------------------------------------


def on(a, device):
    """``a`` (NumPy) as an array of ``device`` (CuPy for "cuda")."""
    if device == "cuda":
        import cupy

        return cupy.asarray(a)
    return a


def host(a) -> np.ndarray:
    """A NumPy copy of a NumPy/CuPy array or torch tensor."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy().copy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.array(a)


def t64(a) -> torch.Tensor:
    return torch.tensor(host(a), dtype=torch.float64)


def randn(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def torch_module_from(layer_state: dict, module: torch.nn.Module, dtype=torch.float64):
    """``module`` in ``dtype`` with gpunn's state (arrays by torch's key names) copied in."""
    module = module.to(dtype)
    module.load_state_dict({k: torch.tensor(host(v)) for k, v in layer_state.items()})
    return module


def run_torch(module, x, dy):
    """torch's y, dx and parameter grads (by name) for float64 copies of x and dy."""
    xt = t64(x).requires_grad_(True)
    yt = module(xt)
    yt.backward(t64(dy))
    grads = {name: p.grad for name, p in module.named_parameters()}
    return yt.detach(), xt.grad, grads


def assert_grads(layer, torch_grads, dtype):
    for name, p in layer.named_parameters():
        assert_close(host(p.grad), torch_grads[name], dtype)


def assert_grad_close(name, grads, ref_grads, dtype):
    """grads[name] against ref_grads[name]; the error of a bias is measured against the
    larger of its norm and its module's weight gradient's (the bias of a Linear followed by a
    training-mode BatchNorm has a gradient of exactly 0 in exact arithmetic: rounding noise)."""
    out, ref = np.asarray(grads[name], np.float64), np.asarray(ref_grads[name], np.float64)
    scale = np.linalg.norm(ref)
    if name.endswith("bias"):
        scale = max(scale, np.linalg.norm(np.asarray(ref_grads[name[:-4] + "weight"])))
    err = np.linalg.norm(out - ref) / scale
    assert err <= TOLERANCE[dtype], (name, err)


# --- Linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, n_in, n_out", [
    ((17,), 13, 7),        # (N, in)
    ((3, 5), 13, 7),       # (*, in), flattened to rows
    ((9,), 1, 1),          # in = out = 1
    ((9,), 1, 6),
    ((9,), 6, 1),
])
def test_linear_matches_torch(rng, device, dtype, bias, shape, n_in, n_out):
    layer = nn.Linear(n_in, n_out, bias, dtype=dtype, generator=rng).to(device)
    ref = torch_module_from(layer.state_dict(), torch.nn.Linear(n_in, n_out, bias))
    x, dy = randn(rng, shape + (n_in,), dtype), randn(rng, shape + (n_out,), dtype)
    y = layer(on(x, device))
    dx = layer.backward(on(dy, device))
    y_ref, dx_ref, grads = run_torch(ref, x, dy)
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(host(y), y_ref, dtype)
    assert_close(host(dx), dx_ref, dtype)
    assert_grads(layer, grads, dtype)
    assert (layer.bias is None) == (not bias)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(0, 4), min_size=0, max_size=2), n_in=st.integers(1, 9),
       n_out=st.integers(1, 9), bias=st.booleans(), device=st.sampled_from(HOST_BACKENDS),
       seed=st.integers(0, 2**32 - 1))
def test_linear_property_any_shape(lead, n_in, n_out, bias, device, seed):
    """Any leading shape (none: one sample; zeros: empty) and width, float64, against torch;
    two backwards accumulate."""
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (n_in,)
    layer = nn.Linear(n_in, n_out, bias, dtype="float64", generator=rng).to(device)
    ref = torch_module_from(layer.state_dict(), torch.nn.Linear(n_in, n_out, bias))
    x, dy = randn(rng, shape, "float64"), randn(rng, shape[:-1] + (n_out,), "float64")
    y = layer(x)
    dx = layer.backward(dy)
    layer.backward(dy, input_grad=False)
    y_ref, dx_ref, grads = run_torch(ref, x, dy)
    assert y.shape == tuple(y_ref.shape) and dx.shape == shape
    assert_close(y, y_ref, "float64")
    assert_close(dx, dx_ref, "float64")
    for name, p in layer.named_parameters():
        assert_close(p.grad, 2 * grads[name], "float64")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_empty_batch(device):
    layer = nn.Linear(4, 3, generator=0).to(device)
    y = layer(on(np.zeros((0, 4), np.float32), device))
    assert y.shape == (0, 3)
    dx = layer.backward(on(np.zeros((0, 3), np.float32), device))
    assert dx.shape == (0, 4)
    assert not host(layer.weight.grad).any() and not host(layer.bias.grad).any()


def test_linear_init_is_torch_uniform():
    """W and b uniform on [-1/sqrt(in), 1/sqrt(in)] (torch's Kaiming-uniform with a = sqrt(5)):
    within the bounds and a Kolmogorov-Smirnov test against the uniform distribution."""
    from scipy import stats

    n_in, n_out = 300, 200
    layer = nn.Linear(n_in, n_out, generator=1234)
    bound = 1 / math.sqrt(n_in)
    w, b = layer.weight.data, layer.bias.data
    assert w.shape == (n_out, n_in) and b.shape == (n_out,)
    assert w.dtype == np.float32 and b.dtype == np.float32
    for a in (w, b):
        assert np.abs(a).max() <= bound
    assert np.abs(w).max() > 0.99 * bound  # spans the interval, not a narrower one
    assert stats.kstest(w.ravel(), "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    assert stats.kstest(b, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3
    # torch's own initialisation has the same law (two-sample test against it)
    torch.manual_seed(0)
    tw = torch.nn.Linear(n_in, n_out).weight.detach().numpy().ravel()
    assert stats.ks_2samp(w.ravel(), tw).pvalue > 1e-3


def test_linear_generator_reproducible():
    a = nn.Linear(8, 5, generator=7)
    b = nn.Linear(8, 5, generator=7)
    c = nn.Linear(8, 5, generator=8)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    np.testing.assert_array_equal(a.bias.data, b.bias.data)
    assert not np.array_equal(a.weight.data, c.weight.data)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    m1 = nn.Sequential(nn.Linear(8, 5, generator=g1), nn.Linear(5, 2, generator=g1))
    m2 = nn.Sequential(nn.Linear(8, 5, generator=g2), nn.Linear(5, 2, generator=g2))
    np.testing.assert_array_equal(m1.arena.data, m2.arena.data)
    # a shared Generator advances: the second layer differs from a fresh draw with the seed
    assert not np.array_equal(m1[1].weight.data, nn.Linear(5, 2, generator=3).weight.data)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        nn.Linear(0, 3)
    with pytest.raises(TypeError, match="dtype must be one of"):
        nn.Linear(2, 3, dtype="float16")


# --- BatchNorm --------------------------------------------------------------------------------

BN_CASES = {
    "default": {},
    "momentum_none": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running": {"track_running_stats": False},
    "momentum_eps": {"momentum": 0.3, "eps": 1e-3},
}


def _bn_pair(kind, shape, options, dtype, device, rng):
    layer = getattr(nn, kind)(shape[1], dtype=dtype, **options)
    state = layer.state_dict()
    C = shape[1]
    if layer.affine:
        state["weight"][...] = rng.uniform(0.5, 1.5, C)
        state["bias"][...] = rng.standard_normal(C)
    if layer.track_running_stats:
        state["running_mean"][...] = rng.standard_normal(C)
        state["running_var"][...] = rng.uniform(0.5, 2.0, C)
    layer.to(device)
    ref = torch_module_from(layer.state_dict(),
                            getattr(torch.nn, kind)(C, **options))
    return layer, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(BN_CASES))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind, shape", [
    ("BatchNorm1d", (19, 5)),
    ("BatchNorm1d", (6, 5, 7)),
    ("BatchNorm2d", (4, 3, 5, 6)),
])
def test_batchnorm_matches_torch(rng, device, dtype, case, training, kind, shape):
    """Two batches (the cumulative average of momentum=None needs a second), then the
    backward of the second: y, dx, dweight, dbias, running stats and the batch counter."""
    layer, ref = _bn_pair(kind, shape, BN_CASES[case], dtype, device, rng)
    layer.train(training)
    ref.train(training)
    for step in range(2):
        x = randn(rng, shape, dtype, 2.0) + 3.0  # a mean far from 0
        dy = randn(rng, shape, dtype)
        layer.zero_grad()
        ref.zero_grad()
        y = layer(on(x, device))
        dx = layer.backward(on(dy, device))
        y_ref, dx_ref, grads = run_torch(ref, x, dy)
        assert_close(host(y), y_ref, dtype)
        assert_close(host(dx), dx_ref, dtype)
        assert_grads(layer, grads, dtype)
        for name, buf in ref.named_buffers():
            if name == "num_batches_tracked":
                assert int(host(layer.num_batches_tracked)) == int(buf) == (
                    step + 1 if training else 0)
            else:
                assert_close(host(getattr(layer, name)), buf, dtype)
    assert [k for k, _ in layer.named_buffers()] == [k for k, _ in ref.named_buffers()]
    assert [k for k, _ in layer.named_parameters()] == [k for k, _ in ref.named_parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind, shape", [
    ("BatchNorm1d", (23, 6)), ("BatchNorm1d", (5, 6, 7)), ("BatchNorm2d", (3, 4, 5, 6)),
])
def test_batchnorm_relu_fused_matches_torch(rng, device, dtype, training, kind, shape):
    """forward_relu/backward_relu (what Sequential runs) against torch's BN then ReLU."""
    layer, ref = _bn_pair(kind, shape, {}, dtype, device, rng)
    layer.train(training)
    ref.train(training)
    x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
    y = layer.forward_relu(on(x, device))
    dx = layer.backward_relu(on(dy, device))
    y_ref, dx_ref, grads = run_torch(torch.nn.Sequential(ref, torch.nn.ReLU()), x, dy)
    assert_close(host(y), y_ref, dtype)
    assert_close(host(dx), dx_ref, dtype)
    for name, p in layer.named_parameters():
        assert_close(host(p.grad), grads["0." + name], dtype)
    assert_close(host(layer.running_mean), ref.running_mean, dtype)
    assert_close(host(layer.running_var), ref.running_var, dtype)


def test_batchnorm_refused_input_changes_nothing():
    bn = nn.BatchNorm1d(3)
    before = {k: host(v) for k, v in bn.state_dict().items()}
    with pytest.raises(nn.ShapeError, match=r"BatchNorm1d\(3\).*\(N, 3\) or \(N, 3, L\).*"
                                            r"\(2, 3, 4, 5\)"):
        bn(np.ones((2, 3, 4, 5), np.float32))
    with pytest.raises(nn.ShapeError, match=r"\(4, 5\)"):
        bn(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        bn(np.ones((4, 3), np.float64))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(host(v), before[k], err_msg=k)
    with pytest.raises(nn.ShapeError, match=r"\(N, C, H, W\)|\(N, 3, H, W\)"):
        nn.BatchNorm2d(3)(np.ones((4, 3, 5), np.float32))
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm1d(3, eps=0)


# --- activations, Flatten ---------------------------------------------------------------------

ACTIVATIONS = {
    "ReLU": (lambda: nn.ReLU(), lambda: torch.nn.ReLU()),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.2), lambda: torch.nn.LeakyReLU(0.2)),
    "LeakyReLU_default": (lambda: nn.LeakyReLU(), lambda: torch.nn.LeakyReLU()),
    "ELU": (lambda: nn.ELU(), lambda: torch.nn.ELU()),
    "ELU_alpha": (lambda: nn.ELU(0.7), lambda: torch.nn.ELU(0.7)),
    "GELU": (lambda: nn.GELU(), lambda: torch.nn.GELU()),
    "GELU_tanh": (lambda: nn.GELU("tanh"), lambda: torch.nn.GELU("tanh")),
    "SiLU": (lambda: nn.SiLU(), lambda: torch.nn.SiLU()),
    "Sigmoid": (lambda: nn.Sigmoid(), lambda: torch.nn.Sigmoid()),
    "Tanh": (lambda: nn.Tanh(), lambda: torch.nn.Tanh()),
    "Softmax_last": (lambda: nn.Softmax(), lambda: torch.nn.Softmax(-1)),
    "Softmax_0": (lambda: nn.Softmax(0), lambda: torch.nn.Softmax(0)),
    "Softmax_1": (lambda: nn.Softmax(1), lambda: torch.nn.Softmax(1)),
    "LogSoftmax_last": (lambda: nn.LogSoftmax(), lambda: torch.nn.LogSoftmax(-1)),
    "LogSoftmax_1": (lambda: nn.LogSoftmax(1), lambda: torch.nn.LogSoftmax(1)),
    "LogSoftmax_0": (lambda: nn.LogSoftmax(0), lambda: torch.nn.LogSoftmax(0)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_torch(rng, device, dtype, name):
    make, make_ref = ACTIVATIONS[name]
    layer = make().to(device)
    x, dy = randn(rng, (5, 7, 11), dtype, 3.0), randn(rng, (5, 7, 11), dtype)
    y = layer(on(x, device))
    dx = layer.backward(on(dy, device))
    assert layer.backward(on(dy, device), input_grad=False) is None
    y_ref, dx_ref, _ = run_torch(make_ref(), x, dy)
    assert y.dtype == dtype
    assert_close(host(y), y_ref, dtype)
    assert_close(host(dx), dx_ref, dtype)
    assert layer.parameters() == []


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("erf")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start, end, shape", [
    (1, -1, (4, 3, 5, 2)), (2, 3, (4, 3, 5, 2)), (0, 1, (4, 3, 5)), (1, -1, (0, 3, 4)),
    (1, -1, (6, 5)),
])
def test_flatten_matches_torch(rng, device, start, end, shape):
    layer = nn.Flatten(start, end).to(device)
    x = randn(rng, shape, "float32")
    y = layer(on(x, device))
    ref = torch.nn.Flatten(start, end)(torch.from_numpy(x))
    assert y.shape == tuple(ref.shape)
    np.testing.assert_array_equal(host(y), ref.numpy())
    dy = randn(rng, y.shape, "float32")
    dx = layer.backward(on(dy, device))
    assert dx.shape == shape
    np.testing.assert_array_equal(host(dx), dy.reshape(shape))


# --- Dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_is_the_op_on_its_stream(rng, device, dtype):
    p = 0.3
    layer = nn.Dropout(p, generator=11).to(device)
    seed = layer.seed
    assert 0 <= seed < 2**64
    offset = 0
    masks = []
    for shape in ((6, 50), (7, 3, 5)):
        x, dy = randn(rng, shape, dtype), randn(rng, shape, dtype)
        assert layer.offset == offset
        y = layer(on(x, device))
        dx = layer.backward(on(dy, device))
        y_ref = ops.dropout(x, p, True, seed, offset, backend="numpy")
        dx_ref = ops.dropout_backward(dy, p, seed, offset, backend="numpy")
        np.testing.assert_array_equal(host(y), y_ref)
        np.testing.assert_array_equal(host(dx), dx_ref)
        keep = y_ref != 0
        np.testing.assert_allclose(host(y)[keep], x[keep] / (1 - p), rtol=1e-6)
        assert np.array_equal(host(dx) != 0, keep)  # the backward regenerates the same mask
        masks.append(keep.ravel())
        offset += x.size
        assert layer.offset == offset  # the stream advances by the elements used
    assert not np.array_equal(masks[0][:masks[1].size], masks[1])  # fresh draws, not a replay
    assert layer.backward(on(dy, device), input_grad=False) is None


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_eval_and_p0_are_identity(rng, device):
    x, dy = randn(rng, (8, 9), "float32"), randn(rng, (8, 9), "float32")
    for layer in (nn.Dropout(0.5, generator=1).eval(), nn.Dropout(0.0, generator=1)):
        layer.to(device)
        y = layer(on(x, device))
        np.testing.assert_array_equal(host(y), x)
        np.testing.assert_array_equal(host(layer.backward(on(dy, device))), dy)
        assert layer.offset == 0
    layer = nn.Dropout(1.0, generator=1).to(device)
    assert not host(layer(on(x, device))).any()
    assert not host(layer.backward(on(dy, device))).any()


def test_dropout_bad_input():
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be in"):
            nn.Dropout(p)
    layer = nn.Dropout(0.5, generator=0)
    with pytest.raises(TypeError, match="dtype"):
        layer(np.ones(4, np.int32))
    assert layer.offset == 0  # a refused input consumes no stream


def test_extra_state_replays_dropout_masks(rng):
    def model(seed):
        g = np.random.default_rng(seed)
        return nn.Sequential(nn.Linear(6, 8, generator=g), nn.Dropout(0.4, generator=g),
                             nn.ReLU(), nn.Linear(8, 4, generator=g), nn.Dropout(0.2, generator=g))

    a, b = model(1), model(2)
    b.load_state_dict(a.state_dict())
    x = randn(rng, (10, 6), "float32")
    for _ in range(3):
        a(x)
    state = a.extra_state()
    assert set(state) == {"1", "4"}
    assert state["1"]["offset"] == 3 * 10 * 8
    assert not np.array_equal(a(x), b(x))  # different seeds, different masks
    b.load_extra_state(state)
    a.load_extra_state(state)
    for _ in range(2):
        ya, yb = a(x), b(x)
        np.testing.assert_array_equal(ya, yb)
        dy = randn(rng, ya.shape, "float32")
        a.zero_grad()
        b.zero_grad()
        np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    assert a.extra_state() == b.extra_state()
    with pytest.raises(KeyError, match="'0'"):
        b.load_extra_state({"0": {"seed": 1, "offset": 0}})


# --- losses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("ignore", [None, 2])
def test_cross_entropy_matches_torch(rng, device, dtype, reduction, smoothing, ignore):
    N, C = 29, 7
    logits = randn(rng, (N, C), dtype, 3.0)
    labels = rng.integers(0, C, N)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    if ignore is not None:
        labels[::4] = -1
        kwargs["ignore_index"] = -1
    criterion = nn.CrossEntropyLoss(**kwargs)
    loss = criterion(on(logits, device), on(labels, device))
    dloss = rng.standard_normal(N) if reduction == "none" else 2.5
    grad = criterion.backward(on(np.asarray(dloss, dtype), device)
                              if reduction == "none" else dloss)
    xt = t64(logits).requires_grad_(True)
    ref = F.cross_entropy(xt, torch.from_numpy(labels), **kwargs)
    ref.backward(torch.as_tensor(dloss, dtype=torch.float64))
    assert_close(host(loss), ref.detach(), dtype)
    assert grad.shape == (N, C) and grad.dtype == dtype
    assert_close(host(grad), xt.grad, dtype)
    # the default dloss is 1
    grad1 = criterion.backward() if reduction != "none" else None
    if grad1 is not None:
        assert_close(host(grad1) * 2.5, xt.grad, dtype)


def test_cross_entropy_bad_labels():
    criterion = nn.CrossEntropyLoss()
    logits = np.zeros((3, 4), np.float32)
    for bad in (4, -2):
        with pytest.raises(IndexError):
            criterion(logits, np.array([0, bad, 1]))
    with pytest.raises(RuntimeError, match="before a forward"):
        nn.CrossEntropyLoss().backward()
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss(reduction="avg")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_matches_torch(rng, device, dtype, reduction):
    out, target = randn(rng, (13, 5), dtype), randn(rng, (13, 5), dtype)
    criterion = nn.MSELoss(reduction)
    loss = criterion(on(out, device), on(target, device))
    dloss = rng.standard_normal((13, 5)) if reduction == "none" else 0.7
    grad = criterion.backward(on(np.asarray(dloss, dtype), device)
                              if reduction == "none" else dloss)
    xt = t64(out).requires_grad_(True)
    ref = F.mse_loss(xt, t64(target), reduction=reduction)
    ref.backward(torch.as_tensor(dloss, dtype=torch.float64))
    assert_close(host(loss), ref.detach(), dtype)
    assert_close(host(grad), xt.grad, dtype)


# --- Sequential -------------------------------------------------------------------------------


class PlainReLU(nn.ReLU):
    """A ReLU Sequential does not fold into the BatchNorm before it (not exactly ReLU)."""


def mlp(dtype="float32", seed=0, relu=nn.ReLU, sizes=(12, 16, 10, 5), pre_bn_bias=True):
    g = np.random.default_rng(seed)
    a, b, c, d = sizes
    return nn.Sequential(
        nn.Linear(a, b, pre_bn_bias, dtype=dtype, generator=g), nn.BatchNorm1d(b, dtype=dtype),
        relu(),
        nn.Linear(b, c, pre_bn_bias, dtype=dtype, generator=g), nn.BatchNorm1d(c, dtype=dtype),
        relu(),
        nn.Linear(c, d, dtype=dtype, generator=g))


def torch_mlp(sizes=(12, 16, 10, 5), pre_bn_bias=True):
    a, b, c, d = sizes
    return torch.nn.Sequential(
        torch.nn.Linear(a, b, pre_bn_bias), torch.nn.BatchNorm1d(b), torch.nn.ReLU(),
        torch.nn.Linear(b, c, pre_bn_bias), torch.nn.BatchNorm1d(c), torch.nn.ReLU(),
        torch.nn.Linear(c, d))


def grads_of(model):
    return {name: host(p.grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_plan_equals_unfused_layers_and_torch(rng, device, dtype):
    fused, plain = mlp(dtype).to(device), mlp(dtype, relu=PlainReLU).to(device)
    assert [step is not layer for _, layer, step in fused._plan] == [False, True, False, True,
                                                                    False]
    assert [i for i, _, _ in fused._plan] == [0, 1, 3, 4, 6]
    assert all(step is layer for _, layer, step in plain._plan) and len(plain._plan) == 7
    np.testing.assert_array_equal(host(fused.arena.data), host(plain.arena.data))
    ref = torch_module_from(fused.state_dict(), torch_mlp())
    for training in (True, False):
        for m in (fused, plain, ref):
            m.train(training)
            m.zero_grad()
        x, dy = randn(rng, (21, 12), dtype), randn(rng, (21, 5), dtype)
        y, y_plain = fused(on(x, device)), plain(on(x, device))
        dx, dx_plain = fused.backward(on(dy, device)), plain.backward(on(dy, device))
        y_ref, dx_ref, grads = run_torch(ref, x, dy)
        assert_close(host(y), host(y_plain), dtype)
        assert_close(host(dx), host(dx_plain), dtype)
        assert_close(host(y), y_ref, dtype)
        assert_close(host(dx), dx_ref, dtype)
        g_fused, g_plain = grads_of(fused), grads_of(plain)
        for name in g_fused:
            assert_grad_close(name, g_fused, g_plain, dtype)
            assert_grad_close(name, g_fused, grads, dtype)
        for name, buf in ref.named_buffers():
            assert_close(host(fused.state_dict()[name]), buf, dtype)
            assert_close(host(plain.state_dict()[name]), buf, dtype)


def test_sequential_runs_the_step_a_layer_fuses_with_the_next():
    """Sequential knows no layer class: each layer's fused_with decides what runs."""
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

        def backward(self, dy, input_grad=True):
            return 2 * dy if input_grad else None

    class DoubleTwiceThenAddOne:  # not 4x, so that running the two layers would show
        def forward(self, x):
            return 4 * x + 1

        def backward(self, dy, input_grad=True):
            return 4 * dy + 1

    class FusingDouble(Double):
        def fused_with(self, following):
            return DoubleTwiceThenAddOne() if isinstance(following, Double) else None

    model = nn.Sequential(FusingDouble(), Double(), FusingDouble())
    assert [i for i, _, _ in model._plan] == [0, 2]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(model(x), 2 * (4 * x + 1))
    np.testing.assert_array_equal(model.backward(np.ones_like(x)), 4 * 2 + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first", ["trainable", "flatten"])
def test_input_grad_false_returns_none_and_fills_every_grad(rng, device, first):
    def make():
        model = mlp("float64", sizes=(12, 9, 8, 3))
        if first == "flatten":
            model = nn.Sequential(nn.Flatten(), *model.layers)
        return model.to(device)

    shape = (14, 12) if first == "trainable" else (14, 3, 4)
    a, b = make(), make()
    x, dy = randn(rng, shape, "float64"), randn(rng, (14, 3), "float64")
    for m in (a, b):
        m.zero_grad()
        m(on(x, device))
    dx = a.backward(on(dy, device))
    assert dx.shape == shape
    assert b.backward(on(dy, device), input_grad=False) is None
    ga, gb = grads_of(a), grads_of(b)
    assert set(ga) == set(gb) and len(ga) == 10
    for name in ga:
        assert np.abs(gb[name]).sum() > 0, name
        assert_grad_close(name, gb, ga, "float64")


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_accumulate_until_zero_grad(rng, device):
    model = mlp("float64").to(device)
    x, dy = randn(rng, (16, 12), "float64"), randn(rng, (16, 5), "float64")
    model.zero_grad()
    model(on(x, device))
    model.backward(on(dy, device))
    once = grads_of(model)
    model(on(x, device))  # the same batch again (BN statistics are the batch's: same grads)
    model.backward(on(dy, device))
    twice = {name: g / 2 for name, g in grads_of(model).items()}
    for name in twice:
        assert_grad_close(name, twice, once, "float64")
    model.zero_grad()
    assert all(not g.any() for g in grads_of(model).values())
    assert not host(model.arena.grad).any()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_grad_after_optimizer_set_to_none(rng, device):
    """optimizer.zero_grad(set_to_none=True) drops the gradients; the backward then creates
    fresh ones, and model.zero_grad() must zero those too (it puts them back in the arena)."""
    model = mlp("float64").to(device)
    opt = optim.SGD(model.parameters(), lr=0.0)
    x, dy = randn(rng, (16, 12), "float64"), randn(rng, (16, 5), "float64")
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    model(on(x, device))
    model.backward(on(dy, device))  # grads created outside the arena
    once = grads_of(model)
    for _ in range(2):
        model.zero_grad()
        model(on(x, device))
        model.backward(on(dy, device))
        for name, g in grads_of(model).items():
            assert_grad_close(name, {name: g}, once, "float64")
    assert all(p.grad.base is model.arena.grad for p in model.parameters())


def _check_arena(model):
    arena = model.arena
    params = model.parameters()
    assert arena.owns(params)
    assert arena.params == params
    end = 0
    for p, offset in zip(params, arena.offsets):
        assert offset % ALIGN == 0 and offset >= end
        end = offset + p.data.size
        for view, block in ((p.data, arena.data), (p.grad, arena.grad)):
            assert view.base is block
            assert view.shape == p.data.shape
            start = (view.__array_interface__["data"][0]
                     - block.__array_interface__["data"][0]) // block.itemsize
            assert start == offset
    assert end <= arena.data.size < end + ALIGN
    assert arena.data.size % ALIGN == 0
    used = np.zeros(arena.data.size, bool)
    for p, offset in zip(params, arena.offsets):
        used[offset:offset + p.data.size] = True
    return ~used


def test_arena_views_alignment_and_padding(rng):
    model = mlp("float32", sizes=(7, 5, 3, 2))  # sizes not multiples of ALIGN: padding
    padding = _check_arena(model)
    assert padding.any()
    assert model.arena.data.dtype == np.float32
    # writes through a parameter show in the arena and the other way round
    model[0].bias.data[0] = 123.0
    assert model.arena.data[model.arena.offsets[1]] == 123.0
    model.arena.grad[model.arena.offsets[0]] = 5.0
    assert model[0].weight.grad[0, 0] == 5.0
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    criterion = nn.CrossEntropyLoss()
    for _ in range(3):
        x, y = randn(rng, (9, 7), "float32"), rng.integers(0, 2, 9)
        model.zero_grad()
        criterion(model(x), y)
        model.backward(criterion.backward())
        nn.l2_penalty(model.parameters(), 1e-3)
        opt.step()
    assert not model.arena.data[padding].any()
    assert not model.arena.grad[padding].any()
    _check_arena(model)
    with pytest.raises(TypeError, match="one dtype"):
        nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, dtype="float64"))


def test_nested_sequential_shares_one_arena():
    inner = nn.Sequential(nn.Linear(3, 4, generator=0), nn.ReLU())
    outer = nn.Sequential(inner, nn.Linear(4, 2, generator=1))
    assert inner.arena is None and outer.arena is not None
    _check_arena(outer)
    assert [k for k in outer.state_dict()] == ["0.0.weight", "0.0.bias", "1.weight", "1.bias"]
    x = np.ones((2, 3), np.float32)
    outer.zero_grad()
    outer(x)
    outer.backward(np.ones((2, 2), np.float32))
    assert outer.arena.grad.any()


def test_sequential_rejects_non_modules():
    with pytest.raises(TypeError, match="layer 1 must be a gpunn.nn.Module"):
        nn.Sequential(nn.ReLU(), torch.nn.ReLU())


# --- training against torch.optim -------------------------------------------------------------

TRAIN_SIZES = (20, 32, 16, 5)
#: relative bounds on the loss curve and on the final weights after 30 steps; measured:
#: float32 8.7e-8 (losses) and 4.0e-7 (weights), float64 1.5e-16 and 7.1e-16
TRAIN_RTOL = {"float64": 1e-12, "float32": 1e-5}


def _batches(rng, dtype, n=4, size=24):
    return [(randn(rng, (size, TRAIN_SIZES[0]), dtype), rng.integers(0, TRAIN_SIZES[-1], size))
            for _ in range(n)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["adamw", "sgd"])
def test_training_run_matches_torch(rng, device, dtype, algorithm):
    # no bias before a BatchNorm: its gradient is 0 up to rounding, and Adam, which divides by
    # sqrt(v), would turn that noise into steps of size lr: a comparison of noise
    model = mlp(dtype, seed=5, sizes=TRAIN_SIZES, pre_bn_bias=False).to(device)
    ref = torch_module_from(model.state_dict(), torch_mlp(TRAIN_SIZES, pre_bn_bias=False),
                            TORCH_DTYPE[dtype])
    if algorithm == "adamw":
        opt = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    criterion, criterion_ref = nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    batches = _batches(rng, dtype)
    losses, losses_ref = [], []
    for step in range(30):
        x, y = batches[step % len(batches)]
        model.zero_grad()
        loss = criterion(model(on(x, device)), on(y, device))
        model.backward(criterion.backward(), input_grad=False)
        opt.step()
        losses.append(float(host(loss)))
        opt_ref.zero_grad()
        loss_ref = criterion_ref(ref(torch.from_numpy(x)), torch.from_numpy(y))
        loss_ref.backward()
        opt_ref.step()
        losses_ref.append(loss_ref.item())
    bound = TRAIN_RTOL[dtype]
    assert losses[-1] < 0.5 * losses[0]  # it learned something
    assert rel_err(losses, losses_ref) <= bound, rel_err(losses, losses_ref)
    state, state_ref = model.state_dict(), ref.state_dict()
    assert list(state) == list(state_ref)
    for name, value in state.items():
        err = rel_err(host(value), state_ref[name].numpy())
        assert err <= bound, (name, err)


# --- state_dict -------------------------------------------------------------------------------


def test_state_dict_keys_and_round_trip_through_torch(rng):
    model = mlp("float32", seed=3)
    ref = torch_mlp()
    assert list(model.state_dict()) == list(ref.state_dict())
    model.train()
    model(randn(rng, (10, 12), "float32"))  # running stats and counters away from defaults
    ref.load_state_dict({k: torch.tensor(host(v)) for k, v in model.state_dict().items()})
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), host(model.state_dict()[k]), err_msg=k)
    # torch trains a step; its weights come back (tensors accepted) into a fresh model
    x, y = torch.randn(10, 12), torch.randint(0, 5, (10,))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    back = mlp("float32", seed=99)
    back.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(host(back.state_dict()[k]), v.numpy(), err_msg=k)
    assert int(back[1].num_batches_tracked) == 2
    _check_arena(back)  # loading writes into the arena, it does not replace the views
    back.eval()
    ref.eval()
    xe = randn(rng, (6, 12), "float32")
    assert_close(back(xe), ref(torch.from_numpy(xe)).detach(), "float32")


def _snapshot(model):
    return {k: host(v) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(host(v), snapshot[k], err_msg=k)


def test_load_state_dict_refuses_wrong_shapes_and_keys():
    model = mlp("float32", seed=3)
    before = _snapshot(model)
    good = {k: v + 1 for k, v in before.items()}
    bad = dict(good)
    bad["6.bias"] = np.zeros(6, np.float32)  # the last key: nothing before it may be written
    with pytest.raises(nn.ShapeError, match=r"6\.bias.*\(6,\).*\(5,\)"):
        model.load_state_dict(bad)
    _assert_unchanged(model, before)
    missing = dict(good)
    del missing["4.running_var"]
    with pytest.raises(KeyError, match=r"missing \['4\.running_var'\]"):
        model.load_state_dict(missing)
    _assert_unchanged(model, before)
    extra = {**good, "7.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(KeyError, match=r"unexpected \['7\.weight'\]"):
        model.load_state_dict(extra)
    _assert_unchanged(model, before)
    with pytest.raises(nn.ShapeError, match=r"0\.weight"):
        model.load_state_dict({"0.weight": np.zeros((3, 3), np.float32)}, strict=False)
    _assert_unchanged(model, before)
    # non-strict: the keys that fit are loaded, the rest ignored or kept
    model.load_state_dict({**missing, "7.weight": np.zeros(1)}, strict=False)
    now = _snapshot(model)
    for k in before:
        expected = before[k] if k == "4.running_var" else good[k]
        np.testing.assert_array_equal(now[k], expected, err_msg=k)
    _check_arena(model)


# --- devices ----------------------------------------------------------------------------------


def test_to_numpy_and_back_keeps_values_and_arena(rng):
    model = mlp("float64", seed=4)
    x = randn(rng, (11, 12), "float64")
    y_cpu = model(x)
    before = _snapshot(model)
    arena = model.arena
    for device in ("numpy", "cpu", "numpy"):
        assert model.to(device) is model
        assert all(m.device == device for m in model.modules())
        assert model.arena is arena
        _check_arena(model)
        _assert_unchanged(model, before)
    model.arena.grad.fill(1.0)
    model.zero_grad()
    assert not model.arena.grad.any()
    assert all(p.grad.base is model.arena.grad for p in model.parameters())
    model.eval()
    y_numpy = model(x)
    model.to("cpu")
    assert_close(y_numpy, model(x), "float64")
    model.train()
    # the numpy device runs the reference ops: same numbers as the Numba kernels
    assert_close(y_cpu, mlp("float64", seed=4).to("numpy")(x), "float64")


@pytest.mark.skipif(has_gpu(), reason="a CUDA device is visible")
def test_to_cuda_without_a_device_raises():
    model = mlp()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="cuda"):
        model.to("cuda")
    assert all(m.device == "cpu" for m in model.modules())
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="device must be one of"):
        model.to("gpu")


@pytest.mark.gpu
def test_to_cuda_and_back_keeps_values_and_arena(rng):
    import cupy

    model = mlp("float32", seed=4)
    before = _snapshot(model)
    model.to("cuda")
    assert isinstance(model.arena.data, cupy.ndarray)
    assert all(p.data.base is model.arena.data and p.grad.base is model.arena.grad
               for p in model.parameters())
    assert all(isinstance(b, cupy.ndarray) for _, b in model.named_buffers())
    _assert_unchanged(model, before)
    model.to("cpu")
    _check_arena(model)
    _assert_unchanged(model, before)


# --- bad input --------------------------------------------------------------------------------


def test_linear_wrong_feature_count_names_layer_and_shapes():
    layer = nn.Linear(5, 7)
    with pytest.raises(nn.ShapeError, match=r"Linear\(5 -> 7\).*\(N, 5\).*\(8, 4\)"):
        layer(np.ones((8, 4), np.float32))
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.Linear(6, 2))
    with pytest.raises(nn.ShapeError, match=r"Sequential layer 3 \(Linear\).*Linear\(6 -> 2\)"
                                            r".*\(N, 6\).*\(3, 7\)"):
        model(np.ones((3, 6), np.float32))
    with pytest.raises(nn.ShapeError, match=r"Sequential layer 0 \(Linear\).*\(3, 2\)"):
        model(np.ones((3, 2), np.float32))
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(nn.ShapeError, match=r"layer 1 \(BatchNorm1d\).*\(2, 5, 1, 4\)"):
        model(np.ones((2, 5, 1, 3), np.float32))  # Linear takes (*, in); BatchNorm1d not 4-D
    assert int(model[1].num_batches_tracked) == 0
    # a backward with a dy that does not fit the forward's output
    layer(np.ones((2, 5), np.float32))
    layer.zero_grad()
    with pytest.raises(nn.ShapeError, match=r"backward.*\(2, 7\).*\(2, 6\)"):
        layer.backward(np.ones((2, 6), np.float32))
    assert not layer.weight.grad.any()


# --- penalties --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_penalties_match_torch(rng, dtype):
    model = mlp(dtype, seed=2)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    weights[0].data[0, :3] = 0.0  # |w| has no slope at 0: its gradient is 0
    model.zero_grad()
    model.arena.grad[...] = rng.standard_normal(model.arena.grad.size)  # accumulated into
    start = {id(p): p.grad.copy() for p in weights}
    ts = [t64(p.data).requires_grad_(True) for p in weights]
    l2 = nn.l2_penalty(weights, 0.3)
    l2_ref = 0.15 * sum((t ** 2).sum() for t in ts)
    l1 = nn.l1_penalty(weights, 0.02)
    l1_ref = 0.02 * sum(t.abs().sum() for t in ts)
    (l2_ref + l1_ref).backward()
    assert isinstance(l2, float) and isinstance(l1, float)
    assert abs(l2 - l2_ref.item()) <= TOLERANCE[dtype] * abs(l2_ref.item())
    assert abs(l1 - l1_ref.item()) <= TOLERANCE[dtype] * abs(l1_ref.item())
    for p, t in zip(weights, ts):
        assert_close(p.grad - start[id(p)], t.grad, dtype)
    assert not (weights[0].grad[0, :3] - start[id(weights[0])][0, :3]).any()
    # grad=False: the value only; strength < 0 refused before anything changes
    grads = host(model.arena.grad)
    assert nn.l2_penalty(weights, 0.3, grad=False) == l2
    assert nn.l1_penalty(weights, 0.02, grad=False) == l1
    for f in (nn.l1_penalty, nn.l2_penalty):
        for strength in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=r"strength must be in \[0, inf\)"):
                f(weights, strength)
    np.testing.assert_array_equal(model.arena.grad, grads)
    assert nn.l2_penalty(weights, 0.0) == 0.0


def test_penalties_create_missing_grads():
    layer = nn.Linear(3, 2, generator=0)
    assert layer.weight.grad is None
    nn.l1_penalty([layer.weight], 1.0)
    np.testing.assert_array_equal(layer.weight.grad, np.sign(layer.weight.data))


def test_linear_refuses_another_dtype():
    layer = nn.Linear(3, 2, generator=0)
    with pytest.raises(TypeError, match=r"Linear\(3 -> 2\).*float64.*float32"):
        layer(np.ones((4, 3)))


def test_losses_run_on_the_backend_asked(monkeypatch):
    """backend= reaches the ops (a model's device), and check_labels=False skips the check."""
    seen = []
    real = ops.cross_entropy_forward

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["check_labels"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "cross_entropy_forward", spy)
    logits = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 1, 0])
    reference = nn.CrossEntropyLoss()(logits, labels)
    loss = nn.CrossEntropyLoss(backend="numpy", check_labels=False)(logits, labels)
    assert seen == [(None, True), ("numpy", False)]
    assert abs(float(loss) - float(reference)) <= 1e-6 * abs(float(reference))
    mse = nn.MSELoss(backend="numpy")
    assert float(mse(logits, logits + 1)) == pytest.approx(1.0)
    np.testing.assert_allclose(mse.backward(), -2 / logits.size, rtol=1e-6)


# --- errors change nothing --------------------------------------------------------------------


def _grads(model):
    return [host(p.grad) for p in model.parameters()]


def test_sequential_backward_checks_dy_before_any_gradient(rng):
    model = mlp("float32", seed=5)
    x = randn(rng, (6, 12), "float32")
    y = model(x)
    model.zero_grad()
    model.arena.grad[...] = rng.standard_normal(model.arena.grad.size)  # accumulated into
    before, state = _grads(model), _snapshot(model)
    dy = randn(rng, y.shape, "float32")
    cases = [(dy.astype(np.float64), TypeError, r"Sequential backward: dy has dtype float64, "
                                                r"expected float32"),
             (dy[:, :4], nn.ShapeError, r"dy has shape \(6, 4\), expected \(6, 5\)"),
             (torch.from_numpy(dy), TypeError, r"dy is a torch tensor; gpunn.nn layers take "
                                               r"NumPy or CuPy arrays.*gpunn.torch"),
             (dy.tolist(), TypeError, r"dy is a list"),
             (dy.astype(">f4"), TypeError, r"dy has non-native byte order")]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            model.backward(bad)
        for g, b in zip(_grads(model), before):
            np.testing.assert_array_equal(g, b)
    _assert_unchanged(model, state)
    # each layer on its own checks its dy too
    last = model[6]
    with pytest.raises(TypeError, match=r"Linear\(10 -> 5\) backward: dy has dtype float64"):
        last.backward(dy.astype(np.float64))
    bn = model[4]
    with pytest.raises(TypeError, match=r"BatchNorm1d\(10\) backward: dy is a torch tensor"):
        bn.backward_relu(torch.zeros(6, 10))
    for g, b in zip(_grads(model), before):
        np.testing.assert_array_equal(g, b)
    model.backward(dy)  # the good dy still works after the refusals
    assert any(not np.array_equal(g, b) for g, b in zip(_grads(model), before))


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(3, 2), lambda: nn.Flatten(), lambda: nn.BatchNorm1d(3),
    lambda: nn.Dropout(0.5), lambda: nn.ReLU(), lambda: nn.Softmax(),
    lambda: nn.Sequential(nn.Linear(3, 2), nn.ReLU())])
def test_backward_before_forward_says_so(make):
    layer = make()
    with pytest.raises(RuntimeError, match="backward called before a forward: call forward "
                                           "first"):
        layer.backward(np.ones((4, 3), np.float32))


def test_backward_after_a_failed_forward_says_so(rng):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(nn.ShapeError):
        model(np.ones((2, 3), np.float32))  # layers 0 and 1 ran, layer 2 refused
    with pytest.raises(RuntimeError, match="call forward first"):
        model.backward(np.ones((2, 2), np.float32))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(3, 2), (4, 3)), (lambda: nn.Flatten(), (4, 3)),
    (lambda: nn.BatchNorm1d(3), (4, 3)), (lambda: nn.Dropout(0.5), (4, 3)),
    (lambda: nn.GELU(), (4, 3)), (lambda: nn.Sequential(nn.Linear(3, 2)), (4, 3))])
def test_layers_refuse_torch_tensors_naming_the_argument(make, shape):
    layer = make()
    before = {k: host(v) for k, v in layer.state_dict().items()}
    with pytest.raises(TypeError, match=r"x is a torch tensor; gpunn.nn layers take NumPy or "
                                        r"CuPy arrays \(for torch models use gpunn.torch\)"):
        layer(torch.ones(shape))
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(host(v), before[k], err_msg=k)
    if isinstance(layer, nn.Dropout):
        assert layer.offset == 0


def test_layer_checks_its_gradients_before_accumulating(rng):
    layer = nn.Linear(3, 2, generator=0)
    layer(randn(rng, (4, 3), "float32"))
    read_only = np.zeros((2, 3), np.float32)
    read_only.flags.writeable = False
    layer.weight.grad = read_only
    layer.bias.grad = bias = randn(rng, 2, "float32")
    before = bias.copy()
    with pytest.raises(ValueError, match=r"Linear\(3 -> 2\) backward: weight.grad is read-only"):
        layer.backward(randn(rng, (4, 2), "float32"))
    np.testing.assert_array_equal(bias, before)
    layer.weight.grad = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"weight.grad has shape \(3, 2\).*expected \(2, 3\)"):
        layer.backward(randn(rng, (4, 2), "float32"))
    np.testing.assert_array_equal(bias, before)


def test_batchnorm_checks_its_counter_before_updating_running_stats(rng):
    bn = nn.BatchNorm1d(3)
    counter = np.zeros((), np.int64)
    counter.flags.writeable = False
    bn.num_batches_tracked = counter
    before = {k: host(v) for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): num_batches_tracked is read-only"):
        bn(randn(rng, (5, 3), "float32"))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(host(v), before[k], err_msg=k)


def _read_only(a):
    a = np.array(a)
    a.flags.writeable = False
    return a


def test_load_state_dict_from_read_only_arrays_copies_them(rng):
    model = mlp("float32", seed=6)
    source = {k: _read_only(v + 1) for k, v in _snapshot(model).items()}
    model.load_state_dict(source)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, source[k], err_msg=k)
        assert v.flags.writeable and not np.shares_memory(v, source[k]), k
    # a training step writes every parameter, gradient and running statistic
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    y = model(randn(rng, (8, 12), "float32"))
    model.zero_grad()
    model.backward(np.ones_like(y))
    opt.step()
    assert int(model[1].num_batches_tracked) == int(source["1.num_batches_tracked"]) + 1
    assert not np.array_equal(model[1].running_mean, source["1.running_mean"])
    assert not np.array_equal(model[0].weight.data, source["0.weight"])


def test_load_state_dict_into_a_read_only_array_is_refused_first():
    model = mlp("float32", seed=7)
    model[4].running_var = _read_only(model[4].running_var)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"load_state_dict: 4.running_var is read-only"):
        model.load_state_dict({k: v + 1 for k, v in before.items()})
    _assert_unchanged(model, before)
    bad = {k: v + 1 for k, v in before.items()}
    bad["6.bias"] = np.array(["a"] * 5)
    model = mlp("float32", seed=7)
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"6.bias has dtype <U1.*expected real numbers"):
        model.load_state_dict(bad)
    _assert_unchanged(model, before)


def test_load_extra_state_checks_every_module_first():
    g = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(4, 4, generator=g), nn.Dropout(0.5, generator=g),
                          nn.Dropout(0.5, generator=g))
    before = model.extra_state()
    for bad in ({"seed": 1, "offset": "x"}, {"seed": -1, "offset": 0}, {"seed": 1},
                {"seed": 1.5, "offset": 0}, [1, 2]):
        with pytest.raises(ValueError, match=r"load_extra_state: module '2'"):
            model.load_extra_state({"1": {"seed": 9, "offset": 9}, "2": bad})
        assert model.extra_state() == before


def test_penalties_and_zero_grad_check_every_gradient_first(rng):
    layers = [nn.Linear(3, 2, generator=0), nn.Linear(2, 2, generator=1)]
    first = randn(rng, (2, 3), "float32")
    layers[0].weight.grad = first
    layers[1].weight.grad = _read_only(np.ones((2, 2), np.float32))
    before = first.copy()
    weights = [layer.weight for layer in layers]
    for penalty in (nn.l1_penalty, nn.l2_penalty):
        with pytest.raises(ValueError, match=rf"{penalty.__name__}: params\[1\].grad is read-only"):
            penalty(weights, 0.5)
        np.testing.assert_array_equal(first, before)
    model = nn.Sequential(nn.ReLU(), layers[0], nn.ReLU(), layers[1])
    model.arena = None  # a model whose parameters are not packed (packing rebinds gradients)
    layers[0].weight.grad = first
    layers[1].weight.grad = _read_only(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"zero_grad: 3.weight.grad is read-only"):
        model.zero_grad()
    np.testing.assert_array_equal(first, before)


def test_mse_loss_keeps_nothing_from_a_refused_call(rng):
    loss = nn.MSELoss()
    out = randn(rng, (4, 3), "float32")
    loss(out, out + 1)
    with pytest.raises((TypeError, ValueError)):
        loss(randn(rng, (4, 3), "float32").astype(np.int32), np.zeros((4, 3)))
    np.testing.assert_allclose(loss.backward(), -2 / out.size, rtol=1e-6)
