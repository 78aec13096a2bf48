"""What a suite's options hold and how they are read: sizes, names, the common options."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Callable

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)\s*$")
_UNIT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'1M' -> 1048576, '4k' -> 4096, '1000' -> 1000 (K, M, G are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use a count such as 1000, 64K, 16M)")
    n = int(m.group(1)) * _UNIT[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"sizes must be positive, got {text!r}")
    return n


def parse_names(text: str, choices, what: str) -> list[str]:
    """'a, b' -> ['a', 'b'], each one of ``choices``; ValueError naming the unknown ones."""
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in names if s not in choices]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; "
                         f"choose from {', '.join(choices)}")
    return names


def format_size(n: int) -> str:
    """The inverse of parse_size where exact: 16777216 -> '16M'; else the plain count."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_shape(shape) -> str:
    shape = tuple(shape)
    return format_size(shape[0]) if len(shape) == 1 else "x".join(str(s) for s in shape)


DEVICES = ("cpu", "cuda", "all")


@dataclass
class Options:
    """What every suite takes; a suite's ``Options`` adds its own fields. All optional: the
    CLI's namespace has the same attributes, None where an option is not given."""

    device: str = "cpu"  # cpu | cuda | all
    sizes: list[int] | None = None  # elements (each suite says of what)
    dtypes: list[str] | None = None
    quick: bool = False
    seed: int = 0
    time_budget: float | None = None  # seconds; cases after it are skipped
    progress: bool = True  # progress lines on stderr


def option(options, name: str, default=None):
    """``options.name``, or ``default`` where it is missing or None (the CLI's namespace holds
    None for every option not given)."""
    value = getattr(options, name, None)
    return default if value is None else value


def names_type(choices, what: str) -> Callable[[str], list[str]]:
    """An argparse ``type``: 'a,b' -> ['a', 'b'] by :func:`parse_names`, its error as an
    ArgumentTypeError."""

    def parse(text: str) -> list[str]:
        try:
            return parse_names(text, choices, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def selected(options, name: str, choices) -> list:
    """The choices option ``name`` names (all when it is not set), in the order of ``choices``."""
    chosen = option(options, name) or choices
    return [c for c in choices if c in chosen]


def selected_dtypes(options, default, can) -> list[str]:
    """The ``dtypes`` option (else ``default``), less those the device cannot run (``can``)."""
    return [d for d in (option(options, "dtypes") or default) if d in can]


def selected_sizes(options, default) -> list[int]:
    """The ``sizes`` option, else the sizes ``default`` spells ('1M', ...)."""
    return option(options, "sizes") or [parse_size(s) for s in default]


def case_label(base: dict) -> str:
    """A case's progress label from its record fields: 'relu forward 1M float32 (cpu)'."""
    return (f"{base['op']} {base['direction']} {format_shape(base['shape'])} {base['dtype']} "
            f"({base['device']})")
