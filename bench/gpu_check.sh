#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU tests and the GPU benchmarks in one command, for the lent GPU
# machine (no network, nothing installed: runs from this source tree with PYTHONPATH=.).
#
#   bench/gpu_check.sh [OUTDIR]        OUTDIR defaults to $OUT, else ./gpu-check-<UTC stamp>
#
# Steps, each under its own `timeout` so that one hang cannot eat the budget (the limits add
# up to just under 10 minutes; an H100 normally needs far less):
#   1. nvidia-smi
#   2. versions of python, numpy, numba, cupy, torch, ml_dtypes and the device CuPy sees
#   3. python3 -m pytest -m gpu -q tests            (JUnit XML: OUTDIR/gpu-tests.xml)
#   4. gpunn train --backend cuda: the main job on the GPU (OUTDIR/train-cuda/metrics.json)
#   5. gpunn bench SUITE --device cuda for each suite in BENCH_SUITES
#      (JSON: OUTDIR/SUITE-cuda-*.json)
# Everything printed also goes to OUTDIR/gpu_check.log. The exit status is that of the first
# failing step (0 when all passed). BENCH_SUITES lists suite:seconds pairs; each suite stops
# starting new cases after its seconds and, if interrupted, still writes what it measured.
# Commit the JSON under bench/results/.

set -u -o pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${1:-${OUT:-$ROOT/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
PY=${PYTHON:-python3}
BENCH_SUITES=${BENCH_SUITES:-"train:40 optim:35 batchnorm:35 activations:25 losses:25 dropout:15 augment:15"}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$LOG"

status=0
# step NAME SECONDS COMMAND...: run under timeout (SIGINT first, so Python can write its
# results, then SIGKILL 15 s later), tee to the log, remember the first failure.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
    return 0
}

step nvidia-smi 15 nvidia-smi
step versions 30 "$PY" - <<'EOF'
import platform, importlib, importlib.metadata
print("python", platform.python_version(), platform.platform())
for name in ("numpy", "numba", "llvmlite", "scipy", "cupy", "torch", "ml_dtypes", "rich"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", None)
              or importlib.metadata.version(name))
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, e)
try:
    import cupy
    d = cupy.cuda.Device()
    p = cupy.cuda.runtime.getDeviceProperties(d.id)
    print("device", p["name"].decode(), "cc", d.compute_capability,
          "SMs", d.attributes["MultiProcessorCount"], "L2", d.attributes["L2CacheSize"],
          "runtime", cupy.cuda.runtime.runtimeGetVersion(),
          "driver", cupy.cuda.runtime.driverGetVersion())
except Exception as e:
    print("cupy device: FAILED", type(e).__name__, e)
try:
    import torch
    print("torch cuda", torch.version.cuda, torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as e:
    print("torch cuda: FAILED", type(e).__name__, e)
EOF
step gpu-tests 170 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
    --junitxml="$OUTDIR/gpu-tests.xml"
step gpu-train 50 "$PY" -m gpunn.cli train --backend cuda --quiet --out "$OUTDIR/train-cuda"
for entry in $BENCH_SUITES; do
    suite=${entry%%:*} budget=${entry##*:}
    step "gpu-bench-$suite" $((budget + 20)) "$PY" -m gpunn.cli bench "$suite" --device cuda \
        --out "$OUTDIR" --time-budget "$budget"
done

echo "=== gpu_check: exit $status; files in $OUTDIR:" | tee -a "$LOG"
ls -l "$OUTDIR" | tee -a "$LOG"
exit "$status"
