"""gpunn.torch as a drop-in for torch.optim (torch 2.13), each gap found by torch's own
optimizer tests checked against torch.optim on CPU: Adam's decoupled_weight_decay; torch's
signatures (positions, keyword-only options) and param_group keys; SGD without a 'step'
state; Adagrad's states made at construction; Tensor hyperparameters; a parameter listed
twice; deepcopy, pickle and torch.save; state dicts of another optimizer or of complex
values refused, nothing changed."""

import copy
import inspect
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gpunn.optim as go
import gpunn.torch as gt
from gpunn.nn import Parameter
from conftest import assert_close
from test_optim import (ALGOS, CLASSES, FULL, SMALL, _continue, _snapshot,
                        assert_trajectories_match, make_data, start)

pytestmark = pytest.mark.usefixtures("one_thread")

GPUNN_OPTIONS = ("l1", "max_grad_norm", "skip_nonfinite", "master_weights", "backend")


def _torch_keys(group):
    return {k: v for k, v in group.items() if k not in GPUNN_OPTIONS + ("params",)}


def _run_pair(algo, options, grads_steps, rng, theirs_options=None, theirs_cls=None):
    """gpunn.torch and torch.optim (foreach=False) over the same data; returns both runs."""
    init, grads = make_data(rng, SMALL, grads_steps, np.float32)
    ours = start("gpunn.torch", algo, [init], options)
    theirs = start("torch", algo, [init], {})
    theirs.opt = (theirs_cls or CLASSES[algo][2])(
        theirs.flat, foreach=False, **(options if theirs_options is None else theirs_options))
    _continue([ours, theirs], grads)
    return ours, theirs


# --- 1. Adam(decoupled_weight_decay=True) ----------------------------------------------------


def test_adam_decoupled_weight_decay_is_adamw(rng):
    """gpunn.torch.Adam(decoupled_weight_decay=True) follows torch's Adam with it (AdamW's
    math, not Adam's L2); its group says so, as AdamW's does."""
    options = dict(lr=1e-2, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True)
    ours, theirs = _run_pair("adam", options, 12, rng)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")
    l2 = start("gpunn.torch", "adam", [ours.result()[0]], dict(options,
                                                               decoupled_weight_decay=False))
    assert l2.opt.param_groups[0]["decoupled_weight_decay"] is False
    assert ours.opt.param_groups[0]["decoupled_weight_decay"] is True
    p = nn.Parameter(torch.ones(3))
    assert gt.AdamW([p]).param_groups[0]["decoupled_weight_decay"] is True
    assert isinstance(gt.AdamW([p]), gt.Adam) and isinstance(go.AdamW([Parameter(
        np.ones(3, np.float32))]), go.Adam)  # as torch's AdamW subclasses Adam


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_gpunn_optim_adam_decoupled_equals_adamw(backend, rng):
    init, grads = make_data(rng, SMALL, 8, np.float32)
    options = dict(lr=1e-2, weight_decay=0.1)
    a = start(backend, "adam", [init], dict(options, decoupled_weight_decay=True))
    w = start(backend, "adamw", [init], options)
    _continue([a, w], grads)
    assert _snapshot(a)[:2] == _snapshot(w)[:2]


def test_adamw_load_forces_decoupled_as_torch(rng):
    """An Adam state dict loaded into AdamW: decoupled (torch's AdamW.__setstate__), and
    AdamW's into Adam: whatever it says (torch's Adam reads the group)."""
    init, grads = make_data(rng, SMALL, 6, np.float32)
    src = start("torch", "adam", [init], dict(lr=1e-2, weight_decay=0.1))
    _continue([src], grads[:3])
    saved = copy.deepcopy(src.opt.state_dict())
    for runner in ("torch", "gpunn.torch"):
        dst = start(runner, "adamw", [src.result()[0]], dict(lr=1e-2))
        dst.opt.load_state_dict(copy.deepcopy(saved))
        assert dst.opt.param_groups[0]["decoupled_weight_decay"] is True
    ours = start("gpunn.torch", "adamw", [src.result()[0]], dict(lr=1e-2))
    theirs = start("torch", "adamw", [src.result()[0]], dict(lr=1e-2))
    for run in (ours, theirs):
        run.opt.load_state_dict(copy.deepcopy(saved))
    _continue([ours, theirs], grads[3:])
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


