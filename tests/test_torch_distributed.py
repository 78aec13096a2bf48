"""gpunn.torch on torch.distributed, two gloo processes on the CPU:

- SyncBatchNorm (and SyncBatchNormReLU): two processes on halves of a batch match one process
  on the whole batch (outputs, input gradients, summed weight gradients, running statistics
  and counter over two steps, momentum 0.1 and None, NCHW and channels_last), with one
  collective per layer in each direction;
- the optimizers under DistributedDataParallel and ZeroRedundancyOptimizer equal torch.optim's
  under the same wrappers;
- FSDP2 (fully_shard, DTensor parameters): the step runs on the local shards and
  max_grad_norm clips by the norm over all shards of all ranks, as torch.optim after
  clip_grad_norm_ on the DTensors.

Each scenario group runs once in a pair of spawned processes (module-scoped fixture)."""

import pytest
import torch

import gpunn.torch as gt
from gloo_ranks import run_worker

WORKER = r'''
import sys, traceback
import torch
import torch.distributed as dist
from gloo_ranks import join, spawn_two


def syncbn(rank, world, check):
    import gpunn.torch as gt
    calls = {"all_gather_into_tensor": 0, "all_reduce": 0}
    for name in calls:
        original = getattr(dist, name)
        def counted(*a, _name=name, _f=original, **k):
            calls[_name] += 1
            return _f(*a, **k)
        setattr(dist, name, counted)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 3, 4, 4, generator=g) * 3 + 5 for _ in range(2)]
    dys = [torch.randn(8, 3, 4, 4, generator=g) for _ in range(2)]
    w0, b0 = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    for relu in (False, True):
        for momentum in (0.1, None):
            for layout in ("nchw", "channels_last"):
                name = f"syncbn relu={relu} momentum={momentum} {layout}"
                sync = (gt.nn.SyncBatchNormReLU if relu else gt.nn.SyncBatchNorm)(
                    3, momentum=momentum)
                ref = (gt.nn.BatchNormReLU2d if relu else gt.nn.BatchNorm2d)(3, momentum=momentum)
                for m in (sync, ref):
                    with torch.no_grad():
                        m.weight.copy_(w0)
                        m.bias.copy_(b0)
                half = slice(4 * rank, 4 * rank + 4)
                for x, dy in zip(xs, dys):
                    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                    xl = x[half].contiguous(memory_format=fmt).requires_grad_()
                    xf = x.clone().requires_grad_()
                    before = dict(calls)
                    y = sync(xl)
                    gathers = calls["all_gather_into_tensor"] - before["all_gather_into_tensor"]
                    y.backward(dy[half])
                    reduces = calls["all_reduce"] - before["all_reduce"]
                    yr = ref(xf)
                    yr.backward(dy)
                    check(name, (gathers, reduces) == (1, 1), f"collectives {gathers}, {reduces}")
                    check(name, torch.allclose(y, yr[half], rtol=1e-4, atol=1e-5), "y")
                    check(name, torch.allclose(xl.grad, xf.grad[half], rtol=1e-4, atol=1e-5), "dx")
                grads = torch.cat([sync.weight.grad, sync.bias.grad])
                dist.all_reduce(grads)
                check(name, torch.allclose(grads, torch.cat([ref.weight.grad, ref.bias.grad]),
                                           rtol=1e-4, atol=1e-4), "dweight, dbias")
                for b, c in zip(sync.buffers(), ref.buffers()):
                    check(name, torch.allclose(b.float(), c.float(), rtol=1e-5, atol=1e-6),
                          "running statistics")
                print(f"{name} done", flush=True)  # one write: two ranks share the pipe


def optimizers(rank, world, check):
    import gpunn.torch as gt
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def model():
        torch.manual_seed(0)
        # the last bias has one element: rank 1's FSDP2 shard of it is empty
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                                   torch.nn.Tanh(), torch.nn.Linear(3, 1))

    def run(wrap, make_opt, steps=3):
        m = wrap(model())
        opt = make_opt(list(m.parameters()))
        g = torch.Generator().manual_seed(10 + rank)
        for _ in range(steps):
            opt.zero_grad()
            m(torch.randn(5, 6, generator=g)).pow(2).mean().backward()
            opt.step()
        return m

    def same(name, a, b, wrap, tol=1e-5):
        """The updates (from the same initial weights) agree."""
        local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).detach()
        for p, q, s in zip(a.parameters(), b.parameters(), wrap(model()).parameters()):
            p, q, s = local(p), local(q), local(s)
            err = float((p - q).norm() / (q - s).norm()) if q.numel() else 0.0
            check(name, err <= tol, f"relative error {err:.3g}")

    ddp = lambda m: DDP(m)
    same("ddp", run(ddp, lambda ps: gt.Adam(ps, lr=1e-2, weight_decay=0.1)),
         run(ddp, lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, foreach=False)), ddp)
    same("zero", run(ddp, lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=gt.AdamW, lr=1e-2)),
         run(ddp, lambda ps: ZeroRedundancyOptimizer(ps, optimizer_class=torch.optim.AdamW, lr=1e-2,
                                                     foreach=False)), ddp)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        check("fsdp2", True, "")
        print("fsdp2 unavailable", flush=True)
        return

    def fsdp(m):
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(m)
        return m

    class Clipped:
        def __init__(self, opt, params, norm):
            self.opt, self.params, self.norm = opt, list(params), norm
        def zero_grad(self):
            self.opt.zero_grad()
        def step(self):
            torch.nn.utils.clip_grad_norm_(self.params, self.norm)
            self.opt.step()

    m = fsdp(model())
    opt = gt.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(5, 6)).sum().backward()
    opt.step()
    for p in m.parameters():  # the states are the shards' size; the step wrote the shard itself
        check("fsdp2 states", opt.state[p]["exp_avg"].shape == p.to_local().shape, "shape")
        check("fsdp2 memory", gt.optim._local(p).data_ptr() == p.to_local().data_ptr(), "view")
    same("fsdp2", run(fsdp, lambda ps: gt.AdamW(ps, lr=1e-2)),
         run(fsdp, lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)), fsdp)
    for algo in ("SGD", "Adam"):
        kw = dict(lr=0.05, momentum=0.9) if algo == "SGD" else dict(lr=1e-2)
        same(f"fsdp2 max_grad_norm {algo}",
             run(fsdp, lambda ps: getattr(gt, algo)(ps, max_grad_norm=0.05, **kw)),
             run(fsdp, lambda ps: Clipped(getattr(torch.optim, algo)(ps, foreach=False, **kw), ps, 0.05)),
             fsdp)


def rank_main(rank, world, port, scenario, results):
    join(rank, world, port)
    failures = []
    def check(name, ok, what):
        if not ok:
            failures.append(f"{name}: {what}")
    try:
        globals()[scenario](rank, world, check)
        results.put((rank, failures))
    except BaseException:
        results.put((rank, ["error: " + traceback.format_exc()]))
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    got = spawn_two(rank_main, sys.argv[1])
    for rank, failures in got:
        for f in failures:
            print(f"rank {rank} FAILED {f}")
    print("ranks", [r for r, _ in got], "failures", sum(len(f) for _, f in got))
'''


