"""Pruning benchmark: SmolLM2-135M-Instruct pruned by each method and pattern, perplexity on wiki-leads.

    python benchmarks/pruning.py --out benchmarks/results/pruning.json                 # full: 16 runs
    python benchmarks/pruning.py --quick --out benchmarks/results/pruning_quick.json   # 3 runs, < 10 min on 2 CPUs
    python benchmarks/pruning.py --out benchmarks/results/pruning.json --runs wanda-2of4   # re-measure, merge

Every run is a fresh child process (this script with ``--single``), so its peak RSS is its own and no
run inherits another's allocator state. Rows are written after each run, so an interrupted benchmark keeps
what it finished. ``python benchmarks/render_readme.py`` turns the full file into the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Timer, compress_and_evaluate, metadata, now_iso, peak_rss_mb, read_results, write_results)

MODEL = "smollm2-135m-instruct"
EVAL_SEQLEN = 512
METHODS = ("magnitude", "wanda", "sparsegpt", "barber_wanda", "barber_sparsegpt")
PATTERNS: dict[str, dict[str, Any]] = {
    "unstructured": {"sparsity_type": "unstructured", "sparsity": 0.5},
    "2:4": {"sparsity_type": "2:4"},
    "4:8": {"sparsity_type": "4:8"},
}


@dataclass(frozen=True)
class Settings:
    nsamples: int
    calib_seqlen: int
    eval_windows: int
    runs: tuple[str, ...] | None  # None: every run


MODES = {
    # The README table. The configs in configs/prune/ calibrate on 64 windows of 512 tokens; on 2 CPU cores
    # the 16 runs at that size take about 5 hours (LLM-Barber: one backward pass per sample and block), so
    # the table uses 16 calibration windows of 512 and 32 evaluation windows of 512 (16,384 tokens).
    "full": Settings(nsamples=16, calib_seqlen=512, eval_windows=32, runs=None),
    # The acceptance protocol of the pruning issue: 50% unstructured, 128 x 512 calibration tokens.
    "calib128": Settings(nsamples=128, calib_seqlen=512, eval_windows=32,
                         runs=("dense", "magnitude-unstructured", "wanda-unstructured", "barber_wanda-unstructured")),
    # For checking the script, not for the README; sized to stay inside 10 minutes on 2 (shared) CPU cores.
    # LLM-Barber's per-sample backward passes cost about the same for short windows, so nsamples is the lever.
    "quick": Settings(nsamples=4, calib_seqlen=128, eval_windows=4,
                      runs=("dense", "wanda-unstructured", "barber_wanda-unstructured")),
}


@dataclass(frozen=True)
class RunSpec:
    method: str  # "dense" or one of METHODS
    pattern: str | None  # None for dense
    callback_kwargs: dict[str, Any] | None  # Pruning(**kwargs); None for dense


def barber_options(init: str, pattern: str) -> dict[str, Any]:
    """LLM-Barber settings of the shipped configs: they differ by initial method and, for SparseGPT, pattern."""
    if init == "wanda":
        return {"barber": True, "barber_granularity": "output1", "barber_threshold": 0.01}
    granularity = "layer" if pattern == "unstructured" else "output1"
    return {"barber": True, "barber_granularity": granularity, "barber_threshold": 0.1}


def run_specs() -> dict[str, RunSpec]:
    """Every run by name: ``dense`` and ``<method>-<unstructured|2of4|4of8>``."""
    specs = {"dense": RunSpec("dense", None, None)}
    for pattern, pattern_kwargs in PATTERNS.items():
        for method in METHODS:
            init = method.removeprefix("barber_")
            kwargs = {"method": init, **pattern_kwargs}
            if method != init:
                kwargs.update(barber_options(init, pattern))
            specs[f"{method}-{pattern.replace(':', 'of')}"] = RunSpec(method, pattern, kwargs)
    return specs


# -- one run (in the child process) ----------------------------------------------------------------
def measure(name: str, mode: str) -> dict[str, Any]:
    """Load the model, prune it through ``Trainer.validate`` and measure; returns one result row."""
    from callbacks.pruning.callback import Pruning

    spec, settings = run_specs()[name], MODES[mode]
    run = compress_and_evaluate(
        lambda calibration: None if spec.callback_kwargs is None else Pruning(
            **spec.callback_kwargs, calibration=calibration, progress=False),
        MODEL, settings.nsamples, settings.calib_seqlen, EVAL_SEQLEN, settings.eval_windows)
    report = run["report"]
    return {"run": name, "mode": mode, "method": spec.method, "pattern": spec.pattern,
            "sparsity": report["summary"]["sparsity"] if report else 0.0, "ppl": run["ppl"],
            "seconds": report["seconds"] if report else 0.0, "peak_rss_mb": peak_rss_mb(),
            "forward_seconds": run["forward_seconds"], "wall_seconds": run["wall_seconds"],
            "calib_nsamples": settings.nsamples, "calib_seqlen": settings.calib_seqlen,
            "eval_windows": run["eval_windows"], "eval_seqlen": EVAL_SEQLEN,
            **_barber_fields(spec), "summary": report["summary"] if report else None, "date": now_iso()}


def _barber_fields(spec: RunSpec) -> dict[str, Any]:
    kwargs = spec.callback_kwargs or {}
    barber = bool(kwargs.get("barber"))
    return {"barber": barber, "barber_granularity": kwargs.get("barber_granularity") if barber else None,
            "barber_threshold": kwargs.get("barber_threshold") if barber else None}


# -- the driver (in the parent process) ------------------------------------------------------------
def run_child(name: str, mode: str) -> dict[str, Any]:
    """Measure one run in a fresh interpreter; its output is shown only if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--single", name, "--mode", mode,
               "--row-file", str(row_file)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"run {name!r} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads(row_file.read_text(encoding="utf-8"))


