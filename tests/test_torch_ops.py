"""gpunn.torch.nn.functional: every op's autograd formula against float64 finite differences
(torch.autograd.gradcheck) for every option, values and gradients against
torch.nn.functional, the custom-op registrations (torch.library.opcheck: schema, fake
implementation, autograd, AOT dispatch), layouts, autocast dtypes, dropout's seed and
statistics, and the bytes each op saves for its backward."""

import pytest
import torch
import torch.nn.functional as TF

import gpunn.torch.nn.functional as F
from gpunn.torch.memory import saved_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = dict(dtype=torch.float64)


def gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def leaf(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def channels_last(t):
    return t.detach().to(memory_format=torch.channels_last).requires_grad_()


# --- gradcheck: every op and option ----------------------------------------------------------

ACTIVATIONS = {
    "sigmoid": ((), {}), "tanh": ((), {}), "relu": ((), {}), "silu": ((), {}),
    "leaky_relu": ((0.2,), {}), "elu": ((0.7,), {}),
    "gelu": ((), {"approximate": "none"}), "gelu_tanh": ((), {"approximate": "tanh"}),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_gradcheck_and_torch(name):
    args, kwargs = ACTIVATIONS[name]
    op = name.removesuffix("_tanh")
    ours, theirs = getattr(F, op), getattr(TF, op)
    x = leaf(5, 7)
    with torch.no_grad():  # keep away from the kinks of relu-like ops
        x[x.abs() < 1e-3] = 0.5
    gradcheck(lambda x: ours(x, *args, **kwargs), x)
    y = ours(x, *args, **kwargs)
    ref = theirs(x, *args, **kwargs)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid"])
def test_activation_channels_last_kept(name):
    x = channels_last(leaf(2, 3, 4, 5))
    gradcheck(getattr(F, name), x)
    y = getattr(F, name)(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, getattr(TF, name)(x))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_gradcheck_and_torch(log, dim):
    ours, theirs = (F.log_softmax, TF.log_softmax) if log else (F.softmax, TF.softmax)
    x = leaf(4, 6, 3)
    gradcheck(lambda x: ours(x, dim), x)
    torch.testing.assert_close(ours(x, dim), theirs(x, dim))
    torch.testing.assert_close(ours(x, dim=dim, dtype=torch.float32),
                               theirs(x, dim=dim, dtype=torch.float32))


def test_softmax_implicit_dim_warns_like_torch():
    x = leaf(3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        y = F.softmax(x)
    torch.testing.assert_close(y, TF.softmax(x, 1))


BN_CASES = {
    "train": dict(training=True, stats=True, affine=True),
    "train-no-affine": dict(training=True, stats=True, affine=False),
    "train-no-stats": dict(training=True, stats=False, affine=True),
    "eval": dict(training=False, stats=True, affine=True),
    "train-momentum-none": dict(training=True, stats=True, affine=True, momentum=None),
}


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batch_norm_gradcheck_and_torch(case, layout, relu):
    c = BN_CASES[case]
    x = leaf(2, 3) if layout == "2d" else leaf(3, 3, 2, 3)
    x = x if layout != "channels_last" else channels_last(x)
    C = x.shape[1]
    w, b = (leaf(C, seed=1), leaf(C, seed=2)) if c["affine"] else (None, None)
    rm, rv = (torch.randn(C, **F64), torch.rand(C, **F64) + 0.5) if c["stats"] else (None, None)
    momentum = c.get("momentum", 0.1)
    nbt = torch.tensor(4) if momentum is None else None
    ours = F.batch_norm_relu if relu else F.batch_norm

    def f(x, *wb):
        w_, b_ = wb if wb else (None, None)
        return ours(x, None if rm is None else rm.clone(), None if rv is None else rv.clone(),
                    w_, b_, c["training"], momentum, 1e-5, num_batches_tracked=nbt)

    gradcheck(f, x, *((w, b) if w is not None else ()))
    # against torch, running statistics included (momentum None: factor 1 / batches)
    r1 = [None if a is None else a.clone() for a in (rm, rv)]
    r2 = [None if a is None else a.clone() for a in (rm, rv)]
    y = ours(x, *r1, w, b, c["training"], momentum, num_batches_tracked=nbt)
    ref = TF.batch_norm(x, *r2, w, b, c["training"], 0.25 if momentum is None else momentum)
    ref = TF.relu(ref) if relu else ref
    torch.testing.assert_close(y, ref)
    for a, e in zip(r1, r2):
        if a is not None:
            torch.testing.assert_close(a, e)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, e)


def test_batch_norm_errors_name_the_argument():
    x = leaf(4, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x[:1], None, None, training=True)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.batch_norm(x, torch.zeros(3, **F64), torch.ones(3, **F64), training=True,
                     momentum=None)
    with pytest.raises(ValueError, match="weight"):
        F.batch_norm(x, None, None, torch.ones(4, **F64), training=True)
    with pytest.raises(RuntimeError, match="running_mean"):  # torch raises too
        F.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(x, None, None, training=True, eps=0.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("p", [0.3, 1.0])
def test_dropout_gradcheck(p, layout):
    x = leaf(3, 4, 2, 5)
    x = channels_last(x) if layout == "channels_last" else x

    def f(x):
        torch.manual_seed(0)  # one mask for every evaluation
        return F.dropout(x, p)

    gradcheck(f, x)
    y = f(x)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    # the gradient is the forward's own mask and scale: dx = y / x
    dx = torch.autograd.grad(y.sum(), x)[0]
    torch.testing.assert_close(dx * x, y)


def test_dropout_identity_cases_and_p_check():
    x = leaf(4, 5)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            F.dropout(x, p)


def test_dropout_statistics_and_manual_seed():
    """The keep fraction is 1 - p within 5 sigma, kept values are scaled by 1/(1-p),
    torch.manual_seed reproduces the mask and successive calls draw new ones."""
    x = torch.ones(200_000, **F64)
    torch.manual_seed(3)
    y1, y2 = F.dropout(x, 0.3), F.dropout(x, 0.3)
    torch.manual_seed(3)
    assert torch.equal(F.dropout(x, 0.3), y1)
    assert not torch.equal(y1, y2)
    kept = y1 != 0
    frac = kept.double().mean().item()
    assert abs(frac - 0.7) < 5 * (0.7 * 0.3 / x.numel()) ** 0.5
    torch.testing.assert_close(y1[kept], torch.full_like(y1[kept], 1 / 0.7))


REDUCTIONS = ["none", "mean", "sum"]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignore_index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_gradcheck_and_torch(reduction, ignore, smoothing):
    x = leaf(6, 5)
    t = torch.tensor([0, 4, 2, 3, 1, 1])
    if ignore:
        t[[1, 4]] = 7
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=7)
    gradcheck(lambda x: F.cross_entropy(x, t, **kw), x)
    y, ref = F.cross_entropy(x, t, **kw), TF.cross_entropy(x, t, **kw)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("shape", [(5,), (3, 5, 2, 2)], ids=["unbatched", "spatial"])
def test_cross_entropy_other_shapes(shape):
    x = leaf(*shape)
    t = torch.tensor(2) if len(shape) == 1 else torch.randint(5, (3, 2, 2))
    for reduction in REDUCTIONS:
        gradcheck(lambda x: F.cross_entropy(x, t, reduction=reduction), x)
        torch.testing.assert_close(F.cross_entropy(x, t, reduction=reduction),
                                   TF.cross_entropy(x, t, reduction=reduction))


def test_loss_options_not_supported_are_refused():
    x, t = leaf(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(NotImplementedError, match="weight"):
        F.cross_entropy(x, t, weight=torch.ones(4, **F64))
    with pytest.raises(NotImplementedError, match="target"):
        F.cross_entropy(x, torch.softmax(x.detach(), 1))
    with pytest.raises(NotImplementedError, match="weight"):
        F.nll_loss(x, t, weight=torch.ones(4, **F64))
    with pytest.raises(IndexError, match="labels"):
        F.cross_entropy(x, torch.tensor([0, 9, 1]))


@pytest.mark.parametrize("ignore", [False, True], ids=["all-rows", "ignore_index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_gradcheck_and_torch(reduction, ignore):
    x = leaf(6, 5)
    t = torch.tensor([0, 4, 2, 3, 1, 1])
    if ignore:
        t[2] = -100
    gradcheck(lambda x: F.nll_loss(x, t, reduction=reduction), x)
    torch.testing.assert_close(F.nll_loss(x, t, reduction=reduction),
                               TF.nll_loss(x, t, reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_loss_gradcheck_and_torch(reduction):
    x, t = leaf(4, 3), leaf(4, 3, seed=1)
    gradcheck(lambda x, t: F.mse_loss(x, t, reduction=reduction), x, t)
    torch.testing.assert_close(F.mse_loss(x, t, reduction=reduction),
                               TF.mse_loss(x, t, reduction=reduction))
    assert F.mse_loss(x, t.detach(), reduction=reduction).requires_grad


def test_mse_loss_broadcast_warns_like_torch():
    x, t = leaf(4, 3), leaf(3, seed=1)
    with pytest.warns(UserWarning, match="target size"):
        y = F.mse_loss(x, t)
    torch.testing.assert_close(y, TF.mse_loss(x, t.expand(4, 3)))
    with pytest.warns(UserWarning, match="target size"):
        gradcheck(lambda x, t: F.mse_loss(x, t), x, t)


def test_inplace_writes_input_only_without_autograd():
    x = torch.randn(5, 4)
    y = F.relu(x, inplace=True)
    assert y is x and (x >= 0).all()
    a = leaf(5, 4)
    h = a * 1
    y = F.relu(h, inplace=True)
    assert y is not h and y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(a.grad, (a > 0).double())


# --- the registrations: schema, fake impl, autograd, AOT dispatch ----------------------------


def _opcheck_cases():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)  # the kernels gradcheck compiled already
    try:
        x = torch.randn(3, 2, 2, 3, requires_grad=True)
        w, b = torch.randn(2, requires_grad=True), torch.randn(2, requires_grad=True)
        z = torch.randn(5, 4, requires_grad=True)
        z2 = torch.randn(5, 4, requires_grad=True)
        rm, rv = torch.zeros(2), torch.ones(2)
    finally:
        torch.set_default_dtype(torch.float32)
    t = torch.randint(4, (5,))
    O = torch.ops.gpunn
    return {
        "relu": (O.relu.default, (x,)),
        "gelu": (O.gelu.default, (x, "tanh")),
        "leaky_relu-channels_last": (O.leaky_relu.default, (channels_last(x), 0.2)),
        "log_softmax": (O.log_softmax.default, (x, 1)),
        "batch_norm_relu-train": (O.batch_norm.default,
                                  (x, rm, rv, w, b, True, 0.1, 1e-5, None, True)),
        "batch_norm-momentum-none": (O.batch_norm.default,
                                     (channels_last(x), rm, rv, None, None, True, None, 1e-5,
                                      torch.tensor(2), False)),
        "dropout": (O.dropout.default, (x, 0.3, torch.tensor(5))),
        "cross_entropy": (O.cross_entropy.default, (z, t, "none", 0.1, -100)),
        "nll_loss": (O.nll_loss.default, (z, t, "mean", 1)),
        "mse_loss": (O.mse_loss.default, (z, z2, "sum")),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --- autocast, memory --------------------------------------------------------------------------


def test_autocast_cpu_dtypes():
    """Under CPU autocast (bfloat16): activations, dropout and batch norm keep the input's
    dtype; softmax and the losses compute in float32. Values match torch on the same input."""
    x = torch.randn(4, 3, 2, 2).bfloat16().requires_grad_()
    rm, rv, w = torch.zeros(3), torch.ones(3), torch.ones(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.gelu(x).dtype == torch.bfloat16
        assert F.dropout(x, 0.2).dtype == torch.bfloat16
        y = F.batch_norm(x, rm, rv, w, None, True)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, TF.batch_norm(x, rm.clone(), rv.clone(), w, None, True),
                                   atol=2e-2, rtol=2e-2)
        assert F.softmax(x, 1).dtype == torch.float32
        loss = F.cross_entropy(x.reshape(4, -1), torch.tensor([0, 1, 2, 3]))
        assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0


def test_saved_bytes_against_torch():
    """Dropout saves its 8-byte seed, not a mask; BN+ReLU saves x (and per-channel
    statistics), not x and y; cross-entropy saves the logits, labels and an 8-byte
    log-sum-exp per row (torch: log_softmax(x) and labels)."""
    torch.manual_seed(0)
    h = torch.randn(8, 4, 6, 6, **F64, requires_grad=True) * 1  # an activation, not a leaf
    n = h.numel() * 8
    assert saved_bytes(F.dropout, h, 0.5) == 8
    assert saved_bytes(TF.dropout, h, 0.5) >= h.numel()
    w, b = torch.ones(4, **F64, requires_grad=True), torch.zeros(4, **F64, requires_grad=True)
    rm, rv = torch.zeros(4, **F64), torch.ones(4, **F64)
    ours = saved_bytes(F.batch_norm_relu, h, rm, rv, w, b, True, exclude=(w, b))
    theirs = saved_bytes(lambda: TF.relu(TF.batch_norm(h, rm, rv, w, b, True)), exclude=(w, b))
    assert n <= ours <= n + 128 and theirs >= 2 * n
    z = torch.randn(16, 10, **F64, requires_grad=True) * 1
    t = torch.randint(10, (16,))
    assert saved_bytes(F.cross_entropy, z, t) == z.numel() * 8 + 16 * 8 + 16 * 8


# --- gpunn.ops never detaches silently ---------------------------------------------------------


def _ops_calls():
    """Every array-taking op of gpunn.ops, called on float64 tensors; ``g`` (requires grad)
    goes where the name says."""
    from gpunn import ops

    x, dy = torch.randn(4, 3, 2, 2, **F64), torch.randn(4, 3, 2, 2, **F64)
    m, s = torch.zeros(3, **F64), torch.ones(3, **F64)
    z, t = torch.randn(5, 4, **F64), torch.tensor([0, 3, 1, 2, 2])
    calls = {}
    for name in ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu", "softmax",
                 "log_softmax"):
        calls[name] = ("x", lambda g, f=getattr(ops, name): f(g))
        calls[f"{name}_backward"] = (
            "dy", lambda g, f=getattr(ops, f"{name}_backward"): f(g, x))
    calls["gelu(tanh)"] = ("x", lambda g: ops.gelu(g, approximate="tanh"))
    for name in ("batch_norm", "batch_norm_forward", "batch_norm_relu",
                 "batch_norm_relu_forward"):
        calls[name] = ("x", lambda g, f=getattr(ops, name): f(g, m.clone(), s.clone(),
                                                                training=True))
        calls[f"{name}(weight)"] = ("weight", lambda g, f=getattr(ops, name): f(
            x, None, None, g[0, :, 0, 0].contiguous(), training=True))
    calls["batch_norm_backward"] = ("dy", lambda g: ops.batch_norm_backward(g, x, m, s))
    calls["batch_norm_relu_backward"] = ("dy",
                                         lambda g: ops.batch_norm_relu_backward(g, x, m, s))
    calls["dropout"] = ("x", lambda g: ops.dropout(g, 0.5, seed=1))
    calls["dropout_backward"] = ("dy", lambda g: ops.dropout_backward(g, 0.5, 1))
    rows = lambda g: g.reshape(4, -1)[:, :4].contiguous()  # noqa: E731  (4, 4) logits
    calls["cross_entropy"] = ("logits", lambda g: ops.cross_entropy(rows(g), t[:4]))
    calls["cross_entropy_forward"] = ("logits",
                                      lambda g: ops.cross_entropy_forward(rows(g), t[:4]))
    calls["cross_entropy_backward"] = ("logits",
                                       lambda g: ops.cross_entropy_backward(1.0, rows(g), t[:4]))
    calls["nll_loss"] = ("log_probs", lambda g: ops.nll_loss(rows(g), t[:4]))
    calls["nll_loss_backward"] = ("dloss", lambda g: ops.nll_loss_backward(g.sum(), z, t))
    calls["mse_loss"] = ("target", lambda g: ops.mse_loss(x, g))
    calls["mse_loss_backward"] = ("input", lambda g: ops.mse_loss_backward(1.0, g, x))
    calls["augment"] = ("x", lambda g: ops.augment(g, 3, degrees=10.0))
    calls["affine_warp"] = ("theta", lambda g: ops.affine_warp(
        x, g.reshape(-1)[:24].reshape(4, 2, 3).contiguous()))
    return calls


CALLS = list(_ops_calls())


@pytest.mark.parametrize("case", CALLS)
def test_ops_refuse_tensors_that_require_grad(case):
    """gpunn.ops given a tensor that requires grad, grad mode on: a RuntimeError naming the
    argument and gpunn.torch.nn.functional (the op itself where it has a differentiable
    twin), before anything is computed; under torch.no_grad() the same call runs."""
    arg, call = _ops_calls()[case]
    g = torch.randn(4, 3, 2, 2, **F64).requires_grad_()
    base = case.split("(")[0].removesuffix("_forward")
    where = (rf"gpunn\.torch\.nn\.functional\.{base}\b" if base in F.__all__
             else r"gpunn\.torch\.nn\.functional")
    with pytest.raises(RuntimeError, match=rf"{arg} requires grad.*{where}"):
        call(g)
    with torch.no_grad():
        call(g)
    call(g.detach())


def test_every_op_of_gpunn_ops_is_covered():
    from gpunn import ops

    names = {c.split("(")[0] for c in CALLS}
    assert set(ops.__all__) - names == {"random_affine", "dropout_mask"}  # take no tensor data


# --- CUDA tensors (a GPU only: the simulator has no CUDA torch tensors) ----------------------


@pytest.mark.gpu
def test_cuda_tensors_gradcheck_16bit_autocast_and_streams():
    """On CUDA tensors: gradcheck (float64) of every op family, channels_last batch norm,
    float16/bfloat16 against torch in float32, autocast dtypes, and work queued on torch's
    current stream (a side stream gives the same result)."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    dev = dict(device="cuda", dtype=torch.float64)
    x = torch.randn(4, 3, 2, 5, **dev).requires_grad_()
    w, b = torch.rand(3, **dev).add_(0.5).requires_grad_(), torch.randn(3, **dev).requires_grad_()
    z, t = torch.randn(6, 5, **dev).requires_grad_(), torch.tensor([0, 4, 1, 2, -100, 3],
                                                                   device="cuda")
    gradcheck(lambda x: F.gelu(x, approximate="tanh"), x)
    gradcheck(lambda x: F.log_softmax(x, 1), x)
    gradcheck(lambda x, w, b: F.batch_norm_relu(x, None, None, w, b, True), channels_last(x),
              w, b)
    gradcheck(lambda x: (torch.manual_seed(0), F.dropout(x, 0.3))[1], x)
    gradcheck(lambda z: F.cross_entropy(z, t, label_smoothing=0.1), z)
    gradcheck(lambda z: F.mse_loss(z, torch.ones_like(z), reduction="sum"), z)
    for dtype in (torch.float16, torch.bfloat16):
        h = torch.randn(8, 3, 4, 4, device="cuda").to(dtype).requires_grad_()
        y = F.batch_norm(h, None, None, torch.ones(3, device="cuda"), None, True)
        ref = TF.batch_norm(h.float(), None, None, None, None, True)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
        y.float().sum().backward()
        assert h.grad.dtype == dtype and torch.isfinite(h.grad.float()).all()
    with torch.autocast("cuda", dtype=torch.float16):
        h = torch.randn(8, 10, device="cuda").half()
        assert F.relu(h).dtype == torch.float16
        assert F.softmax(h, 1).dtype == torch.float32
        assert F.cross_entropy(h, torch.randint(10, (8,), device="cuda")).dtype == torch.float32
    big = torch.randn(1 << 20, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = F.silu(big)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, TF.silu(big))
