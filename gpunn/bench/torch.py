"""PyTorch models on gpunn's kernels: a training step of a patched model against the plain one, and the activation memory autograd keeps.

Training step cases (direction 'step'): forward, loss, backward and optimizer step of
    cnn  Conv2d(1, 16, 3) BatchNorm2d ReLU Conv2d(16, 32, 3) BatchNorm2d ReLU MaxPool2d(2)
         Dropout(0.25) Linear(32*14*14, 10); batch 64 of (1, 28, 28) (256 on the GPU)
    mlp  Linear(784, 512) BatchNorm1d ReLU Dropout(0.2) Linear(512, 512) BatchNorm1d ReLU
         Dropout(0.2) Linear(512, 10); batch 256 (1024 on the GPU)
with CrossEntropyLoss. Contenders: gpunn (``gpunn.torch.patch(model)``: fused BatchNorm+ReLU,
gpunn dropout and loss; ``gpunn.torch.AdamW``) and torch (the same model unpatched,
``torch.optim.AdamW``, torch's default foreach step). Both start from the same weights; the
check is the loss after two steps on one batch with dropout off (float32 tolerance), the
timed calls are steps with dropout on.

Saved-memory cases (direction 'fwd+bwd'): dropout (p=0.5), BN+ReLU (training) and
cross-entropy, forward and backward timed, gpunn.torch.nn.functional against
torch.nn.functional; each record carries ``saved_bytes`` (what autograd keeps between them,
measured with saved_tensors_hooks, storages counted once, the input included) and
``saved_ratio_vs_torch``. Targets: the step no slower than torch on the CPU, faster on the
GPU; at most half of torch's saved bytes for dropout and BN+ReLU.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import harness
from .harness import Contender, Record

SUITE = "torch"


@dataclass
class TorchRecord(Record):
    """A Record with the bytes autograd saves between forward and backward."""

    saved_bytes: int | None = None
    saved_ratio_vs_torch: float | None = None


@dataclass(frozen=True)
class Model:
    name: str
    batch: int
    gpu_batch: int
    quick_batch: int


MODELS = {"cnn": Model("cnn", 64, 256, 8), "mlp": Model("mlp", 256, 1024, 16)}


def build(name: str):
    """The plain torch model of a case (weights from torch's default initialization)."""
    import torch

    nn = torch.nn
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
                             nn.Linear(32 * 14 * 14, 10))
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(512, 10))


def _step_contender(name: str, patched: bool, x, t, seed: int) -> Contender:
    import torch

    import gpunn.torch as gt

    def make():
        torch.manual_seed(seed)
        model = build(name).to(x.device)
        loss_fn = torch.nn.CrossEntropyLoss()
        if patched:
            gt.patch(model)
            gt.patch(loss_fn)
            opt = gt.AdamW(model.parameters(), lr=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        first = [True]

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), t)
            loss.backward()
            opt.step()
            return loss

        def call():
            if not first[0]:
                return step()
            first[0] = False  # the checked call: two steps with dropout off
            for m in dropouts:
                m.eval()
            step()
            loss = step().detach().clone()
            for m in dropouts:
                m.train()
            return loss

        return call

    return Contender("gpunn" if patched else "torch", "gpunn" if patched else "torch", make,
                     clock="cpu" if x.device.type == "cpu" else "torch")


def _loss_check(reference):
    def check(contender, out):
        return float(abs(out.item() - reference) / abs(reference)), ""

    return check


def run_steps(runner: harness.Runner, device: str) -> None:
    import torch

    quick = harness.option(runner.options, "quick", False)
    policy = runner.policy_cpu if device == "cpu" else runner.policy_gpu
    for model in MODELS.values():
        batch = model.quick_batch if quick else (model.batch if device == "cpu"
                                                 else model.gpu_batch)
        g = torch.Generator().manual_seed(runner.seed)
        x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
        t = torch.randint(10, (batch,), generator=g).to(device)
        base = dict(suite=SUITE, device=device, op=f"train step {model.name}",
                    direction="step", shape=list(x.shape), dtype="float32", bytes=0)
        if not runner.admit(base):
            continue
        contenders = [_step_contender(model.name, p, x, t, runner.seed) for p in (True, False)]
        reference = contenders[1].make()().item()  # torch's loss after the two checked steps
        t0 = runner.clock()
        records = runner.measure(base, contenders, _loss_check(reference), policy)
        runner.say(f"[{runner.count}] train step {model.name} ({device}): "
                   f"{runner.clock() - t0:.1f} s; " + ", ".join(
                       f"{r.impl} {r.median_s * 1e3:.2f} ms" if r.median_s else
                       f"{r.impl} {r.status}" for r in records))


# --- saved activations ---------------------------------------------------------------------


