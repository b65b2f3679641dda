"""Regenerate the README's result tables from the benchmark JSON files.

    python benchmarks/render_readme.py            # rewrite every table in README.md
    python benchmarks/render_readme.py --check    # exit 1 if README.md differs from what the JSON files give
    python benchmarks/render_readme.py --readme /tmp/README.md --results pruning=benchmarks/results/pruning_quick.json

The README holds one marker pair per table, ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->``; everything
between them is generated, so hand edits there are lost. A table is registered in ``TABLES`` with its
result file and how to turn its rows into cells; adding a benchmark means adding one entry.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see benchmarks/pruning.py

from benchmarks.common import REPO_ROOT, atomic_write_text, read_results  # noqa: E402

MARKER = re.compile(r"<!-- table:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL)
OPENING = re.compile(r"<!-- (/?)table:([\w-]+) -->")
DASH = "—"


@dataclass(frozen=True)
class Table:
    results: str  # JSON file, relative to the repository root
    headers: tuple[str, ...]
    cells: Callable[[dict], list[str]]  # one row dict -> its cells, in header order
    sort_key: Callable[[dict], Any]
    caption: Callable[[dict, list[dict]], str]  # (meta, rows) -> one line under the table
    producer: str  # the command that writes ``results``, shown while there are none


# -- pruning ---------------------------------------------------------------------------------------
PRUNING_METHODS = ("dense", "magnitude", "wanda", "barber_wanda", "sparsegpt", "barber_sparsegpt")
PRUNING_PATTERNS = (None, "unstructured", "2:4", "4:8")


def _number(value: Any, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def pruning_cells(row: dict) -> list[str]:
    dense = row["method"] == "dense"
    return [row["method"], row.get("pattern") or DASH, f"{100 * row['sparsity']:.1f}%", _number(row["ppl"], 2),
            DASH if dense else _number(row["seconds"], 1), _number(row.get("peak_rss_mb"), 0),
            _number(row.get("forward_seconds"), 2)]


def _order(values: tuple, value: Any) -> int:
    return values.index(value) if value in values else len(values)


def pruning_sort_key(row: dict) -> tuple:
    # Dense first, then grouped by pattern so each initial method sits next to its Barber rebuild.
    return (row["method"] != "dense", _order(PRUNING_PATTERNS, row.get("pattern")),
            _order(PRUNING_METHODS, row["method"]), row["method"])


def pruning_caption(meta: dict, rows: list[dict]) -> str:
    modes = sorted({r.get("mode", "?") for r in rows})
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    calib = f"calibration {settings.get('nsamples', '?')} × {settings.get('calib_seqlen', '?')} tokens"
    evaluation = f"evaluation {settings.get('eval_windows', '?')} windows of {meta.get('eval_seqlen', '?')}"
    where = (f"{machine.get('cpu_count', '?')} CPUs, {machine.get('threads', '?')} threads, "
             f"torch {machine.get('torch', '?')}")
    return (f"_Mode {'/'.join(modes)}: {meta.get('model', '?')}, {calib}, {evaluation} (wiki-leads); sparsity of the "
            f"decoder linears{barber_note(rows)}; forward s = one no-grad forward over the calibration windows, "
            f"batch 1; times on {where}; {_dates(meta, rows)}, `{meta.get('command', '?')}`._")


def _dates(meta: dict, rows: list[dict]) -> str:
    """The day(s) the rows were measured (several when ``--runs`` re-measured some later)."""
    days = sorted({str(r.get("date") or meta.get("date", "?"))[:10] for r in rows})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def barber_note(rows: list[dict]) -> str:
    """The LLM-Barber settings of the rebuilt rows, grouped: they differ by initial method and pattern."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        if row.get("barber"):
            key = (row["method"], row.get("barber_granularity"), row.get("barber_threshold"))
            groups.setdefault(key, []).append(row.get("pattern") or DASH)
    parts = [f"{method} {granularity} τ={threshold} ({', '.join(patterns)})"
             for (method, granularity, threshold), patterns in groups.items()]
    return f"; LLM-Barber: {'; '.join(parts)}" if parts else ""


TABLES: dict[str, Table] = {
    "pruning": Table(
        results="benchmarks/results/pruning.json",
        headers=("method", "pattern", "sparsity", "ppl", "compression s", "peak RSS MB", "forward s"),
        cells=pruning_cells, sort_key=pruning_sort_key, caption=pruning_caption,
        producer="python benchmarks/pruning.py --out benchmarks/results/pruning.json"),
}


# -- rendering -------------------------------------------------------------------------------------
def markdown_table(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_table(table: Table, results: Path) -> str:
    """The text between a table's markers: the table and its caption, or a note while there are no rows."""
    payload = read_results(results)
    rows = sorted(payload["rows"], key=table.sort_key)
    if not rows:
        return f"\n_No results yet: run `{table.producer}`, then `python benchmarks/render_readme.py`._\n"
    body = markdown_table(table.headers, [table.cells(r) for r in rows])
    return f"\n{body}\n\n{table.caption(payload['meta'], rows)}\n"


def check_markers(text: str) -> None:
    """Unpaired or unknown markers would silently leave a table stale; refuse them."""
    opened: list[str] = []
    for closing, name in OPENING.findall(text):
        if name not in TABLES:
            raise ValueError(f"README marker table:{name} names no registered table; allowed: {sorted(TABLES)}")
        if not closing:
            if opened:
                raise ValueError(f"README marker table:{name} is nested inside table:{opened[-1]}")
            opened.append(name)
        elif not opened or opened.pop() != name:
            raise ValueError(f"README marker /table:{name} closes no open table:{name}")
    if opened:
        raise ValueError(f"README marker table:{opened[-1]} is never closed by <!-- /table:{opened[-1]} -->")


def render(text: str, results: dict[str, Path]) -> str:
    """``text`` with every marked table regenerated; ``results`` maps table names to their JSON files."""
    check_markers(text)

    def replace(match: re.Match) -> str:
        name = match["name"]
        return f"<!-- table:{name} -->{render_table(TABLES[name], results[name])}<!-- /table:{name} -->"

    return MARKER.sub(replace, text)


def result_paths(overrides: list[str]) -> dict[str, Path]:
    """Each table's JSON file: the registered one under the repository, or ``NAME=PATH`` from the command line."""
    paths = {name: REPO_ROOT / table.results for name, table in TABLES.items()}
    for item in overrides:
        name, sep, path = item.partition("=")
        if not sep or name not in TABLES:
            raise SystemExit(f"--results {item!r}: expected NAME=PATH with NAME one of {sorted(TABLES)}")
        paths[name] = Path(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--results", action="append", default=[], metavar="NAME=PATH",
                        help="read table NAME from PATH instead of its registered file")
    parser.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        fresh = render(text, result_paths(args.results))
    except ValueError as error:
        print(f"{args.readme}: {error}", file=sys.stderr)
        return 2
    if args.check:
        if fresh != text:
            same = " ".join(a for a in (sys.argv[1:] if argv is None else argv) if a != "--check")
            print(f"{args.readme} is stale: run python benchmarks/render_readme.py {same}".rstrip(), file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        atomic_write_text(args.readme, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
