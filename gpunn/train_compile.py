"""The first run's compiling: a notice per Numba kernel compiled, and the backward pass's
kernels compiled in a second process while the trainer compiles the forward's (a cold
``gpunn train`` in about 20 s instead of 70 s on 2 cores; README)."""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from .backend import numba_threads
from .data import Dataset
from .optim import AdamW
from .train_config import TrainConfig
from .trainer import mlp

@contextlib.contextmanager
def compile_notice(say=None, on_first=None):
    """While the block runs, tell when Numba compiles a kernel (its cache is cold: the first
    run, or after an upgrade): one line before the first, then one per kernel with its time,
    and the total; ``say=None``: silent. ``on_first()`` runs as the first compile starts (a
    text it returns is said too)."""
    if say is None and on_first is None:
        yield
        return
    from numba.core import event

    from .cpu_jit import SUFFIX

    say = say or (lambda text: None)

    class Notice(event.Listener):
        def __init__(self):
            self.depth, self.count, self.seconds, self.t0 = 0, 0, 0.0, 0.0

        def on_start(self, ev):
            if self.depth == 0:
                if self.count == 0:
                    say("compiling CPU kernels (first run only: Numba caches them on disk)")
                    note = on_first() if on_first is not None else None
                    if note:
                        say(note)
                self.t0 = time.perf_counter()
            self.depth += 1

        def on_end(self, ev):
            self.depth -= 1
            if self.depth == 0:
                dt = time.perf_counter() - self.t0
                self.count += 1
                self.seconds += dt
                f = ev.data["dispatcher"].py_func
                say(f"  [{self.count}] {f.__module__.removeprefix('gpunn.')}."
                    f"{f.__qualname__.removesuffix(SUFFIX)} {dt:.1f} s")

    notice = Notice()
    with event.install_listener("numba:compile", notice):
        yield
    if notice.count:
        say(f"compiled {notice.count} CPU kernels in {notice.seconds:.1f} s")


def compile_backward_kernels(in_features: int, num_classes: int, width: int, depth: int,
                             dropout: float, lr: float, weight_decay: float) -> None:
    """Compile into Numba's disk cache the CPU kernels of the second half of a training step
    of the job's model (the backward of dropout and batch norm + ReLU, the AdamW step), as
    the trainer calls them (one thread). The forward runs on the NumPy reference, so that
    nothing of the first half compiles here: :func:`backward_compiler` runs this in a second
    process while the trainer compiles the first half."""
    model = mlp(in_features, num_classes, width, depth, dropout, 0).to("numpy")
    x = np.random.default_rng(0).standard_normal((8, in_features), dtype=np.float32)
    logits = model(x)
    model.to("cpu")
    with numba_threads(1):
        model.zero_grad()
        model.backward(np.full_like(logits, 1.0 / logits.size), input_grad=False)
        AdamW(model.parameters(), lr=lr, weight_decay=weight_decay).step()


def backward_compiler_command(args: list) -> list[str]:
    """The command running ``compile_backward_kernels(*args)`` with this very gpunn (loaded
    from its folder, not from whichever the second interpreter's path finds first)."""
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(package, "__init__.py")
    return [sys.executable, "-c", (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpunn', {init!r}, "
        f"submodule_search_locations=[{package!r}])\n"
        "sys.modules['gpunn'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "from gpunn.train_compile import compile_backward_kernels\n"
        f"compile_backward_kernels(*{args!r})\n")]


@contextlib.contextmanager
def backward_compiler(config: TrainConfig, train_set: Dataset):
    """Yields a function that starts :func:`compile_backward_kernels` for this job in a
    second process (once; on the host, with two or more CPUs) and returns a line saying so
    (None when it starts nothing); the process is stopped when the block ends. On a cold cache the trainer calls it as its first kernel compiles: the
    two halves of the step compile side by side (measured: the batch norm backward alone
    is ~10 s of the ~35 s of CPU the job's kernels take to compile)."""
    import subprocess

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    started = []

    def start():
        if started or config.resolved_device() != "cpu" or (cpus or 1) < 2:
            return None
        args = [int(np.prod(train_set.sample_shape)), train_set.num_classes, config.width,
                config.depth, config.dropout, config.lr, config.weight_decay]
        started.append(subprocess.Popen(
            backward_compiler_command(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        return "  (the backward pass's kernels compile in a second process meanwhile)"

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
