"""The gpunn command: `gpunn bench activations` end to end, argument errors, the help
screens (built without kernel code), where results go."""

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


def _env() -> dict:
    """The environment of a subprocess running this checkout's gpunn."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_bench_activations_subprocess(tmp_path):
    env = _env()
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


def test_help_imports_no_kernel_code():
    """Every --help answers from the parser alone: no Numba, torch, kernels or trainer (a
    subprocess: a clean interpreter; what is imported is counted, not timed)."""
    code = (
        "import sys\n"
        "from gpunn import cli\n"
        "for argv in (['--help'], ['train', '--help'], ['bench', '--help'],\n"
        "             ['bench', 'activations', '--help'], ['bench', 'train', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('numba', 'torch', 'scipy', 'sklearn', 'matplotlib', 'cupy', 'gpunn.ops',\n"
        "         'gpunn.train', 'gpunn.nn', 'gpunn.optim')\n"
        "under = tuple(h + '.' for h in heavy)\n"
        "print('LOADED', sorted(m for m in sys.modules if m in heavy or m.startswith(under)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "LOADED []", proc.stdout.splitlines()[-1]


def test_bench_help_lists_whole_first_sentences(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, module in cli.SUITES.items():
        sentence = cli.first_sentence(cli.suite_doc(module))
        assert sentence.endswith("."), (name, sentence)
        assert f"{name} {sentence}" in text, (name, sentence)
    assert cli.first_sentence("One line\ngoes on. Then more.\n\nNext.") == "One line goes on."


def test_suite_options_come_with_the_suite_named(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "activations", "--help"])
    assert "--softmax-cols" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "dropout", "--softmax-cols", "256"])
    assert e.value.code == 2
    assert "--softmax-cols" in capsys.readouterr().err


def test_bench_writes_into_the_working_folder_by_default(tmp_path, monkeypatch, capsys):
    """A user's run writes ./gpunn-bench-results/, never into the package; --repo-results
    is the maintainers' way into bench/results/ (exclusive with --out)."""
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["bench", "activations", *TINY, "--ops", "relu", "--directions", "forward"])
    assert rc == 0
    assert len(list((tmp_path / "gpunn-bench-results").glob("activations-cpu-*.json"))) == 1
    assert f"results: {tmp_path / 'gpunn-bench-results'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "activations", "--repo-results", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--repo-results" in capsys.readouterr().err


def test_cuda_without_cupy_names_the_install_command(monkeypatch, capsys):
    from gpunn import backend

    monkeypatch.setattr(backend, "has_cupy", lambda: False)
    for argv, option in ((["train", "--backend", "cuda"], "--backend"),
                         (["bench", "activations", "--device", "cuda", *TINY], "--device")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {option}" in err and 'pip install "gpunn[cuda13]"' in err, err
        assert "gpunn[cuda12]" in err and "sees none" not in err


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
