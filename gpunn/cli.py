"""The ``gpunn`` command.

    gpunn train [--data digits|FILE.npz|MNIST_DIR] [--epochs 40] [--batch-size 64] [--lr 3e-3]
                [--width 256] [--depth 2] [--seed 0] [--ensemble K] [--backend cpu|numpy|cuda]
                [--out DIR] [--resume | --overwrite] [--find-lr] ...

``gpunn train`` trains the MLP of :mod:`gpunn.train` (BatchNorm, ReLU, dropout, augmentation,
fused AdamW with a warm-up cosine schedule) and writes config.json, metrics.json, curves.png
and checkpoints into ``--out``; ``--find-lr`` runs the learning-rate range test instead.
Ctrl-C stops it with one line naming the last checkpoint and the command that resumes
(exit status 130).

    gpunn bench activations [--device cpu|cuda|all] [--sizes 1M,16M] [--dtypes float32]
                            [--ops sigmoid,relu,...] [--quick] [--out DIR] [--time-budget S]

``gpunn bench SUITE`` runs one benchmark suite (the suites are listed in
``gpunn.bench.SUITES``), prints a table and writes the JSON results into ``--out``
(default ./gpunn-bench-results/; ``--repo-results`` writes into bench/results/ of the
source checkout, where the README's tables come from).

Building the parser imports no kernel code (no NumPy, Numba or torch): the train options'
defaults come from :mod:`gpunn.train_config`, the suites' descriptions from their modules'
source text, and only the suite named on the command line is imported for its own options.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import re
import shlex
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
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR",
                       help="where to write the JSON (default ./gpunn-bench-results/)")
    where.add_argument("--repo-results", action="store_true",
                       help="write the JSON into bench/results/ of the source checkout gpunn "
                            "runs from (for maintainers: the README's tables cite these)")
    parser.add_argument("--no-json", dest="json", action="store_false",
                        help="print the table only")
    parser.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                        help="start no new case after this long (the rest are reported as "
                             "skipped), and cut a case's repetitions short at the deadline")
    parser.add_argument("--seed", type=_nonnegative(int), default=0,
                        help="random seed of the inputs")
    parser.add_argument("--quiet", dest="progress", action="store_false",
                        help="no progress lines on stderr")


_DOCSTRING = re.compile(r'\s*(?:#[^\n]*\n\s*)*([rRuU]?("""|\'\'\')(?s:.*?)\2)')


def suite_doc(module_name: str) -> str:
    """A suite module's docstring, read from its source without importing it."""
    spec = importlib.util.find_spec(module_name)
    with open(spec.origin, encoding="utf-8") as f:
        match = _DOCSTRING.match(f.read())
    return inspect.cleandoc(ast.literal_eval(match.group(1))) if match else ""


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[:end + 1]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``gpunn`` parser. Only the suite that ``argv`` names after ``bench`` is imported
    (for its own options); the others are listed from their source text."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[1] if len(argv) > 1 and argv[0] == "bench" else None
    parser = argparse.ArgumentParser(prog="gpunn", description=(
        "Fused training kernels for NumPy, CuPy and PyTorch arrays."))
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(commands)
    bench = commands.add_parser("bench", help="run a benchmark suite",
                                description="Run a benchmark suite: a table, and JSON results.")
    suites = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, module_name in SUITES.items():
        doc = suite_doc(module_name) or name
        sub = suites.add_parser(name, help=first_sentence(doc), description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(sub)
        if name == chosen:
            module = importlib.import_module(module_name)
            if hasattr(module, "add_arguments"):
                module.add_arguments(sub)
        sub.set_defaults(handler=_bench, module=module_name, parser=sub)
    return parser


def _bench(args) -> int:
    from . import backend
    from .bench import harness

    module = importlib.import_module(args.module)
    if args.device is None:
        args.device = "all" if backend.cuda_device_count() > 0 else "cpu"
    if args.device == "cuda":
        why = harness.gpu_ready()
        if why is not None:
            args.parser.error(f"argument --device: cuda: {why}")
    out = harness.checkout_results_dir() if args.repo_results else args.out
    if args.repo_results and out is None:
        args.parser.error("argument --repo-results: gpunn does not run from a source checkout "
                          f"({harness.__file__}); use --out DIR")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    records = module.run(args)
    title = f"gpunn bench {args.suite} ({args.device}; {harness.cpu_model()})"
    if any(r.device == "cuda" for r in records):
        gpu = harness.gpu_info() or {}
        title = f"gpunn bench {args.suite} ({args.device}; {gpu.get('name', 'GPU')})"
    harness.print_table(records, title=title)
    if args.json:
        options = {k: v for k, v in vars(args).items()
                   if k not in ("handler", "parser", "module", "argv")}
        path = harness.write_json(records, args.suite, args.device, out, options=options,
                                  notes=[f"command: {' '.join(sys.argv)}",
                                         f"load average at start: {load_start}"])
        print(f"results: {path}")
    interrupted = any(r.note == "interrupted" and r.status == "skipped" for r in records)
    return 130 if interrupted else 0


def add_train_parser(commands) -> None:
    from .train_config import AugmentConfig, TrainConfig

    d, a = TrainConfig(), AugmentConfig()
    train = commands.add_parser(
        "train", help="train the digits MLP (the main job)",
        description="Train an MLP (Linear-BatchNorm-ReLU-Dropout blocks) with fused AdamW, a "
                    "warm-up cosine schedule and fused random-affine augmentation; print test "
                    "accuracy and time per epoch; write config.json, metrics.json, curves.png "
                    "and a checkpoint per member (after every epoch) to --out. Ctrl-C stops "
                    "it and prints the command that resumes.")
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
                       help="output folder (default ./gpunn-train); one that holds a run is "
                            "refused unless --resume or --overwrite")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its checkpoints, with the same "
                            "options (refused when it has no checkpoint)")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run in --out (checkpoints, metrics) and start anew")
    train.add_argument("--find-lr", action="store_true",
                       help="run the learning-rate range test (log scale) instead of training: "
                            "print loss against lr and plot it to DIR/lr-range.png")
    train.add_argument("--quiet", dest="progress", action="store_false",
                       help="no progress bar, per-epoch or compiling lines")
    train.set_defaults(handler=_train, parser=train)


