"""Learning-rate schedules and the lr range test: every step against torch.optim.lr_scheduler
(warm-up against SequentialLR), state dicts (round trip, to and from torch), a duck-typed
optimizer without torch, the range test on a quadratic whose divergent lr is known, bad input."""

import copy
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as T

from gpunn.optim.lr_scheduler import (CosineAnnealingLR, ExponentialLR, LRRangeTestResult,
                                      StepLR, lr_range_test)

BASE_LRS = (0.1, 0.037)  # two param groups with different base lrs
STEPS = 200

# name: (our scheduler, torch's), each built on a given optimizer
CASES = {
    "step": (lambda o: StepLR(o, 7, gamma=0.5), lambda o: T.StepLR(o, 7, gamma=0.5)),
    "step_defaults": (lambda o: StepLR(o, 30), lambda o: T.StepLR(o, 30)),
    "step_every": (lambda o: StepLR(o, 1, gamma=0.97), lambda o: T.StepLR(o, 1, gamma=0.97)),
    "exponential": (lambda o: ExponentialLR(o, 0.97), lambda o: T.ExponentialLR(o, 0.97)),
    "exponential_up": (lambda o: ExponentialLR(o, 1.01), lambda o: T.ExponentialLR(o, 1.01)),
    "cosine": (lambda o: CosineAnnealingLR(o, 150), lambda o: T.CosineAnnealingLR(o, 150)),
    # past T_max: torch's cosine climbs back (period 2 T_max), several periods here
    "cosine_eta_min": (lambda o: CosineAnnealingLR(o, 40, eta_min=1e-3),
                       lambda o: T.CosineAnnealingLR(o, 40, eta_min=1e-3)),
    "cosine_short": (lambda o: CosineAnnealingLR(o, 3, eta_min=0.01),
                     lambda o: T.CosineAnnealingLR(o, 3, eta_min=0.01)),
    "cosine_one": (lambda o: CosineAnnealingLR(o, 1), lambda o: T.CosineAnnealingLR(o, 1)),
}


