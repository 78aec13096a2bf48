"""The results: the JSON file (records with machine, versions, commit) and the table."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .machine import default_results_dir, git_commit, machine_info, versions
from .options import format_shape
from .records import MAX_FRACTION, MAX_SPREAD, Record

def results_path(suite: str, device: str, out_dir: str | os.PathLike | None = None) -> Path:
    """``<out_dir>/<suite>-<device>-<UTC timestamp>.json``, never overwriting a file."""
    d = Path(out_dir) if out_dir is not None else default_results_dir()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = d / f"{suite}-{device}-{stamp}.json"
    i = 1
    while path.exists():
        path = d / f"{suite}-{device}-{stamp}-{i}.json"
        i += 1
    return path


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def write_json(records: list[Record], suite: str, device: str,
               out_dir: str | os.PathLike | None = None, options: dict | None = None,
               notes: list[str] | None = None) -> Path:
    """Write the records with machine, versions and git commit; returns the file's path."""
    path = results_path(suite, device, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    payload = {
        "suite": suite,
        "device": device,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine_info(gpu=device in ("cuda", "all")
                                or any(r.device == "cuda" for r in records)),
        "versions": versions(),
        "options": _jsonable(options or {}),
        "notes": list(notes or []),
        "records": [r.to_dict() for r in records],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)
    return path


_STATUS_STYLE = {"ok": "green", "wrong": "bold red", "error": "bold red", "skipped": "yellow"}
#: Distrusted timings listed by name under the table (the rest are counted).
SHOW_DISTRUSTED = 10


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def print_table(records: list[Record], title: str | None = None, console=None,
                show_limit: bool = True) -> None:
    """A rich table: op, dir, size, dtype, impl, ms (median), min-max ms, GB/s, % of limit,
    speed-up vs torch and the check (relative error against the reference); notes are listed
    under the table, and a warning for the timings marked ``!`` (see :func:`distrust`)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: don't squeeze the table into 80 columns
            console = Console(width=150)
    table = Table(title=title, header_style="bold", pad_edge=False)
    for name, justify in (("op", "left"), ("dir", "left"), ("size", "right"),
                          ("dtype", "left"), ("impl", "left"), ("ms", "right"),
                          ("min-max ms", "right"), ("GB/s", "right"), ("% limit", "right"),
                          ("vs torch", "right"), ("check", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    notes: dict[str, int] = {}
    skipped = [r for r in records if r.status == "skipped"]
    previous = None
    for r in records:
        if r.status == "skipped" or (r.role == "limit" and not show_limit):
            continue
        key = r.key()
        if previous is not None and key != previous:
            table.add_section()
        first = key != previous
        previous = key
        check = r.status.upper() if r.status != "ok" else "ok"
        if r.error is not None:
            check += f" {r.error:.0e}"
        if r.note:
            check += f" [{notes.setdefault(r.note, len(notes) + 1)}]"
        style = "dim" if r.role == "limit" else ("bold" if r.role == "gpunn" else None)
        speedup = _fmt(r.speedup_vs_torch, ".2f") + ("x" if r.speedup_vs_torch else "")
        spread = (f"{_fmt(r.min_s, '.3f', 1e3)}-{_fmt(r.max_s, '.3f', 1e3)}"
                  if r.min_s is not None and r.max_s is not None else "")
        table.add_row(
            r.op if first else "", {"forward": "fwd", "backward": "bwd"}.get(r.direction, r.direction) if first else "",
            format_shape(r.shape) if first else "", r.dtype if first else "",
            r.impl, _fmt(r.median_s, ".3f", 1e3) + ("[bold yellow]![/]" if r.distrust else ""),
            spread, _fmt(r.gbps, ".1f"), _fmt(r.frac_of_limit, ".0f", 100), speedup,
            f"[{_STATUS_STYLE.get(r.status, '')}]{check}[/]", style=style)
    console.print(table)
    for note, i in notes.items():
        console.print(f"[{i}] {note}", markup=False, highlight=False)
    if skipped:
        reasons = sorted({r.note or "skipped" for r in skipped})
        console.print(f"[yellow]{len(skipped)} case(s) not run: {'; '.join(reasons)}[/]")
    shaky = [r for r in records if r.distrust]
    if shaky:
        console.print(f"[bold yellow]warning: {len(shaky)} timing(s) marked ! are not to be "
                      f"trusted (a spread over {100 * MAX_SPREAD:.0f}% of the median, or over "
                      f"{100 * MAX_FRACTION:.0f}% of the limit): the machine was busy; rerun "
                      f"when it is quiet.[/]")
        for r in shaky[:SHOW_DISTRUSTED]:
            console.print(f"  ! {r.op} {r.direction} {format_shape(r.shape)} {r.dtype} {r.impl}: "
                          f"{r.distrust}", markup=False, highlight=False)
        if len(shaky) > SHOW_DISTRUSTED:
            console.print(f"  ... and {len(shaky) - SHOW_DISTRUSTED} more (the JSON has each "
                          f"one's 'distrust')", markup=False, highlight=False)
    bad = [r for r in records if r.status in ("wrong", "error")]
    if bad:
        console.print(f"[bold red]{len(bad)} result(s) flagged WRONG or ERROR "
                      "(see the check column)[/]")
