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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see benchmarks/pruning.py

from benchmarks import tables_compression as compression  # noqa: E402
from benchmarks import tables_grpo as grpo  # noqa: E402
from benchmarks.common import REPO_ROOT, atomic_write_text, read_results  # noqa: E402
from benchmarks.table_format import Table, markdown_table  # noqa: E402

MARKER = re.compile(r"<!-- table:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL)
OPENING = re.compile(r"<!-- (/?)table:([\w-]+) -->")

TABLES: dict[str, Table] = {**compression.TABLES, **grpo.TABLES}


# -- rendering -------------------------------------------------------------------------------------
def render_table(table: Table, results: Path) -> str:
    """The text between a table's markers: the table and its caption, or a note while there are no rows."""
    payload = read_results(results)
    rows = payload["rows"] if table.regroup is None or not payload["rows"] else table.regroup(payload["rows"])
    rows = sorted(rows, key=table.sort_key)
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