def torch_sgd(lrs=BASE_LRS):
    return torch.optim.SGD([{"params": [torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                             "lr": lr} for lr in lrs])


class DuckOptimizer:
    """All a scheduler needs: ``param_groups``, a list of dicts holding 'lr'."""

    def __init__(self, lrs=BASE_LRS):
        self.param_groups = [{"lr": lr} for lr in lrs]

    def step(self):
        pass


def group_lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def run(scheduler, opt, steps):
    """lrs at steps 0..steps-1 (training order: optimizer.step(), then scheduler.step())."""
    out = []
    for _ in range(steps):
        assert scheduler.get_last_lr() == group_lrs(opt)
        out.append(group_lrs(opt))
        opt.step()
        scheduler.step()
    return np.array(out)


def max_rel_err(out, ref):
    """Largest per-value relative error; an exact 0 in ref must be an exact 0 in out."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    zero = ref == 0
    assert np.array_equal(out[zero], ref[zero])
    return float(np.max(np.abs(out[~zero] - ref[~zero]) / np.abs(ref[~zero]), initial=0.0))


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_every_step(name):
    ours, theirs = CASES[name]
    opt, ref_opt = torch_sgd(), torch_sgd()
    sched, ref = ours(opt), theirs(ref_opt)
    assert sched.base_lrs == ref.base_lrs == list(BASE_LRS)
    assert [g["initial_lr"] for g in opt.param_groups] == list(BASE_LRS)
    values, expected = run(sched, opt, STEPS), run(ref, ref_opt, STEPS)
    assert sched.last_epoch == ref.last_epoch == STEPS
    assert max_rel_err(values, expected) < 1e-12
    assert np.ptp(values[:, 0]) > 0  # the schedule moved


@settings(max_examples=40, deadline=None)
@given(step_size=st.integers(1, 50), gamma=st.floats(0.05, 2.0),
       t_max=st.integers(1, 100), eta_min=st.floats(0.0, 0.2),
       warmup=st.integers(0, 30), start_factor=st.floats(1e-3, 1.0))
def test_matches_torch_any_hyperparameters(step_size, gamma, t_max, eta_min, warmup,
                                           start_factor):
    """Random hyperparameters (eta_min may exceed the base lr: the cosine then rises)."""
    pairs = [(lambda o: StepLR(o, step_size, gamma), lambda o: T.StepLR(o, step_size, gamma)),
             (lambda o: ExponentialLR(o, gamma), lambda o: T.ExponentialLR(o, gamma))]
    if warmup:
        pairs.append((lambda o: CosineAnnealingLR(o, t_max, eta_min, warmup_steps=warmup,
                                                  warmup_start_factor=start_factor),
                      lambda o: T.SequentialLR(o, [
                          T.LinearLR(o, start_factor=start_factor, total_iters=warmup),
                          T.CosineAnnealingLR(o, t_max, eta_min)], milestones=[warmup])))
    else:
        pairs.append((lambda o: CosineAnnealingLR(o, t_max, eta_min),
                      lambda o: T.CosineAnnealingLR(o, t_max, eta_min)))
    for ours, theirs in pairs:
        opt, ref_opt = torch_sgd(), torch_sgd()
        assert max_rel_err(run(ours(opt), opt, 120), run(theirs(ref_opt), ref_opt, 120)) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_duck_typed_optimizer_gets_the_same_lrs(name):
    ours, _ = CASES[name]
    duck, opt = DuckOptimizer(), torch_sgd()
    np.testing.assert_array_equal(run(ours(duck), duck, STEPS), run(ours(opt), opt, STEPS))
    assert [g["initial_lr"] for g in duck.param_groups] == list(BASE_LRS)


class NumpyParam:
    """A gpunn parameter: ``.data`` and ``.grad`` arrays."""

    def __init__(self, rng):
        self.data = rng.standard_normal(11).astype(np.float32)
        self.grad = rng.standard_normal(11).astype(np.float32)


def test_drives_gpunn_optimizers_and_torch_schedulers_drive_gpunn_torch(rng):
    """One scheduler class for gpunn.optim and gpunn.torch optimizers; each step moves the
    weights by the scheduled lr; torch's own scheduler on gpunn.torch gives the same lrs."""
    import gpunn.optim
    import gpunn.torch

    param = NumpyParam(rng)
    tensor = torch.tensor(rng.standard_normal(11), dtype=torch.float32, requires_grad=True)
    tensor.grad = torch.tensor(rng.standard_normal(11), dtype=torch.float32)
    tensor_ref = tensor.detach().clone().requires_grad_()
    tensor_ref.grad = tensor.grad.clone()
    opts = [gpunn.optim.SGD([param], lr=0.1), gpunn.torch.SGD([tensor], lr=0.1)]
    ref_opt = gpunn.torch.SGD([tensor_ref], lr=0.1)
    scheds = [CosineAnnealingLR(o, 6, warmup_steps=2) for o in opts]
    ref = T.SequentialLR(ref_opt, [T.LinearLR(ref_opt, total_iters=2),
                                   T.CosineAnnealingLR(ref_opt, 6)], milestones=[2])
    arrays = [lambda: param.data.copy(), lambda: tensor.detach().numpy().copy()]
    grads = [param.grad.copy(), tensor.grad.numpy().copy()]
    for _ in range(10):
        lr = scheds[0].get_last_lr()[0]
        assert scheds[1].get_last_lr() == [lr] and ref.get_last_lr()[0] == pytest.approx(lr)
        for opt, sched, array, grad in zip(opts, scheds, arrays, grads):
            before = array()
            opt.step()
            np.testing.assert_allclose(before - array(), lr * grad, rtol=1e-5, atol=1e-7)
            sched.step()
        ref_opt.step()
        ref.step()
    torch.testing.assert_close(tensor_ref, tensor, rtol=1e-6, atol=1e-7)


def test_import_and_run_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from gpunn.optim.lr_scheduler import CosineAnnealingLR, lr_range_test\n"
            "class O: param_groups = [{'lr': 0.5}]\n"
            "o = O(); s = CosineAnnealingLR(o, 4, warmup_steps=2)\n"
            "for _ in range(6): s.step()\n"
            "print(o.param_groups[0]['lr'], s.get_last_lr()[0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lr, last = map(float, done.stdout.split())
    assert lr == last == 0.0  # step 6 = warm-up 2 + T_max 4: the end of the cosine


@pytest.mark.parametrize("warmup_steps, start_factor", [(10, 0.1), (5, 1.0 / 3), (1, 0.5),
                                                        (25, 1.0), (40, 0.01)])
@pytest.mark.parametrize("eta_min", [0.0, 2e-3])
def test_warmup_equals_sequential_linear_then_cosine(warmup_steps, start_factor, eta_min):
    t_max = 60
    opt, ref_opt = torch_sgd(), torch_sgd()
    sched = CosineAnnealingLR(opt, t_max, eta_min=eta_min, warmup_steps=warmup_steps,
                              warmup_start_factor=start_factor)
    ref = T.SequentialLR(ref_opt, [
        T.LinearLR(ref_opt, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps),
        T.CosineAnnealingLR(ref_opt, t_max, eta_min=eta_min)], milestones=[warmup_steps])
    values = run(sched, opt, STEPS)
    assert max_rel_err(values, run(ref, ref_opt, STEPS)) < 1e-12
    np.testing.assert_array_equal(values[warmup_steps], BASE_LRS)  # warm-up ends at base
    np.testing.assert_allclose(values[warmup_steps + t_max], eta_min, rtol=0, atol=1e-17)


def test_default_warmup_factor_is_torch_linear_lr_default():
    opt, ref_opt = torch_sgd(), torch_sgd()
    sched = CosineAnnealingLR(opt, 20, warmup_steps=5)
    ref = T.SequentialLR(ref_opt, [T.LinearLR(ref_opt, total_iters=5),
                                   T.CosineAnnealingLR(ref_opt, 20)], milestones=[5])
    assert max_rel_err(run(sched, opt, 60), run(ref, ref_opt, 60)) < 1e-12


def test_warmup_from_zero():
    """start factor 0 (torch's LinearLR needs > 0): 0, base/W, 2 base/W, ..., base."""
    duck = DuckOptimizer()
    values = run(CosineAnnealingLR(duck, 30, warmup_steps=8, warmup_start_factor=0.0), duck, 9)
    np.testing.assert_array_equal(values[0], [0.0, 0.0])
    ramp = np.arange(9)[:, None] / 8 * np.array(BASE_LRS)
    np.testing.assert_allclose(values, ramp, rtol=1e-15, atol=0)


def roundtrip(state):
    return pickle.loads(pickle.dumps(copy.deepcopy(state)))


@pytest.mark.parametrize("name", CASES)
def test_state_dict_roundtrip_mid_run(name):
    ours, theirs = CASES[name]
    opt, ref_opt = torch_sgd(), torch_sgd()
    sched, ref = ours(opt), theirs(ref_opt)
    run(sched, opt, 37)
    run(ref, ref_opt, 37)
    state, opt_state = roundtrip(sched.state_dict()), roundtrip(opt.state_dict())
    # a fresh process: new optimizer and scheduler, then both states loaded
    opt2 = torch_sgd()
    sched2 = ours(opt2)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == sched.last_epoch == 37
    assert sched2.get_last_lr() == sched.get_last_lr()
    resumed, original, expected = run(sched2, opt2, 150), run(sched, opt, 150), run(ref, ref_opt, 150)
    np.testing.assert_array_equal(resumed, original)
    assert max_rel_err(resumed, expected) < 1e-12


@pytest.mark.parametrize("name", CASES)
def test_state_dict_to_and_from_torch(name):
    ours, theirs = CASES[name]
    ref_opt, ref = torch_sgd(), None
    ref = theirs(ref_opt)
    run(ref, ref_opt, 23)
    # torch's state into ours
    opt = torch_sgd()
    sched = ours(opt)
    opt.load_state_dict(ref_opt.state_dict())
    sched.load_state_dict(ref.state_dict())
    # ours back into a fresh torch scheduler
    back_opt = torch_sgd()
    back = theirs(back_opt)
    back_opt.load_state_dict(opt.state_dict())
    back.load_state_dict(sched.state_dict())
    expected = run(ref, ref_opt, 120)
    assert max_rel_err(run(sched, opt, 120), expected) < 1e-12
    assert max_rel_err(run(back, back_opt, 120), expected) < 1e-12


RESUME = {  # the same schedule built fresh, and resumed at last_epoch=20
    "step": lambda o, e=-1: StepLR(o, 7, gamma=0.5, last_epoch=e),
    "exponential": lambda o, e=-1: ExponentialLR(o, 0.97, last_epoch=e),
    "cosine": lambda o, e=-1: CosineAnnealingLR(o, 40, eta_min=1e-3, last_epoch=e,
                                                warmup_steps=9, warmup_start_factor=0.2),
}


@pytest.mark.parametrize("name", RESUME)
def test_resume_with_last_epoch(name):
    """last_epoch=k continues the schedule: lrs from step k + 1 on, as if never stopped."""
    duck = DuckOptimizer()
    full = run(RESUME[name](duck), duck, 60)
    resumed = DuckOptimizer()
    for group, base in zip(resumed.param_groups, BASE_LRS):
        group["initial_lr"] = base
        group["lr"] = 123.0  # whatever the optimizer holds: the closed form does not read it
    sched = RESUME[name](resumed, 20)
    assert sched.last_epoch == 21
    np.testing.assert_array_equal(run(sched, resumed, 39), full[21:])


def test_second_scheduler_keeps_initial_lr():
    """As torch: an existing group['initial_lr'] is the base, whatever the current lr."""
    opt, ref_opt = torch_sgd(), torch_sgd()
    ExponentialLR(opt, 0.5).step()
    ref = T.ExponentialLR(ref_opt, 0.5)
    ref_opt.step()
    ref.step()
    assert group_lrs(opt) == group_lrs(ref_opt) == [b / 2 for b in BASE_LRS]
    assert StepLR(opt, 3).base_lrs == T.StepLR(ref_opt, 3).base_lrs == list(BASE_LRS)


def test_tensor_lr_updated_in_place():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=torch.tensor(0.25))
    lr = opt.param_groups[0]["lr"]
    sched = StepLR(opt, 2, gamma=0.5)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == sched.get_last_lr()[0] == 0.0625


