"""Fused optimizers (gpunn.optim): 50-step trajectories against torch.optim for every algorithm
under many option combinations, on the numpy and cpu backends and through gpunn.torch; the
backends against each other; the functional API against torch.optim._functional; l1,
max_grad_norm, grad_scale and skipped steps; state-dict round trips with torch.optim mid-run;
bad input (a clear error naming the argument, nothing modified); GPU: every algorithm and dtype
against the float64 reference, master weights, many tensors, device scalars, determinism."""

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import _functional as TF

import gpunn.optim as go
import gpunn.torch as gt
from gpunn.nn import Parameter
from gpunn.optim import functional as F
from gpunn.backend import SERIAL_BELOW
from gpunn.optim import walker
from gpunn.optim.fused import CHUNK, chunk_list
from conftest import HOST_BACKENDS, TOLERANCE, assert_close, rel_err
from conftest import functional_step as torch_algorithm_step

# algorithm: (gpunn.optim class, gpunn.torch class, torch.optim class)
CLASSES = {
    "sgd": (go.SGD, gt.SGD, torch.optim.SGD),
    "adagrad": (go.Adagrad, gt.Adagrad, torch.optim.Adagrad),
    "rmsprop": (go.RMSprop, gt.RMSprop, torch.optim.RMSprop),
    "adam": (go.Adam, gt.Adam, torch.optim.Adam),
    "adamw": (go.AdamW, gt.AdamW, torch.optim.AdamW),
}
ALGOS = tuple(CLASSES)

# Options in torch's names; each entry runs against torch.optim with the same options.
CONFIGS = {
    "sgd": [
        dict(lr=0.05),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True),
        dict(lr=0.05, weight_decay=0.1, maximize=True),
        dict(lr=0.05, momentum=0.5, dampening=0.5, weight_decay=1e-3),
    ],
    "adagrad": [
        dict(),
        dict(lr=0.1, lr_decay=0.01),
        dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6),
        dict(lr=0.05, weight_decay=0.1, lr_decay=1e-3, maximize=True),
    ],
    "rmsprop": [
        dict(),
        dict(lr=1e-3, alpha=0.9),
        dict(lr=1e-3, centered=True),
        dict(lr=1e-3, momentum=0.9),
        dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=0.01),
        dict(lr=1e-3, alpha=0.5, eps=1e-4, maximize=True),
    ],
    "adam": [
        dict(),
        dict(lr=1e-2, betas=(0.8, 0.99)),
        dict(lr=1e-2, amsgrad=True),
        dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(lr=1e-2, betas=(0.0, 0.5), eps=1e-6),
    ],
    "adamw": [
        dict(),
        dict(lr=1e-2, weight_decay=0.1, amsgrad=True),
        dict(lr=1e-2, betas=(0.5, 0.9), maximize=True),
        dict(lr=1e-2, weight_decay=0.0),
    ],
}
CASES = [pytest.param(a, c, id=f"{a}-" + (",".join(f"{k}={v}" for k, v in c.items()) or "defaults"))
         for a in ALGOS for c in CONFIGS[a]]
# The config of each algorithm that uses every state it has (for the tests that need few).
FULL = {
    "sgd": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=0.01),
    "rmsprop": dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01),
    "adam": dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    "adamw": dict(lr=1e-2, amsgrad=True),
}

#: Odd shapes: empty, one element, primes, not a multiple of any vector width.
SMALL = [(0,), (1,), (7,), (13, 3), (2, 5, 11), (1021,)]
#: ... and one tensor of several CHUNKs (35005 elements: 3 chunks).
BIG = SMALL + [(5, 7001)]
STEPS = 50
RUNNERS = ("numpy", "cpu", "gpunn.torch")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def parallel():
    """Every Numba thread for this test (chunks spread over threads)."""
    import numba

    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    yield numba.get_num_threads()
    numba.set_num_threads(1)


def make_data(rng, shapes, steps, dtype, missing=True):
    """Initial parameters and per-step gradient lists (None where a parameter has no gradient:
    parameter 2 every fifth step, parameter 4 during the first three)."""
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = []
    for k in range(steps):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        if missing:
            if k % 5 == 3:
                gs[2] = None
            if k < 3:
                gs[4] = None
        grads.append(gs)
    return init, grads


def _np(v):
    return v.detach().numpy().copy() if isinstance(v, torch.Tensor) else np.array(v, copy=True)


def _states(opt, params):
    return [{k: _np(v) for k, v in opt.state[p].items() if v is not None} if p in opt.state
            else {} for p in params]


class TorchRun:
    """torch.optim (single-tensor implementation) or gpunn.torch on CPU tensors."""

    def __init__(self, cls, groups, **options):
        self.params = [[torch.tensor(x, requires_grad=True) for x in g] for g in groups]
        self.opt = cls([{"params": ps} for ps in self.params], **options)
        self.flat = [p for ps in self.params for p in ps]

    def step(self, grads, *args, **kwargs):
        for p, g in zip(self.flat, grads):
            p.grad = None if g is None else torch.tensor(g)
        self.opt.step(*args, **kwargs)

    def result(self):
        return [p.detach().numpy().copy() for p in self.flat], _states(self.opt, self.flat)


class GpunnRun(TorchRun):
    """gpunn.optim over gpunn.nn.Parameter holding NumPy arrays."""

    def __init__(self, cls, groups, **options):
        self.params = [[Parameter(np.array(x, copy=True)) for x in g] for g in groups]
        self.opt = cls([{"params": ps} for ps in self.params], **options)
        self.flat = [p for ps in self.params for p in ps]

    def step(self, grads, *args, **kwargs):
        for p, g in zip(self.flat, grads):
            p.grad = None if g is None else np.array(g, copy=True)
        return self.opt.step(*args, **kwargs)

    def result(self):
        return [p.data.copy() for p in self.flat], _states(self.opt, self.flat)


def start(runner, algo, groups, options):
    """A run of ``algo`` with these groups of initial values: runner 'torch' (torch.optim,
    foreach=False), 'numpy'/'cpu' (gpunn.optim with that backend) or 'gpunn.torch'."""
    ours, adapter, theirs = CLASSES[algo]
    if runner == "torch":
        return TorchRun(theirs, groups, foreach=False, **options)
    if runner == "gpunn.torch":
        return TorchRun(adapter, groups, **options)
    return GpunnRun(ours, groups, backend=runner, **options)


def trajectory(runner, algo, options, init, grads, groups=1):
    """Run all steps; ``groups`` splits the parameters into that many groups."""
    cut = [init[i::groups] for i in range(groups)]
    order = [i for g in range(groups) for i in range(g, len(init), groups)]
    run = start(runner, algo, cut, options)
    for gs in grads:
        run.step([gs[i] for i in order])
    params, states = run.result()
    back = np.argsort(order)
    return [params[i] for i in back], [states[i] for i in back]


def assert_trajectories_match(out, ref, dtype, tol=None, steps=True):
    """Parameters and every state of torch's (``ref``) match; gpunn also holds 'step'
    (``steps=False``: torch.optim.SGD keeps a loaded 'step' without counting on)."""
    bound = TOLERANCE[np.dtype(dtype).name] if tol is None else tol
    (params, states), (ref_params, ref_states) = out, ref
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == r.dtype and p.shape == r.shape, (i, p.dtype, r.dtype)
        err = rel_err(p, r)
        assert err <= bound, f"param {i} {p.shape}: relative error {err:.3g} > {bound:g}"
    for i, (s, r) in enumerate(zip(states, ref_states)):
        assert set(r) <= set(s) and set(s) - set(r) <= {"step"}, (i, sorted(s), sorted(r))
        for key in r:
            if key == "step":
                assert not steps or s[key].dtype == np.float32 and float(s[key]) == float(r[key]), (i, key)
            else:
                assert s[key].dtype == r[key].dtype, (i, key, s[key].dtype)
                err = rel_err(s[key], r[key])
                assert err <= bound, f"state {i} {key}: relative error {err:.3g} > {bound:g}"


def expected_steps(grads, i):
    return sum(gs[i] is not None for gs in grads)


# --- Trajectories against torch.optim --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("algo, options", CASES)
def test_trajectory_matches_torch(algo, options, runner, dtype, rng):
    init, grads = make_data(rng, SMALL, STEPS, dtype)
    ref = trajectory("torch", algo, options, init, grads)
    out = trajectory(runner, algo, options, init, grads)
    assert_trajectories_match(out, ref, dtype)
    for i in range(len(SMALL)):  # steps counted per parameter, only where it had a gradient
        if algo == "sgd" and runner == "gpunn.torch":  # as torch's, its state has no step
            assert "step" not in out[1][i]
        else:
            assert float(out[1][i]["step"]) == expected_steps(grads, i)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_trajectory_multi_chunk_two_groups(algo, runner, dtype, rng, parallel):
    """A tensor of several CHUNKs among the small ones, split into two parameter groups with
    different options (each group its own fused step)."""
    assert len(chunk_list(np.array([math.prod(BIG[-1])]))) == 3
    init, grads = make_data(rng, BIG, 12, dtype)
    options = FULL[algo]
    ref = trajectory("torch", algo, options, init, grads, groups=2)
    out = trajectory(runner, algo, options, init, grads, groups=2)
    assert_trajectories_match(out, ref, dtype)


@settings(max_examples=15, deadline=None)
@given(algo=st.sampled_from(ALGOS), seed=st.integers(0, 2**32 - 1),
       lr=st.floats(1e-4, 0.1), beta=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]), flag=st.booleans(),
       flag2=st.booleans(), maximize=st.booleans())
