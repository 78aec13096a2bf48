"""Memory safety and bad input of the fused optimizer step (gpunn.optim, gpunn.torch and the
functional API), one regression test per reported bug: the cached pointer table against
parameters replaced, shrunk, transposed or resized between steps; read-only memory; byte
order; tensor subclasses, sparse and meta tensors, FSDP2 DTensors; the 'same gradients'
shortcut; nothing changed by a failed step; huge finite gradients, bad grad_scale values,
duplicated parameters, foreign state dicts, bad betas; pickled and copied optimizers.
Reproducers that could crash the interpreter run in a subprocess: a crash fails the test."""

import copy
import io
import pickle
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import gpunn.optim as go
import gpunn.torch as gt
from gpunn.nn import Parameter
from gpunn.optim import functional as F
from conftest import HOST_BACKENDS, array_bytes, assert_close
from gloo_ranks import run_worker

pytestmark = pytest.mark.usefixtures("one_thread")

#: algorithm -> (gpunn.optim class, gpunn.torch class, torch.optim class, options using
#: every state the algorithm has)
ALGOS = {
    "sgd": (go.SGD, gt.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adagrad": (go.Adagrad, gt.Adagrad, torch.optim.Adagrad, dict(lr=0.1)),
    "rmsprop": (go.RMSprop, gt.RMSprop, torch.optim.RMSprop,
                dict(lr=0.01, momentum=0.9, centered=True)),
    "adam": (go.Adam, gt.Adam, torch.optim.Adam, dict(lr=0.01, amsgrad=True)),
    "adamw": (go.AdamW, gt.AdamW, torch.optim.AdamW, dict(lr=0.01)),
}
NAMES = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam",
         "adamw": "AdamW"}
READ_ONLY = r"read-only|writeable|writable"


def run_python(code: str, timeout: float = 300, args=()) -> str:
    """Run ``code`` in a fresh interpreter; a crash (signal, abort) or an exception fails the
    test with the output. Returns stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"subprocess exited with {proc.returncode}"
        f"{' (killed by signal ' + str(-proc.returncode) + ')' if proc.returncode < 0 else ''}"
        f"\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout


def snapshot(opt, *extra):
    """Every parameter, gradient and state of ``opt`` (and ``extra`` arrays), as bytes, and the
    groups' options."""
    out = []
    for group in opt.param_groups:
        out.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            state = opt.state[p] if p in opt.state else {}
            out.append((array_bytes(p.data), array_bytes(p.grad),
                        {k: array_bytes(v) for k, v in state.items()}))
    return out + [array_bytes(a) for a in extra]


def _arrays_bytes(*lists):
    return [[array_bytes(a) for a in (lst or [])] for lst in lists]


def _functional(algo, params, grads, states, steps, **kw):
    """One gpunn functional step of ``algo`` with ``ALGOS`` options; ``states`` by slot."""
    options = {k: v for k, v in ALGOS[algo][3].items()}
    options.update(kw)
    if algo == "sgd":
        return F.sgd(params, grads, states["momentum_buffer"], steps, **options)
    if algo == "adagrad":
        return F.adagrad(params, grads, states["sum"], steps, **options)
    if algo == "rmsprop":
        return F.rmsprop(params, grads, states["square_avg"], states["grad_avg"],
                         states["momentum_buffer"], steps, **options)
    fn = F.adam if algo == "adam" else F.adamw
    return fn(params, grads, states["exp_avg"], states["exp_avg_sq"],
              states.get("max_exp_avg_sq"), steps, **options)