# --- the lr range test -------------------------------------------------------------------------

CURVATURE = 4.0
DIVERGENT_LR = 2.0 / CURVATURE  # gradient descent on c/2 (w - m)^2 diverges above 2/c


class Quadratic:
    """Minibatch least squares in one dimension, loss_b(w) = c/2 mean_j (w - x_j)^2 with
    x ~ N(3, 1): the curvature is c on every batch, so the gradient step
    w <- w - lr c (w - mean x) shrinks the error for lr < 2/c and blows it up above."""

    def __init__(self, rng, batch=16):
        self.rng, self.batch, self.w = rng, batch, 0.0
        self.param_groups = [{"lr": 0.5, "momentum": 0.0}]
        self.seen_lrs = []

    def train_step(self):
        lr = self.param_groups[0]["lr"]
        self.seen_lrs.append(lr)
        x = self.rng.normal(3.0, 1.0, self.batch)
        loss = 0.5 * CURVATURE * np.mean((self.w - x) ** 2)
        self.w -= lr * CURVATURE * (self.w - x.mean())
        return loss


def smoothed_reference(losses, beta):
    """Bias-corrected moving average written as the weighted mean it is."""
    out = []
    for i in range(len(losses)):
        weights = (1 - beta) * beta ** np.arange(i, -1, -1)
        out.append(np.dot(weights, losses[:i + 1]) / weights.sum())
    return np.array(out)


