"""gpunn.torch: the fused optimizers as torch.optim.Optimizer subclasses. Under
torch.optim.lr_scheduler and torch.amp.GradScaler (scale/unscale, inf steps skipped, the
scale's backoff and growth) against torch.optim under the same; a small nn model trained by
both; state dicts between gpunn.torch, torch.optim and gpunn.optim, mid-run, and through
torch.save; the adapter's own behaviour (closure, parameters without gradients, options);
GPU: CUDA tensors against torch.optim on CUDA, GradScaler on CUDA, bfloat16 master weights,
side streams."""

import copy
import inspect
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import gpunn.optim as go
import gpunn.torch as gt
from conftest import assert_close, rel_err
from test_optim import (ALGOS, CLASSES, FULL, SMALL, _continue, _snapshot, assert_trajectories_match,
                        make_data, start)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(algo, model, options, device="cpu"):
    """(gpunn.torch optimizer, torch.optim optimizer) over two copies of ``model``."""
    ours, theirs = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    foreach = dict(foreach=False) if device == "cpu" else {}
    return ((ours, CLASSES[algo][1](ours.parameters(), **options)),
            (theirs, CLASSES[algo][2](theirs.parameters(), **options, **foreach)))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(rng, n, device="cpu"):
    """Batches of (x, y) with y a fixed linear map of x plus noise: a loss that can fall."""
    teacher = rng.standard_normal((5, 3))
    out = []
    for _ in range(n):
        x = rng.standard_normal((8, 5))
        y = x @ teacher + 0.1 * rng.standard_normal((8, 3))
        out.append((torch.tensor(x, dtype=torch.float32, device=device),
                    torch.tensor(y, dtype=torch.float32, device=device)))
    return out


def _assert_models_match(a, b, dtype="float32"):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        err = rel_err(p.detach().double().cpu(), q.detach().double().cpu())
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"


# --- A model trained by gpunn.torch and by torch.optim ---------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_small_model_training_matches_torch(algo, rng):
    """nn.Linear-Tanh-nn.Linear, MSE loss, 30 steps: the same losses and parameters."""
    (ours, a), (theirs, b) = _pair(algo, _model(), FULL[algo])
    losses = []
    for x, y in _batches(rng, 30):
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert_close(losses[0::2], losses[1::2], "float32")
    assert np.mean(losses[-10::2]) < np.mean(losses[:10:2])  # it trains
    _assert_models_match(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        for key, value in b.state[q].items():
            if key == "step":
                assert float(a.state[p][key]) == float(value) == 30.0
            else:
                assert_close(a.state[p][key].numpy(), value.numpy(), "float32")


def test_closure_unused_parameters_and_zero_grad(rng):
    """step(closure) evaluates the closure with grad enabled and returns its loss; a
    parameter without a gradient (unused, or requires_grad=False) is left alone, as torch
    leaves it."""
    model = _model()
    frozen = nn.Parameter(torch.ones(3), requires_grad=False)
    unused = nn.Parameter(torch.ones(4))
    opt = gt.Adam(list(model.parameters()) + [frozen, unused], lr=1e-2)
    x, y = _batches(rng, 1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert torch.equal(frozen, torch.ones(3)) and torch.equal(unused.detach(), torch.ones(4))
    assert frozen not in opt.state and unused not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())  # torch's default: set to None


def test_step_hooks_run_once_per_step():
    p = nn.Parameter(torch.ones(3))
    opt = gt.Adam([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"] and float(opt.state[p]["step"]) == 1


def test_new_states_are_aligned_views_of_one_block_laid_out_like_their_parameters():
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7)),
              nn.Parameter(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))]
    opt = gt.Adam(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    states = [t for p in params for t in opt.state[p].values()]
    assert len({t.untyped_storage().data_ptr() for t in states}) == 1
    assert all(t.data_ptr() % 64 == 0 for t in states)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in states)
    assert all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))
    for p in params:
        assert all(opt.state[p][k].stride() == p.stride() for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("how", ["data", "set_"])
def test_state_moved_to_new_memory_is_the_one_updated(how, rng):
    """A state (a view of the optimizer's block) pointed at new memory in place, by
    ``.data =`` or ``set_``: the next steps update that memory, as torch's do."""
    init = torch.tensor(rng.standard_normal(64).astype(np.float32))
    ours, theirs = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opts = gt.Adam([ours], lr=0.01), torch.optim.Adam([theirs], lr=0.01)
    for step in range(4):
        g = torch.tensor(rng.standard_normal(64).astype(np.float32))
        ours.grad, theirs.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
        if step == 1:
            for opt, p in zip(opts, (ours, theirs)):
                moved = opt.state[p]["exp_avg"].clone() * 2
                if how == "data":
                    opt.state[p]["exp_avg"].data = moved
                else:
                    opt.state[p]["exp_avg"].set_(moved)
    torch.testing.assert_close(opts[0].state[ours]["exp_avg"], opts[1].state[theirs]["exp_avg"],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


def test_global_step_hooks_and_a_pre_hook_replacing_the_arguments():
    """Global hooks run once around the step (pre before the optimizer's own, post after),
    and a pre hook's (args, kwargs) replace the step's: here it passes a closure."""
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)

    p = nn.Parameter(torch.ones(3))
    opt = gt.SGD([p], lr=0.1)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda *a: calls.append("global post"))]
    try:
        opt.register_step_pre_hook(
            lambda o, args, kwargs: (args, {"closure": lambda: calls.append("closure")}))
        opt.register_step_post_hook(lambda *a: calls.append("post"))
        p.grad = torch.ones(3)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "closure", "post", "global post"]
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))
    calls.clear()
    opt.step()  # the global hooks are gone; the optimizer's stay
    assert calls == ["closure", "post"]


