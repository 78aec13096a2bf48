"""The benchmark harness: timing, bandwidth, result records, the JSON file and the table.

A suite module keeps what is its own (cases, contenders, bytes formulas, its own options) and
takes the rest from here: :func:`option` and :func:`names_type` for its options, a
:class:`Runner` (the time budget, the progress lines, the records) for its cases, and
:func:`run_suite` for its ``run()`` (the device, GPU readiness, an interrupted run's record,
:func:`finalize`). :class:`GpuArrays`, :func:`device_f32` and the other GPU helpers give the
suites their device inputs and compare device outputs.

    options   sizes and names on the command line, the options every suite takes
    timing    policies, host timing in rounds, CUDA-event timing (and ``default_clock``)
    records   Record, Contender, the error check, GB/s, the fraction of the limit, trust
    limits    the CPU limit kernels and the GPU copy limit
    runner    run_contenders, Runner (the time budget), run_suite
    gpu       device arrays in every dtype, bfloat16 bits, the usual GPU contenders
    machine   where results go; machine, versions, git commit
    report    the JSON file and the table

CuPy and torch are imported only when a GPU or torch contender asks for them.
"""

from .gpu import (GpuArrays, device_f32, free_gpu_memory, gpu_contenders, gpu_ready, itemsize,
                  natives)
from .limits import cpu_limit, cuda_copy_limit
from .machine import checkout_results_dir, checkout_root, cpu_model, default_results_dir, gpu_info
from .options import (Options, format_shape, format_size, names_type, option, parse_names,
                      parse_size, selected, selected_dtypes, selected_sizes)
from .records import CHECK_TOLERANCE, ROLES, Contender, Record, finalize, passes, rel_err
from .report import print_table, write_json
from .runner import Runner, _short, failed_check, host_array, run_contenders, run_suite
from .timing import (CPU_POLICY, QUICK_POLICY, Policy, Timing, time_cpu,
                     time_cpu_interleaved)

__all__ = [
    "CHECK_TOLERANCE", "CPU_POLICY", "Contender", "GpuArrays", "Options", "Policy",
    "QUICK_POLICY", "ROLES", "Record", "Runner", "Timing", "checkout_results_dir",
    "checkout_root", "cpu_limit", "cpu_model", "cuda_copy_limit", "default_results_dir",
    "device_f32", "failed_check", "finalize", "format_shape", "format_size", "free_gpu_memory",
    "gpu_contenders", "gpu_info", "gpu_ready", "host_array", "itemsize", "names_type",
    "natives", "option", "parse_names", "parse_size", "passes", "print_table", "rel_err",
    "run_contenders", "run_suite", "selected", "selected_dtypes", "selected_sizes", "time_cpu",
    "time_cpu_interleaved", "write_json",
]
