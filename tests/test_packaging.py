"""The CUDA sources ship inside the wheel and are found from an installed wheel too."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numba
import numpy as np
import pytest

from gpunn import cuda

ROOT = Path(__file__).resolve().parent.parent


def test_sources_found_in_a_checkout():
    assert cuda.kernel_dir() == ROOT / "kernels"
    assert '#include "' not in cuda.source("activations")


@pytest.mark.slow
def test_wheel_ships_and_finds_the_kernel_sources(tmp_path):
    """Build the wheel, install it in a fresh venv (its dependencies lent from this one by a
    .pth line, the checkout kept off the path), and find the sources from outside the checkout."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("gpunn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in (ROOT / "kernels").iterdir():
        assert f"gpunn/kernels/{source.name}" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    deps = {str(Path(m.__file__).parent.parent) for m in (np, numba)}
    (site / "lent_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", "import gpunn.cuda as c; print(c.kernel_dir()); "
         "print(all(len(c.source(f)) > 1000 for f in ('activations', 'softmax')))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(site / "gpunn" / "kernels"), "True"]
