"""The README's GRPO demo, measured: ``litforge fit -c configs/demo/grpo_phased_quick.yaml`` and its clean accuracy.

    python benchmarks/grpo_demo.py --out benchmarks/results/grpo_demo.json

Runs the demo config through the same CLI class as ``litforge`` (in this process, in a temporary folder) and
writes one row: greedy clean accuracy on the held-out questions before training and after the last step,
the run's wall time, peak RSS and thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, Timer, metadata, now_iso, peak_rss_mb, write_results  # noqa: E402

CONFIG = "configs/demo/grpo_phased_quick.yaml"


def run_demo(config: str = CONFIG) -> dict:
    import torch

    from lit_modules.cli import LitforgeCLI

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as root, Timer() as wall:
        cwd = os.getcwd()
        os.chdir(root)  # the config's TensorBoard logger writes under ./runs
        try:
            cli = LitforgeCLI(args=["fit", "-c", str(REPO_ROOT / config)])
        finally:
            os.chdir(cwd)
    history = cli.model.clean_acc_history
    init = cli.config["fit"]
    return {"run": "grpo_phased_quick", "config": config, "steps": cli.trainer.global_step,
            "noise_rate": init["data"]["init_args"]["noise_rate"], "task": init["data"]["init_args"]["source"],
            "num_val": init["data"]["init_args"]["num_val"], "clean_acc_before": history[0][1],
            "clean_acc_after": history[-1][1], "clean_acc_curve": history, "wall_seconds": wall.seconds,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "date": now_iso()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    args = parser.parse_args(argv)
    row = run_demo()
    write_results(args.out, [row], metadata(benchmark="grpo_demo", mode="demo", config=CONFIG))
    print(f"clean accuracy {row['clean_acc_before']:.3f} -> {row['clean_acc_after']:.3f} in "
          f"{row['wall_seconds']:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