# --- 2. Signatures -------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_signatures_are_torchs_then_gpunns_keyword_only(algo):
    """Every parameter of torch's __init__ in order, kind and default; then gpunn's
    options, keyword-only (gpunn.optim's classes share the signature)."""
    theirs = [(k, v.kind, v.default)
              for k, v in inspect.signature(CLASSES[algo][2].__init__).parameters.items()]
    for cls in CLASSES[algo][:2]:
        ours = [(k, v.kind, v.default)
                for k, v in inspect.signature(cls.__init__).parameters.items()]
        assert ours[:len(theirs)] == theirs
        assert [(k, kind) for k, kind, _ in ours[len(theirs):]] == [
            (k, inspect.Parameter.KEYWORD_ONLY) for k in GPUNN_OPTIONS]


#: Every positional argument of torch's signature after params, none at its default.
POSITIONAL = {
    "sgd": (0.05, 0.9, 0.0, 0.01, True),
    "adagrad": (0.05, 0.01, 0.01, 0.2, 1e-6, False),  # foreach is positional
    "rmsprop": (1e-3, 0.9, 1e-6, 0.01, 0.5, True, False, False, True, False),
    "adam": (1e-2, (0.8, 0.9), 1e-6, 0.01, True),
    "adamw": (1e-2, (0.8, 0.9), 1e-6, 0.05, True),
}


@pytest.mark.parametrize("algo", ALGOS)
def test_positional_arguments_mean_what_they_mean_in_torch(algo, rng):
    """The same positional call gives the same param_groups (torch's keys) and, run, the
    same trajectory; one positional argument more is a TypeError, as in torch."""
    args = POSITIONAL[algo]
    init, grads = make_data(rng, SMALL, 10, np.float32)
    runs = []
    for cls in CLASSES[algo][1:]:
        params = [torch.tensor(x, requires_grad=True) for x in init]
        runs.append((params, cls(params, *args)))
        with pytest.raises(TypeError):
            cls(params, *args, False)
    (ours, a), (theirs, b) = runs
    assert _torch_keys(a.param_groups[0]) == _torch_keys(b.param_groups[0])
    for gs in grads:
        for params, opt in runs:
            for p, g in zip(params, gs):
                p.grad = None if g is None else torch.tensor(g)
            opt.step()
    for p, q in zip(ours, theirs):
        assert_close(p.detach().numpy(), q.detach().numpy(), "float32")


# --- 3. param_groups keys ---------------------------------------------------------------------


@pytest.mark.parametrize("options", ["defaults", "full"])
@pytest.mark.parametrize("algo", ALGOS)
def test_param_groups_hold_torchs_keys_and_values(algo, options):
    """torch's keys, in torch's order, with torch's values; gpunn's options after them."""
    kw = {} if options == "defaults" else FULL[algo]
    p = nn.Parameter(torch.ones(3))
    for cls in CLASSES[algo][:2]:
        ours = cls([Parameter(np.ones(3, np.float32))] if cls is CLASSES[algo][0] else [p], **kw)
        theirs = CLASSES[algo][2]([p], **kw)
        assert list(_torch_keys(ours.param_groups[0]).items()) == \
            list(_torch_keys(theirs.param_groups[0]).items())
        assert list(ours.param_groups[0])[-len(GPUNN_OPTIONS):] == list(GPUNN_OPTIONS)
        assert ours.defaults == {k: v for k, v in ours.param_groups[0].items() if k != "params"}


@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_round_trip_both_ways_keeps_torchs_groups(algo, rng):
    """gpunn.torch -> torch.optim -> gpunn.torch mid-run: the groups keep torch's keys and
    values, gpunn's options survive, and the trajectory is torch's."""
    init, grads = make_data(rng, SMALL, 9, np.float32)
    options = dict(FULL[algo], max_grad_norm=1e3)
    ours = start("gpunn.torch", algo, [init], options)
    whole = start("gpunn.torch", algo, [init], options)
    _continue([ours, whole], grads[:3])
    theirs = start("torch", algo, [ours.result()[0]], {})
    theirs.opt.load_state_dict(copy.deepcopy(ours.opt.state_dict()))
    assert _torch_keys(theirs.opt.param_groups[0]) == _torch_keys(ours.opt.param_groups[0])
    _continue([theirs, whole], grads[3:6])
    back = start("gpunn.torch", algo, [theirs.result()[0]], dict(lr=0.5))
    back.opt.load_state_dict(copy.deepcopy(theirs.opt.state_dict()))
    assert back.opt.param_groups[0] == {**whole.opt.param_groups[0],
                                        "params": back.opt.param_groups[0]["params"]}
    _continue([back, whole], grads[6:])
    assert_trajectories_match(back.result(), whole.result(), "float32")