def test_step_is_labelled_for_the_profiler():
    p = nn.Parameter(torch.ones(3))
    opt = gt.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert "Optimizer.step#Adam.step" in {event.name for event in prof.events()}
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("algo", ALGOS)
def test_numpy_backend_on_torch_tensors(algo, rng):
    """backend='numpy' on CPU torch tensors: the reference runs on NumPy views of them."""
    init, grads = make_data(rng, SMALL, 15, np.float32)
    ours = start("torch", algo, [init], {})  # the tensors only
    ours.opt = CLASSES[algo][1](ours.flat, backend="numpy", **FULL[algo])
    theirs = start("torch", algo, [init], FULL[algo])
    _continue([ours, theirs], grads)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


def test_channels_last_model(rng):
    model = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    (ours, a), (theirs, b) = _pair("adam", model, FULL["adam"])
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    for model_, opt in ((ours, a), (theirs, b)):
        for _ in range(3):
            opt.zero_grad()
            model_(x).square().mean().backward()
            opt.step()
    _assert_models_match(ours, theirs)


# --- torch.optim.lr_scheduler ---------------------------------------------------------------


SCHEDULERS = {
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "warmup_cosine": lambda o: lr_scheduler.SequentialLR(o, [
        lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
        lr_scheduler.CosineAnnealingLR(o, T_max=12)], milestones=[4]),
    "step": lambda o: lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
}


