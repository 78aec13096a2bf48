"""torch.compile(fullgraph=True) of patched models: every gpunn op traces without a graph
break (fullgraph raises on one), through AOTAutograd's fake tensors and the registered
autograd formulas, and the compiled training step matches eager: outputs, gradients,
running statistics."""

import shutil

import pytest
import torch

import gpunn.torch as gt
import gpunn.torch.nn.functional as F

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.GELU(approximate="tanh"), torch.nn.Flatten(), torch.nn.Dropout(0.0),
        torch.nn.Linear(4 * 6 * 6, 16), torch.nn.BatchNorm1d(16), torch.nn.SiLU(),
        torch.nn.Linear(16, 16), torch.nn.ELU(), torch.nn.Linear(16, 16), torch.nn.LeakyReLU(),
        torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Sigmoid(),
        torch.nn.Linear(16, 5), torch.nn.LogSoftmax(1))


def _loss(model, x, t, loss_fn):
    out = model(x)
    return (loss_fn(out, t) + F.mse_loss(out.exp(), torch.softmax(out, 1).detach())
            + F.cross_entropy(out, t, label_smoothing=0.1))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_patched_model_matches_eager(backend):
    if backend == "inductor" and shutil.which("g++") is None and shutil.which("cc") is None:
        pytest.skip("inductor needs a C++ compiler on the CPU")
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    gt.patch(eager)
    gt.patch(compiled)
    # the patched cross-entropy inside the compiled step too
    loss_fn = gt.nn.NLLLoss()
    fn = torch.compile(lambda x, t: _loss(compiled, x, t, loss_fn), backend=backend,
                       fullgraph=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # running statistics and the momentum=None counter advance
        x, t = torch.randn(8, 1, 6, 6, generator=g), torch.randint(5, (8,), generator=g)
        for m in (eager, compiled):
            m.zero_grad()
        ref = _loss(eager, x, t, loss_fn)
        got = fn(x, t)
        ref.backward()
        got.backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        for (name, b), c in zip(compiled.named_buffers(), eager.buffers()):
            torch.testing.assert_close(b, c, msg=name)
    assert int(compiled[4].num_batches_tracked) == 2


def test_compiled_dropout_and_channels_last_trace():
    """Dropout in training (its seed drawn inside the graph) and channels_last batch norm
    trace with fullgraph=True; the compiled dropout keeps about 1 - p, and its backward
    regenerates the forward's mask (dx = y / x for y = dropout(x))."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Dropout(0.5))
    gt.patch(model)
    fn = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(16, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    y = fn(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert 0.2 < (y != 0).float().mean().item() < 0.3  # half of the ReLU's positive half
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    drop = torch.compile(lambda x: F.dropout(x, 0.3), backend="aot_eager", fullgraph=True)
    x = (torch.rand(1000) + 0.5).requires_grad_()
    y = drop(x)
    assert 0.6 < (y != 0).float().mean().item() < 0.8
    y.sum().backward()
    torch.testing.assert_close(x.grad * x, y.detach())