SLOTS = {"sgd": ("momentum_buffer",), "adagrad": ("sum",),
         "rmsprop": ("square_avg", "grad_avg", "momentum_buffer"),
         "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}
SHAPES = [(7,), (3, 5), (1,), (13,)]


def functional_inputs(rng, algo, dtype=np.float32, shapes=SHAPES):
    """Valid params, grads, states (by slot; square_avg >= grad_avg^2, exp_avg_sq >= 0) and
    step counts (1.0) for ``algo``."""
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    states = {}
    for slot in SLOTS[algo]:
        if slot in ("momentum_buffer", "exp_avg", "grad_avg"):
            states[slot] = [0.3 * rng.standard_normal(s).astype(dtype) for s in shapes]
        else:
            states[slot] = [rng.uniform(0.5, 1.0, s).astype(dtype) for s in shapes]
    steps = [np.ones((), np.float32) for _ in shapes]
    return params, grads, states, steps


# --- 1. The cached pointer table must address what the step sees --------------------------------


def test_torch_data_replaced_by_smaller_tensor_with_stale_grad_subprocess():
    """p.data = empty(0); p.data = zeros(1000) (was 2000, .grad of 2000 kept), five times per
    algorithm: a ValueError about the shape each time, never a write past the new tensor
    (the allocator may hand the new tensor the old address)."""
    out = run_python("""
        import torch, gpunn.torch as gt
        torch.set_num_threads(1)
        for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
            for i in range(5):
                p = torch.nn.Parameter(torch.randn(2000))
                opt = getattr(gt, name)([p], lr=0.1)
                p.grad = torch.ones(2000)
                opt.step()
                p.data = torch.empty(0)
                p.data = torch.zeros(1000)
                try:
                    opt.step()
                except ValueError as e:
                    assert "shape" in str(e), str(e)
                else:
                    raise AssertionError(f"{name}: step with a (2000,) grad on a (1000,) param")
                assert p.shape == (1000,) and not p.detach().any(), name
            print(name, "ok")
    """)
    assert out.split() == [w for n in NAMES.values() for w in (n, "ok")]


def test_torch_same_address_smaller_tensor_before_a_guard_page_subprocess():
    """The deterministic form of the above: the parameter's first 1000 elements end at a page
    made inaccessible after the first step; p.data = those 1000 elements (same address as
    before, stale .grad of 2000): a ValueError, not a write into the guard page (SIGSEGV)."""
    out = run_python("""
        import ctypes, mmap
        import numpy as np, torch, gpunn.torch as gt
        torch.set_num_threads(1)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        PAGE = mmap.PAGESIZE
        for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
            region = mmap.mmap(-1, 3 * PAGE)
            raw = np.frombuffer(region, np.uint8)
            start = raw.__array_interface__["data"][0]
            assert start % PAGE == 0
            floats = raw[PAGE - 4000:PAGE - 4000 + 8000].view(np.float32)
            floats[:] = np.random.default_rng(0).standard_normal(2000)
            t = torch.from_numpy(floats)
            p = torch.nn.Parameter(t)
            assert p.data_ptr() == t.data_ptr()
            opt = getattr(gt, name)([p], lr=0.1)
            p.grad = torch.ones(2000)
            opt.step()
            assert libc.mprotect(start + PAGE, PAGE, 0) == 0  # PROT_NONE
            p.data = t[:1000]
            before = p.detach().clone()
            try:
                opt.step()
            except ValueError as e:
                assert "shape" in str(e), str(e)
            else:
                raise AssertionError(f"{name}: step with a (2000,) grad on a (1000,) param")
            assert torch.equal(p.detach(), before)
            assert libc.mprotect(start + PAGE, PAGE, 3) == 0  # read/write again
            print(name, "ok")
    """)
    assert out.split() == [w for n in NAMES.values() for w in (n, "ok")]


@pytest.mark.parametrize("grad", ["fresh", "stale"])
@pytest.mark.parametrize("algo", ["sgd-plain", *ALGOS])
def test_torch_prefix_view_of_a_buffer_leaves_the_rest_alone(algo, grad, rng):
    """buf = zeros(3000); p = Parameter(buf[:2000]); step; p.data = buf[:1000] (the same
    address) with a fresh (1000,) or the stale (2000,) gradient: buf[1000:] stays
    bit-identical; the step raises a ValueError (changing nothing) or updates buf[:1000] as
    torch.optim does the same."""
    _, ours_cls, torch_cls, options = ALGOS[algo.removesuffix("-plain")]
    if algo == "sgd-plain":
        options = dict(lr=0.1)
    init = rng.standard_normal(3000).astype(np.float32)
    g1 = torch.tensor(rng.standard_normal(2000).astype(np.float32))
    g2 = torch.tensor(rng.standard_normal(1000).astype(np.float32))
    runs = []
    for cls, extra in ((ours_cls, {}), (torch_cls, dict(foreach=False))):
        buf = torch.tensor(init)
        p = torch.nn.Parameter(buf[:2000])
        opt = cls([p], **options, **extra)
        p.grad = g1.clone()
        opt.step()
        p.data = buf[:1000]
        if grad == "fresh":
            p.grad = g2.clone()
        before = buf.clone()
        try:
            opt.step()
            error = None
        except (ValueError, RuntimeError) as e:
            error = e
        runs.append((buf, before, error))
    (ours, ours_before, error), (theirs, _, torch_error) = runs
    assert torch.equal(ours[1000:], ours_before[1000:]), "wrote past the parameter"
    if error is not None:
        assert isinstance(error, ValueError) and "shape" in str(error), repr(error)
        assert torch.equal(ours, ours_before)  # nothing changed
        return
    assert torch_error is None, f"gpunn stepped where torch.optim raised {torch_error!r}"
    assert_close(ours[:1000].numpy(), theirs[:1000].numpy(), "float32")


@pytest.mark.parametrize("algo", list(ALGOS))
def test_torch_transposed_data_follows_torch(algo, rng):
    """p.data = p.data.t() on a square weight, then steps with gradients: torch applies them
    by logical index. SGD must give torch.optim's result; an algorithm with states may instead
    refuse the transposed layout clearly (ValueError), changing nothing."""
    _, ours_cls, torch_cls, options = ALGOS[algo]
    if algo == "sgd":
        options = dict(lr=0.1)
    init = rng.standard_normal((5, 5)).astype(np.float32)
    grads = [rng.standard_normal((5, 5)).astype(np.float32) for _ in range(3)]
    runs = []
    for cls, extra in ((ours_cls, {}), (torch_cls, dict(foreach=False))):
        p = torch.nn.Parameter(torch.tensor(init))
        opt = cls([p], **options, **extra)
        p.grad = torch.tensor(grads[0])
        opt.step()
        p.data = p.data.t()
        runs.append((p, opt))
    (p, opt), (q, ref) = runs
    for g in grads[1:]:
        p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        before = snapshot(opt)
        try:
            opt.step()
        except ValueError as e:
            assert algo != "sgd", f"plain SGD refused a transposed parameter: {e}"
            assert snapshot(opt) == before
            return
        ref.step()
        assert_close(p.detach().numpy(), q.detach().numpy(), "float32")
    for key, value in ref.state[q].items():
        if value is not None:
            assert_close(np.asarray(opt.state[p][key]), value.numpy(), "float32")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_numpy_data_replaced_by_smaller_array(algo, backend, rng):
    """gpunn.optim: p.data = np.zeros(smaller) between steps (the 2000-long gradient and states
    kept): ValueError naming the shape, nothing changed."""
    go_cls, _, _, options = ALGOS[algo]
    p = Parameter(rng.standard_normal(2000).astype(np.float32),
                  rng.standard_normal(2000).astype(np.float32))
    opt = go_cls([p], backend=backend, **options)
    opt.step()
    p.data = np.zeros(1000, np.float32)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert snapshot(opt) == before
    p.grad = rng.standard_normal(1000).astype(np.float32)  # states still 2000 long
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert not p.data.any()


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_numpy_arrays_resized_in_place_subprocess(backend):
    """The same gradient, parameter or state objects as last step, resized in place with
    ``resize(16, refcheck=False)`` or given a new shape (the other arrays stay 2000 long): a
    ValueError every time, never a read of freed memory or a write past the new allocation."""
    out = run_python("""
        import sys
        import numpy as np, gpunn.optim as go
        from gpunn.nn import Parameter
        backend = sys.argv[1]
        rng = np.random.default_rng(0)
        for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
            for what in ("grad", "grad_and_data", "data", "grad_shape", "state"):
                for i in range(3):
                    p = Parameter(rng.standard_normal(2000).astype(np.float32),
                                  rng.standard_normal(2000).astype(np.float32))
                    momentum = dict(momentum=0.9) if name == "SGD" else {}
                    opt = getattr(go, name)([p], lr=0.1, backend=backend, **momentum)
                    opt.step()
                    opt.step()
                    if what == "grad_shape":
                        p.grad.shape = (40, 50)
                    if what in ("grad", "grad_and_data"):
                        p.grad.resize(16, refcheck=False)
                    if what in ("data", "grad_and_data"):
                        p.data.resize(16, refcheck=False)
                    if what == "state":
                        slot = next(k for k in opt.state[p] if k != "step")
                        opt.state[p][slot].resize(16, refcheck=False)
                    before = p.data.copy()
                    try:
                        opt.step()
                    except ValueError as e:
                        assert "shape" in str(e), str(e)
                    else:
                        raise AssertionError(f"{name} {what}: stepped a {p.data.shape} "
                                             f"parameter with a {p.grad.shape} gradient "
                                             f"and states {[v.shape for v in opt.state[p].values()]}")
                    assert np.array_equal(p.data, before)
            print(name, "ok")
    """, args=[backend])
    assert out.split() == [w for n in NAMES.values() for w in (n, "ok")]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_torch_state_resized_in_place_is_refused(algo, rng):
    """A state tensor the optimizer made, resized in place (``resize_``: same object, same
    address, fewer elements) between steps: a ValueError naming it (torch.optim raises on the
    shapes too), nothing changed; never an update of elements the state no longer has."""
    _, ours_cls, _, options = ALGOS[algo]
    p = torch.nn.Parameter(torch.tensor(rng.standard_normal(2000).astype(np.float32)))
    opt = ours_cls([p], **options)
    for _ in range(2):
        p.grad = torch.tensor(rng.standard_normal(2000).astype(np.float32))
        opt.step()
    slot = next(k for k in opt.state[p] if k != "step")
    opt.state[p][slot].resize_(5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=slot):
        opt.step()
    assert snapshot(opt) == before


# --- 2. Read-only memory -------------------------------------------------------------------------


def test_read_only_memmap_parameter_subprocess(tmp_path):
    """A parameter from np.load(mmap_mode='r') (writing it was SIGSEGV): ValueError naming the
    parameter and read-only memory (when the optimizer is built or stepped), the file and the
    optimizer's state unchanged; the functional API alike."""
    path = tmp_path / "weights.npy"
    np.save(path, np.arange(1, 2001, dtype=np.float32) / 7)
    out = run_python("""
        import re, sys
        import numpy as np, gpunn.optim as go
        from gpunn.nn import Parameter
        from gpunn.optim import functional as F
        path = sys.argv[1]
        RO = r"read-only|writeable|writable"
        original = np.load(path)
        for backend in ("cpu", "numpy"):
            for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
                mm = np.load(path, mmap_mode="r")
                p = Parameter(mm, np.ones(2000, np.float32))
                opt, before = None, None
                try:
                    opt = getattr(go, name)([p], lr=0.1, backend=backend)
                    before = {k: v.copy() for k, v in opt.state.get(p, {}).items()}
                    opt.step()
                except ValueError as e:
                    assert re.search(RO, str(e)) and "param" in str(e), str(e)
                else:
                    raise AssertionError(f"{name} {backend}: stepped a read-only memmap")
                if opt is not None:
                    after = opt.state.get(p, {})
                    assert before.keys() == after.keys(), name
                    assert all(np.array_equal(v, after[k]) for k, v in before.items()), name
                del p, opt, mm
                assert np.array_equal(np.load(path), original)
            mm = np.load(path, mmap_mode="r")
            steps = [np.zeros((), np.float32)]
            try:
                F.adam([mm], [np.ones(2000, np.float32)], [np.zeros(2000, np.float32)],
                       [np.zeros(2000, np.float32)], None, steps, backend=backend)
            except ValueError as e:
                assert re.search(RO, str(e)) and re.search(r"params\\[0\\]", str(e)), str(e)
            else:
                raise AssertionError(f"functional {backend}: stepped a read-only memmap")
            assert float(steps[0]) == 0.0
            del mm
            assert np.array_equal(np.load(path), original)
            print(backend, "ok")
    """, args=[path])
    assert out.split() == ["cpu", "ok", "numpy", "ok"]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_read_only_parameter_from_bytes(algo, backend, rng):
    """A parameter over immutable bytes (np.frombuffer): ValueError naming it; the bytes and
    the other parameter unchanged, no state created."""
    go_cls, _, _, options = ALGOS[algo]
    raw = rng.standard_normal(4).astype(np.float32).tobytes()
    frozen = Parameter(np.frombuffer(raw, np.float32), np.ones(4, np.float32))
    other = Parameter(rng.standard_normal(6).astype(np.float32), np.ones(6, np.float32))
    opt = go_cls([other, frozen], backend=backend, **options)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=READ_ONLY) as info:
        opt.step()
    assert "param" in str(info.value)
    assert snapshot(opt) == before and bytes(frozen.data.tobytes()) == raw


