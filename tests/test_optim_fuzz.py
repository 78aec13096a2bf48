"""Property-based fuzzing of the fused optimizer step (DESIGN.md, Safety) on the host backends.

Every parameter, gradient, state and step count lives in a canary-guarded arena: one buffer
filled with a NaN sentinel, each array carved as a view with guard elements around it. A
mirror of the arena, viewed the same way by torch tensors, runs torch.optim (the reference)
through the same calls. Between steps the parameters and gradients are mutated: .data
replaced by a smaller, larger, transposed, aliased or fresh view, gradients swapped, dropped,
re-shaped, resized in place or given the wrong shape. Each step must either raise a clear
exception (ValueError/TypeError/RuntimeError with a message) changing nothing, or succeed and
match torch.optim within the dtype's tolerance; and no guard element may ever change.
The functional API gets the same treatment with bad lists (wrong shapes, dtypes, layouts,
read-only or big-endian arrays, bad step counts, aliasing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

import gpunn.optim as go
import gpunn.torch as gt
from gpunn.nn import Parameter
from gpunn.optim import functional as F
from conftest import HOST_BACKENDS, TOLERANCE, array_bytes, functional_step, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

#: No shrinking: a failing example is reported as drawn, with its notes (the mutations and
#: the errors), which keeps a red run as short as a green one.
FUZZ = settings(max_examples=30, deadline=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Sentinel bits of the guard elements: quiet NaNs with a payload.
SENTINEL = {4: np.uint32(0x7FC12345), 8: np.uint64(0x7FF8000012345678)}
#: Shapes of parameters: empty, one element, primes, 2-D (square ones can be transposed).
SHAPES = [(), (0,), (1,), (2,), (7,), (13,), (127,), (1021,), (1, 1), (3, 5), (5, 5),
          (11, 11), (4, 31), (40, 50)]
LR = {"sgd": 0.05, "adagrad": 0.1, "rmsprop": 0.01, "adam": 0.01, "adamw": 0.01}
CLASSES = {"sgd": ("SGD", torch.optim.SGD), "adagrad": ("Adagrad", torch.optim.Adagrad),
           "rmsprop": ("RMSprop", torch.optim.RMSprop), "adam": ("Adam", torch.optim.Adam),
           "adamw": ("AdamW", torch.optim.AdamW)}
CLEAR = (ValueError, TypeError, RuntimeError)


# --- The arena -----------------------------------------------------------------------------------


class Arena:
    """A sentinel-filled buffer and its mirror; ``carve`` hands out regions between guards."""

    def __init__(self, dtype, size, rng):
        self.dtype = np.dtype(dtype)
        self.bits = np.uint32 if self.dtype.itemsize == 4 else np.uint64
        self.buf = np.empty(size, self.dtype)
        self.buf.view(self.bits)[:] = SENTINEL[self.dtype.itemsize]
        self.mirror = self.buf.copy()
        self.ours_t = torch.from_numpy(self.buf)
        self.ref_t = torch.from_numpy(self.mirror)
        self.used = np.zeros(size, bool)
        self.regions: list[tuple[int, int, object]] = []  # (start, size, tag)
        self.next = 0
        self.rng = rng

    def carve(self, n, slack=0):
        """The offset of a new region of ``n`` elements (plus ``slack`` kept free behind it
        for views that grow), guards of 1-32 elements before it and after it."""
        start = self.next + int(self.rng.integers(1, 33))
        self.next = start + n + slack
        assert self.next + 33 <= self.buf.size, "arena too small for this example"
        return start

    def fill(self, start, values, tag=None):
        """Write ``values`` at ``start`` in both buffers; the elements are no longer guards."""
        n = values.size
        self.buf[start:start + n] = values.reshape(-1)
        self.mirror[start:start + n] = values.reshape(-1)
        if n:
            self.used[start:start + n] = True
            self.regions.append((start, n, tag))

    def address(self, start):
        return self.buf.ctypes.data + start * self.dtype.itemsize

    def guards_intact(self) -> bool:
        return bool(np.all(self.buf.view(self.bits)[~self.used] == SENTINEL[self.dtype.itemsize]))

    def mismatch(self, tol, skip=lambda tag, start: False):
        """The first region where ours and the reference differ beyond ``tol``, or None
        (regions for which ``skip(tag, start)`` is true are not compared)."""
        for start, n, tag in self.regions:
            if skip(tag, start):
                continue
            err = rel_err(self.buf[start:start + n], self.mirror[start:start + n])
            if not err <= tol:
                return f"region [{start}, {start + n}): relative error {err:.3g}"
        return None


class Spec:
    """A view of an arena: element offset, shape, element strides."""

    def __init__(self, offset, shape, strides=None):
        self.offset, self.shape = int(offset), tuple(int(s) for s in shape)
        if strides is None:
            strides, step = [], 1
            for s in reversed(self.shape):
                strides.append(step)
                step *= max(s, 1)
            strides = tuple(reversed(strides))
        self.strides = tuple(int(s) for s in strides)

    @property
    def size(self):
        return math.prod(self.shape)

    def contiguous(self):
        return self.strides == Spec(0, self.shape).strides

    def transposed(self):
        return Spec(self.offset, self.shape[::-1], self.strides[::-1])

    def numpy(self, arena):
        item = arena.dtype.itemsize
        return np.lib.stride_tricks.as_strided(arena.buf[self.offset:], self.shape,
                                               [s * item for s in self.strides])

    def torch(self, base):
        return torch.as_strided(base, self.shape, self.strides, self.offset)


def _random(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def carve_filled(arena, shape, rng, slack=0, values=None, tag=None):
    """A new region holding ``values`` (default: random normal), as a C-contiguous Spec."""
    values = _random(rng, shape, arena.dtype) if values is None else values
    spec = Spec(arena.carve(values.size, slack), shape)
    arena.fill(spec.offset, values, tag)
    return spec


def carve_strided(arena, shape, rng, tag=None):
    """A view of ``shape`` over every other element of a new region (not dense)."""
    n = max(1, math.prod(shape))
    start = arena.carve(2 * n)
    arena.fill(start, _random(rng, 2 * n, arena.dtype), tag)
    strides = Spec(0, shape).strides
    return Spec(start, shape, tuple(2 * s for s in strides))


# --- The optimizer fuzz ---------------------------------------------------------------------------


@st.composite
def configs(draw):
    """(algorithm, torch's options, gpunn's extra options)."""
    algo = draw(st.sampled_from(list(CLASSES)))
    wd = draw(st.sampled_from([0.0, 0.01]))
    options = dict(lr=LR[algo], weight_decay=wd, maximize=draw(st.booleans()))
    if algo == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        options.update(momentum=momentum, nesterov=nesterov,
                       dampening=0.0 if nesterov or not momentum else draw(
                           st.sampled_from([0.0, 0.3])))
    elif algo == "adagrad":
        options.update(lr_decay=draw(st.sampled_from([0.0, 0.01])))
    elif algo == "rmsprop":
        options.update(centered=draw(st.booleans()), momentum=draw(st.sampled_from([0.0, 0.9])),
                       alpha=draw(st.sampled_from([0.99, 0.9])))
    else:
        options.update(amsgrad=draw(st.booleans()),
                       betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.99)])))
    extra = dict(l1=draw(st.sampled_from([0.0, 0.0, 0.01])),
                 max_grad_norm=draw(st.sampled_from([None, None, 1.0, 100.0])),
                 skip_nonfinite=draw(st.booleans()))
    return algo, options, extra


def state_slots(algo, options):
    if algo == "sgd":
        return ("momentum_buffer",) if options["momentum"] else ()
    if algo == "adagrad":
        return ("sum",)
    if algo == "rmsprop":
        return ("square_avg",) + (("momentum_buffer",) if options["momentum"] else ()) + (
            ("grad_avg",) if options["centered"] else ())
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if options["amsgrad"] else ())


def preset_values(rng, algo, options, shape, dtype):
    """Valid states (square_avg >= grad_avg^2, second moments and sums > 0)."""
    values = {}
    for slot in state_slots(algo, options):
        if slot in ("momentum_buffer", "exp_avg", "grad_avg"):
            values[slot] = (0.3 * rng.standard_normal(shape)).astype(dtype)
        else:
            values[slot] = rng.uniform(0.5, 1.0, shape).astype(dtype)
    if "grad_avg" in values:
        values["square_avg"] = (values["square_avg"] + values["grad_avg"] ** 2).astype(dtype)
    if "max_exp_avg_sq" in values:
        values["max_exp_avg_sq"] = (values["exp_avg_sq"] * 1.1).astype(dtype)
    return values


class Fuzz:
    """Ours (gpunn.optim on NumPy arrays, or gpunn.torch on CPU tensors) and the reference
    (torch.optim, foreach=False) over mirrored arenas, mutated alike. With ``preset`` the
    states and step counts are arena views too, else each optimizer makes its own."""

    def __init__(self, api, backend, algo, options, extra, shapes, dtype, rng, preset):
        self.api, self.algo, self.options, self.extra = api, algo, options, extra
        self.rng, self.dtype = rng, np.dtype(dtype)
        self.arena = Arena(dtype, 1 << 17, rng)
        self.steps_arena = self.arena if self.dtype == np.float32 else Arena(np.float32, 256, rng)
        self.data = [carve_filled(self.arena, s, rng, slack=int(rng.integers(0, 64)))
                     for s in shapes]
        self.frozen: set[int] = set()  # parameters with a read-only state or step count
        self.grads: list = [None] * len(shapes)  # Spec, ("owned", ours, ref) or None
        self.ours = [self._ours_param(spec) for spec in self.data]
        self.ref = [torch.nn.Parameter(spec.torch(self.arena.ref_t)) for spec in self.data]
        name, ref_cls = CLASSES[algo]
        ours_cls = getattr(go if api == "gpunn.optim" else gt, name)
        self.opt = ours_cls(self.ours, backend=backend, **options, **extra)
        self.ref_opt = ref_cls(self.ref, foreach=False, **options)
        if not preset:  # each side makes its own states
            return
        self.ref_opt.state.clear()
        for i, spec in enumerate(self.data):  # states in the arena too
            ours_state, ref_state = {}, {}
            for slot, values in preset_values(rng, algo, options, spec.shape, dtype).items():
                s = carve_filled(self.arena, spec.shape, rng, values=values, tag=(i, slot))
                ours_state[slot], ref_state[slot] = self._ours_view(s), s.torch(self.arena.ref_t)
            if algo != "sgd":
                step = carve_filled(self.steps_arena, (), rng,
                                    values=np.zeros((), np.float32))
                ours_state["step"] = (step.numpy(self.steps_arena) if api == "gpunn.optim"
                                      else step.torch(self.steps_arena.ours_t))
                ref_state["step"] = step.torch(self.steps_arena.ref_t)
            if ours_state:
                self.opt.state[self.ours[i]] = ours_state
                self.ref_opt.state[self.ref[i]] = ref_state

    # views on each side

    def _ours_view(self, spec):
        return spec.numpy(self.arena) if self.api == "gpunn.optim" else spec.torch(
            self.arena.ours_t)

    def _ours_param(self, spec):
        view = self._ours_view(spec)
        return Parameter(view) if self.api == "gpunn.optim" else torch.nn.Parameter(view)

    def set_data(self, i, spec):
        self.data[i] = spec
        self.ours[i].data = self._ours_view(spec)
        self.ref[i].data = spec.torch(self.arena.ref_t)

    def set_grad(self, i, grad):
        """grad: a Spec (arena view), ("owned", shape) for a fresh NumPy array outside the
        arena (gpunn.optim), or None."""
        if grad is None:
            self.grads[i] = None
            self.ours[i].grad = self.ref[i].grad = None
            return
        if isinstance(grad, Spec):
            self.grads[i] = grad
            ours, ref = self._ours_view(grad), grad.torch(self.arena.ref_t)
        else:
            values = _random(self.rng, grad[1], self.dtype)
            ours, ref = values, torch.tensor(values)
            self.grads[i] = ("owned", ours, ref)
        self.ours[i].grad = None
        self.ref[i].grad = None
        self._assign(i, ours, ref)

    def _assign(self, i, ours, ref):
        """Set gradients as a user could: torch refuses .grad of another shape, so such a
        gradient is put in place by re-pointing the existing gradient tensor (set_)."""
        for param, g in ((self.ours[i], ours), (self.ref[i], ref)):
            if not isinstance(param, torch.Tensor) or tuple(g.shape) == tuple(param.shape):
                param.grad = g
            else:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.set_(g)

    # mutations

    def mutate_data(self, draw):
        i = draw(st.integers(0, len(self.ours) - 1), label="param")
        spec = self.data[i]
        kinds = ["smaller", "larger", "fresh", "alias", "strided"]
        if len(spec.shape) == 2:
            kinds.append("transpose")
        if self.api == "gpunn.torch":
            kinds.append("requires_grad")
        kind = draw(st.sampled_from(kinds), label="data mutation")
        if kind == "smaller" and spec.contiguous() and spec.size > 0:
            self.set_data(i, Spec(spec.offset, (draw(st.integers(0, spec.size - 1)),)))
        elif kind == "larger" and spec.contiguous() and self._room(i, spec) > 0:
            grow = draw(st.integers(1, self._room(i, spec)))
            self.arena.fill(spec.offset + spec.size, _random(self.rng, grow, self.dtype))
            self.set_data(i, Spec(spec.offset, (spec.size + grow,)))
        elif kind == "transpose":
            self.set_data(i, spec.transposed())
        elif kind == "alias" and not self.extra["l1"]:  # l1's sign(p) is taken before
            j = draw(st.integers(0, len(self.ours) - 1), label="aliased")
            other = self.data[j]
            if draw(st.booleans()) or not other.contiguous() or other.size < 2:
                self.set_data(i, other)
            else:  # a partial overlap: shifted by one element
                self.set_data(i, Spec(other.offset + 1, (other.size - 1,)))
        elif kind == "fresh":
            self.set_data(i, carve_filled(self.arena, draw(st.sampled_from(SHAPES)), self.rng))
        elif kind == "strided":  # the same shape, every other element of new memory
            self.set_data(i, carve_strided(self.arena, spec.shape, self.rng))
        elif kind == "requires_grad":
            flag = not self.ours[i].requires_grad
            self.ours[i].requires_grad_(flag)
            self.ref[i].requires_grad_(flag)
        return f"{kind} data[{i}]"

    def _room(self, i, spec):
        """Free elements right behind a parameter's original region (its slack)."""
        end = spec.offset + spec.size
        room = 0
        while end + room < self.arena.buf.size and not self.arena.used[end + room] and room < 64:
            room += 1
        return max(0, room - 1)  # keep one guard element

    def refresh_grads(self, draw, first):
        """New gradient values: in place in the same arrays, in new arrays, or none."""
        for i, spec in enumerate(self.data):
            choices = ["new", "new", "none"] if first else ["same", "same", "new", "none"]
            action = draw(st.sampled_from(choices), label=f"grad[{i}]")
            grad = self.grads[i]
            if action == "same" and grad is not None:
                ours = self.ours[i].grad
                values = _random(self.rng, tuple(ours.shape), self.dtype)
                ref = self.ref[i].grad
                if isinstance(ours, torch.Tensor):
                    ours.copy_(torch.from_numpy(values))
                else:
                    ours[...] = values
                ref.copy_(torch.from_numpy(values))
            elif action in ("new", "same"):
                if self.api == "gpunn.optim" and draw(st.booleans(), label="owned"):
                    self.set_grad(i, ("owned", spec.shape))
                    continue
                layout = draw(st.sampled_from(["dense", "dense", "like param", "strided"]),
                              label="grad layout")
                if layout == "strided":
                    g = carve_strided(self.arena, spec.shape, self.rng)
                elif layout == "like param" and len(spec.shape) == 2 and spec.strides[0] < \
                        spec.strides[1]:
                    g = carve_filled(self.arena, spec.shape[::-1], self.rng).transposed()
                else:
                    g = carve_filled(self.arena, spec.shape, self.rng)
                self.set_grad(i, g)
            else:
                self.set_grad(i, None)

    def mutate_state(self, draw):
        """One parameter's states: resized in place (torch), replaced by new valid ones
        (dense or strided), or one replaced by an array of another shape."""
        i = draw(st.integers(0, len(self.ours) - 1), label="state of")
        p, q = self.ours[i], self.ref[i]
        slots = state_slots(self.algo, self.options)
        if not slots or p not in self.opt.state or q not in self.ref_opt.state:
            return "no state"
        kinds = ["replace", "wrong_shape"] + (["resize"] if self.api == "gpunn.torch" else
                                              ["read_only"])
        kind = draw(st.sampled_from(kinds), label="state mutation")
        shape = tuple(q.shape)
        if kind == "resize":
            slot = draw(st.sampled_from(slots))
            ours, ref = self.opt.state[p][slot], self.ref_opt.state[q][slot]
            if ours.numel() == 0:
                return "resize (empty state)"
            new = draw(st.integers(0, ours.numel() - 1))
            ours.resize_(new)
            ref.resize_(new)
            return f"resize state[{i}][{slot!r}]"
        if kind == "read_only":  # NumPy: flags.writeable False on a state or the step count
            key = draw(st.sampled_from([k for k, v in self.opt.state[p].items()
                                        if isinstance(v, np.ndarray)]), label="read-only")
            self.opt.state[p][key].flags.writeable = False
            self.frozen.add(i)
            return f"read_only state[{i}][{key!r}]"
        if kind == "wrong_shape":
            slot = draw(st.sampled_from(slots))
            spec = carve_filled(self.arena, (math.prod(shape) + 1,), self.rng, tag=(i, slot))
            self.opt.state[p][slot] = self._ours_view(spec)
            self.ref_opt.state[q][slot] = spec.torch(self.arena.ref_t)
            return f"wrong_shape state[{i}][{slot!r}]"
        strided = draw(st.booleans(), label="strided states")
        for slot, values in preset_values(self.rng, self.algo, self.options, shape,
                                          self.dtype).items():
            if strided:
                spec = carve_strided(self.arena, shape, self.rng, tag=(i, slot))
                spec.numpy(self.arena)[...] = values
                spec.torch(self.arena.ref_t).copy_(torch.from_numpy(np.array(values)))
            else:
                spec = carve_filled(self.arena, shape, self.rng, values=values, tag=(i, slot))
            self.opt.state[p][slot] = self._ours_view(spec)
            self.ref_opt.state[q][slot] = spec.torch(self.arena.ref_t)
        return f"replace{' strided' if strided else ''} states[{i}]"

    def mutate_grads(self, draw):
        n = len(self.ours)
        kind = draw(st.sampled_from(["swap", "wrong_shape", "resize", "none_all"]),
                    label="grad mutation")
        i = draw(st.integers(0, n - 1), label="grad")
        if kind == "swap":
            j = draw(st.integers(0, n - 1), label="with")
            gi, gj = self.ours[i].grad, self.ours[j].grad
            ri, rj = self.ref[i].grad, self.ref[j].grad
            for param, g in ((self.ours[i], None), (self.ours[j], None), (self.ref[i], None),
                             (self.ref[j], None)):
                param.grad = g
            if gj is not None:
                self._assign(i, gj, rj)
            if gi is not None:
                self._assign(j, gi, ri)
            self.grads[i], self.grads[j] = self.grads[j], self.grads[i]
        elif kind == "wrong_shape":
            shape = (self.data[i].size + draw(st.sampled_from([1, 2, 7])),)
            g = carve_filled(self.arena, shape, self.rng)
            self._assign(i, self._ours_view(g), g.torch(self.arena.ref_t))
            self.grads[i] = g
        elif kind == "resize" and self.ours[i].grad is not None and self.ours[i].grad.ndim:
            ours, ref = self.ours[i].grad, self.ref[i].grad
            new = draw(st.integers(0, max(0, math.prod(ours.shape) - 1)))
            if isinstance(ours, torch.Tensor):
                ours.resize_(new)
            elif ours.flags.owndata:
                ours.resize(new, refcheck=False)
            else:
                return "resize (not possible on a view)"
            ref.resize_(new)
        elif kind == "none_all":
            for k in range(n):
                self.set_grad(k, None)
        return f"{kind} grad[{i}]"

    def inject_nonfinite(self, draw):
        """An inf or NaN in one dense gradient, when the options say the step must then be
        skipped."""
        if not (self.extra["skip_nonfinite"] or self.extra["max_grad_norm"] is not None):
            return False
        live = [i for i, (p, q) in enumerate(zip(self.ours, self.ref))
                if p.grad is not None and q.grad.is_contiguous() and q.grad.numel() > 0
                and (p.grad.is_contiguous() if isinstance(p.grad, torch.Tensor)
                     else p.grad.flags.c_contiguous)]
        if not live or draw(st.integers(0, 5), label="nonfinite") != 0:
            return False
        i = draw(st.sampled_from(live))
        bad = draw(st.sampled_from([np.inf, -np.inf, np.nan]))
        ours = self.ours[i].grad
        if isinstance(ours, torch.Tensor):
            ours.view(-1)[0] = float(bad)
        else:
            ours.reshape(-1)[0] = bad
        self.ref[i].grad.view(-1)[0] = float(bad)
        return True

    # the step and its checks

    def snapshot(self):
        owned = [array_bytes(g[1]) for g in self.grads if isinstance(g, tuple)]
        states = []
        for p in self.ours:
            state = self.opt.state[p] if p in self.opt.state else {}
            states.append({k: array_bytes(v) for k, v in state.items()})
        shapes = [(tuple(p.data.shape), None if p.grad is None else tuple(p.grad.shape))
                  for p in self.ours]
        return (self.arena.buf.tobytes(), self.steps_arena.buf.tobytes(), owned, states, shapes)

    def reference_step(self):
        """torch.optim's step with gpunn's extras: the step is skipped on a non-finite
        gradient (skip_nonfinite or clipping), gradients clipped by their global norm
        (float64), l1 * sign(p) added. Returns whether it was skipped."""
        live = [(p, p.grad) for p in self.ref if p.grad is not None]
        for p, g in live:
            if tuple(g.shape) != tuple(p.shape):
                raise RuntimeError("gradient shape differs from the parameter's (torch)")
        values = [g.detach().double() for _, g in live]
        if any(not torch.isfinite(v).all() for v in values) and (
                self.extra["skip_nonfinite"] or self.extra["max_grad_norm"] is not None):
            return True
        coef = 1.0
        if self.extra["max_grad_norm"] is not None:
            norm = math.sqrt(sum(float((v * v).sum()) for v in values))
            coef = min(1.0, self.extra["max_grad_norm"] / (norm + 1e-6))
        sign = -1.0 if self.options["maximize"] else 1.0
        for (p, g), v in zip(live, values):
            new = v * coef
            if self.extra["l1"]:
                new = new + sign * self.extra["l1"] * torch.sign(p.detach().double())
            p.grad = new.to(p.dtype)
        try:
            self.ref_opt.step()
        finally:
            for p, g in live:
                p.grad = g
        return False

    def dropped_state(self, tag, start):
        """Whether a state region is one ours no longer uses (a state re-laid for a
        parameter that changed layout, as torch continues with it): not compared."""
        if tag is None:
            return False
        i, slot = tag
        state = self.opt.state[self.ours[i]] if self.ours[i] in self.opt.state else {}
        a = state.get(slot)
        if a is None:
            return True
        address = a.data_ptr() if isinstance(a, torch.Tensor) else \
            a.__array_interface__["data"][0]
        return address != self.arena.address(start)

    def check_state(self):
        tol = TOLERANCE[self.dtype.name]
        for p, q in zip(self.ours, self.ref):
            theirs = self.ref_opt.state[q] if q in self.ref_opt.state else {}
            mine = self.opt.state[p] if p in self.opt.state else {}
            for key, value in theirs.items():
                if value is None:
                    continue
                assert key in mine, f"state {key!r} missing"
                a = np.asarray(mine[key].detach() if isinstance(mine[key], torch.Tensor)
                               else mine[key], np.float64)
                b = value.detach().double().numpy()
                assert a.shape == b.shape, (key, a.shape, b.shape)
                err = rel_err(a, b)
                assert err <= tol, f"state {key!r}: relative error {err:.3g}"