@pytest.mark.parametrize("schedule", SCHEDULERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_lr_scheduler_matches_torch(algo, schedule, rng):
    """torch's schedulers drive gpunn.torch as they drive torch.optim: the same lr every step
    (two groups with different base lrs) and the same trajectory."""
    init, grads = make_data(rng, SMALL, 20, np.float32)
    options = FULL[algo]
    ours = start("gpunn.torch", algo, [init[:3], init[3:]], options)
    theirs = start("torch", algo, [init[:3], init[3:]], options)
    for run in (ours, theirs):
        run.opt.param_groups[1]["lr"] = options["lr"] / 4
        run.scheduler = SCHEDULERS[schedule](run.opt)
    lrs = []
    for gs in grads:
        for run in (ours, theirs):
            run.step(gs)
            run.scheduler.step()
        lrs.append([g["lr"] for g in ours.opt.param_groups])
        assert lrs[-1] == [g["lr"] for g in theirs.opt.param_groups]
        assert ours.scheduler.get_last_lr() == theirs.scheduler.get_last_lr()
    assert len({tuple(x) for x in lrs}) > 3  # the lr did change
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


def test_lr_scheduler_state_dict_resumes_with_optimizer_state(rng):
    """Optimizer and scheduler checkpointed mid-run, restored into fresh ones, go on as the
    uninterrupted run."""
    init, grads = make_data(rng, SMALL, 16, np.float32)
    whole = start("gpunn.torch", "adam", [init], FULL["adam"])
    sched = lr_scheduler.CosineAnnealingLR(whole.opt, T_max=16)
    for k, gs in enumerate(grads):
        whole.step(gs)
        sched.step()
        if k == 7:
            saved = copy.deepcopy((whole.opt.state_dict(), sched.state_dict()))
            params = whole.result()[0]
    resumed = start("gpunn.torch", "adam", [params], FULL["adam"])
    resumed.opt.load_state_dict(saved[0])
    sched2 = lr_scheduler.CosineAnnealingLR(resumed.opt, T_max=16)
    sched2.load_state_dict(saved[1])
    for gs in grads[8:]:
        resumed.step(gs)
        sched2.step()
    assert resumed.opt.param_groups[0]["lr"] == whole.opt.param_groups[0]["lr"]
    assert _snapshot(resumed)[:2] == _snapshot(whole)[:2]


# --- torch.amp.GradScaler on CPU ---------------------------------------------------------------


def _scaled_training(algo, model, rng, steps, inject, device="cpu", unscale_and_clip=False,
                     options=None):
    """Train two copies (gpunn.torch and torch.optim) under their own GradScaler; at the steps
    in ``inject`` a gradient gets an inf (a NaN at odd ones). Returns per-step records."""
    options = FULL[algo] if options is None else options
    (ours, a), (theirs, b) = _pair(algo, model, options, device)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0 ** 12, growth_interval=3)
               for _ in range(2)]
    records = []
    for k, (x, y) in enumerate(_batches(rng, steps, device)):
        row = {}
        for who, model_, opt, scaler in (("ours", ours, a, scalers[0]),
                                         ("theirs", theirs, b, scalers[1])):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model_(x), y)
            scaler.scale(loss).backward()
            if k in inject:
                grad = list(model_.parameters())[k % 4].grad.view(-1)
                grad[k % grad.numel()] = float("nan") if k % 2 else float("inf")
            if unscale_and_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model_.parameters(), 0.5, foreach=False)
            scaler.step(opt)
            row[who] = dict(scale=scaler.get_scale(), found=sum(
                float(v) for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
                .values()))
            scaler.update()
            row[who]["after"] = scaler.get_scale()
        row["skipped"] = a.last_step_skipped
        assert not hasattr(a, "grad_scale") and not hasattr(a, "found_inf")
        records.append(row)
    return (ours, a), (theirs, b), records


@pytest.mark.parametrize("clip", [False, True], ids=["", "unscale_clip"])
@pytest.mark.parametrize("algo", ALGOS)
def test_grad_scaler_cpu_matches_torch(algo, clip, rng):
    """GradScaler('cpu') with a float32 model: gpunn.torch takes the scale and the found-inf
    flag from the scaler (unscaling in its step, or after unscale_ + clipping), skips the
    steps with an inf/NaN gradient, and the scaler backs off and grows as with torch.optim;
    the trajectory equals torch.optim under its own scaler."""
    inject = {4, 5, 11}
    (ours, a), (theirs, b), records = _scaled_training(algo, _model(), rng, 16, inject,
                                                       unscale_and_clip=clip)
    for k, row in enumerate(records):
        assert row["ours"] == row["theirs"], k
        assert row["skipped"] == (k in inject)
        assert (row["ours"]["found"] > 0) == (k in inject)
        if k in inject:
            assert row["ours"]["after"] == row["ours"]["scale"] / 2
    scales = [r["ours"]["after"] for r in records]
    assert max(scales) > 2.0 ** 12 > min(scales)  # grew after 3 good steps, backed off
    _assert_models_match(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):  # skipped steps not counted
        if algo == "sgd":  # neither SGD shows a step count
            assert "step" not in a.state[p] and "step" not in b.state[q]
        else:
            assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == 16 - len(inject)