def _train(args) -> int:
    from . import train as training
    from .nn.module import array_module_of
    from .train_config import AugmentConfig, TrainConfig

    parser = args.parser
    if args.device == "cuda":
        try:
            array_module_of("cuda")
        except RuntimeError as e:
            parser.error(f"argument --backend: {e}")
    try:
        config = TrainConfig(
            data=args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, width=args.width, depth=args.depth,
            dropout=args.dropout, warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            augment=AugmentConfig() if args.augment else None, seed=args.seed,
            ensemble=args.ensemble, device=args.device)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    if not args.find_lr:
        try:
            training.check_output(args.out, config, resume=args.resume,
                                  overwrite=args.overwrite)
        except training.RunExists as e:
            parser.error(f"argument --out: {e.folder} already holds a run "
                         f"({', '.join(e.files)}): add --resume to continue it, or "
                         f"--overwrite to delete it and start anew")
        except training.NothingToResume as e:
            parser.error(f"argument --resume: {e}; without --resume a new run starts")
        except ValueError as e:
            parser.error(f"argument --resume: {e}; resume with the same options, or start "
                         f"anew with --overwrite")
    try:
        data = training.datasets(config)
    except (OSError, ValueError) as e:
        print(f"gpunn train: error: argument --data: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpunn train: interrupted while loading the data (nothing saved)",
              file=sys.stderr)
        return 130
    try:
        if args.find_lr:
            result = training.find_lr(config, args.out, data=data)
            print(result.table())
            print(f"plot: {os.path.join(args.out, 'lr-range.png')}")
            return 0
        result = training.train(config, args.out, resume=args.resume, overwrite=args.overwrite,
                                progress=args.progress, log=_say, data=data)
    except training.Interrupted as e:
        print(f"gpunn train: {interrupted_line(e, args.argv)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("gpunn train: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as e:
        print(f"gpunn train: error: {e}", file=sys.stderr)
        return 1
    print(training.summary(result))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}, "
          f"{os.path.join(args.out, 'curves.png')}")
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def interrupted_line(e, argv: list[str]) -> str:
    """One line for Ctrl-C: where the last checkpoint is and the exact command that resumes
    (the command as given, --overwrite dropped, --resume added); with no checkpoint, the
    command that starts again."""
    words = [w for w in argv if w not in ("--overwrite", "--resume")]
    if e.checkpoint is None:
        return f"{e.where()}; start again with: {shlex.join(['gpunn', *words])}"
    return f"{e.where()}; resume with: {shlex.join(['gpunn', *words, '--resume'])}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