def _available():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _run(tmp_path_factory, scenario):
    _available()
    return run_worker(tmp_path_factory.mktemp(scenario), WORKER, scenario, timeout=600)


@pytest.fixture(scope="module")
def syncbn_run(tmp_path_factory):
    return _run(tmp_path_factory, "syncbn")


@pytest.fixture(scope="module")
def optim_run(tmp_path_factory):
    return _run(tmp_path_factory, "optimizers")


def _assert_clean(proc, names):
    out = proc.stdout
    detail = f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0 and "ranks [0, 1] failures 0" in out, detail
    for name in names:
        assert f"FAILED {name}" not in out, detail


def test_sync_batch_norm_two_processes_match_one(syncbn_run):
    _assert_clean(syncbn_run, ["syncbn"])
    assert syncbn_run.stdout.count(" done") == 2 * 8  # 8 cases on each rank


def test_optimizers_under_ddp_zero_and_fsdp2(optim_run):
    _assert_clean(optim_run, ["ddp", "zero", "fsdp2"])


def test_sync_batch_norm_without_process_group_is_batch_norm():
    """No process group (or eval mode): the plain batch norm, as torch's SyncBatchNorm."""
    torch.manual_seed(0)
    sync, plain = gt.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert list(sync.state_dict()) == list(torch.nn.SyncBatchNorm(4).state_dict())


def test_convert_sync_batchnorm_keeps_tensors_and_fusion():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3),
                                torch.nn.ReLU(), torch.nn.BatchNorm2d(3))
    gt.patch(model)
    weight = model[1].weight
    model = gt.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is gt.nn.SyncBatchNormReLU and model[1].weight is weight
    assert type(model[3]) is gt.nn.SyncBatchNorm
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(
        torch.nn.BatchNorm1d(5)))
    assert [s.after for s in gt.patch(plain)] == [gt.nn.SyncBatchNorm]
    assert [s.after for s in gt.unpatch(model)] == [torch.nn.SyncBatchNorm, torch.nn.ReLU,
                                                   torch.nn.SyncBatchNorm]


def test_merge_statistics_is_the_whole_batch():
    from gpunn.torch.distributed import merge_statistics

    x = torch.randn(10, 3, dtype=torch.float64) * 5 + 1e4
    parts = [x[:3], x[3:]]
    counts = torch.tensor([[3.0] * 3, [7.0] * 3], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2s = torch.stack([p.var(0, correction=0) * len(p) for p in parts])
    n, mean, m2 = merge_statistics(counts, means, m2s)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2 / n, x.var(0, correction=0))


