"""Benchmarks: each suite is a module with ``run(options) -> records`` (and optionally
``add_arguments(parser)`` for its own options), listed in :data:`SUITES`.

Adding a suite is one line here: ``"name": "gpunn.bench.module"``. ``gpunn bench <name>``
then runs it with the common options (device, sizes, dtypes, quick, out, time budget), prints
the table and writes the JSON results (see :mod:`gpunn.bench.harness`).
"""

#: Suite name -> module (imported when the command line is built or the suite is run).
SUITES = {
    "activations": "gpunn.bench.activations",
    "augment": "gpunn.bench.augment",
    "batchnorm": "gpunn.bench.batchnorm",
    "dropout": "gpunn.bench.dropout",
    "losses": "gpunn.bench.losses",
    "optim": "gpunn.bench.optim",
    "torch": "gpunn.bench.torch",
    "train": "gpunn.bench.train",
}