@pytest.mark.parametrize("what", ["state", "step"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_read_only_state_or_step_count(algo, backend, what, rng):
    """A state or step count made read-only between steps (flags.writeable False; the cached
    table must notice): ValueError naming it, nothing changed."""
    go_cls, _, _, options = ALGOS[algo]
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = go_cls(params, backend=backend, **options)
    opt.step()
    key = SLOTS[algo][0] if what == "state" else "step"
    opt.state[params[2]][key].flags.writeable = False
    before = snapshot(opt)
    with pytest.raises(ValueError, match=READ_ONLY) as info:
        opt.step()
    assert key in str(info.value)
    assert snapshot(opt) == before


FUNCTIONAL_READ_ONLY = [("params", 1, r"params\[1\]"), ("state", 0, None),
                        ("steps", 2, r"state_steps\[2\]")]


@pytest.mark.parametrize("which, index, pattern", FUNCTIONAL_READ_ONLY,
                         ids=[c[0] for c in FUNCTIONAL_READ_ONLY])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_functional_read_only_argument(algo, backend, which, index, pattern, rng):
    """A read-only parameter, state or step count in a functional step: ValueError naming it
    (params[i], the state's name, state_steps[i]), every array unchanged."""
    params, grads, states, steps = functional_inputs(rng, algo)
    slot = SLOTS[algo][0]
    target = {"params": params, "state": states[slot], "steps": steps}[which]
    target[index].flags.writeable = False
    before = _arrays_bytes(params, grads, steps, *states.values())
    with pytest.raises(ValueError, match=READ_ONLY) as info:
        _functional(algo, params, grads, states, steps, backend=backend)
    assert re.search(pattern or slot, str(info.value)), str(info.value)
    assert _arrays_bytes(params, grads, steps, *states.values()) == before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_read_only_master_copy(backend, rng):
    """A read-only master copy: ValueError naming master_params, nothing changed (on the host
    a master copy of a 32-bit parameter is refused anyway)."""
    params, grads, states, steps = functional_inputs(rng, "adam")
    masters = [p.copy() for p in params]
    for m in masters:
        m.flags.writeable = False
    before = _arrays_bytes(params, grads, steps, masters, *states.values())
    with pytest.raises(ValueError, match="master"):
        _functional("adam", params, grads, states, steps, master_params=masters,
                    backend=backend)
    assert _arrays_bytes(params, grads, steps, masters, *states.values()) == before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_read_only_gradient_is_accepted(algo, backend, rng):
    """Gradients are only read: read-only ones (np.frombuffer) step exactly as writeable ones."""
    results = []
    for read_only in (False, True):
        r = np.random.default_rng(7)
        params, grads, states, steps = functional_inputs(r, algo)
        if read_only:
            grads = [np.frombuffer(g.tobytes(), g.dtype).reshape(g.shape) for g in grads]
            assert not grads[0].flags.writeable
        _functional(algo, params, grads, states, steps, backend=backend)
        results.append(_arrays_bytes(params, steps, *states.values()))
    assert results[0] == results[1]


# --- 3. Byte order -------------------------------------------------------------------------------


def _big_endian(a):
    out = np.asarray(a).astype(np.dtype(a.dtype).newbyteorder(">"))
    assert out.dtype.byteorder == ">" and np.array_equal(out, a)
    return out


@pytest.mark.parametrize("role", ["param", "grad", "state"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_big_endian_arrays_are_refused(algo, backend, role, rng):
    """A big-endian parameter, gradient or state (optimizer API): TypeError about the byte
    order, nothing changed."""
    go_cls, _, _, options = ALGOS[algo]
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = go_cls(params, backend=backend, **options)
    opt.step()
    target = params[1]
    if role == "param":
        target.data = _big_endian(target.data)
    elif role == "grad":
        target.grad = _big_endian(target.grad)
    else:
        slot = SLOTS[algo][0]
        opt.state[target][slot] = _big_endian(opt.state[target][slot])
    before = snapshot(opt)
    with pytest.raises(TypeError, match="byte order"):
        opt.step()
    assert snapshot(opt) == before


@pytest.mark.parametrize("role", ["params", "grads", "state"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_big_endian_arrays_are_refused(backend, role, rng):
    """The same through the functional API, with the spec's values (arange(4) - 0.5)."""
    params, grads, states, steps = functional_inputs(rng, "adam", shapes=[(4,), (4,)])
    be = _big_endian(np.arange(4, dtype=np.float32) - 0.5)
    {"params": params, "grads": grads, "state": states["exp_avg"]}[role][1] = be
    before = _arrays_bytes(params, grads, steps, *states.values())
    with pytest.raises(TypeError, match="byte order"):
        _functional("adam", params, grads, states, steps, backend=backend)
    assert _arrays_bytes(params, grads, steps, *states.values()) == before


# --- 4. Tensor subclasses, sparse and meta tensors, FSDP2 ------------------------------------------


def test_tensor_subclass_sparse_and_meta_subprocess():
    """A torch.Tensor subclass parameter or gradient, a meta parameter: TypeError/RuntimeError
    naming the argument, nothing changed. A sparse gradient (nn.Embedding(sparse=True)): SGD
    and Adagrad give torch.optim's result or refuse clearly ('sparse'); the others refuse."""
    out = run_python("""
        import re
        import torch, gpunn.torch as gt
        torch.set_num_threads(1)

        class Sub(torch.Tensor):
            pass

        def expect_error(label, make, pattern, *tensors):
            # make() builds the optimizer; building or stepping it must refuse
            before = [t.detach().clone() for t in tensors]
            try:
                make().step()
            except (TypeError, RuntimeError, ValueError) as e:
                assert re.search(pattern, str(e)), f"{label}: {e}"
                assert all(torch.equal(b, t.detach()) for b, t in zip(before, tensors)), label
                print(label, "refused")
            else:
                raise AssertionError(f"{label}: no error")

        for name in ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW"):
            cls = getattr(gt, name)
            s = torch.Tensor._make_subclass(Sub, torch.randn(5), True)
            s.grad = torch.ones(5)
            expect_error(f"{name}-subclass-param", lambda: cls([s], lr=0.1), "param", s)
            p = torch.nn.Parameter(torch.randn(5))
            p.grad = torch.Tensor._make_subclass(Sub, torch.ones(5))
            expect_error(f"{name}-subclass-grad", lambda: cls([p], lr=0.1), "grad", p)
            m = torch.nn.Parameter(torch.empty(5, device="meta"))
            m.grad = torch.empty(5, device="meta")
            try:
                cls([m], lr=0.1).step()
            except (TypeError, RuntimeError, ValueError) as e:
                assert re.search("meta", str(e)) and re.search("param", str(e)), str(e)
                print(f"{name}-meta", "refused")
            else:
                raise AssertionError(f"{name}: stepped a meta tensor")
            torch.manual_seed(0)
            emb = torch.nn.Embedding(10, 3, sparse=True)
            ref = torch.nn.Embedding(10, 3, sparse=True)
            ref.load_state_dict(emb.state_dict())
            idx = torch.tensor([1, 2, 2, 7])
            for e in (emb, ref):
                e(idx).pow(2).sum().backward()
            assert emb.weight.grad.layout == torch.sparse_coo
            before = emb.weight.detach().clone()
            try:
                cls(emb.parameters(), lr=0.1).step()
            except (TypeError, RuntimeError, ValueError) as e:
                assert re.search("sparse", str(e)), str(e)
                assert torch.equal(before, emb.weight.detach())
                print(f"{name}-sparse", "refused")
                continue
            assert name in ("SGD", "Adagrad"), f"{name} stepped a sparse gradient"
            getattr(torch.optim, name)(ref.parameters(), lr=0.1).step()
            assert torch.allclose(emb.weight, ref.weight, rtol=1e-5, atol=1e-6), name
            print(f"{name}-sparse", "matches")
    """)
    lines = dict(line.split() for line in out.splitlines())
    for name in NAMES.values():
        for case in ("subclass-param", "subclass-grad", "meta"):
            assert lines.get(f"{name}-{case}") == "refused", out
        assert f"{name}-sparse" in lines, out


FSDP_SCRIPT = """
import torch
import torch.distributed as dist
from gloo_ranks import join, spawn_two


def rank_main(rank, world, port, results):
    join(rank, world, port)
    try:
        from torch.distributed.fsdp import fully_shard
        import gpunn.torch as gt

        def model():
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
            for layer in m:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(m)
            return m

        ours, theirs = model(), model()
        opt = gt.AdamW(ours.parameters(), lr=1e-2)
        ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
        torch.manual_seed(1 + rank)
        x = torch.randn(4, 8)
        for m in (ours, theirs):
            m(x).pow(2).sum().backward()
        before = [p.to_local().detach().clone() for p in ours.parameters()]
        try:
            opt.step()
        except (TypeError, RuntimeError, ValueError, NotImplementedError) as e:
            if "DTensor" not in str(e):
                raise
            same = all(torch.equal(b, p.to_local()) for b, p in zip(before, ours.parameters()))
            results.put((rank, "refused" if same else "refused but changed: " + str(e)))
            return
        ref.step()
        for p, q in zip(ours.parameters(), theirs.parameters()):
            a, b = p.to_local().detach(), q.to_local().detach()
            err = float((a - b).norm() / b.norm()) if b.numel() else 0.0
            if not err <= 1e-5:
                results.put((rank, f"wrong: relative error {err:.3g}"))
                return
        results.put((rank, "stepped"))
    except BaseException as e:
        results.put((rank, f"error: {type(e).__name__}: {e}"))
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    got = spawn_two(rank_main)
    print(got)
    assert [r for r, _ in got] == [0, 1], got
    assert all(v in ("refused", "stepped") for _, v in got), got
    assert len({v for _, v in got}) == 1, got
    print("outcome", got[0][1])
"""


@pytest.mark.slow
def test_fsdp2_adamw_first_step_two_gloo_ranks(tmp_path):
    """FSDP2 (fully_shard) over two gloo ranks on the CPU: the first gpunn.torch.AdamW step
    (was SIGSEGV in both processes) refuses DTensor parameters clearly or equals
    torch.optim.AdamW's step on each rank's shards."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    proc = run_worker(tmp_path, FSDP_SCRIPT, timeout=300)
    assert proc.returncode == 0 and "outcome" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


# --- 6. A failed step changes nothing --------------------------------------------------------------


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_negative_step_count_is_refused(algo, backend, rng):
    """A state step of -1 (functional API): ValueError naming state_steps[i]; no counter
    advanced, no parameter NaN, nothing changed."""
    params, grads, states, steps = functional_inputs(rng, algo)
    steps[2][...] = -1.0
    before = _arrays_bytes(params, grads, steps, *states.values())
    with pytest.raises(ValueError, match=r"state_steps\[2\]"):
        _functional(algo, params, grads, states, steps, backend=backend)
    assert _arrays_bytes(params, grads, steps, *states.values()) == before


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", ["adam", "adagrad"])
def test_negative_step_count_in_optimizer_state(algo, backend, rng):
    """The same through an optimizer whose state's 'step' was set to -1."""
    go_cls, _, _, options = ALGOS[algo]
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = go_cls(params, backend=backend, **options)
    opt.step()
    opt.state[params[1]]["step"] = np.array(-1.0, np.float32)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="step"):
        opt.step()
    assert snapshot(opt) == before


# --- 7. Silent wrong results -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, scale, shift", [("float32", 2e19, 33), ("float64", 1e200, 630)],
                         ids=["float32-2e19", "float64-1e200"])
def test_huge_finite_gradient_is_clipped_not_skipped(dtype, scale, shift, rng):
    """max_grad_norm=1 and skip_nonfinite with finite gradients whose sum of squares overflows
    the gradient's dtype (float32 2e19) or float64 (1e200): every host backend takes the step
    with the clipped gradient: torch's clip_grad_norm_ + SGD on the same gradients scaled by
    2**-shift (exact; clipping does not depend on the scale) in float64."""
    shapes = [(7,), (3, 5), (13,)]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [(scale * rng.standard_normal(s)).astype(dtype) for s in shapes]
    assert all(np.isfinite(g).all() for g in grads)
    ref = [torch.nn.Parameter(torch.tensor(x, dtype=torch.float64)) for x in init]
    for q, g in zip(ref, grads):
        q.grad = torch.tensor(np.ldexp(g.astype(np.float64), -shift))
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    torch.optim.SGD(ref, lr=0.1, foreach=False).step()
    expected = [q.detach().numpy().astype(dtype) for q in ref]
    assert not any(np.array_equal(e, x) for e, x in zip(expected, init))
    results = {}
    for backend in HOST_BACKENDS:
        params = [Parameter(x.copy(), g.copy()) for x, g in zip(init, grads)]
        opt = go.SGD(params, lr=0.1, max_grad_norm=1.0, skip_nonfinite=True, backend=backend)
        opt.step()
        assert not opt.last_step_skipped, f"{backend}: a finite gradient skipped the step"
        results[backend] = [p.data for p in params]
        for p, e in zip(params, expected):
            assert_close(p.data, e, dtype)
    for a, b in zip(results["numpy"], results["cpu"]):
        assert_close(a, b, dtype)


BAD_SCALES = [float("nan"), -1.0, 0.0, float("inf")]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=["nan", "-1", "0", "inf"])
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_bad_host_grad_scale_is_refused(algo, backend, scale, rng):
    """grad_scale NaN, negative, zero or inf as a host number: ValueError naming grad_scale,
    nothing changed (optimizer and functional API)."""
    go_cls, _, _, options = ALGOS[algo]
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = go_cls(params, backend=backend, **options)
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=scale)
    assert snapshot(opt) == before
    p, g, s, t = functional_inputs(rng, algo)
    before = _arrays_bytes(p, g, t, *s.values())
    with pytest.raises(ValueError, match="grad_scale"):
        _functional(algo, p, g, s, t, grad_scale=scale, backend=backend)
    assert _arrays_bytes(p, g, t, *s.values()) == before


DEVICE_SCALES = {
    "array-inf": lambda: np.array([np.inf], np.float32),
    "array-nan": lambda: np.array(np.nan, np.float32),
    "tensor-inf": lambda: torch.tensor([float("inf")]),
    "tensor-nan": lambda: torch.tensor(float("nan")),
}


@pytest.mark.parametrize("scale", list(DEVICE_SCALES))
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("algo", list(ALGOS))
def test_nonfinite_array_grad_scale_skips_the_step(algo, backend, scale, rng):
    """A one-element array or CPU tensor grad_scale holding inf or NaN (as a device scale would
    be): the step is skipped, last_step_skipped is True, everything bit-identical."""
    go_cls, _, _, options = ALGOS[algo]
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    opt = go_cls(params, backend=backend, **options)
    opt.step()
    before = snapshot(opt)
    opt.step(grad_scale=DEVICE_SCALES[scale]())
    assert opt.last_step_skipped
    assert snapshot(opt) == before


@pytest.mark.parametrize("options", [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
                                     dict(lr=0.1, momentum=0.9, nesterov=True)],
                         ids=["plain", "momentum", "nesterov"])
def test_parameter_listed_twice_follows_torch(options, rng):
    """gpunn.torch.SGD([p, p]): torch.optim.SGD([p, p]) warns and steps; ours must give
    torch's result with a UserWarning, or refuse clearly (nothing changed)."""
    init = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(3)]
    q = torch.nn.Parameter(torch.tensor(init))
    with pytest.warns(UserWarning):
        ref = torch.optim.SGD([q, q], foreach=False, **options)
    p = torch.nn.Parameter(torch.tensor(init))
    pattern = r"twice|duplicate|more than once|appears? "
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = gt.SGD([p, p], **options)
        except (ValueError, RuntimeError) as e:
            assert re.search(pattern, str(e)), str(e)
            return
        p.grad = torch.tensor(grads[0])
        try:
            opt.step()
        except (ValueError, RuntimeError) as e:
            assert re.search(pattern, str(e)), str(e)
            assert torch.equal(p.detach(), torch.tensor(init))
            return
        for g in grads[1:]:
            p.grad = torch.tensor(g)
            opt.step()
    assert any(issubclass(w.category, UserWarning) for w in caught), "no warning"
    for g in grads:
        q.grad = torch.tensor(g)
        ref.step()
    assert_close(p.detach().numpy(), q.detach().numpy(), "float32")


def _refused_without_change(opt, bad, exc):
    before = snapshot(opt)
    with pytest.raises(exc):
        opt.load_state_dict(bad)
    assert snapshot(opt) == before


@pytest.mark.parametrize("source", ["gpunn", "torch"])
def test_adam_refuses_an_sgd_state_dict(source, rng):
    """Adam.load_state_dict of an SGD state dict (gpunn.optim's or torch.optim's):
    ValueError, nothing changed."""
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    if source == "gpunn":
        ps = [Parameter(x.copy(), g.copy()) for x, g in zip(init, grads)]
        sgd = go.SGD(ps, lr=0.1, momentum=0.9)
    else:
        ps = [torch.nn.Parameter(torch.tensor(x)) for x in init]
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        sgd = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    sgd.step()
    params = [Parameter(x.copy(), g.copy()) for x, g in zip(init, grads)]
    adam = go.Adam(params, lr=0.01)
    adam.step()
    _refused_without_change(adam, copy.deepcopy(sgd.state_dict()), ValueError)


def test_complex_state_in_state_dict_is_a_type_error(rng):
    """An exp_avg loaded from a complex array: TypeError (not a ComplexWarning and a silent
    cast), nothing changed."""
    params = [Parameter(rng.standard_normal(s).astype(np.float32),
                        rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    adam = go.Adam(params, lr=0.01)
    adam.step()
    bad = copy.deepcopy(adam.state_dict())
    bad["state"][1]["exp_avg"] = bad["state"][1]["exp_avg"].astype(np.complex64) * (1 + 1j)
    _refused_without_change(adam, bad, TypeError)


@pytest.mark.parametrize("betas", [(0.9, 0.99, 0.9), (0.9,)], ids=["three", "one"])
@pytest.mark.parametrize("api", ["gpunn.optim", "gpunn.torch", "functional"])
def test_betas_of_the_wrong_length(api, betas, rng):
    """betas with 3 (or 1) values: ValueError naming betas, not a failed unpacking."""
    with pytest.raises(ValueError, match="betas"):
        if api == "gpunn.optim":
            go.Adam([Parameter(np.ones(3, np.float32))], betas=betas)
        elif api == "gpunn.torch":
            gt.AdamW([torch.nn.Parameter(torch.ones(3))], betas=betas)
        else:
            p, g, s, t = functional_inputs(rng, "adam")
            _functional("adam", p, g, s, t, betas=betas)


# --- 8. Copies and pickles of optimizers ----------------------------------------------------------


def _copies(opt, kind):
    if kind == "deepcopy":
        return copy.deepcopy(opt)
    if kind == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("kind", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("api", ["numpy", "cpu", "gpunn.torch"])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_copied_optimizer_steps_like_the_original(algo, api, kind, rng):
    """deepcopy / pickle / torch.save of an optimizer mid-run, then steps with new gradients on
    both: the copy matches the original continuing (bitwise), and neither touches the other's
    parameters (the copy's cached addresses are not the original's)."""
    go_cls, gt_cls, _, options = ALGOS[algo]
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(4)]
    if api == "gpunn.torch":
        params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
        opt = gt_cls(params, **options)

        def set_grads(ps, gs):
            for p, g in zip(ps, gs):
                p.grad = torch.tensor(g)
    else:
        params = [Parameter(x.copy()) for x in init]
        opt = go_cls(params, backend=api, **options)

        def set_grads(ps, gs):
            for p, g in zip(ps, gs):
                p.grad = g.copy()
    for gs in grads[:2]:
        set_grads(params, gs)
        opt.step()
    clone = _copies(opt, kind)
    theirs = _params(clone)
    assert len(theirs) == len(params) and not any(a is b for a, b in zip(theirs, params))
    for gs in grads[2:]:
        set_grads(params, gs)
        set_grads(theirs, gs)
        mine = snapshot(opt)
        clone.step()
        assert snapshot(opt) == mine, "stepping the copy changed the original"
        copied = snapshot(clone)
        opt.step()
        assert snapshot(clone) == copied, "stepping the original changed the copy"
    assert snapshot(clone) == snapshot(opt)


def test_optimizer_unpickled_in_a_fresh_process(tmp_path, rng):
    """An optimizer pickled mid-run (gpunn.optim on both host backends, gpunn.torch through
    torch.save) and loaded in another interpreter steps to the same values (its addresses
    are that process's, not the pickling one's)."""
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    cases = {}
    for backend in HOST_BACKENDS:
        params = [Parameter(x.copy()) for x in init]
        opt = go.Adam(params, lr=0.01, amsgrad=True, backend=backend)
        for p, g in zip(params, grads[0]):
            p.grad = g.copy()
        opt.step()
        blob = pickle.dumps(opt)
        for p, g in zip(params, grads[1]):
            p.grad = g.copy()
        opt.step()
        cases[backend] = (blob, [p.data.copy() for p in params])
    tparams = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    topt = gt.RMSprop(tparams, lr=0.01, momentum=0.9, centered=True)
    for p, g in zip(tparams, grads[0]):
        p.grad = torch.tensor(g)
    topt.step()
    buf = io.BytesIO()
    torch.save(topt, buf)
    for p, g in zip(tparams, grads[1]):
        p.grad = torch.tensor(g)
    topt.step()
    cases["gpunn.torch"] = (buf.getvalue(), [p.detach().numpy().copy() for p in tparams])
    path = tmp_path / "optimizers.pkl"
    path.write_bytes(pickle.dumps({"cases": cases, "grads": grads[1]}))
    out = run_python("""
        import io, pickle, sys
        import numpy as np, torch
        data = pickle.loads(open(sys.argv[1], "rb").read())
        for name, (blob, expected) in data["cases"].items():
            if name == "gpunn.torch":
                opt = torch.load(io.BytesIO(blob), weights_only=False)
                params = [p for g in opt.param_groups for p in g["params"]]
                for p, g in zip(params, data["grads"]):
                    p.grad = torch.tensor(g)
                opt.step()
                got = [p.detach().numpy() for p in params]
            else:
                opt = pickle.loads(blob)
                params = [p for g in opt.param_groups for p in g["params"]]
                for p, g in zip(params, data["grads"]):
                    p.grad = g.copy()
                opt.step()
                got = [p.data for p in params]
            assert all(np.array_equal(a, b) for a, b in zip(got, expected)), name
            print(name, "ok")
    """, args=[path])
    assert out.split() == ["numpy", "ok", "cpu", "ok", "gpunn.torch", "ok"]