@pytest.mark.parametrize("smooth", [0.98, 0.9])
def test_range_test_stops_past_the_divergent_lr(rng, smooth):
    problem = Quadratic(rng)
    start, end, n = 1e-5, 1e2, 141  # 20 lrs per decade
    result = lr_range_test(problem.train_step, problem, start, end, n, smooth=smooth)
    sweep = np.geomspace(start, end, n)
    k = len(result.lrs)
    assert result.stop_reason == "diverged" and result.stopped_early and k < n
    np.testing.assert_array_equal(result.lrs, sweep[:k])
    assert problem.seen_lrs == list(sweep[:k])
    assert problem.param_groups == [{"lr": 0.5, "momentum": 0.0}]  # restored
    np.testing.assert_allclose(result.smoothed_losses,
                               smoothed_reference(result.losses, smooth), rtol=1e-12)
    # the stop is the first step whose smoothed loss exceeds 4x the lowest before it
    s = result.smoothed_losses
    over = [i for i in range(1, k) if s[i] > 4.0 * s[:i].min()]
    assert over == [k - 1]
    # every stable lr ran; the moving average lags the blow-up by a few steps (< 0.7 decade)
    assert DIVERGENT_LR < result.lrs[-1] < 5 * DIVERGENT_LR
    assert result.suggested_lr == result.min_loss_lr / 10
    assert start < result.suggested_lr < DIVERGENT_LR / 2


def test_range_test_below_the_divergent_lr_runs_every_step(rng):
    problem = Quadratic(rng)
    result = lr_range_test(problem.train_step, problem, 1e-4, 0.8 * DIVERGENT_LR, 60)
    assert result.stop_reason is None and not result.stopped_early
    assert len(result.lrs) == len(result.losses) == 60
    assert result.lrs[0] == 1e-4 and result.lrs[-1] == 0.8 * DIVERGENT_LR
    assert result.suggested_lr is not None


