"""Noise study (GRPO spec §6): clean accuracy of each method against the label-noise rate, over seeds.

    python benchmarks/noise_study.py --mode reduced --out benchmarks/results/noise_study.json   # the CPU grid
    python benchmarks/noise_study.py --out benchmarks/results/noise_study_full.json             # every method
    python benchmarks/noise_study.py --quick --out benchmarks/results/noise_study_quick.json    # checks the script
    python benchmarks/noise_study.py --plot benchmarks/results/noise_study.json                 # -> the PNG

A run is ``<method>-p<noise rate>-s<seed>``: SmolLM2-135M-Instruct trained by GRPO on one-digit additions whose
training labels are corrupted (near-miss: the true sum ± 1 or ± 10) at that rate. The seed fixes which labels
are corrupted and the sampling; the questions and the clean validation set are the same for every run.
Clean accuracy is measured by greedy decoding before training and every ``val_every`` optimizer steps.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import now_iso, peak_rss_mb, read_results  # noqa: E402
from benchmarks.driver import Benchmark  # noqa: E402

MODEL = "smollm2-135m-instruct"
TASK = "add_1digit"
LAMBDA = 0.01  # λ_max = λ_min (spec §2.3 default)
# Spec §6.1 methods: the entropy schedule and the reward of each (M9 is left out).
METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"entropy_schedule": None},
    "phased": {"entropy_schedule": {"name": "max_to_min", "lam_max": LAMBDA, "lam_min": LAMBDA, "switch_frac": 0.8}},
    "min_only": {"entropy_schedule": {"name": "const_min", "lam_min": LAMBDA}},
    "max_only": {"entropy_schedule": {"name": "const_max", "lam_max": LAMBDA}},
    "reversed": {"entropy_schedule": {"name": "min_to_max", "lam_max": LAMBDA, "lam_min": LAMBDA, "switch_frac": 0.8}},
    "rent": {"entropy_schedule": None, "rewards": ["token_entropy"]},
    "intuitor": {"entropy_schedule": None, "rewards": ["self_certainty"]},
    "ttrl": {"entropy_schedule": None, "rewards": ["majority_vote"]},
}
RATES = (0.0, 0.2, 0.4, 0.6, 0.8)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Settings:
    steps: int
    val_every: int
    num_generations: int
    prompts_per_batch: int
    max_new_tokens: int
    learning_rate: float
    num_train: int
    num_val: int
    model: str = MODEL
    task: str = TASK
    data_seed: int = 0  # seed of the questions/images and of the train/val split (the same for every run)


# The CPU grid: the settings of the README demo (configs/demo/grpo_phased_quick.yaml) plus a validation halfway.
# lr 2e-5 is 20x TRL's full-fine-tune default: in 16 steps, 1e-6 would not move the policy.
CPU = Settings(steps=16, val_every=8, num_generations=8, prompts_per_batch=4, max_new_tokens=12,
               learning_rate=2e-5, num_train=60, num_val=40)
MODES: dict[str, tuple[Settings, tuple[str, ...] | None]] = {
    "full": (CPU, None),
    # What one 2-core CPU session affords: the paper's method against vanilla GRPO at every rate, one seed.
    "reduced": (CPU, tuple(f"{m}-p{r}-s0" for r in RATES for m in ("vanilla", "phased"))),
    "quick": (Settings(steps=2, val_every=2, num_generations=4, prompts_per_batch=2, max_new_tokens=8,
                       learning_rate=2e-5, num_train=8, num_val=8), ("phased-p0.4-s0",)),
}


def run_name(method: str, rate: float, seed: int) -> str:
    return f"{method}-p{rate}-s{seed}"


def parse_run(name: str) -> tuple[str, float, int]:
    method, rate, seed = name.rsplit("-", 2)
    return method, float(rate[1:]), int(seed[1:])


def all_runs() -> list[str]:
    return [run_name(m, r, s) for s in SEEDS for r in RATES for m in METHODS]


def measure(name: str, mode: str) -> dict[str, Any]:
    return fit_run(MODES[mode][0], name, mode)


def fit_run(settings: Settings, name: str, mode: str, methods: dict[str, dict[str, Any]] = METHODS
            ) -> dict[str, Any]:  # fmt: skip
    """One GRPO fit of ``methods[<the run's method>]``; the row holds the clean-accuracy curve and the per-step
    training curves."""
    from lightning import Callback, Trainer, seed_everything

    from datamodules.rlvr import RLVRDataModule
    from lit_modules.grpo.module import GRPOModule

    class Curves(Callback):
        KEYS = ("entropy", "entropy_coef", "reward", "reward_std", "frac_reward_zero_std", "clean_acc",
                "noisy_label_agreement", "completion_length")

        def __init__(self):
            self.steps: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, *args):
            metrics = trainer.callback_metrics
            self.steps.append({k: float(metrics[f"train/{k}"]) for k in self.KEYS if f"train/{k}" in metrics})

    method, rate, seed = parse_run(name)
    seed_everything(seed, verbose=False)
    module = GRPOModule(settings.model, num_generations=settings.num_generations, max_new_tokens=settings.max_new_tokens,
                        learning_rate=settings.learning_rate, loss_type="grpo", **methods[method])
    data = RLVRDataModule(settings.task, num_train=settings.num_train, num_val=settings.num_val,
                          seed=settings.data_seed, noise_rate=rate,
                          noise_kind="near_miss", noise_seed=seed, prompts_per_batch=settings.prompts_per_batch)
    curves = Curves()
    trainer = Trainer(accelerator="auto", devices=1, max_steps=settings.steps, val_check_interval=settings.val_every,
                      check_val_every_n_epoch=None, num_sanity_val_steps=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[curves], log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    accuracy = module.clean_acc_history
    return {"run": name, "mode": mode, "method": method, "noise_rate": rate, "seed": seed, "model": settings.model,
            "task": settings.task, "settings": asdict(settings), "method_options": methods[method],
            "clean_acc_before": accuracy[0][1], "clean_acc_after": accuracy[-1][1],
            "clean_acc_curve": accuracy, "clean_acc_auc": statistics.mean(a for _, a in accuracy),
            "train_curves": curves.steps, "peak_rss_mb": peak_rss_mb(), "date": now_iso()}


def describe(row: dict[str, Any]) -> str:
    return f"clean accuracy {row['clean_acc_before']:.3f} -> {row['clean_acc_after']:.3f}"


BENCHMARK = Benchmark(
    name="noise_study", script=Path(__file__).resolve(), run_names=all_runs,
    modes={mode: runs for mode, (_, runs) in MODES.items()}, measure=measure, describe=describe,
    settings=lambda mode: asdict(MODES[mode][0]), header={"model": MODEL, "task": TASK, "lambda": LAMBDA})


# -- the figure ----------------------------------------------------------------------------------------
def summary(rows: list[dict[str, Any]]) -> dict[str, dict[float, tuple[float, float, int]]]:
    """method -> noise rate -> (mean, std, number of seeds) of the final clean accuracy."""
    grouped: dict[str, dict[float, list[float]]] = {}
    for row in rows:
        grouped.setdefault(row["method"], {}).setdefault(row["noise_rate"], []).append(row["clean_acc_after"])
    return {method: {rate: (statistics.mean(v), statistics.pstdev(v), len(v)) for rate, v in sorted(rates.items())}
            for method, rates in grouped.items()}


def plot(result_file: Path, png: Path | None = None, focus_rate: float = 0.4) -> Path:
    """Clean accuracy vs noise per method (mean ± std over seeds), and entropy / λ per step at ``focus_rate``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(result_file)["rows"]
    if not rows:
        raise SystemExit(f"{result_file}: no rows to plot")
    png = png or result_file.with_suffix(".png")
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    before = statistics.mean(r["clean_acc_before"] for r in rows)
    for method, rates in summary(rows).items():
        xs = list(rates)
        means, stds = [rates[x][0] for x in xs], [rates[x][1] for x in xs]
        left.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
    left.axhline(before, color="grey", linestyle=":", label="before training")
    left.set(xlabel="label-noise rate", ylabel="clean accuracy (greedy)", title="Clean accuracy after GRPO")
    left.legend(fontsize=8)
    for row in rows:
        if row["noise_rate"] == focus_rate and row["seed"] == min(r["seed"] for r in rows):
            steps = range(len(row["train_curves"]))
            line, = middle.plot(steps, [s.get("entropy", float("nan")) for s in row["train_curves"]],
                                label=row["method"])
            right.plot(steps, [s.get("entropy_coef", 0.0) for s in row["train_curves"]], color=line.get_color(),
                       label=row["method"], drawstyle="steps-post")  # λ is piecewise constant in the step
    middle.set(xlabel="optimizer step", ylabel="mean token entropy", title=f"Entropy at noise {focus_rate}")
    right.set(xlabel="optimizer step", ylabel="λ (entropy coefficient)", title="Schedule λ(s)")
    middle.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--plot":
        print(plot(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(BENCHMARK.main(doc=__doc__))
