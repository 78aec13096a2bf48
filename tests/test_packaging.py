"""The CUDA sources ship inside the wheel and are found from an installed wheel too."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpunn import cuda

ROOT = Path(__file__).resolve().parent.parent


def test_sources_found_in_a_checkout():
    assert cuda.kernel_dir() == ROOT / "kernels"
    assert '#include "' not in cuda.source("activations")


@pytest.mark.slow
def test_wheel_ships_and_finds_the_kernel_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("gpunn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for source in (ROOT / "kernels").iterdir():
        assert f"gpunn/kernels/{source.name}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import gpunn.cuda as c; print(c.kernel_dir()); "
         "print(all(len(c.source(f)) > 1000 for f in ('activations', 'softmax')))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(site / "gpunn" / "kernels"), "True"]
