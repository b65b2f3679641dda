"""Pruning benchmark: SmolLM2-135M-Instruct pruned by each method and pattern, perplexity on wiki-leads.

    python benchmarks/pruning.py --out benchmarks/results/pruning.json                 # full: 16 runs
    python benchmarks/pruning.py --quick --out benchmarks/results/pruning_quick.json   # 3 runs, < 10 min on 2 CPUs
    python benchmarks/pruning.py --out benchmarks/results/pruning.json --runs wanda-2of4   # re-measure, merge
    python benchmarks/pruning.py --mode sweep --out benchmarks/results/pruning_sweep.json   # LLM-Barber tau/granularity

Every run is a fresh child process (``benchmarks/driver.py``), so its peak RSS is its own and no run
inherits another's allocator state. Rows are written after each run, so an interrupted benchmark keeps what
it finished. ``python benchmarks/render_readme.py`` turns the full file into the README table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Settings, measure_compression  # noqa: E402
from benchmarks.driver import Benchmark  # noqa: E402

MODEL = "smollm2-135m-instruct"
EVAL_SEQLEN = 512
METHODS = ("magnitude", "wanda", "sparsegpt", "barber_wanda", "barber_sparsegpt")
PATTERNS: dict[str, dict[str, Any]] = {
    "unstructured": {"sparsity_type": "unstructured", "sparsity": 0.5},
    "2:4": {"sparsity_type": "2:4"},
    "4:8": {"sparsity_type": "4:8"},
}


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
    # LLM-Barber's threshold and granularity on Wanda's 50% unstructured mask, at the full table's sizes.
    "sweep": Settings(nsamples=16, calib_seqlen=512, eval_windows=32, runs=None),
}
# The sweep's settings (granularity, τ); the full table's Wanda and Barber(output1, τ = 0.01) rows are its references.
SWEEP = (("output1", 0.05), ("output1", 0.1), ("layer", 0.05), ("block", 0.05))


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
    for granularity, threshold in SWEEP:
        kwargs = {"method": "wanda", **PATTERNS["unstructured"], "barber": True, "barber_granularity": granularity,
                  "barber_threshold": threshold}
        specs[f"barber_wanda-unstructured-{granularity}-t{threshold}"] = RunSpec("barber_wanda", "unstructured", kwargs)
    return specs


def mode_runs(mode: str) -> tuple[str, ...] | None:
    """The runs a mode measures by default (None: the full table's, i.e. every run outside the sweep)."""
    if mode == "sweep":  # its references, Wanda and τ = 0.01, are the full table's rows
        return tuple(f"barber_wanda-unstructured-{g}-t{t}" for g, t in SWEEP)
    return MODES[mode].runs or tuple(n for n in run_specs() if n.count("-") <= 1)


# -- one run (in the child process) ----------------------------------------------------------------
def measure(name: str, mode: str) -> dict[str, Any]:
    """Load the model, prune it through ``Trainer.validate`` and measure; returns one result row."""
    from callbacks.pruning.callback import Pruning

    spec = run_specs()[name]
    fields, report = measure_compression(
        lambda calibration: None if spec.callback_kwargs is None else Pruning(
            **spec.callback_kwargs, calibration=calibration, progress=False),
        MODEL, MODES[mode], EVAL_SEQLEN)
    return {"run": name, "mode": mode, "method": spec.method, "pattern": spec.pattern,
            "sparsity": report["summary"]["sparsity"] if report else 0.0, **fields, **_barber_fields(spec)}


def _barber_fields(spec: RunSpec) -> dict[str, Any]:
    kwargs = spec.callback_kwargs or {}
    barber = bool(kwargs.get("barber"))
    return {"barber": barber, "barber_granularity": kwargs.get("barber_granularity") if barber else None,
            "barber_threshold": kwargs.get("barber_threshold") if barber else None}


# -- the driver (benchmarks/driver.py) ---------------------------------------------------------------
def describe(row: dict[str, Any]) -> str:
    return (f"ppl {row['ppl']:.2f}, sparsity {row['sparsity']:.3f}, compression {row['seconds']:.1f} s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB, run {row['wall_seconds']:.0f} s")


BENCHMARK = Benchmark(
    name="pruning", script=Path(__file__).resolve(), run_names=lambda: list(run_specs()),
    modes={mode: mode_runs(mode) for mode in MODES}, measure=measure, describe=describe,
    settings=lambda mode: MODES[mode].header(),
    header={"model": MODEL, "eval_seqlen": EVAL_SEQLEN})

if __name__ == "__main__":
    sys.exit(BENCHMARK.main(doc=__doc__))
