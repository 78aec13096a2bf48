"""The gpunn command: `gpunn bench activations` end to end, and argument errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpunn import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--quick", "--sizes", "1K", "--softmax-cols", "256", "--softmax-total", "1K", "--quiet"]


def _results(folder: Path) -> dict:
    files = sorted(folder.glob("activations-cpu-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_bench_activations_main(tmp_path, capsys):
    rc = cli.main(["bench", "activations", *TINY, "--ops", "sigmoid,softmax",
                   "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "results: " in out and str(tmp_path) in out
    for word in ("sigmoid", "softmax", "gpunn cpu", "torch", "limit", "GB/s", "vs torch"):
        assert word in out
    data = _results(tmp_path)
    assert {r["op"] for r in data["records"]} == {"sigmoid", "softmax"}
    assert data["options"]["quick"] is True
    assert all(r["status"] == "ok" for r in data["records"])


def test_bench_activations_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "gpunn.cli", "bench", "activations", *TINY, "--ops", "relu",
         "--directions", "forward", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "results: " in proc.stdout
    data = _results(tmp_path)
    assert [(r["op"], r["direction"]) for r in data["records"]] == [("relu", "forward")] * 4


@pytest.mark.parametrize("args, name", [
    (["--sizes", "lots"], "--sizes"),
    (["--sizes", "0"], "--sizes"),
    (["--ops", "sigmoid,nope"], "--ops"),
    (["--device", "tpu"], "--device"),
    (["--dtypes", "int8"], "--dtypes"),
    (["--time-budget", "-1"], "--time-budget"),
    (["--softmax-cols", "x"], "--softmax-cols"),
    (["--directions", "sideways"], "--directions"),
    (["--no-such-option"], "--no-such-option"),
])
def test_bad_arguments_exit_2_naming_the_argument(args, name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "activations", *args])
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_missing_command_or_suite(capsys):
    for argv in ([], ["bench"], ["bench", "nosuch"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert "nosuch" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_an_argument_error(capsys):
    from gpunn import backend

    if backend.cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "activations", "--device", "cuda", *TINY])
    assert e.value.code == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("args, name", [
    (["--seed", "-1"], "--seed"),
    (["--seed", "1.5"], "--seed"),
    (["--depth", "-1"], "--depth"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--label-smoothing", "nan"], "--label-smoothing"),
    (["--warmup-epochs", "x"], "--warmup-epochs"),
    (["--epochs", "0"], "--epochs"),
])
def test_train_bad_arguments_exit_2_naming_the_option(args, name, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args, "--out", str(tmp_path / "run"), "--quiet"])
    assert e.value.code == 2
    assert f"argument {name}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bench_negative_seed_names_the_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "activations", "--seed", "-1", *TINY])
    assert e.value.code == 2
    assert "argument --seed: must be >= 0" in capsys.readouterr().err
