"""gpunn.torch.nn modules and gpunn.torch.patch/unpatch: torch's constructor arguments,
parameters, buffers and state_dict keys; in-place swaps that keep tensors, hooks and modes;
the BatchNorm+ReLU fusion and when it must not happen; state dicts both ways; an MLP and a
small CNN trained 50 steps patched and unpatched from the same weights."""

import copy

import pytest
import torch

import gpunn.torch as gt
import gpunn.torch.nn as gnn

pytestmark = pytest.mark.usefixtures("one_thread")

# (gpunn class, torch class, constructor arguments other than the defaults)
MODULES = [
    (gnn.ReLU, torch.nn.ReLU, dict(inplace=True)),
    (gnn.LeakyReLU, torch.nn.LeakyReLU, dict(negative_slope=0.2)),
    (gnn.ELU, torch.nn.ELU, dict(alpha=0.5)),
    (gnn.GELU, torch.nn.GELU, dict(approximate="tanh")),
    (gnn.SiLU, torch.nn.SiLU, dict()),
    (gnn.Sigmoid, torch.nn.Sigmoid, dict()),
    (gnn.Tanh, torch.nn.Tanh, dict()),
    (gnn.Softmax, torch.nn.Softmax, dict(dim=0)),
    (gnn.LogSoftmax, torch.nn.LogSoftmax, dict(dim=1)),
    (gnn.Dropout, torch.nn.Dropout, dict(p=0.25)),
    (gnn.BatchNorm1d, torch.nn.BatchNorm1d, dict(num_features=5, momentum=None)),
    (gnn.BatchNorm2d, torch.nn.BatchNorm2d, dict(num_features=5, eps=1e-3, affine=False)),
    (gnn.BatchNorm3d, torch.nn.BatchNorm3d, dict(num_features=5, track_running_stats=False)),
    (gnn.CrossEntropyLoss, torch.nn.CrossEntropyLoss, dict(label_smoothing=0.1,
                                                           ignore_index=3)),
    (gnn.NLLLoss, torch.nn.NLLLoss, dict(reduction="sum")),
    (gnn.MSELoss, torch.nn.MSELoss, dict(reduction="none")),
]


def _ids(m):
    return m[0].__name__


@pytest.mark.parametrize("spec", MODULES, ids=_ids)
def test_module_matches_torch_attributes_and_state(spec):
    ours_cls, torch_cls, kwargs = spec
    ours, theirs = ours_cls(**kwargs), torch_cls(**kwargs)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(theirs).replace(torch_cls.__name__, ours_cls.__name__, 1)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


def _input_for(m):
    g = torch.Generator().manual_seed(0)
    if isinstance(m, torch.nn.BatchNorm1d):
        return (torch.randn(6, 5, generator=g),)
    if isinstance(m, torch.nn.BatchNorm2d):
        return (torch.randn(4, 5, 3, 3, generator=g),)
    if isinstance(m, torch.nn.BatchNorm3d):
        return (torch.randn(3, 5, 2, 2, 2, generator=g),)
    if isinstance(m, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
        return torch.randn(6, 5, generator=g), torch.tensor([0, 3, 4, 1, 3, 2])
    if isinstance(m, torch.nn.MSELoss):
        return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    return (torch.randn(6, 5, generator=g),)


@pytest.mark.parametrize("spec", MODULES, ids=_ids)
def test_module_forward_backward_match_torch(spec):
    """Train mode (several steps for the batch norms: their running statistics and counter,
    momentum=None's cumulative average) and eval mode, against the torch module."""
    ours_cls, torch_cls, kwargs = spec
    if ours_cls is gnn.Dropout:
        kwargs = dict(p=0.0)  # dropout's masks differ from torch's by design
    ours, theirs = ours_cls(**kwargs), torch_cls(**kwargs)
    for training in (True, True, True, False):
        ours.train(training)
        theirs.train(training)
        inputs = _input_for(ours)
        a = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        b = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        # inputs computed from the leaves (in-place ReLU may not write a leaf)
        y = ours(*(t * 1 if t.requires_grad else t for t in a))
        ref = theirs(*(t * 1 if t.requires_grad else t for t in b))
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        y.backward(g)
        ref.backward(g)
        torch.testing.assert_close(a[0].grad, b[0].grad)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        for (name, t), u in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(t, u, msg=name)


def test_dropout_module_train_and_eval():
    m = gnn.Dropout(0.4)
    x = torch.ones(10_000)
    y = m(x)
    assert 0.55 < (y != 0).float().mean() < 0.65
    m.eval()
    assert m(x) is x


# --- patch / unpatch ------------------------------------------------------------------------


class MyReLU(torch.nn.ReLU):
    """A user subclass: its forward may differ, so patch leaves it alone."""


def _cnn(dropout=0.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Dropout(dropout), torch.nn.Linear(8 * 4 * 4, 10))


def _mlp(dropout=0.0):
    torch.manual_seed(1)
    L, BN = torch.nn.Linear, torch.nn.BatchNorm1d
    return torch.nn.Sequential(
        L(20, 64), BN(64), torch.nn.ReLU(), L(64, 64), torch.nn.GELU(), torch.nn.Dropout(dropout),
        L(64, 64), BN(64), torch.nn.SiLU(), L(64, 64), BN(64), torch.nn.ELU(),
        L(64, 64), BN(64), torch.nn.Sigmoid(), L(64, 64), torch.nn.LeakyReLU(0.1),
        L(64, 64), torch.nn.Tanh(), L(64, 5), torch.nn.LogSoftmax(dim=1))


def test_patch_swaps_in_place_and_unpatch_restores():
    model = _cnn(0.1)
    model.eval()
    params = list(model.parameters())
    buffers = [b.data_ptr() for b in model.buffers()]
    bn = model[1]
    hook_calls = []
    model[0].register_forward_hook(lambda *a: hook_calls.append(1))
    swapped = gt.patch(model)
    assert [(s.name, s.before, s.after) for s in swapped] == [
        ("1", torch.nn.BatchNorm2d, gnn.BatchNormReLU2d), ("2", torch.nn.ReLU, gnn.FusedReLU),
        ("5", torch.nn.BatchNorm2d, gnn.BatchNormReLU2d), ("6", torch.nn.ReLU, gnn.FusedReLU),
        ("8", torch.nn.Dropout, gnn.Dropout)]
    assert model[1] is bn and not model.training and not bn.training
    assert list(model.parameters()) == params  # the same tensor objects
    assert [b.data_ptr() for b in model.buffers()] == buffers
    model(torch.randn(2, 1, 8, 8))
    assert hook_calls == [1]
    assert gt.patch(model) == []  # already patched
    restored = gt.unpatch(model)
    assert [(s.name, s.after) for s in restored] == [
        ("1", torch.nn.BatchNorm2d), ("2", torch.nn.ReLU), ("5", torch.nn.BatchNorm2d),
        ("6", torch.nn.ReLU), ("8", torch.nn.Dropout)]
    assert all(type(m).__module__.startswith("torch.") for m in model.modules())


def test_patch_leaves_what_it_must_not_fuse_or_swap():
    shared = torch.nn.ReLU()
    hooked = torch.nn.BatchNorm1d(4)
    hooked.register_forward_hook(lambda *a: None)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(4), shared,                   # the ReLU is used twice: no fusion
        torch.nn.Sequential(hooked, torch.nn.ReLU()),      # a hook sees the BN output
        torch.nn.BatchNorm1d(4), shared,
        torch.nn.BatchNorm1d(4), MyReLU(),                 # a user subclass
        torch.nn.CrossEntropyLoss(weight=torch.ones(4)))   # class weights: torch's
    swapped = {s.name: s.after for s in gt.patch(model)}
    assert swapped == {"0": gnn.BatchNorm1d, "1": gnn.ReLU, "2.0": gnn.BatchNorm1d,
                       "2.1": gnn.ReLU, "3": gnn.BatchNorm1d, "5": gnn.BatchNorm1d}
    assert type(model[6]) is MyReLU and type(model[7]) is torch.nn.CrossEntropyLoss
    # a model that is itself a supported module
    relu = torch.nn.ReLU()
    assert [s.name for s in gt.patch(relu)] == [""] and type(relu) is gnn.ReLU


