"""The ``gpunn`` command.

    gpunn train [--data digits|FILE.npz|MNIST_DIR] [--epochs 40] [--batch-size 64] [--lr 3e-3]
                [--width 256] [--depth 2] [--seed 0] [--ensemble K] [--backend cpu|numpy|cuda]
                [--out DIR] [--resume] [--find-lr] ...

``gpunn train`` trains the MLP of :mod:`gpunn.train` (BatchNorm, ReLU, dropout, augmentation,
fused AdamW with a warm-up cosine schedule) and writes metrics.json, curves.png and
checkpoints into ``--out``; ``--find-lr`` runs the learning-rate range test instead.

    gpunn bench activations [--device cpu|cuda|all] [--sizes 1M,16M] [--dtypes float32]
                            [--ops sigmoid,relu,...] [--quick] [--out DIR] [--time-budget S]

``gpunn bench SUITE`` runs one benchmark suite (the suites are listed in
``gpunn.bench.SUITES``), prints a table and writes the JSON results to
``bench/results/`` of the checkout (``./gpunn-bench-results/`` outside one, or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .bench import SUITES

DEVICES = ("cpu", "cuda", "all")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def _sizes(text: str) -> list[int]:
    from .bench.harness import parse_size

    try:
        sizes = [parse_size(s) for s in str(text).split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"no sizes in {text!r}")
    return sizes


def _dtypes(text: str) -> list[str]:
    from .bench.harness import parse_names

    try:
        return parse_names(text, DTYPES, "dtype(s)")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind):
    """An argparse type: a number of ``kind`` (int or float) that must be > 0."""
    return _bounded(kind, 0, strict=True)


def _nonnegative(kind):
    """An argparse type: a number of ``kind`` (int or float) that must be >= 0."""
    return _bounded(kind, 0, strict=False)


def _bounded(kind, low, strict: bool):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (value > low if strict else value >= low):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got "
                                             f"{text!r}")
        return value
    return parse


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every bench suite takes."""
    parser.add_argument("--device", choices=DEVICES,
                        help="where to run: cpu, cuda, or all (default: all where CuPy sees a "
                             "CUDA device, else cpu)")
    parser.add_argument("--sizes", type=_sizes, metavar="N[,N...]",
                        help="array sizes in elements, e.g. 1M,16M (K/M/G are powers of 1024)")
    parser.add_argument("--dtypes", type=_dtypes, metavar="DTYPE[,DTYPE...]",
                        help="element types (default float32 on the CPU, float32,bfloat16 on "
                             "the GPU); a device skips those it cannot run")
    parser.add_argument("--quick", action="store_true",
                        help="one warm-up and 3 repetitions per contender (for tests)")
    parser.add_argument("--out", metavar="DIR",
                        help="where to write the JSON (default bench/results/ of the checkout, "
                             "else ./gpunn-bench-results/)")
    parser.add_argument("--no-json", dest="json", action="store_false",
                        help="print the table only")
    parser.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                        help="stop starting new cases after this long (the rest are reported "
                             "as skipped)")
    parser.add_argument("--seed", type=_nonnegative(int), default=0,
                        help="random seed of the inputs")
    parser.add_argument("--quiet", dest="progress", action="store_false",
                        help="no progress lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpunn", description=(
        "Fused training kernels for NumPy, CuPy and PyTorch arrays."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(commands)
    bench = commands.add_parser("bench", help="run a benchmark suite",
                                description="Run a benchmark suite: a table, and JSON results.")
    suites = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module_name in SUITES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or name).strip()
        sub = suites.add_parser(name, help=doc.splitlines()[0], description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(sub)
        if hasattr(module, "add_arguments"):
            module.add_arguments(sub)
        sub.set_defaults(handler=_bench, module=module_name, parser=sub)
    return parser


def _bench(args) -> int:
    from .bench import harness

    from . import backend

    module = importlib.import_module(args.module)
    if args.device is None:
        args.device = "all" if backend.cuda_device_count() > 0 else "cpu"
    if args.device == "cuda":
        if not backend.has_cupy():
            args.parser.error("argument --device: cuda needs CuPy, which is not installed")
        if backend.cuda_device_count() == 0:
            args.parser.error("argument --device: cuda needs a CUDA device, and CuPy sees none")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = module.run(args)
    title = f"gpunn bench {args.suite} ({args.device}; {harness.cpu_model()})"
    if any(r.device == "cuda" for r in records):
        gpu = harness.gpu_info() or {}
        title = f"gpunn bench {args.suite} ({args.device}; {gpu.get('name', 'GPU')})"
    harness.print_table(records, title=title)
    if args.json:
        options = {k: v for k, v in vars(args).items()
                   if k not in ("handler", "parser", "module")}
        path = harness.write_json(records, args.suite, args.device, args.out, options=options,
                                  notes=[f"command: {' '.join(sys.argv)}",
                                         f"load average at start: {load_start}"])
        print(f"results: {path}")
    interrupted = any(r.note == "interrupted" and r.status == "skipped" for r in records)
    return 130 if interrupted else 0


def add_train_parser(commands) -> None:
    from .train import AugmentConfig, TrainConfig

    d, a = TrainConfig(), AugmentConfig()
    train = commands.add_parser(
        "train", help="train the digits MLP (the main job)",
        description="Train an MLP (Linear-BatchNorm-ReLU-Dropout blocks) with fused AdamW, a "
                    "warm-up cosine schedule and fused random-affine augmentation; print test "
                    "accuracy and time per epoch; write metrics.json, curves.png and "
                    "checkpoints to --out.")
    train.add_argument("--data", default=None, metavar="SPEC",
                       help="digits (default: scikit-learn's 8x8 digits, 25%% stratified "
                            "hold-out), an .npz with x and y, or a folder / prefix of MNIST IDX "
                            "files (train-images-idx3-ubyte[.gz], ...; t10k-* as the test set)")
    train.add_argument("--epochs", type=_positive(int), default=d.epochs)
    train.add_argument("--batch-size", type=_positive(int), default=d.batch_size)
    train.add_argument("--lr", type=_positive(float), default=d.lr, help="peak learning rate")
    train.add_argument("--weight-decay", type=_nonnegative(float), default=d.weight_decay)
    train.add_argument("--width", type=_positive(int), default=d.width, help="hidden units")
    train.add_argument("--depth", type=_nonnegative(int), default=d.depth,
                       help="hidden layers")
    train.add_argument("--dropout", type=float, default=d.dropout)
    train.add_argument("--label-smoothing", type=_nonnegative(float),
                       default=d.label_smoothing)
    train.add_argument("--warmup-epochs", type=_nonnegative(float), default=d.warmup_epochs)
    train.add_argument("--no-augment", dest="augment", action="store_false",
                       help=f"no random affine warp (default: rotation +-{a.degrees:g} deg, "
                            f"shift +-{a.translate:g}, zoom +-{a.scale:g}, stretch "
                            f"+-{a.stretch:g}, shear +-{a.shear:g} deg)")
    train.add_argument("--seed", type=_nonnegative(int), default=d.seed,
                       help="weights, batch order, dropout and augmentation draws")
    train.add_argument("--ensemble", type=_positive(int), default=d.ensemble,
                       help="train K members (seeds seed..seed+K-1) and average their softmax")
    train.add_argument("--backend", dest="device", choices=("cpu", "numpy", "cuda"),
                       help="cpu (Numba), numpy (reference) or cuda (CuPy); default: cuda "
                            "where a GPU is visible, else cpu")
    train.add_argument("--out", default="gpunn-train", metavar="DIR",
                       help="output folder (default ./gpunn-train)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints in --out")
    train.add_argument("--find-lr", action="store_true",
                       help="run the learning-rate range test (log scale) instead of training: "
                            "print loss against lr and plot it to DIR/lr-range.png")
    train.add_argument("--quiet", dest="progress", action="store_false",
                       help="no progress bar or per-epoch lines")
    train.set_defaults(handler=_train, parser=train)


def _train(args) -> int:
    from . import train as training

    try:
        config = training.TrainConfig(
            data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, width=args.width, depth=args.depth,
            dropout=args.dropout, warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            augment=training.AugmentConfig() if args.augment else None, seed=args.seed,
            ensemble=args.ensemble, device=args.device)
    except (ValueError, RuntimeError) as e:
        args.parser.error(str(e))
    try:
        if args.find_lr:
            result = training.find_lr(config, args.out)
            print(result.table())
            print(f"plot: {os.path.join(args.out, 'lr-range.png')}")
            return 0
        result = training.train(config, args.out, resume=args.resume, progress=args.progress)
    except (OSError, ValueError, KeyError) as e:
        print(f"gpunn train: error: {e}", file=sys.stderr)
        return 1
    print(training.summary(result))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}, "
          f"{os.path.join(args.out, 'curves.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