def test_range_test_no_smoothing_and_no_growth_stop(rng):
    problem = Quadratic(rng)
    result = lr_range_test(problem.train_step, problem, 1e-3, 1e3, 61, smooth=0.0,
                           diverge_factor=math.inf)
    np.testing.assert_array_equal(result.smoothed_losses, result.losses)
    # only overflow stops it: the loss grows without bound past 2/c
    assert result.stop_reason in (None, "non-finite loss")
    tail = result.losses[result.lrs > 2 * DIVERGENT_LR]
    assert tail.size > 5 and np.all(np.diff(tail[np.isfinite(tail)]) > 0)


def test_range_test_stops_on_nan_and_restores_on_error():
    opt = DuckOptimizer((0.3, 0.2))
    losses = iter([3.0, 2.0, 1.5, float("nan"), 1.0])
    restored = []
    result = lr_range_test(lambda: next(losses), opt, 1e-3, 1.0, 5,
                           restore=lambda: restored.append(True))
    assert result.stop_reason == "non-finite loss" and len(result.lrs) == 4
    assert group_lrs(opt) == [0.3, 0.2] and restored == [True]
    assert "non-finite" in str(result)

    def failing():
        if opt.param_groups[0]["lr"] > 0.01:
            raise RuntimeError("out of memory")
        return 1.0

    with pytest.raises(RuntimeError, match="out of memory"):
        lr_range_test(failing, opt, 1e-3, 1.0, 5, restore=lambda: restored.append(True))
    assert group_lrs(opt) == [0.3, 0.2] and restored == [True, True]


def test_range_test_loss_never_falls():
    opt = DuckOptimizer()
    result = lr_range_test(lambda: 1.0 + opt.param_groups[0]["lr"], opt, 1e-3, 1.0, 20)
    assert result.suggested_lr is None and result.min_loss_lr == 1e-3
    assert "lower start_lr" in result.table()