def run_optimizer_fuzz(api, backend, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    algo, options, extra = data.draw(configs(), label="config")
    dtype = data.draw(st.sampled_from(["float32", "float32", "float64"]), label="dtype")
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4), label="shapes")
    preset = data.draw(st.booleans(), label="states in the arena")
    fuzz = Fuzz(api, backend, algo, options, extra, shapes, dtype, rng, preset)
    tol = TOLERANCE[dtype]
    last = "first step"
    for step in range(data.draw(st.integers(3, 5), label="steps")):
        if step:
            last = "unchanged data"
        if step and data.draw(st.booleans(), label="mutate data"):
            last = fuzz.mutate_data(data.draw)
            note(last)
        if step and data.draw(st.integers(0, 4), label="mutate state") == 0:
            last = fuzz.mutate_state(data.draw)
            note(last)
        fuzz.refresh_grads(data.draw, first=step == 0)
        if step and data.draw(st.integers(0, 3), label="mutate grads") == 0:
            last = fuzz.mutate_grads(data.draw)
            note(last)
        last = last.split("[")[0]
        nonfinite = fuzz.inject_nonfinite(data.draw)
        before = fuzz.snapshot()
        frozen = [i for i in fuzz.frozen if fuzz.ours[i].grad is not None]
        try:
            fuzz.opt.step()
        except CLEAR as e:
            assert str(e), f"{type(e).__name__} without a message"
            assert fuzz.arena.guards_intact(), "a guard element changed"
            assert fuzz.snapshot() == before, f"the failed step changed something: {e}"
            note(f"step {step} refused: {type(e).__name__}: {e}")
            event(f"refused after: {last}")
            return
        assert fuzz.arena.guards_intact() and fuzz.steps_arena.guards_intact(), \
            "a guard element changed"
        assert not frozen or fuzz.opt.last_step_skipped, \
            f"stepped parameters {frozen} whose state is read-only"
        try:
            skipped = fuzz.reference_step()
        except RuntimeError as e:
            raise AssertionError(f"gpunn stepped where torch.optim refused: {e}") from None
        assert fuzz.opt.last_step_skipped == skipped, (skipped, nonfinite)
        if skipped:
            assert fuzz.snapshot()[:2] == before[:2], "a skipped step changed something"
            event("skipped (inf/NaN gradient)")
            continue
        event(f"stepped as torch after: {last}")
        wrong = fuzz.arena.mismatch(tol, fuzz.dropped_state)
        assert wrong is None, f"step {step}: {wrong}"
        if fuzz.steps_arena is not fuzz.arena:
            wrong = fuzz.steps_arena.mismatch(0.0)
            assert wrong is None, f"step {step}: step counts: {wrong}"
        for i, (p, q) in enumerate(zip(fuzz.ours, fuzz.ref)):
            a = np.asarray(p.data.detach() if isinstance(p.data, torch.Tensor) else p.data)
            err = rel_err(a, q.detach().numpy())
            assert err <= tol, f"step {step}: param {i}: relative error {err:.3g}"
        fuzz.check_state()


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("api", ["gpunn.optim", "gpunn.torch"])
def test_optimizer_step_fuzz(api, backend, data):
    """Random optimizer, options, shapes and mutations between 3-5 steps: a clear error that
    changes nothing, or torch.optim's result; guards intact."""
    run_optimizer_fuzz(api, backend, data)


