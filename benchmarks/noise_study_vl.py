"""Noise study on the multimodal task: phased entropy vs vanilla GRPO on point-in-box grounding, over seeds.

    litforge fit -c configs/sft/tiny_vl_grounding.yaml                                # once: the warm start
    python benchmarks/noise_study_vl.py --out benchmarks/results/noise_study_vl.json   # the grid below
    python benchmarks/noise_study_vl.py --quick --out benchmarks/results/noise_study_vl_quick.json
    python benchmarks/noise_study.py --plot benchmarks/results/noise_study_vl.json     # -> the PNG

A run is ``<method>-p<noise rate>-s<seed>``: the warm-started tiny Qwen2-VL (``tiny-qwen2-vl-grounding``) trained
by GRPO on generated grounding images whose training boxes are corrupted (near miss: a distractor object's box)
at that rate; the settings are those of ``configs/grpo/phased_vl_grounding.yaml``. The seed fixes which labels are
corrupted and the sampling; the images and the clean validation set are the same for every run.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see benchmarks/noise_study.py

from benchmarks.driver import Benchmark  # noqa: E402
from benchmarks.noise_study import LAMBDA, METHODS, Settings, describe, fit_run, run_name  # noqa: E402

MODEL = "tiny-qwen2-vl-grounding"
TASK = "image_grounding"
# The phased schedule with a stronger entropy term: at λ = 0.01 the warm start's entropy does not move (the
# spec's sweep goes to 3e-2; this model needs more).
METHODS_VL = {**METHODS, **{f"phased_lam{lam:g}": {"entropy_schedule": {
    "name": "max_to_min", "lam_max": lam, "lam_min": lam, "switch_frac": 0.8}} for lam in (0.05, 0.2)}}
RATES = (0.0, 0.4, 0.8)
SEEDS = (0, 1, 2, 3, 4)
# One pass over 2400 distinct training images (150 steps × 16 prompts): repeated images get memorised (measured:
# 16 fixed prompts reach train reward 0.95 in 60 steps while clean accuracy falls). 256 validation images: one
# image = 0.004.
VL = Settings(steps=150, val_every=50, num_generations=8, prompts_per_batch=16, max_new_tokens=10,
              learning_rate=1e-4, num_train=2400, num_val=256, model=MODEL, task=TASK, data_seed=2)
MODES: dict[str, tuple[Settings, tuple[str, ...] | None]] = {
    # The paper's method against vanilla GRPO: every rate with seeds 0-2, and two more seeds at 40% noise (the rate
    # the issue asks about); about 2 minutes per run on one core.
    "full": (VL, tuple(run_name(m, r, s) for s in SEEDS for r in RATES for m in ("vanilla", "phased")
                       if s < 3 or r == 0.4)),
    "quick": (Settings(steps=2, val_every=2, num_generations=4, prompts_per_batch=2, max_new_tokens=10,
                       learning_rate=1e-4, num_train=8, num_val=8, model=MODEL, task=TASK, data_seed=2),
              ("phased-p0.4-s0",)),
}


def all_runs() -> list[str]:
    return [run_name(m, r, s) for s in SEEDS for r in RATES for m in METHODS_VL]


def measure(name: str, mode: str) -> dict:
    return fit_run(MODES[mode][0], name, mode, METHODS_VL)


BENCHMARK = Benchmark(
    name="noise_study_vl", script=Path(__file__).resolve(), run_names=all_runs,
    modes={mode: runs for mode, (_, runs) in MODES.items()}, measure=measure, describe=describe,
    settings=lambda mode: asdict(MODES[mode][0]), header={"model": MODEL, "task": TASK, "lambda": LAMBDA})

if __name__ == "__main__":
    sys.exit(BENCHMARK.main(doc=__doc__))
