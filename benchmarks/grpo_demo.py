"""The README's demo fits, measured: each ``litforge fit -c <config>`` and its clean accuracy.

    python benchmarks/grpo_demo.py --out benchmarks/results/grpo_demo.json            # every demo fit, in order
    python benchmarks/grpo_demo.py --out benchmarks/results/grpo_demo.json --config configs/demo/grpo_phased_vl_quick.yaml

Runs each config through the same CLI class as ``litforge`` (in this process, in a temporary folder) and writes
one row per config (merged into an existing file by config): greedy clean accuracy on the held-out examples
before training and after the last step, the run's wall time, peak RSS and thread count. The order matters: the
multimodal GRPO demo loads the model that the SFT warm start publishes.
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
from benchmarks.driver import merged_meta  # noqa: E402

CONFIG = "configs/demo/grpo_phased_quick.yaml"
CONFIGS = (CONFIG, "configs/sft/tiny_vl_grounding.yaml", "configs/demo/grpo_phased_vl_quick.yaml")


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
    return {"run": Path(config).stem, "config": config, "steps": cli.trainer.global_step,
            "noise_rate": init["data"]["init_args"]["noise_rate"], "task": init["data"]["init_args"]["source"],
            "num_val": init["data"]["init_args"]["num_val"], "clean_acc_before": history[0][1],
            "clean_acc_after": history[-1][1], "clean_acc_curve": history, "wall_seconds": wall.seconds,
            "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "date": now_iso()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    parser.add_argument("--config", action="append", choices=CONFIGS, help="only these (default: all, in order)")
    args = parser.parse_args(argv)
    configs = args.config or list(CONFIGS)
    meta = metadata(benchmark="grpo_demo", mode="demo", configs=configs)
    merge = args.config is not None
    if merge:
        meta = merged_meta(args.out, meta)
    rows = []
    for config in configs:
        rows.append(run_demo(config))
        write_results(args.out, rows, meta, merge_key=("run",) if merge else None)
        print(f"{config}: clean accuracy {rows[-1]['clean_acc_before']:.3f} -> {rows[-1]['clean_acc_after']:.3f} "
              f"in {rows[-1]['wall_seconds']:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
