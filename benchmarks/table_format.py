"""What every README table shares: the ``Table`` record, number and date formatting, the markdown grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DASH = "—"


@dataclass(frozen=True)
class Table:
    results: str  # JSON file, relative to the repository root
    headers: tuple[str, ...]
    cells: Callable[[dict], list[str]]  # one row dict -> its cells, in header order
    sort_key: Callable[[dict], Any]
    caption: Callable[[dict, list[dict]], str]  # (meta, rows) -> one line under the table
    producer: str  # the command that writes ``results``, shown while there are none
    regroup: Callable[[list[dict]], list[dict]] | None = None  # rows -> table rows (a pivot), before sorting


def number(value: Any, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def order(values: tuple, value: Any) -> int:
    return values.index(value) if value in values else len(values)


def setup(meta: dict) -> tuple[str, str, str]:
    """A caption's calibration size, evaluation size and machine, from a result file's header."""
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    calib = f"calibration {settings.get('nsamples', '?')} × {settings.get('calib_seqlen', '?')} tokens"
    evaluation = f"evaluation {settings.get('eval_windows', '?')} windows of {meta.get('eval_seqlen', '?')}"
    where = (f"{machine.get('cpu_count', '?')} CPUs, {machine.get('threads', '?')} threads, "
             f"torch {machine.get('torch', '?')}")
    return calib, evaluation, where


def dates(meta: dict, rows: list[dict]) -> str:
    """The day(s) the rows were measured (several when ``--runs`` re-measured some later)."""
    days = sorted({str(r.get("date") or meta.get("date", "?"))[:10] for r in rows})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def markdown_table(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