# --- The functional fuzz --------------------------------------------------------------------------

#: Corruptions of one functional call: must raise, or may also succeed (then as torch).
MUST_RAISE = ("state_shape", "state_dtype", "read_only_param", "read_only_state",
              "read_only_step", "big_endian_grad", "negative_step", "short_list",
              "state_overlaps_param", "grad_shape")
MAY_SUCCEED = ("none", "transposed_state", "strided_param", "same_param_twice", "shared_state",
               "grad_is_param")
NEEDS_STATE = ("state_shape", "state_dtype", "read_only_state", "state_overlaps_param",
               "transposed_state", "shared_state")


def run_functional_fuzz(backend, corruption, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    algo, options, extra = data.draw(configs(), label="config")
    extra = dict(extra, l1=0.0)  # the reference adds l1 from p before the step
    dtype = np.dtype(data.draw(st.sampled_from(["float32", "float64"]), label="dtype"))
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=2, max_size=4),
                       label="shapes")
    # what the corruption needs: states, a square or a multi-element parameter, a twin
    if corruption in NEEDS_STATE and algo == "sgd" and not options["momentum"]:
        options = dict(options, momentum=0.9)
    if corruption == "transposed_state" and not any(len(s) == 2 and s[0] == s[1] > 1
                                                    for s in shapes):
        shapes[0] = (5, 5)
    if corruption in ("strided_param", "state_overlaps_param") and not any(
            math.prod(s) > 1 for s in shapes):
        shapes[0] = (7,)
    if corruption in ("same_param_twice", "shared_state"):
        shapes[1] = shapes[0]
    arena = Arena(dtype, 1 << 16, rng)
    steps_arena = arena if dtype == np.float32 else Arena(np.float32, 256, rng)
    p_specs = [carve_filled(arena, s, rng) for s in shapes]
    g_specs = [carve_filled(arena, s, rng) for s in shapes]
    slots = state_slots(algo, options)
    presets = [preset_values(rng, algo, options, s, dtype) for s in shapes]
    s_specs = {slot: [carve_filled(arena, s, rng, values=v[slot]) for s, v in zip(shapes, presets)]
               for slot in slots}
    first = 1.0 if algo == "sgd" else 0.0  # SGD's buffers are given: as after a step
    t_specs = [carve_filled(steps_arena, (), rng, values=np.full((), first, np.float32))
               for _ in shapes]
    n = len(shapes)
    # ours: NumPy views; reference: torch views of the mirror
    params = [s.numpy(arena) for s in p_specs]
    grads = [s.numpy(arena) for s in g_specs]
    states = {k: [s.numpy(arena) for s in v] for k, v in s_specs.items()}
    steps = [s.numpy(steps_arena) for s in t_specs]
    ref_params = [torch.nn.Parameter(s.torch(arena.ref_t)) for s in p_specs]
    ref_grads = [s.torch(arena.ref_t) for s in g_specs]
    ref_states = [{k: s_specs[k][i].torch(arena.ref_t) for k in slots} for i in range(n)]
    for i in range(n):
        if algo != "sgd":
            ref_states[i]["step"] = t_specs[i].torch(steps_arena.ref_t)
    square = [i for i, s in enumerate(shapes) if len(s) == 2 and s[0] == s[1] and s[0] > 1]
    big = [i for i, s in enumerate(shapes) if math.prod(s) > 1]
    i = data.draw(st.integers(0, n - 1), label="index")
    if corruption == "state_shape" and slots:
        states[slots[0]][i] = carve_filled(arena, (math.prod(shapes[i]) + 1,), rng).numpy(arena)
    elif corruption == "state_dtype" and slots:
        other = np.float64 if dtype == np.float32 else np.float32
        states[slots[0]][i] = states[slots[0]][i].astype(other)
    elif corruption == "read_only_param":
        params[i].flags.writeable = False
    elif corruption == "read_only_state" and slots:
        states[slots[-1]][i].flags.writeable = False
    elif corruption == "read_only_step":
        steps[i].flags.writeable = False
    elif corruption == "big_endian_grad":
        grads[i] = grads[i].astype(grads[i].dtype.newbyteorder(">"))
    elif corruption == "negative_step":
        steps[i][...] = -1.0
        steps_arena.mirror[t_specs[i].offset] = -1.0
    elif corruption == "short_list":
        which = data.draw(st.sampled_from(["grads", "steps"] + list(slots)), label="list")
        if which == "grads":
            grads = grads[:-1]
        elif which == "steps":
            steps = steps[:-1]
        else:
            states[which] = states[which][:-1]
    elif corruption == "grad_shape":
        grads[i] = carve_filled(arena, (math.prod(shapes[i]) + 2,), rng).numpy(arena)
    elif corruption == "state_overlaps_param" and slots and big:
        k = data.draw(st.sampled_from(big), label="overlapped")
        states[slots[0]][k] = np.lib.stride_tricks.as_strided(  # shifted by one element
            arena.buf[p_specs[k].offset + 1:], shapes[k],
            [st_ * dtype.itemsize for st_ in p_specs[k].strides])
        arena.used[p_specs[k].offset + p_specs[k].size] = True  # may be read as a state
    elif corruption == "transposed_state" and slots and square:
        k = data.draw(st.sampled_from(square), label="square")
        for slot in slots:  # the same logical values, laid out transposed
            t = carve_filled(arena, shapes[k], rng, values=np.ascontiguousarray(
                states[slot][k].T)).transposed()
            states[slot][k] = t.numpy(arena)
            ref_states[k][slot] = t.torch(arena.ref_t)
    elif corruption == "strided_param" and big:
        k = data.draw(st.sampled_from(big), label="strided")
        size = math.prod(shapes[k])
        wide = Spec(arena.carve(2 * size), (2 * size,))
        values = _random(rng, 2 * size, dtype)
        arena.fill(wide.offset, values)
        spec = Spec(wide.offset, (size,), (2,))
        if len(shapes[k]) == 2:
            spec = Spec(wide.offset, shapes[k], (2 * shapes[k][1], 2))
        params[k] = spec.numpy(arena)
        ref_params[k] = torch.nn.Parameter(spec.torch(arena.ref_t))
    elif corruption == "same_param_twice" and n >= 2 and shapes[0] == shapes[1]:
        params[1] = params[0]
        ref_params[1] = torch.nn.Parameter(p_specs[0].torch(arena.ref_t))
    elif corruption == "shared_state" and slots and n >= 2 and shapes[0] == shapes[1]:
        for slot in slots:
            states[slot][1] = states[slot][0]
            ref_states[1][slot] = ref_states[0][slot]
    elif corruption == "grad_is_param":  # in place: the gradient is read before the update
        grads[i] = params[i]
        ref_grads[i] = ref_params[i].detach().clone()
    else:
        corruption = "none"
    note(f"corruption: {corruption} at {i}")
    everything = [params, grads, steps, *states.values()]
    before = ([[array_bytes(a) for a in lst] for lst in everything], arena.buf.tobytes(),
              steps_arena.buf.tobytes())
    try:
        skipped = functional_step(algo, params, grads, states, steps, options, **extra,
                                  backend=backend)
    except CLEAR as e:
        assert str(e), f"{type(e).__name__} without a message"
        assert arena.guards_intact() and steps_arena.guards_intact(), "a guard element changed"
        after = ([[array_bytes(a) for a in lst] for lst in everything], arena.buf.tobytes(),
                 steps_arena.buf.tobytes())
        assert after == before, f"the failed call changed something: {e}"
        note(f"refused: {type(e).__name__}: {e}")
        event(f"refused: {corruption}")
        return
    assert corruption not in MUST_RAISE, f"{corruption}: the call succeeded"
    event(f"stepped as torch: {corruption}")
    assert arena.guards_intact() and steps_arena.guards_intact(), "a guard element changed"
    # the reference: torch.optim over the mirror, with the same states and steps
    name, ref_cls = CLASSES[algo]
    with torch.no_grad():
        ref = ref_cls([{"params": [p]} for p in ref_params], foreach=False, **options)
    ref.state.clear()
    for p, g, s in zip(ref_params, ref_grads, ref_states):
        p.grad = g
        if s:
            ref.state[p] = s
    values = [g.detach().double() for g in ref_grads]
    expect_skip = any(not torch.isfinite(v).all() for v in values) and (
        extra["skip_nonfinite"] or extra["max_grad_norm"] is not None)
    if not expect_skip:
        if extra["max_grad_norm"] is not None:
            norm = math.sqrt(sum(float((v * v).sum()) for v in values))
            coef = min(1.0, extra["max_grad_norm"] / (norm + 1e-6))
            for p, v in zip(ref_params, values):
                p.grad = (v * coef).to(p.dtype)
        ref.step()
        if algo == "sgd":  # torch's SGD keeps no step count: advance the mirror's as ours
            for t in t_specs:
                steps_arena.mirror[t.offset] += 1
    assert bool(skipped) == expect_skip
    wrong = arena.mismatch(TOLERANCE[dtype.name])
    assert wrong is None, wrong
    if steps_arena is not arena:
        wrong = steps_arena.mismatch(0.0)
        assert wrong is None, f"step counts: {wrong}"


@settings(FUZZ, max_examples=6)
@given(data=st.data())
@pytest.mark.parametrize("corruption", MUST_RAISE + MAY_SUCCEED)
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_functional_step_fuzz(backend, corruption, data):
    """Random functional calls over arena views with one corruption: a clear error that
    changes nothing (always, for the corruptions that must be refused), or torch.optim's
    result; guards intact."""
    run_functional_fuzz(backend, corruption, data)