def selected_runs(mode: str, requested: list[str] | None) -> list[str]:
    specs = run_specs()
    names = requested or list(MODES[mode].runs or specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; allowed: {list(specs)}")
    return names


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


def drive(out: Path, mode: str, requested: list[str] | None) -> int:
    names = selected_runs(mode, requested)
    merge = requested is not None  # a subset updates the file; the whole set replaces it
    meta = metadata(benchmark="pruning", mode=mode, model=MODEL, eval_seqlen=EVAL_SEQLEN,
                    settings={k: v for k, v in asdict(MODES[mode]).items() if k != "runs"})
    if merge:
        meta = merged_meta(out, meta)
    rows, failures = [], 0
    with Timer() as total:
        for i, name in enumerate(names, 1):
            try:
                row = run_child(name, mode)
            except RuntimeError as error:
                failures += 1
                print(f"[{i}/{len(names)}] {error}", file=sys.stderr, flush=True)
                continue
            rows.append(row)
            write_results(out, rows, meta, merge_key=("run",) if merge else None)
            print(f"[{i}/{len(names)}] {name}: ppl {row['ppl']:.2f}, sparsity {row['sparsity']:.3f}, "
                  f"compression {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB, "
                  f"run {row['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    print(f"{len(rows)} run(s) in {total.seconds:.0f} s -> {out}", file=sys.stderr)
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings and 3 runs, to check the script")
    parser.add_argument("--out", type=Path, help="result JSON file")
    parser.add_argument("--runs", nargs="+", metavar="NAME", help=f"only these runs (merged into --out): "
                        f"{', '.join(run_specs())}")
    # Internal: what the driver passes to each child process.
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=sorted(MODES), help="settings (default full; --quick = quick)")
    parser.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single is None and args.out is None:
        parser.error("--out is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.single is not None:
        row = measure(args.single, args.mode or "full")
        args.row_file.write_text(json.dumps(row, default=str), encoding="utf-8")
        return 0
    return drive(args.out, "quick" if args.quick else (args.mode or "full"), args.runs)


if __name__ == "__main__":
    sys.exit(main())