def test_patched_model_matches_and_fuses_gpunn_modules_too():
    """A model built from gpunn modules is fused the same way; outputs equal torch's."""
    model = torch.nn.Sequential(gnn.BatchNorm1d(4), gnn.ReLU())
    ref = copy.deepcopy(model)
    gt.unpatch(ref)
    assert [s.after for s in gt.patch(model)] == [gnn.BatchNormReLU1d, gnn.FusedReLU]
    x = torch.randn(8, 4)
    torch.testing.assert_close(model(x), ref(x))


def test_state_dicts_move_both_ways():
    """A patched model trained a few steps: its state dict loads into a plain torch model
    with the same outputs (eval), and a plain model's loads into a patched one."""
    patched, plain = _cnn(), _cnn()
    gt.patch(patched)
    opt = torch.optim.SGD(patched.parameters(), lr=0.1)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(patched(x), t).backward()
        opt.step()
    assert patched.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(patched.state_dict())
    patched.eval()
    plain.eval()
    torch.testing.assert_close(patched(x), plain(x))
    fresh = _cnn()
    gt.patch(fresh)
    fresh.load_state_dict(plain.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), plain(x))
    assert int(fresh[1].num_batches_tracked) == 3


def _train(model, loss_fn, x, t, steps=50):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_patched_training_matches_unpatched(which):
    """50 SGD steps from the same weights (dropout p=0): the losses agree to float32
    tolerance, and so do the final weights and running statistics."""
    make, loss = (_mlp, torch.nn.NLLLoss) if which == "mlp" else (_cnn, torch.nn.CrossEntropyLoss)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 20, generator=g) if which == "mlp" else torch.randn(32, 1, 8, 8,
                                                                            generator=g)
    t = torch.randint(5 if which == "mlp" else 10, (x.shape[0],), generator=g)
    plain, patched = make(), make()
    loss_plain, loss_patched = loss(), loss()
    swaps = gt.patch(patched) + gt.patch(loss_patched)
    assert len(swaps) >= 4
    a = _train(plain, loss_plain, x, t)
    b = _train(patched, loss_patched, x, t)
    assert a[-1] < 0.5 * a[0]  # it learned
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(patched.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_bench_torch_suite_quick():
    """``gpunn bench torch --quick``: every case checks ok (patched and plain steps agree with
    dropout off), and the saved bytes are what the ops promise."""
    from gpunn.bench import harness
    from gpunn.bench import torch as suite

    records = suite.run(harness.Options(quick=True, progress=False))
    assert {(r.op, r.impl) for r in records} == {
        (op, impl) for op in ("train step cnn", "train step mlp", "dropout", "batch_norm_relu",
                              "cross_entropy") for impl in ("gpunn", "torch")}
    assert all(r.status == "ok" and r.median_s for r in records), [
        (r.op, r.impl, r.status, r.note) for r in records]
    saved = {(r.op, r.impl): r for r in records if r.direction == "fwd+bwd"}
    assert saved["dropout", "gpunn"].saved_bytes == 8
    assert saved["batch_norm_relu", "gpunn"].saved_ratio_vs_torch <= 0.51