# --- 4. SGD without 'step' --------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(lr=0.05), FULL["sgd"],
                                     dict(lr=0.05, momentum=0.9, nesterov=True)],
                         ids=["plain", "momentum", "nesterov"])
def test_sgd_state_and_state_dict_have_torchs_keys_only(options, rng):
    """Neither state nor state_dict shows a step count: the same keys as torch's SGD,
    the same trajectory (momentum's first step included, for parameters whose gradient
    comes late)."""
    ours, theirs = _run_pair("sgd", options, 12, rng)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")
    for opt in (ours, theirs):
        opt.keys = {i: sorted(s) for i, s in opt.opt.state_dict()["state"].items()}
    assert ours.keys == theirs.keys
    assert all("step" not in s for s in ours.opt.state.values())
    assert len(ours.opt.state) == len(theirs.opt.state)


def test_sgd_dropped_momentum_buffer_restarts_as_torch(rng):
    """A momentum buffer removed from the state: the next step starts it from the gradient,
    as torch does (the step count kept aside does not say otherwise)."""
    ours, theirs = _run_pair("sgd", FULL["sgd"], 4, rng)
    _, more = make_data(rng, SMALL, 4, np.float32, missing=False)
    for run in (ours, theirs):
        del run.opt.state[run.flat[1]]["momentum_buffer"]
        run.opt.state[run.flat[3]].clear()
    _continue([ours, theirs], more)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


def test_sgd_step_counts_follow_loads(rng):
    """A state dict with 'step' (gpunn.optim's SGD) loads into gpunn.torch's SGD without
    showing it; the run goes on as the source."""
    init, grads = make_data(rng, SMALL, 8, np.float32)
    src = start("cpu", "sgd", [init], FULL["sgd"])
    _continue([src], grads[:4])
    assert all("step" in s for s in src.opt.state_dict()["state"].values())
    dst = start("gpunn.torch", "sgd", [src.result()[0]], FULL["sgd"])
    dst.opt.load_state_dict(go.to_torch(src.opt.state_dict()))
    assert all("step" not in s for s in dst.opt.state_dict()["state"].values())
    _continue([src, dst], grads[4:])
    assert_trajectories_match(src.result(), dst.result(), "float32")


# --- 5. Adagrad's states at construction ---------------------------------------------------


@pytest.mark.parametrize("which", [0, 1])
def test_adagrad_states_exist_at_construction(which):
    """As torch's Adagrad: 'step' 0 and 'sum' full of initial_accumulator_value for every
    parameter of every group, before any step; the state dicts agree. (A group's own
    initial_accumulator_value is used; torch's constructor uses its argument for all.)"""
    params = [nn.Parameter(torch.randn(s)) for s in [(3,), (2, 5)]]

    def groups(ps, second):
        return [{"params": ps[:1]}, {"params": ps[1:], "initial_accumulator_value": second}]

    theirs = torch.optim.Adagrad(groups(params, 0.3), initial_accumulator_value=0.3)
    mine = params if which == 0 else [Parameter(p.detach().numpy().copy()) for p in params]
    ours = CLASSES["adagrad"][1 - which](groups(mine, 0.3), initial_accumulator_value=0.3)
    for p, q in zip(mine, params):
        state, ref = ours.state[p], theirs.state[q]
        assert list(state) == list(ref) == ["step", "sum"]
        assert float(state["step"]) == 0.0 and np.asarray(state["step"]).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(state["sum"]), ref["sum"].numpy())
    assert sorted(ours.state_dict()["state"]) == sorted(theirs.state_dict()["state"]) == [0, 1]
    ours = CLASSES["adagrad"][1 - which](groups(mine, 0.7), initial_accumulator_value=0.3)
    assert [float(ours.state[p]["sum"].max()) for p in mine] == [
        pytest.approx(0.3), pytest.approx(0.7)]


# --- 6. Tensor hyperparameters ----------------------------------------------------------------