def _memory_cases(device: str, quick: bool):
    """(name, shape, fewest bytes moved forward + backward, make(impl) -> (fn, inputs,
    exclude)) of the saved-memory cases."""
    import torch

    import gpunn.torch.nn.functional as GF

    TF = torch.nn.functional
    n, c, hw = (8, 4, 8) if quick else ((64, 32, 28) if device == "cpu" else (256, 64, 56))
    rows, classes = (64, 10) if quick else ((4096, 1000) if device == "cpu" else (16384, 1000))

    def dropout(impl):
        x = randn(n, c, hw, hw)
        f = GF.dropout if impl == "gpunn" else TF.dropout
        return (lambda h: f(h, 0.5)), x, ()

    def bn_relu(impl):
        x = randn(n, c, hw, hw)
        w = torch.ones(c, device=device, requires_grad=True)
        b = torch.zeros(c, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        if impl == "gpunn":
            fn = lambda h: GF.batch_norm_relu(h, rm, rv, w, b, True)  # noqa: E731
        else:
            fn = lambda h: TF.relu(TF.batch_norm(h, rm, rv, w, b, True))  # noqa: E731
        return fn, x, (w, b)

    def cross_entropy(impl):
        x = randn(rows, classes)
        t = torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(1)).to(device)
        f = GF.cross_entropy if impl == "gpunn" else TF.cross_entropy
        return (lambda h: f(h, t)), x, ()

    act = n * c * hw * hw * 4

    def randn(*shape):  # the same inputs for every contender
        g = torch.Generator().manual_seed(0)
        return torch.randn(*shape, generator=g).to(device).requires_grad_()
    return [("dropout", [n, c, hw, hw], 4 * act, dropout),
            ("batch_norm_relu", [n, c, hw, hw], 5 * act, bn_relu),
            ("cross_entropy", [rows, classes], 3 * rows * classes * 4, cross_entropy)]


def _saved(make, impl) -> int:
    from ..torch.memory import saved_bytes

    fn, x, exclude = make(impl)
    h = x * 1  # an activation, as inside a model (the leaf's storage is counted too)
    return saved_bytes(fn, h, exclude=exclude)


def run_memory(runner: harness.Runner, device: str) -> None:
    import torch

    quick = harness.option(runner.options, "quick", False)
    policy = runner.policy_cpu if device == "cpu" else runner.policy_gpu
    clock = "cpu" if device == "cpu" else "torch"
    for name, shape, moved, make in _memory_cases(device, quick):
        base = dict(suite=SUITE, device=device, op=name, direction="fwd+bwd", shape=shape,
                    dtype="float32", bytes=moved)
        if not runner.admit(base):
            continue
        saved = {impl: _saved(make, impl) for impl in ("gpunn", "torch")}

        def contender(impl):
            def setup():
                fn, x, _ = make(impl)
                g = None

                def call():
                    nonlocal g
                    y = fn(x)
                    g = torch.ones_like(y) if g is None else g
                    (dx,) = torch.autograd.grad(y, x, g)
                    return dx

                return call

            return Contender(impl, impl, setup, clock=clock)

        def check(c, out, name=name):
            ref = contender("torch").make()()
            if name == "dropout":  # masks differ: dx is 0 or 1/(1-p), kept ~ 1 - p
                kept = (out != 0).double().mean().item()
                off = ((out != 0) & (out != 2.0)).double().mean().item()
                sigma = (0.25 / out.numel()) ** 0.5
                return max(off, abs(kept - 0.5) - 5 * sigma, 0.0), f"kept {kept:.4f} (p=0.5)"
            return harness.rel_err(out.detach().cpu().numpy(), ref.detach().cpu().numpy()), ""

        t0 = runner.clock()
        records = [TorchRecord(**r.__dict__) for r in runner.measure(
            base, [contender("gpunn"), contender("torch")], check, policy)]
        runner.records[-len(records):] = records
        for r in records:
            r.saved_bytes = saved[r.impl]
            r.saved_ratio_vs_torch = saved[r.impl] / saved["torch"] if saved["torch"] else None
            note = (f"saved {saved[r.impl]:,} B" + (f" = {r.saved_ratio_vs_torch:.3g} x torch's"
                                                    if r.impl == "gpunn" else ""))
            r.note = f"{r.note}; {note}" if r.note else note
        runner.say(f"[{runner.count}] {name} ({device}): {runner.clock() - t0:.1f} s; saved "
                   f"gpunn {saved['gpunn']:,} B, torch {saved['torch']:,} B")


def _run(device: str):
    def run_device(runner: harness.Runner) -> None:
        run_steps(runner, device)
        run_memory(runner, device)

    return run_device


def run(options=None) -> list[Record]:
    """Run the suite; returns the records (CPU first, then GPU)."""
    options = options or harness.Options()
    return harness.run_suite(SUITE, options, _run("cpu"), _run("cuda"))