def test_grad_scaler_skip_leaves_everything_bitwise(rng):
    """The skipped step under GradScaler changes no parameter, state or step; a plain
    step() afterwards (no scaler) does not divide by a stale scale."""
    (ours, a), _, records = _scaled_training("adam", _model(), rng, 3, set())
    before = [(p.detach().clone(), {k: v.clone() for k, v in a.state[p].items()})
              for p in ours.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = _batches(rng, 1)[0]
    a.zero_grad()
    scaler.scale(nn.functional.mse_loss(ours(x), y)).backward()
    next(ours.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(a)
    scaler.update()
    assert a.last_step_skipped and scaler.get_scale() == 2.0 ** 7
    for p, (q, state) in zip(ours.parameters(), before):
        assert torch.equal(p.detach(), q)
        assert all(torch.equal(a.state[p][k], v) for k, v in state.items())
    # an unscaled plain step equals torch's on the same gradients
    ref = copy.deepcopy(ours)
    ref_opt = torch.optim.Adam(ref.parameters(), **FULL["adam"], foreach=False)
    ref_opt.load_state_dict(copy.deepcopy(a.state_dict()))
    for model_, opt in ((ours, a), (ref, ref_opt)):
        opt.zero_grad()
        nn.functional.mse_loss(model_(x), y).backward()
        opt.step()
    assert not a.last_step_skipped
    _assert_models_match(ours, ref)


# --- State dicts: gpunn.torch <-> torch.optim <-> gpunn.optim ------------------------------------


@pytest.mark.parametrize("direction", ["torch->adapter", "adapter->torch", "adapter->gpunn",
                                       "gpunn->adapter", "adapter->adapter"])
@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_interchange_mid_run(algo, direction, rng):
    """N steps on one side, its state dict loaded mid-run into the other (gpunn.optim's
    through gpunn.optim.to_torch; gpunn.torch's are torch's own), M more steps on both:
    the same trajectory. Two groups, different lrs."""
    init, grads = make_data(rng, SMALL, 14, np.float32)
    runners = {"torch": "torch", "adapter": "gpunn.torch", "gpunn": "cpu"}
    src_name, dst_name = direction.split("->")
    options = FULL[algo]
    src = start(runners[src_name], algo, [init[:4], init[4:]], options)
    src.opt.param_groups[1]["lr"] = options["lr"] / 3
    _continue([src], grads[:7])
    saved = src.opt.state_dict()
    if src_name == "gpunn":
        saved = go.to_torch(saved)
    saved = copy.deepcopy(saved)
    now = src.result()[0]
    dst = start(runners[dst_name], algo, [now[:4], now[4:]], dict(options, lr=0.5))
    dst.opt.load_state_dict(saved)
    assert [g["lr"] for g in dst.opt.param_groups] == [options["lr"], options["lr"] / 3]
    _continue([src, dst], grads[7:])
    out, ref = dst.result(), src.result()
    if algo == "sgd" and direction == "gpunn->adapter":  # gpunn.optim's SGD shows 'step'
        out, ref = ref, out
    assert_trajectories_match(out, ref, "float32",
                              steps=not (algo == "sgd" and "torch" in direction))


@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_through_torch_save(algo, rng):
    """gpunn.torch's state dict (gpunn's options included) saves with torch.save and loads
    with torch.load(weights_only=True) into gpunn.torch and torch.optim."""
    init, grads = make_data(rng, SMALL, 6, np.float32)
    src = start("gpunn.torch", algo, [init], dict(FULL[algo], max_grad_norm=100.0, l1=0.0))
    _continue([src], grads[:3])
    buffer = io.BytesIO()
    torch.save(src.opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["param_groups"][0]["max_grad_norm"] == 100.0
    now = src.result()[0]
    for runner in ("gpunn.torch", "torch"):
        dst = start(runner, algo, [now], FULL[algo])
        dst.opt.load_state_dict(copy.deepcopy(saved))
        assert _snapshot(dst)[1] == _snapshot(src)[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_keeps_float32_states_of_16_bit_parameters(dtype):
    p = nn.Parameter(torch.randn(64).to(dtype))
    src = gt.Adam([p], master_weights=True)
    state = {"step": torch.tensor(3.0), "exp_avg": torch.randn(64) * 1e-3,
             "exp_avg_sq": torch.rand(64) * 1e-4, "master_param": p.detach().float() + 1e-4}
    src.state[p] = {k: v.clone() for k, v in state.items()}
    dst = gt.Adam([p], master_weights=True)
    dst.load_state_dict(src.state_dict())
    for key, value in state.items():
        assert dst.state[p][key].dtype == torch.float32, key
        assert torch.equal(dst.state[p][key], value), key


# --- The adapter's options -----------------------------------------------------------------------


def test_bad_param_group_is_not_added():
    opt = gt.Adam([nn.Parameter(torch.ones(3))], lr=1e-2)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "betas": (0.9, 1.0)})
    assert len(opt.param_groups) == 1


def test_adapter_options_and_errors():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="lr"):
        gt.SGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="nesterov"):
        gt.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        gt.AdamW([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="max_grad_norm"):
        gt.Adagrad([p], max_grad_norm=0.0)
    opt = gt.RMSprop([p], lr=1e-2)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["alpha"] == torch.optim.RMSprop([p]).defaults["alpha"]
    opt.param_groups[0]["lr"] = -1.0  # set by hand: refused at the step, nothing changes
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and p not in opt.state
    wrong = torch.optim.Adam([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError):
        gt.Adam([p]).load_state_dict(wrong.state_dict())


def test_adapter_max_grad_norm_and_l1_match_torch(rng):
    """gpunn's extra options through the adapter: clipping = clip_grad_norm_ then step; l1 =
    the penalty's gradient added by hand."""
    init, grads = make_data(rng, SMALL, 10, np.float32)
    ours = start("gpunn.torch", "adamw", [init], dict(lr=1e-2, max_grad_norm=3.0, l1=0.01))
    theirs = start("torch", "adamw", [init], dict(lr=1e-2))
    for gs in grads:
        ours.step(gs)
        for p, g in zip(theirs.flat, gs):
            p.grad = None if g is None else torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([p for p in theirs.flat if p.grad is not None], 3.0,
                                       foreach=False)
        for p in theirs.flat:
            if p.grad is not None:
                p.grad += 0.01 * torch.sign(p.detach())
        theirs.opt.step()
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_cuda_model_training_matches_torch_cuda(algo, rng):
    """CUDA tensors: gpunn.torch's CUDA kernels against torch.optim on CUDA, 30 steps."""
    (ours, a), (theirs, b) = _pair(algo, _model(), FULL[algo], "cuda")
    for x, y in _batches(rng, 30, "cuda"):
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    _assert_models_match(ours, theirs)
    for p in ours.parameters():
        if algo == "sgd":  # as torch's SGD: no step count in the state
            assert "step" not in a.state[p]
        else:
            assert a.state[p]["step"].device == p.device and float(a.state[p]["step"]) == 30


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_cuda_trajectory_matches_torch_cuda(algo, rng):
    """Odd sizes, missing gradients and a tensor of several chunks, on CUDA."""
    init, grads = make_data(rng, SMALL + [(5, 7001)], 20, np.float32)
    options = FULL[algo]
    ours = [torch.tensor(x, device="cuda", requires_grad=True) for x in init]
    theirs = [torch.tensor(x, device="cuda", requires_grad=True) for x in init]
    a = CLASSES[algo][1](ours, **options)
    b = CLASSES[algo][2](theirs, **options)
    for gs in grads:
        for ps in (ours, theirs):
            for p, g in zip(ps, gs):
                p.grad = None if g is None else torch.tensor(g, device="cuda")
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert rel_err(p.detach().double().cpu(), q.detach().double().cpu()) <= 1e-5
        for key, value in b.state[q].items():
            if key != "step":
                assert rel_err(a.state[p][key].double().cpu(), value.double().cpu()) <= 1e-5
            else:
                assert float(a.state[p][key]) == float(value)


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [False, True], ids=["", "unscale_clip"])
@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_cuda_grad_scaler_matches_torch(algo, clip, rng):
    """GradScaler('cuda'): the scale and found-inf flag stay on the device; inf/NaN steps
    skipped; the same scales and trajectory as torch.optim on CUDA."""
    inject = {3, 6}
    (ours, a), (theirs, b), records = _scaled_training(algo, _model(), rng, 12, inject,
                                                       device="cuda", unscale_and_clip=clip)
    for k, row in enumerate(records):
        assert row["ours"] == row["theirs"], k
        assert row["skipped"] == (k in inject)
    _assert_models_match(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        if algo == "sgd":  # neither SGD shows a step count
            assert "step" not in a.state[p] and "step" not in b.state[q]
        else:
            assert float(a.state[p]["step"]) == float(b.state[q]["step"]) == 12 - len(inject)


@pytest.mark.gpu
def test_cuda_side_stream(rng):
    """A step queued on a side stream (gpunn works on torch's current stream) equals the
    default-stream step."""
    init, grads = make_data(rng, SMALL + [(5, 7001)], 5, np.float32, missing=False)
    results = []
    for use_side in (False, True):
        params = [torch.tensor(x, device="cuda", requires_grad=True) for x in init]
        opt = gt.Adam(params, **FULL["adam"])
        side = torch.cuda.Stream()
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = torch.tensor(g, device="cuda")
            if use_side:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    opt.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                opt.step()
        torch.cuda.synchronize()
        results.append([p.detach().cpu() for p in params])
    assert all(torch.equal(x, y) for x, y in zip(*results))


@pytest.mark.gpu
@pytest.mark.parametrize("algo", ALGOS)
def test_cuda_bfloat16_master_weights_match_float32_torch(algo, rng):
    """bfloat16 CUDA parameters with master weights: the float32 master follows torch.optim
    run in float32 on the same (bfloat16) values; the parameter is the master rounded."""
    options = dict(FULL[algo], lr=1e-3)
    init, grads = make_data(rng, [(7,), (13, 3), (1021,), (3, 9001)], 20, np.float32,
                            missing=False)
    ours = [torch.tensor(x, device="cuda").bfloat16().requires_grad_() for x in init]
    theirs = [p.detach().float().requires_grad_() for p in ours]
    a = CLASSES[algo][1](ours, master_weights=True, **options)
    b = CLASSES[algo][2](theirs, **options)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs):
            p.grad = torch.tensor(g, device="cuda").bfloat16()
            q.grad = p.grad.float()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        master = a.state[p]["master_param"]
        assert master.dtype == torch.float32
        assert algo == "sgd" or a.state[p]["step"].dtype == torch.float32
        assert rel_err(master.double().cpu(), q.detach().double().cpu()) <= 1e-5
        assert torch.equal(master.bfloat16(), p.detach())
        for key in b.state[q]:
            if key != "step":
                assert a.state[p][key].dtype == torch.float32


@pytest.mark.gpu
def test_cuda_bfloat16_state_dict_round_trip_mid_run(rng):
    init, grads = make_data(rng, [(7,), (1021,)], 10, np.float32, missing=False)

    def make(values):
        params = [torch.tensor(x, device="cuda").bfloat16().requires_grad_() for x in values]
        return params, gt.Adam(params, lr=1e-3, master_weights=True)

    def step(params, opt, gs):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, device="cuda").bfloat16()
        opt.step()

    whole, opt = make(init)
    for k, gs in enumerate(grads):
        step(whole, opt, gs)
        if k == 4:
            saved = copy.deepcopy(opt.state_dict())
            now = [p.detach().float().cpu().numpy() for p in whole]
    resumed, opt2 = make(now)
    opt2.load_state_dict(saved)
    for gs in grads[5:]:
        step(resumed, opt2, gs)
    for p, q in zip(whole, resumed):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])


@pytest.mark.parametrize("algo", ALGOS)
def test_torch_implementation_switches_are_accepted(algo):
    """Code written for torch.optim (foreach=/fused= where torch takes them) runs unchanged;
    capturable and differentiable, which gpunn does not implement, are refused by name;
    a switch torch's class does not take is a TypeError, as in torch."""
    params = [torch.nn.Parameter(torch.randn(5))]
    params[0].grad = torch.randn(5)
    cls, theirs = CLASSES[algo][1:]
    taken = inspect.signature(theirs.__init__).parameters
    switches = {k: v for k, v in dict(foreach=False, fused=True).items() if k in taken}
    assert "foreach" in switches
    cls(params, lr=1e-3, **switches).step()
    for name in ("capturable", "differentiable", "fused"):
        if name not in taken:
            with pytest.raises(TypeError, match=name):
                theirs(params, lr=1e-3, **{name: True})
            with pytest.raises(TypeError, match=name):
                cls(params, lr=1e-3, **{name: True})
        elif name != "fused":
            with pytest.raises(ValueError, match=name):
                cls(params, lr=1e-3, **{name: True})
