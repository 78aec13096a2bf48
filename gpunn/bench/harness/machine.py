"""Where results go, and what a result records of its run: machine, versions, git commit."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

def checkout_root() -> Path | None:
    """The source checkout gpunn runs from, if it runs from one (not an installed wheel)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and (root / "gpunn" / "__init__.py").is_file():
        return root
    return None


def default_results_dir() -> Path:
    """./gpunn-bench-results/: a user's run never writes into the package it runs from."""
    return Path.cwd() / "gpunn-bench-results"


def checkout_results_dir() -> Path | None:
    """bench/results/ of the source checkout gpunn runs from (where the README's tables come
    from: ``gpunn bench --repo-results``), or None when it runs from an installed package."""
    root = checkout_root()
    return root / "bench" / "results" if root else None


def git_commit(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout, or (None, None) outside one."""
    root = root or checkout_root()
    if root is None:
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return commit.stdout.strip(), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict | None:
    """The current CUDA device as CuPy sees it, or None without CuPy or a device."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        return {
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "device_id": dev.id,
            "compute_capability": dev.compute_capability,
            "sm_count": dev.attributes.get("MultiProcessorCount"),
            "l2_cache_bytes": dev.attributes.get("L2CacheSize"),
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        }
    except Exception as e:  # no driver, no device
        return {"error": f"{type(e).__name__}: {e}"}


def machine_info(gpu: bool = False) -> dict:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "hostname": platform.node(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    import numba  # here, not at the top: `gpunn --help` imports the harness

    info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    if gpu:
        info["gpu"] = gpu_info()
    return info


def _dist_version(module: str) -> str | None:
    if module in sys.modules and getattr(sys.modules[module], "__version__", None):
        return str(sys.modules[module].__version__)
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    for dist in metadata.packages_distributions().get(module, [module]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for module in ("numpy", "numba", "llvmlite", "scipy", "torch", "cupy", "ml_dtypes", "rich"):
        out[module] = _dist_version(module)
    try:
        from importlib import metadata

        import gpunn

        out["gpunn"] = getattr(gpunn, "__version__", None) or metadata.version("gpunn")
    except Exception:
        out["gpunn"] = None
    return out