def test_trajectory_any_hyperparameters(algo, seed, lr, beta, beta2, weight_decay, flag, flag2,
                                        maximize):
    """Random hyperparameters, cpu backend against torch.optim, float32. Some draws end a
    parameter near zero after moving by O(1) (cancellation: torch's own float32 run is then
    1e-4 off its float64 run in relative terms), so each tensor's error is measured against
    torch in float64 and may be that of torch's float32 run, up to a factor 10."""
    options = {
        "sgd": dict(momentum=beta, nesterov=flag and beta > 0,
                    dampening=0.0 if flag else beta2 - 0.5),
        "adagrad": dict(lr_decay=beta2 - 0.5, initial_accumulator_value=beta, eps=1e-10),
        "rmsprop": dict(alpha=beta2, momentum=beta, centered=flag),
        "adam": dict(betas=(beta, beta2), amsgrad=flag),
        "adamw": dict(betas=(beta, beta2), amsgrad=flag),
    }[algo]
    options.update(lr=lr, weight_decay=weight_decay, maximize=maximize)
    init, grads = make_data(np.random.default_rng(seed), SMALL, 20, np.float32, missing=flag2)
    ref32 = trajectory("torch", algo, options, init, grads)
    ref64 = trajectory("torch", algo, options, [x.astype(np.float64) for x in init],
                       [[None if g is None else g.astype(np.float64) for g in gs] for gs in grads])
    out = trajectory("cpu", algo, options, init, grads)
    pairs = list(zip(out[0], ref32[0], ref64[0])) + [
        (s[k], r32[k], r64[k]) for s, r32, r64 in zip(out[1], ref32[1], ref64[1])
        for k in r32 if k != "step"]
    for ours, theirs, exact in pairs:
        assert ours.dtype == np.float32
        assert rel_err(ours, exact) <= max(TOLERANCE["float32"], 10 * rel_err(theirs, exact))


# --- The backends against each other ------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, 30.0], ids=["", "max_grad_norm"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("algo, options", CASES)
def test_numpy_and_cpu_backends_agree(algo, options, dtype, clip, rng):
    """The Numba kernel against the NumPy reference over 30 steps (a tensor of two chunks
    among the small ones, l1 on): bitwise the same (the same operations in the same order,
    no contraction); with clipping the gradient norm is summed in another order, so
    float64 results may differ in the last bits (float32: still an order of magnitude
    tighter than the torch comparison)."""
    init, grads = make_data(rng, SMALL + [(2, 8209)], 30, dtype)
    options = dict(options, l1=1e-3, max_grad_norm=clip)
    ref = trajectory("numpy", algo, options, init, grads)
    out = trajectory("cpu", algo, options, init, grads)
    if clip is None:
        assert all(a.tobytes() == b.tobytes() for a, b in zip(out[0], ref[0]))
        assert [{k: v.tobytes() for k, v in s.items()} for s in out[1]] == \
            [{k: v.tobytes() for k, v in s.items()} for s in ref[1]]
    else:
        assert_trajectories_match(out, ref, dtype, tol=1e-6 if dtype == "float32" else 1e-12)


def test_default_backend_is_cpu_and_env_override(rng, monkeypatch):
    init, grads = make_data(rng, SMALL, 5, np.float32)
    default = GpunnRun(go.Adam, [init], lr=1e-2)
    for gs in grads:
        default.step(gs)
    assert default.opt.param_groups[0]["backend"] is None
    cpu = trajectory("cpu", "adam", dict(lr=1e-2), init, grads)
    for a, b in zip(default.result()[0], cpu[0]):
        assert np.array_equal(a, b)
    monkeypatch.setenv("GPUNN_BACKEND", "numpy")
    env = GpunnRun(go.Adam, [init], lr=1e-2)
    _continue([env], grads)
    ref = trajectory("numpy", "adam", dict(lr=1e-2), init, grads)
    for a, b in zip(env.result()[0], ref[0]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("algo", ALGOS)
def test_parameters_holding_torch_tensors(algo, rng):
    """gpunn.optim over gpunn.nn.Parameter whose data and grad are CPU torch tensors: torch
    states, the same trajectory as torch.optim."""
    init, grads = make_data(rng, SMALL, 15, np.float32)
    params = [Parameter(torch.tensor(x)) for x in init]
    opt = CLASSES[algo][0](params, **FULL[algo])
    theirs = start("torch", algo, [init], FULL[algo])
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else torch.tensor(g)
        opt.step()
        theirs.step(gs)
    assert all(isinstance(v, torch.Tensor) for p in params for v in opt.state[p].values())
    assert_trajectories_match(([p.data.numpy() for p in params], _states(opt, params)),
                              theirs.result(), "float32")


def test_chunk_list_covers_every_element_once():
    sizes = np.array([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 0, 3 * CHUNK + 7, 5])
    chunks = chunk_list(sizes)
    assert chunks.dtype == np.int64 and chunks.shape[1] == 2
    covered = [np.zeros(n, int) for n in sizes]
    for row, first in chunks:
        assert 0 <= first < sizes[row] and first % CHUNK == 0
        covered[row][first:first + CHUNK] += 1
    assert all((c == 1).all() for c in covered)
    assert len(chunk_list(np.array([0, 0]))) == 0


def test_a_step_picks_its_kernel_by_its_element_count(monkeypatch, rng):
    """The parallel kernel or its serial twin by the step's element count, not its first
    tensor's: 64 tensors of 2048 elements stepped Adam serially (4x slower than the parallel
    kernel on the bench's mixed sizes)."""
    sizes = []
    real = walker.host_kernel
    monkeypatch.setattr(walker, "host_kernel", lambda k, size: (sizes.append(size),
                                                                real(k, size))[1])
    count = -(-SERIAL_BELOW // 2048)
    params = [Parameter(rng.standard_normal(2048).astype(np.float32),
                        rng.standard_normal(2048).astype(np.float32)) for _ in range(count)]
    go.Adam(params[:2], lr=1e-3).step()
    go.Adam(params, lr=1e-3).step()
    assert sizes == [4096, 2048 * count] and sizes[1] >= SERIAL_BELOW


# --- The functional API ---------------------------------------------------------------------


def functional_step(algo, params, grads, states, steps, options, **kwargs):
    """conftest's functional step, and Lion's (an algorithm torch.optim has not)."""
    if algo == "lion":
        return F.lion(params, grads, states["exp_avg"], steps, **options, **kwargs)
    return torch_algorithm_step(algo, params, grads, states, steps, options, **kwargs)


def _slots(algo, options):
    if algo == "lion":
        return ("exp_avg",)
    if algo == "sgd":
        return ("momentum_buffer",) if options.get("momentum", 0) else ()
    if algo == "adagrad":
        return ("sum",)
    if algo == "rmsprop":
        return ("square_avg",) + (("momentum_buffer",) if options.get("momentum", 0) else ()) \
            + (("grad_avg",) if options.get("centered") else ())
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if options.get("amsgrad") else ())


def torch_functional_step(algo, params, grads, states, steps, options):
    """torch.optim._functional's single-tensor step (states as gpunn's slots)."""
    o = dict(options)
    n = len(params)
    if algo == "sgd":
        TF.sgd(params, grads, states.setdefault("momentum_buffer", [None] * n), foreach=False,
               weight_decay=o.get("weight_decay", 0.0), momentum=o.get("momentum", 0.0),
               lr=o["lr"], dampening=o.get("dampening", 0.0), nesterov=o.get("nesterov", False),
               maximize=o.get("maximize", False))
        for s in steps:
            s += 1
    elif algo == "adagrad":
        TF.adagrad(params, grads, states["sum"], steps, foreach=False, lr=o["lr"],
                   weight_decay=o.get("weight_decay", 0.0), lr_decay=o.get("lr_decay", 0.0),
                   eps=o.get("eps", 1e-10), maximize=o.get("maximize", False))
    elif algo == "rmsprop":
        zeros = [torch.zeros_like(p) for p in params]
        TF.rmsprop(params, grads, states["square_avg"], states.get("grad_avg", zeros),
                   states.get("momentum_buffer", zeros), steps, foreach=False,
                   maximize=o.get("maximize", False), lr=o["lr"], alpha=o.get("alpha", 0.99),
                   eps=o.get("eps", 1e-8), weight_decay=o.get("weight_decay", 0.0),
                   momentum=o.get("momentum", 0.0), centered=o.get("centered", False))
    else:
        beta1, beta2 = o.get("betas", (0.9, 0.999))
        fn = TF.adam if algo == "adam" else TF.adamw
        fn(params, grads, states["exp_avg"], states["exp_avg_sq"],
           states.get("max_exp_avg_sq", []), steps, foreach=False,
           amsgrad=o.get("amsgrad", False), beta1=beta1, beta2=beta2, lr=o["lr"],
           weight_decay=o.get("weight_decay", 0.0 if algo == "adam" else 1e-2),
           eps=o.get("eps", 1e-8), maximize=o.get("maximize", False))


FUNCTIONAL_CASES = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-8)),
    ("rmsprop", dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=0.01)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, maximize=True)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.01)),
    ("adam", dict(lr=1e-2, maximize=True)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamw", dict(lr=1e-2)),
]


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo, options", FUNCTIONAL_CASES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(FUNCTIONAL_CASES)])
def test_functional_matches_torch_functional(algo, options, backend, dtype, arrays, rng):
    """gpunn.optim.functional over NumPy arrays or CPU torch tensors against
    torch.optim._functional, 20 steps, states kept by the caller."""
    init, grads = make_data(rng, SMALL, 20, dtype, missing=False)
    slots = _slots(algo, options)
    init_value = 0.3 if algo == "adagrad" else 0.0
    # torch's side
    tp = [torch.tensor(x) for x in init]
    ts = {s: [torch.full(x.shape, init_value, dtype=tp[0].dtype) for x in init] for s in slots
          if s != "momentum_buffer" or algo != "sgd"}
    tsteps = [torch.tensor(0.0) for _ in init]
    # ours, on NumPy arrays or torch tensors
    mine = (lambda x: np.array(x, copy=True)) if arrays == "numpy" else \
        (lambda x: torch.tensor(np.array(x, copy=True)))
    gp = [mine(x) for x in init]
    gs_ = {s: [mine(np.full(x.shape, init_value, dtype)) for x in init] for s in slots}
    gsteps = [mine(np.zeros((), np.float32)) for _ in init]
    for gs in grads:
        skipped = functional_step(algo, gp, [mine(g) for g in gs], gs_, gsteps, options,
                                  backend=backend)
        assert float(skipped) == 0.0
        torch_functional_step(algo, tp, [torch.tensor(g) for g in gs], ts, tsteps, options)
    for a, b in zip(gp, tp):
        assert type(a) is type(tp[0]) if arrays == "torch" else isinstance(a, np.ndarray)
        assert_close(_np(a), b.numpy(), dtype)
    for s in slots:
        for a, b in zip(gs_[s], ts[s]):
            assert_close(_np(a), b.numpy(), dtype)
    assert all(float(s) == len(grads) for s in gsteps)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_functional_matches_class_api(algo, backend, rng):
    """The functional API with the caller's states is bitwise the class API's step."""
    options = {k: v for k, v in FULL[algo].items() if k != "initial_accumulator_value"}
    init, grads = make_data(rng, SMALL, 10, np.float32, missing=False)
    run = GpunnRun(CLASSES[algo][0], [init], backend=backend, **options)
    params = [np.array(x, copy=True) for x in init]
    states = {s: [np.zeros_like(x) for x in init] for s in _slots(algo, options)}
    steps = [np.zeros((), np.float32) for _ in init]
    for gs in grads:
        run.step(gs)
        functional_step(algo, params, gs, states, steps, options, backend=backend)
    ours, ours_states = run.result()
    for i, (a, b) in enumerate(zip(params, ours)):
        assert np.array_equal(a, b)
        for s in states:
            assert np.array_equal(states[s][i], ours_states[i][s])
        assert float(steps[i]) == float(ours_states[i]["step"]) == len(grads)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_skip_flag_and_found_inf(backend, rng):
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    params = [np.array(x, copy=True) for x in init]
    m, v = [np.zeros_like(x) for x in init], [np.zeros_like(x) for x in init]
    steps = [np.zeros((), np.float32) for _ in init]
    flag = F.adam(params, grads[0], m, v, None, steps, lr=1e-2, found_inf=1.0, backend=backend)
    assert float(flag) == 1.0
    assert all(np.array_equal(p, x) for p, x in zip(params, init))
    assert all(float(s) == 0 for s in steps) and all(not a.any() for a in m + v)
    flag = F.adam(params, grads[0], m, v, None, steps, lr=1e-2, found_inf=0.0, backend=backend)
    assert float(flag) == 0.0 and all(float(s) == 1 for s in steps)
    assert not np.array_equal(params[-1], init[-1])


