"""The command line every benchmark script shares: one child process per run, rows written as runs finish.

A script describes its runs (names, modes, how to measure one) in a :class:`Benchmark` and calls ``main``:

    python benchmarks/<script>.py --out FILE [--quick] [--runs NAME ...] [--threads N]

Each run is measured in a fresh interpreter (the script again, with ``--single NAME``), so its peak RSS is its
own and no run inherits another's allocator state or thread pool. The result file is rewritten after every run,
so an interrupted benchmark keeps what it finished. ``--runs`` measures a subset and merges it into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, metadata, read_results, write_results


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_child(script: Path, name: str, mode: str, threads: int) -> dict[str, Any]:
    """Measure one run in a fresh interpreter; its output is shown only if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        cmd = [sys.executable, str(script), "--single", name, "--mode", mode, "--row-file", str(row_file),
               "--threads", str(threads)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"run {name!r} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads(row_file.read_text(encoding="utf-8"))


def merged_meta(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The header of a file that ``--runs`` updates: the first command stays, later ones are listed as updates.

    Rows of different modes in one file would make one table mix settings, so that is refused.
    """
    old = read_results(out)["meta"]
    if old.get("mode") not in (None, meta["mode"]):
        raise SystemExit(f"--out {out} holds {old['mode']!r} rows; a {meta['mode']!r} run cannot merge into it "
                         "(choose another --out, or omit --runs to overwrite it)")
    if not old:
        return meta
    update = {"date": meta["date"], "command": meta["command"]}
    return {**meta, "date": old.get("date", meta["date"]), "command": old.get("command", meta["command"]),
            "updates": [*old.get("updates", []), update]}


@dataclass
class Benchmark:
    """What a benchmark script measures.

    Args:
        name: recorded in the file header (``benchmark``).
        script: the script's own path (children re-run it).
        run_names: every run the script knows, in table order.
        modes: mode -> the runs it measures by default (None: every run); must contain ``full`` and ``quick``.
        measure: ``(run name, mode) -> row`` (runs in the child process).
        describe: one progress line for a finished row.
        settings: mode -> the settings recorded in the header.
        threads: default torch threads per run.
        header: more fields for the file header (model, sequence length, ...).
    """

    name: str
    script: Path
    run_names: Callable[[], Sequence[str]]
    modes: Mapping[str, Sequence[str] | None]
    measure: Callable[[str, str], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    settings: Callable[[str], dict[str, Any]]
    threads: int = 2
    header: dict[str, Any] = field(default_factory=dict)
    spawn: Callable[[Path, str, str, int], dict[str, Any]] = run_child  # tests swap in a stand-in

    def selected_runs(self, mode: str, requested: Sequence[str] | None) -> list[str]:
        known = list(self.run_names())
        names = list(requested or self.modes[mode] or known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; allowed: {known}")
        return names

    def drive(self, out: Path, mode: str, requested: Sequence[str] | None, threads: int | None = None) -> int:
        threads = self.threads if threads is None else threads
        names = self.selected_runs(mode, requested)
        set_threads(threads)  # before metadata(), which records the thread count the runs use
        merge = requested is not None  # a subset updates the file; the whole set replaces it
        meta = metadata(benchmark=self.name, mode=mode, **self.header, settings=self.settings(mode))
        if merge:
            meta = merged_meta(out, meta)
        rows, failures = [], 0
        with Timer() as total:
            for i, name in enumerate(names, 1):
                try:
                    row = self.spawn(self.script, name, mode, threads)
                except RuntimeError as error:
                    failures += 1
                    print(f"[{i}/{len(names)}] {error}", file=sys.stderr, flush=True)
                    continue
                rows.append(row)
                write_results(out, rows, meta, merge_key=("run",) if merge else None)
                print(f"[{i}/{len(names)}] {name}: {self.describe(row)}", file=sys.stderr, flush=True)
        print(f"{len(rows)} run(s) in {total.seconds:.0f} s -> {out}", file=sys.stderr)
        return 1 if failures else 0

    def parse_args(self, argv: Sequence[str] | None = None, doc: str | None = None) -> argparse.Namespace:
        parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--quick", action="store_true", help="small settings, to check the script")
        parser.add_argument("--out", type=Path, help="result JSON file")
        parser.add_argument("--runs", nargs="+", metavar="NAME",
                            help=f"only these runs (merged into --out): {', '.join(self.run_names())}")
        parser.add_argument("--threads", type=int, default=self.threads, metavar="N",
                            help=f"torch threads per run (default {self.threads})")
        # Internal: what the driver passes to each child process.
        parser.add_argument("--single", help=argparse.SUPPRESS)
        parser.add_argument("--mode", choices=sorted(self.modes), help="settings (default full; --quick = quick)")
        parser.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)
        args = parser.parse_args(argv)
        if args.single is None and args.out is None:
            parser.error("--out is required")
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: allowed: a positive int")
        return args

    def main(self, argv: Sequence[str] | None = None, doc: str | None = None) -> int:
        args = self.parse_args(argv, doc)
        if args.single is not None:
            set_threads(args.threads)
            row = self.measure(args.single, args.mode or "full")
            args.row_file.write_text(json.dumps(row, default=str), encoding="utf-8")
            return 0
        return self.drive(args.out, "quick" if args.quick else (args.mode or "full"), args.runs, args.threads)
