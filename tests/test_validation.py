"""The shared argument checks of gpunn.validation."""

import math

import numpy as np
import pytest

from gpunn.validation import choice, gelu_approximate, integer, real


def test_real_accepts_python_and_numpy_numbers():
    assert real("op", "p", 0.25, 0.0, 1.0) == 0.25
    assert real("op", "p", np.float32(0.5), 0.0, 1.0) == 0.5
    assert real("op", "p", np.int64(1), 0.0, 1.0) == 1.0
    assert type(real("op", "p", 1, 0.0, 1.0)) is float


@pytest.mark.parametrize("value", [True, np.bool_(False), "0.5", None, np.ones(1)])
def test_real_refuses_what_is_not_a_number(value):
    with pytest.raises(TypeError, match=r"op: p must be a real number in \[0, 1\], got"):
        real("op", "p", value, 0.0, 1.0)


@pytest.mark.parametrize("value, kwargs, interval", [
    (1.5, dict(lo=0.0, hi=1.0), r"\[0, 1\]"),
    (math.nan, dict(lo=0.0, hi=1.0), r"\[0, 1\]"),
    (0.0, dict(lo=0.0, lo_open=True), r"\(0, inf\)"),
    (math.inf, dict(lo=0.0), r"\[0, inf\)"),
    (90.0, dict(lo=0.0, hi=90.0, hi_open=True), r"\[0, 90\)"),
    (math.nan, dict(), r"\(-inf, inf\)"),
    (1.0, dict(lo=1.0, lo_open=True, finite=False), r"\(1, inf\]"),
])
def test_real_names_the_interval(value, kwargs, interval):
    with pytest.raises(ValueError, match=rf"^op: x must be in {interval}, got"):
        real("op", "x", value, **kwargs)


def test_real_without_bounds_or_finiteness_takes_every_number():
    assert real("op", "a", math.inf, finite=False) == math.inf
    assert math.isnan(real("op", "a", math.nan, finite=False))
    assert real("op", "a", math.inf, 1.0, lo_open=True, finite=False) == math.inf


def test_integer():
    assert integer(None, "k", np.int32(3), 1) == 3
    with pytest.raises(TypeError, match=r"^k must be an integer in \[1, inf\), got 2.0"):
        integer(None, "k", 2.0, 1)
    with pytest.raises(TypeError, match="must be an integer"):
        integer(None, "k", True, 0)
    with pytest.raises(ValueError, match=r"^op: seed must be in \[0, 2\^64\), got"):
        integer("op", "seed", 1 << 64, 0, 1 << 64, hi_open=True)
    assert integer("op", "seed", (1 << 64) - 1, 0, 1 << 64, hi_open=True) == (1 << 64) - 1


def test_choice_and_gelu_approximate():
    assert choice("op", "reduction", "sum", ("none", "mean", "sum")) == "sum"
    with pytest.raises(ValueError, match=r"reduction must be one of \('none', 'mean', 'sum'\)"):
        choice("op", "reduction", "avg", ("none", "mean", "sum"))
    assert gelu_approximate("gelu", "tanh") == "tanh"
    with pytest.raises(ValueError, match="gelu: approximate must be 'none' or 'tanh', got 'erf'"):
        gelu_approximate("gelu", "erf")