# --- l1, max_grad_norm, grad_scale ----------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_l1_one_step_by_hand(algo, backend, rng):
    """One float64 step with l1 against the formula written out (sign(0) = 0)."""
    p0 = rng.standard_normal(301)
    p0[::7] = 0.0
    g = rng.standard_normal(301)
    lr, l1, wd = 0.1, 0.05, 0.01
    opts = dict(lr=lr, l1=l1, weight_decay=wd)
    decoupled = algo == "adamw"
    gl = g + l1 * np.sign(p0) + (0.0 if decoupled else wd * p0)
    if algo == "sgd":
        expected = p0 - lr * gl
    elif algo == "adagrad":
        expected = p0 - lr * gl / (np.sqrt(gl * gl) + 1e-10)
    elif algo == "rmsprop":
        expected = p0 - lr * gl / (np.sqrt(0.01 * gl * gl) + 1e-8)
    else:
        m, v = 0.1 * gl, 0.001 * gl * gl
        start_ = p0 * (1 - lr * wd) if decoupled else p0
        expected = start_ - lr / 0.1 * m / (np.sqrt(v) / math.sqrt(0.001) + 1e-8)
    run = GpunnRun(CLASSES[algo][0], [[p0]], backend=backend, **opts)
    run.step([g])
    assert_close(run.result()[0][0], expected, "float64")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_l1_trajectory_matches_torch_with_penalty_gradient(algo, backend, rng):
    """l1 = the gradient l1 * sign(p) added by hand before torch's step."""
    l1 = 0.02
    init, grads = make_data(rng, SMALL, 30, np.float32)
    init[-1][::5] = 0.0
    options = FULL[algo]
    ours = start(backend, algo, [init], dict(options, l1=l1))
    theirs = start("torch", algo, [init], options)
    for gs in grads:
        ours.step(gs)
        for p, g in zip(theirs.flat, gs):
            p.grad = None if g is None else torch.tensor(g) + l1 * torch.sign(p.detach())
        theirs.opt.step()
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_max_grad_norm_matches_clip_grad_norm(algo, runner, rng):
    """max_grad_norm = torch.nn.utils.clip_grad_norm_ over the group's gradients, then the
    step; the gradients' norms go above and below the bound from step to step."""
    max_norm = 5.0
    init, grads = make_data(rng, SMALL, 20, np.float32)
    factors = [0.05, 0.5, 2.0, 0.1, 3.0]  # the norm is about 34 * factor
    grads = [[None if g is None else (g * factors[k % 5]).astype(np.float32) for g in gs]
             for k, gs in enumerate(grads)]
    options = FULL[algo]
    ours = start(runner, algo, [init], dict(options, max_grad_norm=max_norm))
    theirs = start("torch", algo, [init], options)
    clipped = 0
    for gs in grads:
        ours.step(gs)
        for p, g in zip(theirs.flat, gs):
            p.grad = None if g is None else torch.tensor(g)
        norm = torch.nn.utils.clip_grad_norm_([p for p in theirs.flat if p.grad is not None],
                                              max_norm, foreach=False)
        clipped += float(norm) > max_norm
        theirs.opt.step()
    assert 0 < clipped < len(grads)
    assert_trajectories_match(ours.result(), theirs.result(), "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_max_grad_norm_uses_the_norm_of_every_group(backend, rng):
    """Every group is clipped by the norm of all gradients of the step (each by its own
    max_grad_norm), as clip_grad_norm_(all parameters) computes it; a group without
    max_grad_norm is not clipped. Mixed dtypes in a group are clipped alike."""
    init, grads = make_data(rng, SMALL, 8, np.float32, missing=False)
    init = [x.astype(np.float64) if i == 4 else x for i, x in enumerate(init)]
    grads = [[g.astype(x.dtype) for g, x in zip(gs, init)] for gs in grads]
    groups = [init[:2], init[2:4], init[4:]]
    bounds = (1.0, 4.0, None)
    ours = GpunnRun(go.SGD, groups, lr=0.1, momentum=0.9, backend=backend)
    for group, bound in zip(ours.opt.param_groups, bounds):
        group["max_grad_norm"] = bound
    theirs = start("torch", "sgd", groups, dict(lr=0.1, momentum=0.9))
    for gs in grads:
        ours.step(gs)
        for p, g in zip(theirs.flat, gs):
            p.grad = torch.tensor(g)
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.double()) for p in theirs.flat]))
        for ps, bound in zip(theirs.params, bounds):
            if bound is not None:
                coef = min(1.0, bound / (float(norm) + 1e-6))
                for p in ps:
                    p.grad.mul_(coef)
        theirs.opt.step()
    out, ref = ours.result(), theirs.result()
    for a, b in zip(out[0], ref[0]):
        assert_close(a, b, "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_grad_scale_divides_gradients(algo, backend, rng):
    """step(grad_scale=s) on gradients multiplied by s: a power of two gives bitwise the
    unscaled run; 3.0 matches torch on the unscaled gradients."""
    init, grads = make_data(rng, SMALL, 15, np.float32)
    options = FULL[algo]
    plain, pow2, three = (start(backend, algo, [init], options) for _ in range(3))
    theirs = start("torch", algo, [init], options)
    for gs in grads:
        plain.step(gs)
        pow2.step([None if g is None else g * np.float32(1024) for g in gs], grad_scale=1024.0)
        three.step([None if g is None else g * np.float32(3) for g in gs], grad_scale=3.0)
        theirs.step(gs)
        assert not pow2.opt.last_step_skipped
    for a, b in zip(plain.result()[0], pow2.result()[0]):
        assert np.array_equal(a, b)
    assert_trajectories_match(three.result(), theirs.result(), "float32")


def _snapshot(run):
    """Bytes of every parameter, state and step; and the groups' options."""
    params, states = run.result()
    return ([p.tobytes() for p in params],
            [{k: (v.dtype, v.shape, v.tobytes()) for k, v in s.items()} for s in states],
            [{k: v for k, v in g.items() if k != "params"} for g in run.opt.param_groups])


SKIP_TRIGGERS = {
    "grad_scale": dict(step=dict(grad_scale=4.0)),
    "skip_nonfinite": dict(options=dict(skip_nonfinite=True)),
    "max_grad_norm": dict(options=dict(max_grad_norm=10.0)),
}


@pytest.mark.parametrize("bad", [-np.inf, np.nan], ids=["-inf", "nan"])
@pytest.mark.parametrize("trigger", SKIP_TRIGGERS)
@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_nonfinite_gradient_skips_the_step(algo, runner, trigger, bad, rng):
    """An inf/NaN gradient (checked under grad_scale, skip_nonfinite or max_grad_norm) skips
    the step: parameters and states bit-identical, steps not counted, last_step_skipped;
    the next good step proceeds as if the bad one never came."""
    init, grads = make_data(rng, SMALL, 6, np.float32, missing=False)
    t = SKIP_TRIGGERS[trigger]
    options = dict(FULL[algo], **t.get("options", {}))
    step_kw = t.get("step", {})
    if runner == "gpunn.torch" and step_kw:
        pytest.skip("gpunn.torch takes grad_scale from GradScaler (test_optim_torch.py)")
    a, b = start(runner, algo, [init], options), start(runner, algo, [init], options)
    for gs in grads[:3]:
        a.step(gs, **step_kw)
        b.step(gs, **step_kw)
    before = _snapshot(a)
    broken = [None if g is None else g.copy() for g in grads[3]]
    broken[-1][17] = bad
    a.step(broken, **step_kw)
    assert a.opt.last_step_skipped and not b.opt.last_step_skipped
    assert _snapshot(a) == before
    for gs in grads[4:]:
        a.step(gs, **step_kw)
        b.step(gs, **step_kw)
        assert not a.opt.last_step_skipped
    assert _snapshot(a) == _snapshot(b)


@pytest.mark.parametrize("trigger", ["grad_scale", "skip_nonfinite"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_nonfinite_gradient_in_one_group_skips_every_group(backend, trigger, rng):
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    options = dict(FULL["adam"], skip_nonfinite=trigger == "skip_nonfinite")
    step_kw = dict(grad_scale=2.0) if trigger == "grad_scale" else {}
    run = start(backend, "adam", [init[:3], init[3:]], options)
    run.step(grads[0], **step_kw)
    before = _snapshot(run)
    broken = [g.copy() for g in grads[1]]
    broken[-1][5] = np.inf  # in the second group only
    run.step(broken, **step_kw)
    assert run.opt.last_step_skipped
    assert _snapshot(run) == before


@pytest.mark.parametrize("found_inf", [1.0, True, np.float32(1), np.array(1.0, np.float32),
                                       torch.tensor(1.0)], ids=repr)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_found_inf_skips_the_step(backend, found_inf, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    a, b = (start(backend, "adam", [init], FULL["adam"]) for _ in range(2))
    a.step(grads[0])
    b.step(grads[0])
    before = _snapshot(a)
    a.step(grads[1], found_inf=found_inf)
    assert a.opt.last_step_skipped and _snapshot(a) == before
    a.step(grads[2], found_inf=0.0 * found_inf)
    b.step(grads[2])
    assert not a.opt.last_step_skipped and _snapshot(a) == _snapshot(b)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_one_element_array_scale_and_found_inf(backend, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    a = start(backend, "adam", [init], FULL["adam"])
    a.step(grads[0])  # a skipped first step creates the (zero) state, as torch's does
    before = _snapshot(a)
    a.step(grads[1], found_inf=np.array([1.0], np.float32))
    assert a.opt.last_step_skipped and _snapshot(a) == before
    a.step(grads[2], grad_scale=np.array([2.0], np.float32))
    assert not a.opt.last_step_skipped


# --- State dicts: torch.optim <-> gpunn.optim, mid-run ------------------------------------------


def _continue(runs, grads):
    for gs in grads:
        for r in runs:
            r.step(gs)


@pytest.mark.parametrize("direction", ["torch->gpunn", "gpunn->torch", "gpunn->gpunn"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_round_trip_mid_run(algo, backend, direction, rng):
    """Train N steps on one side, state_dict -> load into the other (a fresh optimizer built
    with other options: the state dict's win), continue M steps on both: the same
    trajectory as the source continuing; two groups with different lrs."""
    init, grads = make_data(rng, SMALL, 14, np.float32)
    options = FULL[algo]
    src_runner, dst_runner = direction.split("->")
    src_runner = backend if src_runner == "gpunn" else "torch"
    dst_runner = ("cpu" if backend == "numpy" else "numpy") if direction == "gpunn->gpunn" \
        else (backend if dst_runner == "gpunn" else "torch")
    cut = [init[:4], init[4:]]
    src = start(src_runner, algo, cut, options)
    src.opt.param_groups[1]["lr"] = options["lr"] / 3
    _continue([src], grads[:7])
    saved = src.opt.state_dict()
    if dst_runner == "torch":
        saved = go.to_torch(saved)
        assert all(isinstance(v, torch.Tensor) for s in saved["state"].values()
                   for v in s.values())
    saved = copy.deepcopy(saved)
    now = [src.result()[0][:4], src.result()[0][4:]]
    dst = start(dst_runner, algo, now, dict(options, lr=0.5))  # lr comes from the state dict
    dst.opt.load_state_dict(saved)
    assert [g["lr"] for g in dst.opt.param_groups] == [options["lr"], options["lr"] / 3]
    _continue([src, dst], grads[7:])
    assert_trajectories_match(dst.result(), src.result(), "float32",
                              steps=not (algo == "sgd" and dst_runner == "torch"))
    if direction == "torch->gpunn":  # against an uninterrupted torch run as well
        whole = start("torch", algo, cut, options)
        whole.opt.param_groups[1]["lr"] = options["lr"] / 3
        _continue([whole], grads)
        assert_trajectories_match(dst.result(), whole.result(), "float32")


@pytest.mark.parametrize("algo", ALGOS)
def test_state_dict_is_a_snapshot_after_load_and_pickles(algo, rng):
    """A loaded state is a copy (the source training on does not change it); the state dict
    pickles; to_torch copies too."""
    init, grads = make_data(rng, SMALL, 6, np.float32, missing=False)
    src = start("cpu", algo, [init], FULL[algo])
    _continue([src], grads[:3])
    saved = pickle.loads(pickle.dumps(src.opt.state_dict()))
    as_torch = go.to_torch(src.opt.state_dict())
    dst = start("cpu", algo, [src.result()[0]], FULL[algo])
    dst.opt.load_state_dict(src.opt.state_dict())
    loaded = _snapshot(dst)
    _continue([src], grads[3:])  # trains the source's live state further
    assert _snapshot(dst) == loaded
    for i, s in saved["state"].items():
        assert float(s["step"]) == 3.0 and float(src.result()[1][i]["step"]) == 6.0
        for k, v in s.items():
            assert np.array_equal(_np(as_torch["state"][i][k]), v)


@pytest.mark.parametrize("algo", ["sgd", "rmsprop", "adagrad", "adam"])
def test_torch_checkpoint_of_fresh_params(algo, rng):
    """torch's state dict lacking some parameters' state (no gradient yet) loads; SGD's
    has no 'step': its momentum buffer alone means the first step is behind it."""
    init, grads = make_data(rng, SMALL, 8, np.float32)  # parameter 4: no gradient at first
    options = FULL[algo]
    src = start("torch", algo, [init], options)
    _continue([src], grads[:2])
    saved = copy.deepcopy(src.opt.state_dict())
    if algo == "sgd":
        assert all("step" not in s for s in saved["state"].values())
    if algo != "adagrad":  # torch's Adagrad makes every state at construction
        assert 4 not in saved["state"]
    dst = start("cpu", algo, [src.result()[0]], options)
    dst.opt.load_state_dict(saved)
    _continue([src, dst], grads[2:])
    assert_trajectories_match(dst.result(), src.result(), "float32")
    if algo != "sgd":
        assert float(dst.result()[1][0]["step"]) == 8


# --- Missing gradients, options, bad input ----------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("algo", ALGOS)
def test_missing_gradient_leaves_that_parameter_alone(algo, runner, rng):
    init, grads = make_data(rng, SMALL, 4, np.float32, missing=False)
    run = start(runner, algo, [init], FULL[algo])
    _continue([run], grads[:2])
    before = _snapshot(run)
    run.step([None, None, grads[2][2], None, None, grads[2][5]])
    after = _snapshot(run)
    for i in range(len(SMALL)):
        if i in (2, 5):
            assert algo == "sgd" and runner == "gpunn.torch" or \
                float(run.result()[1][i]["step"]) == 3.0
            assert after[0][i] != before[0][i] or SMALL[i] == (0,)
        else:
            assert after[0][i] == before[0][i] and after[1][i] == before[1][i]


def test_all_gradients_missing_is_a_no_op(rng):
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    run = start("cpu", "adam", [init], FULL["adam"])
    run.step(grads[0])
    before = _snapshot(run)
    run.step([None] * len(SMALL))
    assert _snapshot(run) == before and not run.opt.last_step_skipped


def test_zero_grad_closure_and_param_groups(rng):
    p = Parameter(rng.standard_normal(5).astype(np.float32), np.ones(5, np.float32))
    q = Parameter(rng.standard_normal(3).astype(np.float32), np.ones(3, np.float32))
    opt = go.SGD([p], lr=0.1)
    opt.add_param_group({"params": q, "lr": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    assert opt.param_groups[1]["momentum"] == 0.0  # defaults filled in
    calls = []
    before = q.data.copy()
    assert opt.step(lambda: calls.append(1) or 3.5) == 3.5 and calls == [1]
    assert_close(q.data, before - 0.5, "float32")
    opt.zero_grad()
    assert not p.grad.any() and not q.grad.any()
    opt.zero_grad(set_to_none=True)
    assert p.grad is None and q.grad is None
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [p]})
    with pytest.raises(ValueError, match="more than one parameter group"):
        go.SGD([p, p], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\].*Parameter"):
        go.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        go.Adam([])
    assert len(opt.param_groups) == 2


def test_defaults_are_torchs():
    p = [Parameter(np.zeros(3, np.float32))]
    for algo, (ours, adapter, theirs) in CLASSES.items():
        mine = ours(p).defaults
        ref = theirs([torch.zeros(3, requires_grad=True)]).defaults
        shared = set(mine) & set(ref)
        assert {"lr", "weight_decay"} <= shared
        for k in shared:
            assert mine[k] == ref[k], (algo, k, mine[k], ref[k])
        assert mine["l1"] == 0.0 and mine["max_grad_norm"] is None
        assert not mine["master_weights"] and not mine["skip_nonfinite"]


BAD_OPTIONS = [
    ("adam", dict(lr=-1e-3), "lr"),
    ("sgd", dict(lr=float("nan")), "lr"),
    ("adam", dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    ("adam", dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
    ("adamw", dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    ("adam", dict(eps=-1e-8), "eps"),
    ("adagrad", dict(eps=-1.0), "eps"),
    ("rmsprop", dict(eps=-1.0), "eps"),
    ("adam", dict(weight_decay=-0.1), "weight_decay"),
    ("sgd", dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
    ("sgd", dict(lr=0.1, nesterov=True), "nesterov"),
    ("sgd", dict(lr=0.1, nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    ("sgd", dict(lr=0.1, momentum=-0.5), "momentum"),
    ("rmsprop", dict(momentum=-0.5), "momentum"),
    ("rmsprop", dict(alpha=-0.5), "alpha"),
    ("adagrad", dict(lr_decay=-0.5), "lr_decay"),
    ("adagrad", dict(initial_accumulator_value=-0.5), "initial_accumulator_value"),
    ("adam", dict(max_grad_norm=0.0), "max_grad_norm"),
    ("sgd", dict(lr=0.1, max_grad_norm=-1.0), "max_grad_norm"),
    ("adamw", dict(l1=-1e-3), "l1"),
]


@pytest.mark.parametrize("where", ["constructor", "add_param_group", "group_then_step"])
@pytest.mark.parametrize("algo, bad, name", BAD_OPTIONS,
                         ids=[f"{a}-{n}-{i}" for i, (a, _, n) in enumerate(BAD_OPTIONS)])
def test_bad_options(algo, bad, name, where, rng):
    """Bad options raise ValueError naming the option: at construction, in add_param_group
    (the group is not added), or set on a group before step (nothing is modified)."""
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    good = dict(lr=0.1) if algo == "sgd" else {}
    if where == "constructor":
        with pytest.raises(ValueError, match=name):
            GpunnRun(CLASSES[algo][0], [init], **dict(good, **bad))
        with pytest.raises(ValueError, match=name):
            TorchRun(CLASSES[algo][1], [init], **dict(good, **bad))
        return
    run = GpunnRun(CLASSES[algo][0], [init], **good)
    run.step(grads[0])
    before = _snapshot(run)
    if where == "add_param_group":
        with pytest.raises(ValueError, match=name):
            run.opt.add_param_group(dict(bad, params=[Parameter(np.zeros(3, np.float32))]))
        assert len(run.opt.param_groups) == 1
    else:
        good_group = dict(run.opt.param_groups[0])
        run.opt.param_groups[0].update(bad)
        with pytest.raises(ValueError, match=name):
            run.step(grads[1])
        assert _snapshot(run)[:2] == before[:2]
        run.opt.param_groups[0].update(good_group)
    assert _snapshot(run) == before


def test_checked_options_are_kept_while_the_group_holds_the_same_values():
    """A step keeps a group's checked options while the group holds the very same plain
    option objects; a new value (even 0.0 -> -0.0) is checked and used at the next step, a
    bad one refused, and a Tensor option (it changes in place) is checked at every step."""
    p = Parameter(np.ones(3, np.float32), np.ones(3, np.float32))
    opt = go.Adam([p], lr=0.1)
    opt.step()
    group = opt.param_groups[0]
    kept = opt._kept_hyper(0, group)
    assert opt._kept_hyper(0, group) is kept
    group["weight_decay"] = -0.0
    negative_zero = opt._kept_hyper(0, group)
    assert negative_zero is not kept and math.copysign(1.0, negative_zero.weight_decay) == -1.0
    group["lr"] = -1.0
    before = p.data.copy()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    np.testing.assert_array_equal(p.data, before)
    group["lr"] = torch.tensor(0.25)
    assert opt._kept_hyper(0, group).lr == 0.25
    group["lr"].fill_(0.5)
    assert opt._kept_hyper(0, group).lr == 0.5


def _bad_grads(grads, rng):
    """name -> (gradient list with one bad entry, exception, message pattern)."""
    g = grads
    return {
        "shape": (g[:1] + [np.zeros(2, np.float32)] + g[2:], ValueError, r"grads\[1\].*shape"),
        "dtype": (g[:1] + [g[1].astype(np.float64)] + g[2:], TypeError, r"grads\[1\].*float64"),
        "not_an_array": (g[:2] + [list(g[2])] + g[3:], TypeError, r"grads\[2\]"),
        "torch_for_numpy": (g[:5] + [torch.tensor(g[5])] + g[6:], TypeError, r"grads\[5\]"),
    }


@pytest.mark.parametrize("kind", ["shape", "dtype", "not_an_array", "torch_for_numpy"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_bad_gradient_changes_nothing(algo, backend, kind, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    run = start(backend, algo, [init], FULL[algo])
    run.step(grads[0])
    before = _snapshot(run)
    bad, exc, pattern = _bad_grads(grads[1], rng)[kind]
    for p, g in zip(run.flat, bad):
        p.grad = g
    with pytest.raises(exc, match=pattern):
        run.opt.step()
    assert _snapshot(run) == before
    run.step(grads[1])  # and the optimizer still works
    assert not run.opt.last_step_skipped and _snapshot(run) != before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_strided_gradients_step_as_their_contiguous_copies(algo, backend, rng):
    """A gradient that is a strided view is read through a copy: the same step as with a
    C-contiguous gradient of the same values."""
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    dense, strided = start(backend, algo, [init], FULL[algo]), start(backend, algo, [init],
                                                                     FULL[algo])
    for g in grads:
        views = [np.repeat(a[..., None], 2, axis=-1)[..., 0] for a in g]  # every other float
        assert not any(v.flags.c_contiguous for v in views if v.size > 1)
        dense.step(g)
        strided.step(views)
    assert _snapshot(strided) == _snapshot(dense)


@pytest.mark.parametrize("runner", ["cpu", "numpy"])
def test_bad_gradient_in_second_group_changes_nothing(runner, rng):
    init, grads = make_data(rng, SMALL, 2, np.float32, missing=False)
    run = start(runner, "adam", [init[:3], init[3:]], FULL["adam"])
    run.step(grads[0])
    before = _snapshot(run)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        run.step(grads[1][:4] + [np.zeros(3, np.float32)] + grads[1][5:])
    assert _snapshot(run) == before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_mixed_dtypes_in_a_group_follow_torch(backend, rng):
    """A group mixing float32 and float64 parameters steps as torch's (one table per
    dtype); an inf in either dtype skips both."""
    shapes = [(3, 5), (7,), (2, 2)]
    dtypes = [np.float32, np.float64, np.float32]
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
    ours = [Parameter(x.copy()) for x in init]
    theirs = [torch.tensor(x.copy(), requires_grad=True) for x in init]
    opt = go.Adam(ours, lr=0.1, weight_decay=0.01, skip_nonfinite=True, backend=backend)
    ref = torch.optim.Adam(theirs, lr=0.1, weight_decay=0.01, foreach=False)
    for _ in range(10):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dtypes)]
        for p, t, g in zip(ours, theirs, grads):
            p.grad, t.grad = g, torch.tensor(g)
        opt.step()
        ref.step()
    for p, t, d in zip(ours, theirs, dtypes):
        assert_close(p.data, t.detach().numpy(), np.dtype(d).name)
    before = [p.data.copy() for p in ours]
    ours[1].grad = np.full(7, np.inf)
    opt.step()
    assert opt.last_step_skipped and all(np.array_equal(p.data, b) for p, b in zip(ours, before))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_unsupported_dtype_and_backend(backend):
    p = [Parameter(np.ones(3, np.int32), np.ones(3, np.int32))]
    with pytest.raises(TypeError, match="int32"):
        go.Adam(p, backend=backend).step()
    assert np.all(p[0].data == 1)
    q = [Parameter(np.ones(3, np.float32), np.ones(3, np.float32))]
    with pytest.raises(ValueError, match="backend"):
        go.Adam(q, backend="gpu").step()
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        go.Adam(q, backend="cuda").step()  # no device here, or host data on a GPU machine
    assert np.all(q[0].data == 1)


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_half_parameters_on_the_host_step_in_float32(algo, backend, master, rng):
    """float16 parameters on the host: float32 states and math, the parameter rounded after
    each step (from its float32 master copy with master_weights): bit for bit the float32
    step with that rounding."""
    init, grads = make_data(rng, SMALL, 4, np.float16, missing=False)
    half = [Parameter(a.copy()) for a in init]
    full = [Parameter(a.astype(np.float32)) for a in init]
    opt_half = CLASSES[algo][0](half, backend=backend, master_weights=master, **FULL[algo])
    opt_full = CLASSES[algo][0](full, backend=backend, **FULL[algo])
    for g in grads:
        for p, q, gi in zip(half, full, g):
            p.grad, q.grad = gi, gi.astype(np.float32)
        opt_half.step()
        opt_full.step()
        if not master:
            for q in full:
                q.data[...] = q.data.astype(np.float16)
        for p, q in zip(half, full):
            assert p.data.dtype == np.float16
            np.testing.assert_array_equal(p.data, q.data.astype(np.float16))
    for p in half:
        assert all(v.dtype == np.float32 for k, v in opt_half.state[p].items())


def test_master_weights_refused_for_32_bit_params():
    p, g = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    with pytest.raises(ValueError, match="master_params"):
        F.adam(p, g, [np.zeros(3, np.float32)], [np.zeros(3, np.float32)], None,
               [np.zeros((), np.float32)], master_params=[np.ones(3, np.float32)])
    assert np.all(p[0] == 1)
    run = GpunnRun(go.Adam, [[np.ones(3, np.float32)]], master_weights=True)
    run.step([np.ones(3, np.float32)])  # 32-bit parameters need none: the option is a no-op
    assert "master_param" not in run.opt.state[run.flat[0]]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_bad_state_changes_nothing(backend, rng):
    init, grads = make_data(rng, SMALL, 1, np.float32, missing=False)
    params = [x.copy() for x in init]
    m = [np.zeros_like(x) for x in init]
    v = [np.zeros_like(x) for x in init]
    steps = [np.zeros((), np.float32) for _ in init]
    cases = [
        (dict(exp_avg_sqs=v[:3] + [np.zeros(4, np.float32)] + v[4:]), ValueError,
         r"exp_avg_sq\[3\].*shape"),
        (dict(exp_avgs=m[:2] + [np.zeros(m[2].shape, np.float64)] + m[3:]), TypeError,
         r"exp_avg\[2\].*float64"),
        (dict(exp_avgs=m[:-1]), ValueError, "exp_avg"),
        (dict(state_steps=steps[:1] + [np.zeros(2, np.float32)] + steps[2:]), ValueError,
         r"state_steps\[1\]"),
        (dict(state_steps=steps[:1] + [np.zeros((), np.float64)] + steps[2:]), TypeError,
         r"state_steps\[1\]"),
        (dict(grads=grads[0][:-1]), ValueError, "gradients"),
        (dict(max_exp_avg_sqs=m[:2], amsgrad=True), ValueError, "max_exp_avg_sq"),
        (dict(exp_avgs=m[:2] + [list(m[2])] + m[3:]), TypeError, r"exp_avg\[2\]"),
    ]
    for change, exc, pattern in cases:
        args = dict(params=params, grads=grads[0], exp_avgs=m, exp_avg_sqs=v,
                    max_exp_avg_sqs=None, state_steps=steps)
        kw = {k: change.pop(k) for k in list(change) if k not in args}
        args.update(change)
        with pytest.raises(exc, match=pattern):
            F.adam(**args, lr=0.1, backend=backend, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(params, init))
        assert not any(a.any() for a in m + v) and all(float(s) == 0 for s in steps)


@pytest.mark.parametrize("call", ["adam_amsgrad", "sgd_momentum", "rmsprop_centered"])
def test_functional_missing_state_list_is_named(call):
    p, g = [np.ones(3, np.float32)], [np.ones(3, np.float32)]
    z, steps = [np.zeros(3, np.float32)], [np.zeros((), np.float32)]
    with pytest.raises(ValueError, match={"adam_amsgrad": "max_exp_avg_sq",
                                          "sgd_momentum": "momentum_buffer",
                                          "rmsprop_centered": "grad_avg"}[call]):
        if call == "adam_amsgrad":
            F.adam(p, g, z, z, None, steps, amsgrad=True)
        elif call == "sgd_momentum":
            F.sgd(p, g, None, steps, lr=0.1, momentum=0.9)
        else:
            F.rmsprop(p, g, z, None, None, steps, centered=True)
    assert np.all(p[0] == 1)


@pytest.mark.parametrize("algo", ALGOS)
def test_wrong_shape_state_in_optimizer_is_refused(algo, rng):
    init, grads = make_data(rng, SMALL, 1, np.float32, missing=False)
    run = start("cpu", algo, [init], FULL[algo])
    slot = _slots(algo, FULL[algo])[0]
    run.opt.state[run.flat[3]] = {slot: np.zeros(5, np.float32), "step": np.ones((), np.float32)}
    with pytest.raises(ValueError, match=rf"{slot}\[3\].*shape"):
        run.step(grads[0])
    assert all(p.data.tobytes() == x.tobytes() for p, x in zip(run.flat, init))
    assert run.opt.state[run.flat[3]][slot].shape == (5,)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_bad_state_dict_changes_nothing(backend, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    run = start(backend, "adam", [init[:3], init[3:]], FULL["adam"])
    _continue([run], grads[:2])
    other = start(backend, "adam", [init[:3], init[3:]], FULL["adam"])
    _continue([other], grads[:1])
    good = other.opt.state_dict()
    before = _snapshot(run)

    def edited(fn):
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    cases = [
        (edited(lambda sd: sd["param_groups"].pop()), "parameter groups"),
        (edited(lambda sd: sd["param_groups"][1]["params"].pop()), "parameters"),
        (edited(lambda sd: sd["state"][4].update(exp_avg=np.zeros(3, np.float32))),
         r"state\[4\]\['exp_avg'\].*shape"),
        (edited(lambda sd: sd["param_groups"][0].update(lr=-1.0)), "lr"),
        (edited(lambda sd: sd["param_groups"][1].update(betas=(0.9, 1.5))), r"betas\[1\]"),
    ]
    for sd, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            run.opt.load_state_dict(sd)
        assert _snapshot(run) == before
    run.step(grads[2])  # still trains on its own state
    reference = start(backend, "adam", [init[:3], init[3:]], FULL["adam"])
    _continue([reference], grads)
    assert _snapshot(run) == _snapshot(reference)


# --- Replaced arrays: torch.optim reads them every step ------------------------------------------


@pytest.mark.parametrize("runner", ["cpu", "gpunn.torch"])
def test_replaced_parameter_data_is_updated(runner, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    run = start(runner, "sgd", [init], dict(lr=0.1))
    ref = start("torch", "sgd", [init], dict(lr=0.1))
    _continue([run, ref], grads[:1])
    keep = []
    for p in run.flat:
        keep.append(p.data)
        p.data = p.data.clone() if isinstance(p, torch.Tensor) else p.data.copy()
    _continue([run, ref], grads[1:])
    assert_trajectories_match(run.result(), ref.result(), "float32")


@pytest.mark.parametrize("replacement", ["zeros", "wrong_shape"])
def test_replaced_state_is_used(replacement, rng):
    init, grads = make_data(rng, SMALL, 3, np.float32, missing=False)
    run = start("cpu", "adam", [init], dict(lr=1e-2))
    run.step(grads[0])
    p = run.flat[5]
    shape = p.data.shape if replacement == "zeros" else (3,)
    run.opt.state[p]["exp_avg"] = np.zeros(shape, np.float32)
    if replacement == "wrong_shape":
        with pytest.raises(ValueError, match=r"exp_avg\[5\]"):
            run.step(grads[1])
    else:
        run.step(grads[1])
        assert run.opt.state[p]["exp_avg"].any()


@pytest.mark.parametrize("how", ["failed"])
def test_no_state_without_a_step(how, rng):
    init, grads = make_data(rng, SMALL, 1, np.float32, missing=False)
    run = start("cpu", "sgd", [init], dict(lr=0.1, momentum=0.9, dampening=0.5))
    if how == "failed":
        with pytest.raises(TypeError, match=r"grads\[1\]"):
            run.step(grads[0][:1] + [grads[0][1].astype(np.float64)] + grads[0][2:])
    else:
        run.step(grads[0], found_inf=1.0)
        assert run.opt.last_step_skipped
    assert run.opt.state_dict()["state"] == {}


# --- GPU: the cuda backend (mirrored on the host for float32/float64 by the cpu backend) ------------

GPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]
DEVICE_CASES = [pytest.param("cpu", dt, id=f"cpu-{dt}") for dt in ("float32", "float64")] + [
    pytest.param("cuda", dt, id=f"cuda-{dt}", marks=pytest.mark.gpu) for dt in GPU_DTYPES]


def _xp(device):
    return np if device == "cpu" else pytest.importorskip("cupy")


def _on(xp, x, dtype):
    """Host values rounded to ``dtype`` (bfloat16 through ml_dtypes), on xp's device."""
    if dtype == "bfloat16":
        import ml_dtypes

        return xp.asarray(np.asarray(x).astype(ml_dtypes.bfloat16))
    return xp.asarray(np.asarray(x).astype(dtype))


def _f64(a):
    """Any array (NumPy, CuPy, torch; any dtype) as a float64 NumPy array."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    if type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.asarray(a).astype(np.float64)


def _random_states(rng, algo, options, shape):
    """Valid nonzero states (square_avg >= grad_avg^2, sums and second moments >= 0)."""
    s = {}
    for slot in _slots(algo, options):
        if slot in ("momentum_buffer", "exp_avg"):
            s[slot] = 0.3 * rng.standard_normal(shape)
        elif slot == "grad_avg":
            s[slot] = 0.5 * rng.standard_normal(shape)
        elif slot == "max_exp_avg_sq":
            s[slot] = s["exp_avg_sq"] * rng.uniform(0.9, 1.1, shape)
        else:
            s[slot] = rng.uniform(0.1, 1.0, shape)
    if "grad_avg" in s:
        s["square_avg"] = s["grad_avg"] ** 2 + rng.uniform(0.5, 1.5, shape)
    return s


STEP_CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True, l1=1e-2)),
    ("adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01, eps=1e-6)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01, maximize=True, max_grad_norm=3.0)),
    ("rmsprop", dict(lr=0.01, momentum=0.5)),
    ("rmsprop", dict(lr=0.01, centered=True)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.01, l1=1e-3)),
    ("adam", dict(lr=0.01, max_grad_norm=1.0)),
    ("adamw", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("adamw", dict(lr=0.01, amsgrad=True, max_grad_norm=100.0)),
    ("lion", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)),
    ("lion", dict(lr=0.01, maximize=True, l1=1e-3, max_grad_norm=1.0)),
]
STEP_SHAPES = [(0,), (1,), (7,), (13, 3), (1021,), (3, 6007)]


@pytest.mark.parametrize("first", [True, False], ids=["t=1", "t=5"])
@pytest.mark.parametrize("master", [False, True], ids=["", "master"])
@pytest.mark.parametrize("device, dtype", DEVICE_CASES)
@pytest.mark.parametrize("algo, options", STEP_CASES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(STEP_CASES)])
def test_backend_step_matches_float64_reference(algo, options, device, dtype, master, first,
                                                rng):
    """One step from random nonzero states (or the first, t=1) over tensors of odd sizes
    (one of several chunks), on the data's backend, against the NumPy reference in float64
    on the same (rounded) values. 16-bit parameters: float32 states, and with a float32
    master copy the parameter is exactly the master rounded."""
    lowp = dtype in ("float16", "bfloat16")
    if master and not lowp:
        pytest.skip("master weights are for 16-bit parameters")
    xp = _xp(device)
    sdt = "float32" if lowp else dtype
    init = [rng.standard_normal(s) for s in STEP_SHAPES]
    grads = [rng.standard_normal(s) for s in STEP_SHAPES]
    states = [_random_states(rng, algo, options, s) for s in STEP_SHAPES]
    if first:
        states = [{k: np.zeros_like(v) + (0.2 if k == "sum" else 0.0) for k, v in s.items()}
                  for s in states]
    t0 = 0.0 if first else 4.0
    masters = [np.asarray(x, np.float32) for x in init] if master else None
    # on the device: values rounded to the storage types
    params = [_on(xp, x, dtype) for x in init]
    dgrads = [_on(xp, g, dtype) for g in grads]
    dstates = {k: [_on(xp, s[k], sdt) for s in states] for k in _slots(algo, options)}
    dsteps = [xp.full((), t0, np.float32) for _ in init]
    dmasters = [xp.asarray(m) for m in masters] if master else None
    # the reference, float64, from exactly those values
    rparams = [_f64(m) for m in dmasters] if master else [_f64(p) for p in params]
    rgrads = [_f64(g) for g in dgrads]
    rstates = {k: [_f64(a) for a in v] for k, v in dstates.items()}
    rsteps = [np.full((), t0, np.float32) for _ in init]
    assert not float(functional_step(algo, rparams, rgrads, rstates, rsteps, options,
                                     backend="numpy"))
    backend = "cpu" if device == "cpu" else "cuda"
    flag = functional_step(algo, params, dgrads, dstates, dsteps, options,
                           master_params=dmasters, backend=backend)
    assert float(flag) == 0.0
    for i, p in enumerate(params):
        assert p.dtype == _on(xp, init[i][:0], dtype).dtype
        assert_close(_f64(p), rparams[i], dtype)
        if master:
            assert_close(_f64(dmasters[i]), rparams[i], "float32")
            assert _f64(_on(xp, _f64(dmasters[i]), dtype)).tobytes() == _f64(p).tobytes()
        assert float(dsteps[i]) == t0 + 1
    for k, v in dstates.items():
        for i, a in enumerate(v):
            assert a.dtype == np.dtype(sdt)
            _assert_state_close(_f64(a), rstates[k][i], states[i][k], grads[i], sdt)


def _assert_state_close(new, ref, old, grad, dtype):
    """A state after one step against the float64 reference, relative to the terms the update
    adds (the old state, the gradient and its square): where they cancel (SGD momentum with
    dampening: -0.5330 + 0.5338 = 7.8e-4), even the exact update rounded once to float32 is
    2.8e-5 off the result; the float32 rounding of the terms sets the error there."""
    scale = max(float(np.linalg.norm(x)) for x in (ref, old, grad, np.square(grad)))
    err = float(np.linalg.norm(np.asarray(new, np.float64) - ref))
    assert err <= TOLERANCE[dtype] * scale, (
        f"error {err:.3g} > {TOLERANCE[dtype]:g} x {scale:.3g} (the terms' magnitude; {dtype})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("algo", ALGOS)
def test_cuda_master_weights_track_the_float32_trajectory(algo, dtype, rng):
    """30 steps of 16-bit parameters: with master weights the master copy follows the float32
    run from the same (rounded) values and the parameter is it rounded; without, the
    parameter drifts (updates below its precision are lost): clearly further off."""
    cupy = pytest.importorskip("cupy")
    # lrs whose 30 steps move the parameters several 16-bit ulps (checked on the host
    # with reference_step on float16/bfloat16 NumPy arrays: no master 3x-9x further off)
    options = dict(FULL[algo], lr={"sgd": 1e-2, "adagrad": 3e-2}.get(algo, 1e-3))
    shapes = [(7,), (13, 3), (1021,), (2, 9001)]
    init = [_on(np, rng.standard_normal(s), dtype) for s in shapes]
    grads = [[_on(np, rng.standard_normal(s), dtype) for s in shapes] for _ in range(30)]

    def run(storage, master):
        params = [Parameter(cupy.array(x.astype(np.float32) if storage == "float32" else x))
                  for x in init]
        opt = CLASSES[algo][0](params, master_weights=master, **options)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = cupy.asarray(g.astype(np.float32) if storage == "float32" else g)
            opt.step()
        return params, opt

    ref, _ = run("float32", False)
    with_master, opt = run(dtype, True)
    without, _ = run(dtype, False)
    ref64 = np.concatenate([_f64(p.data).ravel() for p in ref])
    err = lambda ps: rel_err(np.concatenate([_f64(p.data).ravel() for p in ps]), ref64)
    masters = [opt.state[p]["master_param"] for p in with_master]
    assert all(m.dtype == np.float32 for m in masters)
    assert rel_err(np.concatenate([_f64(m).ravel() for m in masters]), ref64) <= 1e-5
    for p, m in zip(with_master, masters):
        assert _f64(_on(cupy, _f64(m), dtype)).tobytes() == _f64(p.data).tobytes()
    assert err(with_master) <= TOLERANCE[dtype]
    assert 2 * err(with_master) < err(without)


MANY_CASES = [pytest.param("cpu", "float32", 300, id="cpu-300")] + [
    pytest.param("cuda", dt, 2000, id=f"cuda-{dt}-2000", marks=pytest.mark.gpu)
    for dt in ("float32", "bfloat16")]


@pytest.mark.parametrize("device, dtype, count", MANY_CASES)
def test_many_small_tensors_in_one_step(device, dtype, count, rng, parallel):
    """count tensors of 1000 elements (plus a few odd sizes) in one fused step, with the
    gradient norm over all of them (max_grad_norm), against the float64 reference."""
    xp = _xp(device)
    options = dict(lr=1e-2, amsgrad=True, weight_decay=0.01, max_grad_norm=20.0)
    shapes = [(1000,)] * count + [(0,), (1,), (CHUNK + 1,)]
    states = [_random_states(rng, "adam", options, s) for s in shapes]
    sdt = "float32"
    params = [_on(xp, rng.standard_normal(s), dtype) for s in shapes]
    grads = [_on(xp, rng.standard_normal(s), dtype) for s in shapes]
    dstates = {k: [_on(xp, s[k], sdt) for s in states] for k in states[0]}
    dsteps = [xp.full((), 2.0, np.float32) for _ in shapes]
    rparams, rgrads = [_f64(p) for p in params], [_f64(g) for g in grads]
    rstates = {k: [_f64(a) for a in v] for k, v in dstates.items()}
    rsteps = [np.full((), 2.0, np.float32) for _ in shapes]
    functional_step("adam", rparams, rgrads, rstates, rsteps, options, backend="numpy")
    functional_step("adam", params, grads, dstates, dsteps, options,
                    backend="cpu" if device == "cpu" else "cuda")
    out = np.concatenate([_f64(p).ravel() for p in params])
    assert_close(out, np.concatenate([p.ravel() for p in rparams]), dtype)
    for k in dstates:
        assert_close(np.concatenate([_f64(a).ravel() for a in dstates[k]]),
                     np.concatenate([a.ravel() for a in rstates[k]]), sdt)
    assert all(float(s) == 3.0 for s in dsteps)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("algo", ALGOS)
def test_device_scalars_skip_and_scale(algo, device, rng):
    """grad_scale and found_inf as 0-d float32 arrays on the data's device (what GradScaler
    hands over): scaled gradients are divided, inf skips with nothing changed, found_inf
    skips; the skip flag is a device array."""
    xp = _xp(device)
    options = FULL[algo]
    init = [rng.standard_normal(s).astype(np.float32) for s in SMALL]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SMALL] for _ in range(4)]

    def make():
        params = [Parameter(xp.array(x)) for x in init]
        return params, CLASSES[algo][0](params, **options)

    def step(params, opt, gs, **kw):
        for p, g in zip(params, gs):
            p.grad = xp.asarray(g)
        opt.step(**kw)

    def snap(params, opt):
        return ([_f64(p.data).tobytes() for p in params],
                [{k: _f64(v).tobytes() for k, v in opt.state[p].items()} for p in params])

    (pa, a), (pb, b) = make(), make()
    scale = xp.asarray(np.float32(8.0))
    step(pa, a, [g * 8 for g in grads[0]], grad_scale=scale)
    step(pb, b, grads[0])
    assert snap(pa, a) == snap(pb, b)
    before = snap(pa, a)
    bad = [g * 8 for g in grads[1]]
    bad[3][0, 1] = np.inf
    step(pa, a, bad, grad_scale=scale)
    assert type(a.skip_flags[0]).__module__.split(".")[0] == xp.__name__.split(".")[0]
    assert a.last_step_skipped and snap(pa, a) == before
    step(pa, a, grads[2], found_inf=xp.asarray(np.float32(1.0)))
    assert a.last_step_skipped and snap(pa, a) == before
    step(pa, a, grads[2], found_inf=xp.asarray(np.float32(0.0)))
    step(pb, b, grads[2])
    assert not a.last_step_skipped and snap(pa, a) == snap(pb, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("algo", ALGOS)
def test_deterministic_run_to_run(algo, device, rng, parallel):
    """The same steps twice: bitwise the same parameters and states (the gradient norm
    reduces in a fixed order)."""
    xp = _xp(device)
    shapes = [(1000,)] * 50 + [(10**6 + 3,), (7,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    options = dict(FULL[algo], max_grad_norm=100.0)
    results = []
    for _ in range(2):
        params = [Parameter(xp.array(x)) for x in init]
        opt = CLASSES[algo][0](params, **options)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = xp.asarray(g)
            opt.step()
        results.append(([_f64(p.data).tobytes() for p in params],
                        [{k: _f64(v).tobytes() for k, v in opt.state[p].items()}
                         for p in params]))
    assert results[0] == results[1]


@pytest.mark.gpu
def test_cuda_numpy_backend_on_device_arrays_matches_cuda(rng):
    """The reference run through CuPy (backend='numpy' on device arrays) and the CUDA
    kernels agree over 20 steps."""
    init, grads = make_data(rng, BIG, 20, np.float32)
    for algo in ALGOS:
        out = {}
        for backend in ("numpy", "cuda"):
            params = [Parameter(_on(_xp("cuda"), x, "float32")) for x in init]
            opt = CLASSES[algo][0](params, backend=backend, **FULL[algo])
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = None if g is None else _on(_xp("cuda"), g, "float32")
                opt.step()
            out[backend] = [_f64(p.data) for p in params]
        for a, b in zip(out["cuda"], out["numpy"]):
            assert_close(a, b, "float32")


@pytest.mark.gpu
def test_cuda_parameters_on_another_device_change_nothing(rng):
    cupy = pytest.importorskip("cupy")
    host = [rng.standard_normal(s).astype(np.float32) for s in SMALL]
    params = [Parameter(cupy.asarray(x)) for x in host]
    opt = go.Adam(params, lr=1e-2)
    for p, x in zip(params, host):
        p.grad = cupy.asarray(x)
    opt.step()
    before = [p.data.get().tobytes() for p in params]
    states = [{k: _f64(v).tobytes() for k, v in opt.state[p].items()} for p in params]
    params[2].grad = host[2]  # a host gradient for a device parameter
    with pytest.raises(TypeError, match=r"grads\[2\] is a numpy array, the parameters are "
                                        "cupy"):
        opt.step()
    assert [p.data.get().tobytes() for p in params] == before
    assert [{k: _f64(v).tobytes() for k, v in opt.state[p].items()} for p in params] == states
    mixed = [Parameter(host[0].copy(), host[0].copy()), Parameter(cupy.asarray(host[1]),
                                                                  cupy.asarray(host[1]))]
    with pytest.raises(TypeError, match=r"params\[1\] is a cupy array, the parameters are "
                                        "numpy"):
        go.SGD(mixed, lr=0.1).step()
    assert np.array_equal(mixed[0].data, host[0])
    with pytest.raises(ValueError, match="cpu"):
        go.SGD(params, lr=0.1, backend="cpu").step()  # device data on the host backend


# --- Lion: no torch.optim counterpart; its paper's update is the oracle ------------------------


def _lion_paper(p, g, m, lr, beta1, beta2, weight_decay):
    """Lion as written in Chen et al. 2023 (Algorithm 2, float64): one step, in place."""
    update = np.sign(beta1 * m + (1 - beta1) * g)
    p -= lr * (update + weight_decay * p)
    m[...] = beta2 * m + (1 - beta2) * g


@pytest.mark.parametrize("options", [dict(), dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.3)],
                         ids=["defaults", "options"])
def test_lion_reference_is_the_papers_update(options, rng):
    """20 steps of the NumPy reference (float64) against the paper's pseudo-code."""
    o = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0) | options
    params = [rng.standard_normal(s) for s in BIG]
    exp_avgs = [np.zeros(s) for s in BIG]
    steps = [np.zeros((), np.float32) for _ in BIG]
    paper_p, paper_m = [p.copy() for p in params], [m.copy() for m in exp_avgs]
    for _ in range(20):
        grads = [rng.standard_normal(s) for s in BIG]
        assert not F.lion(params, grads, exp_avgs, steps, backend="numpy", **options)
        for p, g, m in zip(paper_p, grads, paper_m):
            _lion_paper(p, g, m, o["lr"], *o["betas"], o["weight_decay"])
    for ours, paper in zip(params + exp_avgs, paper_p + paper_m):
        assert_close(ours, paper, "float64")
    assert [float(t) for t in steps] == [20.0] * len(BIG)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.0, 0.5), maximize=True, l1=1e-3, max_grad_norm=2.0),
], ids=["decay", "maximize-l1-clip"])
def test_lion_cpu_matches_the_reference(options, dtype, rng, parallel):
    """10 steps on the cpu backend (Numba) against the NumPy reference on the same values."""
    init = [rng.standard_normal(s).astype(dtype) for s in BIG]
    grads = [[rng.standard_normal(s).astype(dtype) for s in BIG] for _ in range(10)]
    out = {}
    for backend in HOST_BACKENDS:
        params, exp_avgs = [x.copy() for x in init], [np.zeros_like(x) for x in init]
        steps = [np.zeros((), np.float32) for _ in init]
        for gs in grads:
            F.lion(params, gs, exp_avgs, steps, backend=backend, **options)
        out[backend] = params + exp_avgs
    for ours, ref in zip(out["cpu"], out["numpy"]):
        assert_close(ours, ref, dtype)


def test_lion_classes_and_the_torch_adapter(rng):
    """gpunn.optim.Lion on NumPy parameters, gpunn.torch.Lion on CPU tensors (under a torch
    scheduler) and the paper's update in float64 follow one trajectory; the torch adapter's
    state dict has torch's layout and resumes a run exactly; bad betas change nothing."""
    shapes, lr = [(7,), (13, 3), (1021,)], 1e-2
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(12)]
    ours = [Parameter(x.copy()) for x in init]
    mine = go.Lion(ours, lr=lr, weight_decay=0.1)
    tensors = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    adapter = gt.Lion(tensors, lr=lr, weight_decay=0.1)
    assert isinstance(adapter, torch.optim.Optimizer)
    schedule = torch.optim.lr_scheduler.StepLR(adapter, step_size=100)  # keeps lr; steps fine
    paper = [x.astype(np.float64) for x in init]
    paper_m = [np.zeros(s) for s in shapes]
    for i, gs in enumerate(grads):
        for p, t, g in zip(ours, tensors, gs):
            p.grad, t.grad = g.copy(), torch.tensor(g)
        mine.step()
        adapter.step()
        schedule.step()
        for p, g, m in zip(paper, gs, paper_m):
            _lion_paper(p, g.astype(np.float64), m, lr, 0.9, 0.99, 0.1)
        if i == 5:  # resume from a state dict in a new optimizer
            saved = copy.deepcopy(adapter.state_dict())
            assert set(saved["state"][0]) == {"step", "exp_avg"}
            assert saved["param_groups"][0]["betas"] == (0.9, 0.99)
            adapter = gt.Lion(tensors, lr=lr, weight_decay=0.1)
            adapter.load_state_dict(saved)
            schedule = torch.optim.lr_scheduler.StepLR(adapter, step_size=100)
    for p, t, ref in zip(ours, tensors, paper):
        assert_close(p.data, ref, "float32")
        assert np.array_equal(t.detach().numpy(), p.data)
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\)"):
        gt.Lion(tensors, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        adapter.param_groups[0]["betas"] = (-0.1, 0.99)
        adapter.step()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