def test_range_test_drives_a_torch_optimizer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(8, 1, generator=gen, dtype=torch.float64) \
        + 0.1 * torch.randn(512, 1, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(8, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    lrs_seen = []

    def train_step():
        idx = torch.randint(0, 512, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        lrs_seen.append(opt.param_groups[0]["lr"])
        opt.step()
        return loss  # a one-element tensor is fine

    def restore():
        model.load_state_dict(weights)
        opt.load_state_dict(opt_state)

    result = lr_range_test(train_step, opt, 1e-5, 100.0, 120, restore=restore)
    assert result.stop_reason is not None  # lr 100 with momentum diverges
    np.testing.assert_array_equal(lrs_seen, result.lrs)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.state_dict()["state"] == {}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))
    assert result.losses[0] > 10 * np.nanmin(result.losses)  # it did train
    assert 1e-5 < result.suggested_lr < result.lrs[-1]


def test_range_test_table_and_plot(rng, tmp_path):
    problem = Quadratic(rng)
    result = lr_range_test(problem.train_step, problem, 1e-4, 10.0, 51)  # lrs 1e-4 .. 1e1 exact
    assert isinstance(result, LRRangeTestResult)
    text = str(result)
    assert text == result.table()
    rows = [line.split() for line in text.splitlines() if ".." in line]
    decades = np.unique(np.floor(np.log10(result.lrs) + 1e-9))
    assert [r[0] for r in rows] == [f"1e{int(d):+03d}" for d in decades]
    assert sum(int(r[3]) for r in rows) == len(result.lrs)
    assert f"{result.suggested_lr:.3g}" in text
    path = tmp_path / "lr_range.png"
    fig = result.plot(path)
    assert path.stat().st_size > 1000
    assert fig.axes[0].get_xscale() == "log"


# --- bad input ---------------------------------------------------------------------------------

BAD_SCHEDULERS = [
    (lambda o: StepLR(o, 0), ValueError, "step_size"),
    (lambda o: StepLR(o, -3), ValueError, "step_size"),
    (lambda o: StepLR(o, 2.5), TypeError, "step_size"),
    (lambda o: StepLR(o, 5, gamma=0.0), ValueError, "gamma"),
    (lambda o: StepLR(o, 5, gamma=-0.5), ValueError, "gamma"),
    (lambda o: StepLR(o, 5, gamma="0.1"), TypeError, "gamma"),
    (lambda o: ExponentialLR(o, 0.0), ValueError, "gamma"),
    (lambda o: ExponentialLR(o, float("nan")), ValueError, "gamma"),
    (lambda o: CosineAnnealingLR(o, 0), ValueError, "T_max"),
    (lambda o: CosineAnnealingLR(o, -10), ValueError, "T_max"),
    (lambda o: CosineAnnealingLR(o, 10, eta_min=-1e-3), ValueError, "eta_min"),
    (lambda o: CosineAnnealingLR(o, 10, warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda o: CosineAnnealingLR(o, 10, warmup_start_factor=1.5), ValueError,
     "warmup_start_factor"),
    (lambda o: StepLR(o, 5, last_epoch=-2), ValueError, "last_epoch"),
    (lambda o: ExponentialLR(o, 0.9, last_epoch=4), KeyError, "initial_lr"),
]


@pytest.mark.parametrize("build, error, name", BAD_SCHEDULERS)
def test_bad_scheduler_arguments(build, error, name):
    opt = DuckOptimizer()
    before = copy.deepcopy(opt.param_groups)
    with pytest.raises(error, match=name):
        build(opt)
    assert opt.param_groups == before  # nothing changed, no initial_lr added


class NoGroups:
    pass


class EmptyGroups:
    param_groups = []


class GroupWithoutLr:
    param_groups = [{"params": []}]


class GroupWithBadLr:
    param_groups = [{"lr": "fast"}]


@pytest.mark.parametrize("opt", [NoGroups(), EmptyGroups(), GroupWithoutLr(), GroupWithBadLr(),
                                 {"lr": 0.1}], ids=lambda o: type(o).__name__)
def test_optimizer_without_param_groups(opt):
    with pytest.raises(TypeError, match="param_groups"):
        StepLR(opt, 5)
    with pytest.raises(TypeError, match="param_groups"):
        lr_range_test(lambda: 1.0, opt)


BAD_RANGE_TESTS = [
    (dict(start_lr=0.0), ValueError, "start_lr"),
    (dict(start_lr=-1e-3), ValueError, "start_lr"),
    (dict(start_lr=1.0, end_lr=1.0), ValueError, "end_lr"),
    (dict(start_lr=1.0, end_lr=0.1), ValueError, "end_lr"),
    (dict(end_lr=float("inf")), ValueError, "end_lr"),
    (dict(num_steps=1), ValueError, "num_steps"),
    (dict(num_steps=10.0), TypeError, "num_steps"),
    (dict(smooth=1.0), ValueError, "smooth"),
    (dict(smooth=-0.1), ValueError, "smooth"),
    (dict(diverge_factor=1.0), ValueError, "diverge_factor"),
    (dict(restore="weights"), TypeError, "restore"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD_RANGE_TESTS)
def test_bad_range_test_arguments(kwargs, error, name):
    opt = DuckOptimizer()
    calls = []
    with pytest.raises(error, match=name):
        lr_range_test(lambda: calls.append(1) or 1.0, opt, **kwargs)
    assert calls == [] and group_lrs(opt) == list(BASE_LRS)


def test_bad_train_step():
    opt = DuckOptimizer()
    with pytest.raises(TypeError, match="train_step"):
        lr_range_test(1.0, opt)
    with pytest.raises(TypeError, match="train_step"):
        lr_range_test(lambda: None, opt)
    assert group_lrs(opt) == list(BASE_LRS)


def test_bad_state_dict_changes_nothing():
    opt = DuckOptimizer()
    sched = StepLR(opt, 5)
    run(sched, opt, 3)
    before = sched.state_dict()
    other = ExponentialLR(DuckOptimizer(), 0.9).state_dict()
    with pytest.raises(ValueError, match="gamma|step_size|does not have"):
        sched.load_state_dict({**other, "step_size": 3, "unknown": 1})
    with pytest.raises(ValueError, match="base_lrs"):
        sched.load_state_dict({**before, "base_lrs": [0.1]})
    with pytest.raises(ValueError, match="step_size"):
        sched.load_state_dict({**before, "step_size": 0})
    with pytest.raises(KeyError, match="last_epoch"):
        sched.load_state_dict({"base_lrs": list(BASE_LRS)})
    assert sched.state_dict() == before


def test_step_after_add_param_group():
    opt = torch_sgd()
    sched = StepLR(opt, 5)
    opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 0.2})
    with pytest.raises(ValueError, match="param groups"):
        sched.step()
