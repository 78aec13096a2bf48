"""Parameters the fused kernels cannot address in place (gpunn.torch on CPU tensors): non-dense
views, float16/bfloat16 on the host, gradients and states laid out unlike their parameter,
and parameters whose ``.data`` changes layout between steps. Each is stepped as torch.optim
steps it (torch.optim is the oracle)."""

import numpy as np
import pytest
import torch

import gpunn.torch as gt

ALGOS = {
    "sgd": dict(lr=0.1, momentum=0.9),
    "adagrad": dict(lr=0.1),
    "rmsprop": dict(lr=0.01, momentum=0.5, centered=True),
    "adam": dict(lr=0.1, weight_decay=0.1),
    "adamw": dict(lr=0.1),
}
NAMES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
         "adamw": "AdamW"}


def pair(algo, ours, theirs):
    return (getattr(gt, NAMES[algo])(ours, **ALGOS[algo]),
            getattr(torch.optim, NAMES[algo])(theirs, foreach=False, **ALGOS[algo]))


@pytest.mark.parametrize("algo", ALGOS)
def test_non_dense_parameter_matches_torch(algo):
    torch.manual_seed(0)
    base = torch.randn(8, 32)
    ours = torch.nn.Parameter(base[:, ::2])  # shares memory with base: written in place
    theirs = torch.nn.Parameter(base[:, ::2].clone())
    untouched = base[:, 1::2].clone()
    a, b = pair(algo, [ours], [theirs])
    for _ in range(4):
        g = torch.randn(8, 16)
        ours.grad, theirs.grad = g[:, :].clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(base[:, 1::2], untouched)  # the elements between are not written


@pytest.mark.parametrize("algo", ALGOS)
def test_transposed_data_and_stale_gradient_match_torch(algo):
    """``p.data = p.data.t()`` keeps a C-contiguous gradient: elements pair by index."""
    torch.manual_seed(1)
    w = torch.randn(5, 5)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    a, b = pair(algo, [ours], [theirs])
    g = torch.randn(5, 5)
    ours.grad, theirs.grad = g.clone(), g.clone()
    a.step()
    b.step()
    ours.data, theirs.data = ours.data.t(), theirs.data.t()
    for _ in range(2):
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_parameter_moved_to_channels_last_after_steps(algo):
    torch.manual_seed(2)
    w = torch.randn(2, 3, 4, 5)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    a, b = pair(algo, [ours], [theirs])
    for k in range(4):
        if k == 2:
            for p in (ours, theirs):
                p.data = p.data.to(memory_format=torch.channels_last)
        g = torch.randn(2, 3, 4, 5)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    for name, state in a.state[ours].items():
        if name != "step":
            assert state.stride() == ours.stride(), name


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ALGOS)
def test_half_parameters_on_the_cpu_use_float32_math(algo, dtype, master):
    """16-bit CPU parameters: float32 states and math; the parameter is the float32 update
    rounded once per step (from the float32 master copy with master_weights)."""
    torch.manual_seed(3)
    w = torch.randn(6, 7).to(dtype)
    ours = torch.nn.Parameter(w.clone())
    ref = torch.nn.Parameter(w.float())  # float32 torch.optim, rounded as ours rounds
    a = getattr(gt, NAMES[algo])([ours], master_weights=master, **ALGOS[algo])
    b = getattr(torch.optim, NAMES[algo])([ref], foreach=False, **ALGOS[algo])
    for _ in range(3):
        g = torch.randn(6, 7).to(dtype)
        ours.grad, ref.grad = g.clone(), g.float()
        a.step()
        b.step()
        if not master:
            ref.data = ref.data.to(dtype).float()
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.detach().float(), ref.detach().to(dtype).float(),
                                   rtol=0, atol=float(torch.finfo(dtype).eps) * 8)
    assert all(v.dtype == torch.float32 for v in a.state[ours].values())


def test_gradient_aliasing_what_the_step_writes_is_refused():
    p = torch.nn.Parameter(torch.ones(8))
    opt = gt.Adam([p])
    p.grad = p.detach()  # the gradient is the parameter's own memory
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state.get(p)


def test_new_gradient_aliasing_a_state_is_refused_after_steps():
    """A new gradient laid out like its parameter (the path that binds gradients from their
    signatures alone) that is a state's memory: refused, naming both, nothing changed."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = gt.Adam([p])
    for _ in range(2):
        p.grad = torch.full((8,), 0.5)
        opt.step()
    before = [p.detach().clone()] + [t.clone() for t in opt.state[p].values()]
    p.grad = opt.state[p]["exp_avg"]
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with exp_avg\[0\]"):
        opt.step()
    after = [p.detach()] + list(opt.state[p].values())
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_new_gradient_whose_storage_was_freed_is_refused():
    """A new gradient whose storage was resized to nothing after it was assigned (its shape
    and strides still the parameter's): refused before anything is read, nothing changed."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = gt.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.full((8,), 0.5)
    opt.step()
    before = p.detach().clone()
    g = torch.full((8,), 0.5)
    p.grad = g
    g.untyped_storage().resize_(0)
    with pytest.raises(ValueError, match=r"grads\[0\].*no longer holds"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_read_only_memory_map_parameter_is_refused(tmp_path):
    path = tmp_path / "w.npy"
    np.save(path, np.ones(16, np.float32))
    from gpunn import nn, optim

    p = nn.Parameter(np.load(path, mmap_mode="r"))
    p.grad = np.ones(16, np.float32)
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        optim.Adam([p]).step()
    assert np.all(np.load(path) == 1)