def _raises_alike(make_ours, make_theirs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make_theirs()
    with pytest.raises(exc, match=pattern):
        make_ours()


@pytest.mark.parametrize("algo", ALGOS)
def test_tensor_hyperparameters_refused_as_torch(algo):
    p = nn.Parameter(torch.ones(3))
    ours, theirs = CLASSES[algo][1:]
    _raises_alike(lambda: ours([p], lr=torch.tensor([0.1, 0.2])),
                  lambda: theirs([p], lr=torch.tensor([0.1, 0.2])),
                  ValueError, "Tensor lr must be 1-element")
    if algo in ("adam", "adamw"):
        _raises_alike(lambda: ours([p], lr=torch.tensor(0.1), foreach=True),
                      lambda: theirs([p], lr=torch.tensor(0.1), foreach=True),
                      ValueError, "lr as a Tensor is not supported for capturable=False and "
                                  "foreach=True")
        for betas in ((torch.tensor(0.9), 0.999), (0.9, torch.tensor(0.999))):
            _raises_alike(lambda: ours([p], betas=betas), lambda: theirs([p], betas=betas),
                          ValueError, "betas must be either both floats or both Tensors")
        both = (torch.tensor(0.9), torch.tensor(0.999))
        _raises_alike(lambda: ours([p], betas=both, foreach=True),
                      lambda: theirs([p], betas=both, foreach=True),
                      ValueError, r"betas\[0\] as a Tensor is not supported")
    else:  # torch takes a Tensor lr with foreach=True here
        theirs([p], lr=torch.tensor(0.1), foreach=True)
        ours([p], lr=torch.tensor(0.1), foreach=True)


@pytest.mark.parametrize("lr", ["1-element", "0-d"])
@pytest.mark.parametrize("algo", ALGOS)
def test_one_element_tensor_lr_steps_as_torch(algo, lr, rng):
    """A Tensor lr (and Tensor betas) steps as torch does with it; a scheduler changes it."""
    options = dict(FULL[algo])
    value = options["lr"]
    options["lr"] = torch.tensor([value]) if lr == "1-element" else torch.tensor(value)
    if algo in ("adam", "adamw"):
        options["betas"] = (torch.tensor(0.8), torch.tensor(0.99))
    ours, theirs = _run_pair(algo, options, 6, rng)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")
    _, grads = make_data(rng, SMALL, 4, np.float32)
    for run in (ours, theirs):
        run.opt.param_groups[0]["lr"].fill_(value / 3)
    _continue([ours, theirs], grads)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


# --- 7. A parameter listed twice --------------------------------------------------------------


def test_parameter_listed_twice_is_refused_by_name():
    """torch warns and steps it twice; gpunn.torch refuses it, naming both positions."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        torch.optim.SGD([p, q, p], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"params\[2\] \(shape \(3,\)\) is params\[0\]"):
            gt.SGD([p, q, p], lr=0.1)
        with pytest.raises(ValueError, match=r"params\[1\] 'w2' \(shape \(3,\)\) is params\[0\]"):
            gt.Adam([("w", p), ("w2", p)])
        opt = gt.Adam([p])
        with pytest.raises(ValueError, match=r"params\[1\].*is params\[0\]"):
            opt.add_param_group({"params": [q, q]})
        assert len(opt.param_groups) == 1
        with pytest.raises(ValueError, match="more than one parameter group"):
            opt.add_param_group({"params": [q, p]})
        assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"params\[1\].*is params\[0\]"):
        go.SGD([Parameter(np.ones(3, np.float32))] * 2, lr=0.1)


# --- 8. deepcopy, pickle, torch.save ------------------------------------------------------------


def _copies(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return {"deepcopy": lambda: copy.deepcopy(opt),
            "pickle": lambda: pickle.loads(pickle.dumps(opt)),
            "torch.save": lambda: torch.load(buffer, weights_only=False)}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("algo", ALGOS)
def test_copies_step_as_the_original(algo, how, rng):
    """A copy made mid-run (its own parameters and states) then stepped with gradients
    matches the original continuing, bit for bit; the cached tables are not copied."""
    init, grads = make_data(rng, SMALL, 8, np.float32, missing=False)
    run = start("gpunn.torch", algo, [init], FULL[algo])
    _continue([run], grads[:4])
    assert run.opt._tables
    twin = _copies(run.opt)[how]()
    assert type(twin) is type(run.opt) and twin._tables == {}
    params = twin.param_groups[0]["params"]
    assert all(p is not q for p, q in zip(params, run.flat))
    for gs in grads[4:]:
        run.step(gs)
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        twin.step()
    for p, q in zip(params, run.flat):
        assert torch.equal(p, q)
        assert twin.state[p].keys() == run.opt.state[q].keys()
        assert all(torch.equal(twin.state[p][k], v) for k, v in run.opt.state[q].items())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("algo", ALGOS)
def test_gpunn_optim_copies_step_as_the_original(algo, how, rng):
    init, grads = make_data(rng, SMALL, 6, np.float32, missing=False)
    run = start("cpu", algo, [init], FULL[algo])
    _continue([run], grads[:3])
    assert run.opt._tables and "_tables" not in run.opt.__getstate__()
    twin = copy.deepcopy(run.opt) if how == "deepcopy" else pickle.loads(pickle.dumps(run.opt))
    assert twin._tables == {}
    params = twin.param_groups[0]["params"]
    for gs in grads[3:]:
        run.step(gs)
        for p, g in zip(params, gs):
            p.grad = np.array(g, copy=True)
        twin.step()
    for p, q in zip(params, run.flat):
        assert np.array_equal(p.data, q.data)
        assert all(np.array_equal(twin.state[p][k], v) for k, v in run.opt.state[q].items())


# --- 9. Loading another optimizer's state dict, complex states ---------------------------------


@pytest.mark.parametrize("runner", ["cpu", "gpunn.torch"])
@pytest.mark.parametrize("source", ["sgd", "sgd_fresh", "torch_rmsprop", "unused_state"])
def test_load_of_another_optimizers_state_dict_is_refused(runner, source, rng):
    """Adam given SGD's state dict (mid-run or fresh), torch RMSprop's (groups without betas)
    or its own with a state it does not use: ValueError naming what is wrong; nothing
    changed."""
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    algo = {"sgd": "sgd", "sgd_fresh": "sgd", "torch_rmsprop": "rmsprop"}.get(source, "adam")
    src = start("torch" if source == "torch_rmsprop" else runner, algo, [init], FULL[algo])
    if source != "sgd_fresh":
        _continue([src], grads[:2])
    saved = copy.deepcopy(src.opt.state_dict())
    if runner == "cpu" and source != "torch_rmsprop":
        saved = go.to_torch(saved)
    if source == "unused_state":
        saved["state"][1]["momentum_buffer"] = saved["state"][1]["exp_avg"].clone()
    dst = start(runner, "adam", [init], FULL["adam"])
    _continue([dst], grads[:1])
    before = _snapshot(dst)
    pattern = {"sgd": r"param_groups\[0\] lacks \['betas', 'eps'\]",
               "sgd_fresh": r"param_groups\[0\] lacks \['betas', 'eps'\]",
               "torch_rmsprop": r"param_groups\[0\] lacks \['betas'\]",
               "unused_state": r"state\[1\] has \['momentum_buffer'\], which Adam does not use"}
    with pytest.raises(ValueError, match=pattern[source]):
        dst.opt.load_state_dict(saved)
    assert _snapshot(dst) == before
    _continue([dst], grads[1:])  # still works


@pytest.mark.parametrize("runner", ["cpu", "gpunn.torch"])
def test_complex_state_is_a_type_error_and_changes_nothing(runner, rng):
    """exp_avg from a complex tensor: TypeError (no ComplexWarning, no imaginary part
    dropped), nothing changed; the same for a complex value set in the state by hand."""
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    run = start(runner, "adam", [init], FULL["adam"])
    _continue([run], grads[:2])
    saved = copy.deepcopy(run.opt.state_dict())
    saved = go.to_torch(saved) if runner == "cpu" else saved
    saved["state"][2]["exp_avg"] = saved["state"][2]["exp_avg"].to(torch.complex64) * (1 + 1j)
    before = _snapshot(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=r"state\[2\]\['exp_avg'\].*complex64"):
            run.opt.load_state_dict(saved)
        assert _snapshot(run) == before
        saved["state"][2]["exp_avg"] = saved["state"][2]["exp_avg"].numpy()
        with pytest.raises(TypeError, match=r"complex64"):
            run.opt.load_state_dict(saved)
    assert _snapshot(run) == before
    _continue([run], grads[2:])  # still works
