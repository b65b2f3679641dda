"""GRPO throughput on SmolLM2-135M-Instruct: seconds per optimizer step split into generation and update,
completion tokens per second and peak RSS, with G = 8 completions for each of 8 prompts, up to 32 new tokens.

    python benchmarks/grpo_throughput.py --out benchmarks/results/grpo_throughput.json               # 3 runs
    python benchmarks/grpo_throughput.py --quick --out benchmarks/results/grpo_throughput_quick.json

Runs: ``mu1-beta0`` is the default path (no old log-prob pass because num_iterations = 1, no reference model
because beta = 0); ``mu1-beta0.04`` adds the reference model's log-prob pass; ``mu2-beta0`` stores old
log-probs and takes two optimizer steps per generated batch. The first step of every run is a warm-up and is
not counted. Generation reuses the KV cache (``generate(use_cache=True)``) and the update computes logits at
completion positions only (``logits_to_keep``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import now_iso, peak_rss_mb  # noqa: E402
from benchmarks.driver import Benchmark  # noqa: E402

MODEL = "smollm2-135m-instruct"
TASK = "add_1digit"
SHAPE = {"num_generations": 8, "prompts": 8, "max_new_tokens": 32}
RUNS: dict[str, dict[str, Any]] = {
    "mu1-beta0": {"num_iterations": 1, "beta": 0.0},
    "mu1-beta0.04": {"num_iterations": 1, "beta": 0.04},
    "mu2-beta0": {"num_iterations": 2, "beta": 0.0},
}
STEPS = {"full": 5, "quick": 2}  # optimizer-step batches per run, the first one a warm-up


def measure(name: str, mode: str) -> dict[str, Any]:
    """One short fit; per-step timings come from the module's ``train/timing/*`` metrics."""
    from lightning import Callback, Trainer

    from datamodules.rlvr import RLVRDataModule
    from lit_modules.grpo.module import GRPOModule

    class StepMetrics(Callback):
        def __init__(self):
            self.rows: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, *args):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    options, batches = RUNS[name], STEPS[mode]
    module = GRPOModule(MODEL, num_generations=SHAPE["num_generations"], max_new_tokens=SHAPE["max_new_tokens"],
                        entropy_schedule="max_to_min", **options)
    data = RLVRDataModule(TASK, num_train=SHAPE["prompts"] * batches, num_val=SHAPE["prompts"],
                          prompts_per_batch=SHAPE["prompts"], noise_rate=0.4)
    recorder = StepMetrics()
    trainer = Trainer(accelerator="auto", devices=1, max_steps=batches * options["num_iterations"], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    steps = recorder.rows[1:]  # the first batch warms up kernels and allocators
    generation = [s["train/timing/generation_seconds"] for s in steps]
    update = [s["train/timing/update_seconds"] for s in steps]
    tokens = [s["train/completion_tokens"] for s in steps]
    per_batch = [g + u for g, u in zip(generation, update)]
    return {"run": name, "mode": mode, "model": MODEL, "task": TASK, **SHAPE, **options,
            "measured_batches": len(steps),
            "generation_seconds": statistics.mean(generation), "update_seconds": statistics.mean(update),
            # μ optimizer steps share one generated batch.
            "seconds_per_optimizer_step": statistics.mean(per_batch) / options["num_iterations"],
            "completion_tokens": statistics.mean(tokens),
            "completion_tokens_per_second": sum(tokens) / sum(per_batch),
            "generated_tokens_per_second": sum(tokens) / sum(generation),
            "peak_rss_mb": peak_rss_mb(), "device": str(module.device), "date": now_iso()}


def describe(row: dict[str, Any]) -> str:
    return (f"{row['seconds_per_optimizer_step']:.1f} s/step (generation {row['generation_seconds']:.1f} s, "
            f"update {row['update_seconds']:.1f} s), {row['completion_tokens_per_second']:.0f} completion tok/s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB")


BENCHMARK = Benchmark(
    name="grpo_throughput", script=Path(__file__).resolve(), run_names=lambda: list(RUNS),
    modes={"full": None, "quick": ("mu1-beta0",)}, measure=measure, describe=describe,
    settings=lambda mode: {"batches": STEPS[mode], "warmup_batches": 1, **SHAPE, "task": TASK},
    header={"model": MODEL})

if __name__ == "__main__":
    sys.exit(BENCHMARK.main(doc=__doc__))
