"""A small CNN in PyTorch on gpunn's kernels, against the same model in plain PyTorch.

The model is torch's (Conv2d, MaxPool2d, Linear) with BatchNorm2d, ReLU and Dropout; the
gpunn run patches it (``gpunn.torch.patch``: BatchNorm2d + ReLU fused into one op, gpunn
dropout keeping no mask, gpunn cross-entropy) and trains it with ``gpunn.torch.AdamW``; the
plain run keeps torch's modules and ``torch.optim.AdamW``. Both start from the same weights and
see the same batches, each augmented by gpunn's fused random affine warp
(``gpunn.ops.augment``). Prints test accuracy and seconds per epoch of both runs.

    python examples/torch_cnn.py                      # scikit-learn's 8x8 digits
    python examples/torch_cnn.py --data ~/mnist       # a folder of MNIST IDX files
    python examples/torch_cnn.py --epochs 3 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

import gpunn.torch as gt
from gpunn import ops
from gpunn.data import batches, load, stratified_split


def make_model(channels: int, size: int, classes: int) -> torch.nn.Sequential:
    """Conv-BN-ReLU twice, pooled, then dropout and a linear classifier."""
    nn = torch.nn
    pooled = size // 2
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * pooled * pooled, classes))


def augmented(x: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """gpunn's fused augmentation of a batch: rotation, shift and zoom, per sample."""
    return ops.augment(x, seed, offset, degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1))


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                   for i in range(0, len(x), batch_size))
    model.train()
    return hits / len(x)


def train(model, optimizer, loss_fn, data, epochs: int, batch_size: int, seed: int, name: str):
    """(accuracy after each epoch, seconds of each epoch)."""
    x, y, tx, ty = data
    accs, times = [], []
    for epoch in range(epochs):
        sync(x)
        t0 = time.perf_counter()
        offset = 0
        total = 0.0
        for idx in batches(len(x), batch_size, shuffle=True, seed=seed, epoch=epoch):
            idx = torch.from_numpy(idx).to(x.device)
            xb = augmented(x[idx], seed + epoch, offset)
            offset += len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        sync(x)
        times.append(time.perf_counter() - t0)
        accs.append(accuracy(model, tx, ty))
        print(f"  {name:6s} epoch {epoch + 1}: loss {total / len(x):.4f}, test accuracy "
              f"{accs[-1]:.4f}, {times[-1]:.2f} s")
    return accs, times


def sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="digits (default) or an IDX folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_set, test_set = load(args.data)
    if test_set is None:
        train_set, test_set = stratified_split(train_set, 0.25, args.seed)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(args.device)  # noqa: E731
    data = (as_tensor(train_set.x), as_tensor(train_set.y), as_tensor(test_set.x),
            as_tensor(test_set.y))
    channels, size = train_set.sample_shape[0], train_set.sample_shape[-1]
    print(f"{train_set.name}: {len(train_set)} training and {len(test_set)} test samples of "
          f"{train_set.sample_shape}, {train_set.num_classes} classes, on {args.device}")

    torch.manual_seed(args.seed)
    plain = make_model(channels, size, train_set.num_classes).to(args.device)
    patched = copy.deepcopy(plain)
    swapped = gt.patch(patched)
    loss_fn = torch.nn.CrossEntropyLoss()
    gpunn_loss = copy.deepcopy(loss_fn)
    swapped += gt.patch(gpunn_loss)
    print("patched: " + ", ".join(f"{s.name or 'loss'} {s.before.__name__} -> "
                                  f"{s.after.__name__}" for s in swapped))

    runs = {}
    for name, model, opt_class, criterion in (
            ("gpunn", patched, gt.AdamW, gpunn_loss),
            ("torch", plain, torch.optim.AdamW, loss_fn)):
        torch.manual_seed(args.seed)
        optimizer = opt_class(model.parameters(), lr=args.lr, weight_decay=1e-4)
        runs[name] = train(model, optimizer, criterion, data, args.epochs, args.batch_size,
                           args.seed, name)

    print(f"\n{'':8s}{'test accuracy':>14s}{'s / epoch':>12s}  (median of the epochs "
          "after the first)")
    for name, (accs, times) in runs.items():
        steady = times[1:] or times
        print(f"{name:8s}{accs[-1]:14.4f}{float(np.median(steady)):12.3f}")


if __name__ == "__main__":
    main()
