"""Strategy check: each capability of litforge under each Lightning strategy, through the ``litforge`` CLI.

    python benchmarks/strategy_check.py --out benchmarks/results/strategy_check.json                   # CPU
    python benchmarks/strategy_check.py --accelerator gpu --out benchmarks/results/strategy_check_gpu.json

Capabilities: ``evaluate`` (CausalLM perplexity), ``prune`` (Wanda + LLM-Barber), ``quantize`` (APTQ mixed
precision) and ``grpo`` (two GRPOModule optimizer steps), on the embedded SmolLM2 (or ``--model``) with tiny
data so that the whole matrix takes minutes. Strategies: ``auto`` (one device), ``ddp`` (2 processes on CPU,
all visible GPUs otherwise), ``fsdp`` (on CPU through ``tests.fsdp_cpu.CPUFSDPStrategy``, the same FSDP code
admitted on CPU), ``deepspeed`` and ``multinode`` (Lightning's multi-node ddp on this
machine: one ``litforge`` process per "node", ``NODE_RANK`` 0 and 1, ``--trainer.num_nodes 2``, meeting at one
``MASTER_ADDR:MASTER_PORT`` as two machines would). Every cell runs in its own process(es) and ends as

- ``ok``: the command finished (exit 0);
- ``refused``: it stopped before any work with a message naming the strategy (ours, or Lightning's);
- ``failed``: anything else (the JSON keeps the end of its output);
- ``skipped``: not run (``multinode`` on fewer than 2 GPUs: each "node" needs a device of its own).

The README's support matrix is rendered from this file; ``tests/test_distributed.py`` holds the tests that
compare results across strategies (this script checks that each cell runs, not what it computes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# Run as a script, Python puts benchmarks/ (not the repository) on sys.path; the sibling module needs the latter.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, metadata, now_iso, write_results  # noqa: E402

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed", "multinode")
CAPABILITIES = ("evaluate", "prune", "quantize", "grpo")
# What a refusal says: our callbacks' and module's messages, and Lightning's own checks.
REFUSAL_MARKERS = ("does not support the", "requires a GPU accelerator", "`deepspeed` package", "DeepSpeed",
                   "is not supported")
TIMEOUT_S = 600
CPU_FSDP = "tests.fsdp_cpu.CPUFSDPStrategy"


def eval_data(model: str) -> dict[str, Any]:
    return {"class_path": "datamodules.text.TextDataModule",
            "init_args": {"source": "wiki-leads", "split": "evaluation", "tokenizer": model, "seqlen": 128,
                          "max_windows": 4}}


def calibration(model: str) -> dict[str, Any]:
    return {"class_path": "datamodules.text.TextDataModule",
            "init_args": {"source": "wiki-leads", "split": "calibration", "tokenizer": model, "seqlen": 128,
                          "nsamples": 2, "seed": 0}}


def config(capability: str, model: str, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """``(subcommand, config)`` of one capability at check size."""
    trainer: dict[str, Any] = {"default_root_dir": str(run_dir), "logger": False, "enable_progress_bar": False,
                               "enable_model_summary": False}
    causal_lm = {"class_path": "lit_modules.causal_lm.CausalLM", "init_args": {"model_name_or_path": model}}
    if capability == "evaluate":
        return "validate", {"trainer": trainer, "model": causal_lm, "data": eval_data(model)}
    if capability in ("prune", "quantize"):
        callback = ({"class_path": "callbacks.pruning.callback.Pruning",
                     "init_args": {"method": "wanda", "barber": True, "calibration": calibration(model),
                                   "progress": False}}
                    if capability == "prune" else
                    {"class_path": "callbacks.quantization.callback.Quantization",
                     "init_args": {"method": "aptq", "target_avg_bits": 3.5, "candidate_bits": [3, 4],
                                   "calibration": calibration(model), "progress": False}})
        return "validate", {"trainer": {**trainer, "callbacks": [callback]}, "model": causal_lm,
                            "data": eval_data(model)}
    if capability == "grpo":
        return "fit", {
            "trainer": {**trainer, "max_steps": 2, "enable_checkpointing": False, "num_sanity_val_steps": 0,
                        "limit_val_batches": 0},
            "model": {"class_path": "lit_modules.grpo.module.GRPOModule",
                      "init_args": {"model_name_or_path": model, "num_generations": 2, "max_new_tokens": 4}},
            "data": {"class_path": "datamodules.rlvr.RLVRDataModule",
                     "init_args": {"source": "add_1digit", "num_train": 8, "num_val": 4, "prompts_per_batch": 2}}}
    raise ValueError(f"capability={capability!r} is not allowed; allowed: {list(CAPABILITIES)}")


def devices_for(strategy: str, accelerator: str) -> int:
    """Devices per node: one for ``auto``; 2 CPU processes (``multinode``: 1 per node); else every GPU (split over
    the two nodes for ``multinode``)."""
    if strategy == "auto":
        return 1
    if accelerator == "cpu":
        return 1 if strategy == "multinode" else 2
    import torch

    count = max(torch.cuda.device_count(), 1)
    return max(count // 2, 1) if strategy == "multinode" else count


def strategy_flags(strategy: str, accelerator: str) -> list[str]:
    """``--trainer.*`` flags of one column. ``fsdp`` on CPU goes through ``tests.fsdp_cpu.CPUFSDPStrategy``:
    Lightning admits its FSDPStrategy on GPUs only, and that subclass runs the same FSDP code on CPU processes."""
    if strategy == "multinode":
        return ["--trainer.strategy", "ddp", "--trainer.num_nodes", "2"]
    if strategy == "fsdp" and accelerator == "cpu":
        return ["--trainer.strategy", json.dumps({"class_path": CPU_FSDP})]
    return ["--trainer.strategy", strategy]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cell(capability: str, strategy: str, accelerator: str, model: str) -> dict[str, Any]:
    if strategy == "multinode" and accelerator == "gpu" and devices_for("ddp", accelerator) < 2:
        # Each "node" needs a GPU of its own: NCCL refuses two ranks on one device.
        return {"capability": capability, "strategy": strategy, "accelerator": accelerator, "devices": 0,
                "command": "", "outcome": "skipped", "exit_code": None, "message": "needs 2 GPUs (one per node)",
                "seconds": 0.0, "output_tail": "", "date": now_iso()}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        subcommand, cfg = config(capability, model, run_dir)
        path = run_dir / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        devices = devices_for(strategy, accelerator)
        flags = strategy_flags(strategy, accelerator)
        cmd = [sys.executable, "-m", "lit_modules.cli", subcommand, "-c", str(path), *flags,
               "--trainer.accelerator", accelerator, "--trainer.devices", str(devices)]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        nodes = 2 if strategy == "multinode" else 1
        started = time.perf_counter()
        code, output = run_nodes(cmd, run_dir, env, nodes)
    seconds = time.perf_counter() - started
    message = last_error_line(output) if code != 0 else ""
    outcome = "ok" if code == 0 else "refused" if any(m in message for m in REFUSAL_MARKERS) else "failed"
    return {"capability": capability, "strategy": strategy, "accelerator": accelerator, "devices": devices,
            "command": (f"NODE_RANK=<0|1> " if nodes > 1 else "") + f"litforge {subcommand} -c <{capability} config> "
                       f"{shlex.join(flags)} --trainer.accelerator {accelerator} --trainer.devices {devices}",
            "outcome": outcome, "exit_code": code, "message": message, "seconds": seconds,
            "output_tail": output[-3000:] if outcome == "failed" else "", "date": now_iso()}


def run_nodes(cmd: list[str], run_dir: Path, env: dict[str, str], nodes: int, timeout: float = TIMEOUT_S
              ) -> tuple[int | None, str]:  # fmt: skip
    """Run ``cmd`` once per node (``NODE_RANK`` set when there are several); (first non-zero exit code, None on a
    timeout, or 0; the output of every process). A new session per process, so that a timeout can kill ranks blocked
    in a collective (they ignore SIGTERM)."""
    processes = [subprocess.Popen(cmd, cwd=run_dir, env={**env, **({"NODE_RANK": str(n)} if nodes > 1 else {})},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
                 for n in range(nodes)]  # fmt: skip
    deadline, codes, outputs = time.monotonic() + timeout, [], []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            codes.append(process.returncode)
        except subprocess.TimeoutExpired:
            for other in processes:
                os.killpg(other.pid, 9)
            outputs.append(f"timed out after {timeout} s\n" + (process.communicate()[0] or ""))
            codes.append(None)
    failed = [c for c in codes if c != 0]
    return (failed[0] if failed else 0), "\n".join(outputs)


def last_error_line(output: str) -> str:
    """The exception line of a traceback (the last line that names an error), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error:" in line or "Exception:" in line]
    return (errors or lines or [""])[-1][:500]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or local HF folder")
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES), choices=CAPABILITIES)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args(argv)
    rows = []
    meta = metadata(benchmark="strategy_check", mode=args.accelerator, model=args.model)
    for capability in args.capabilities:
        for strategy in args.strategies:
            row = run_cell(capability, strategy, args.accelerator, args.model)
            rows.append(row)
            write_results(args.out, rows, meta)
            print(f"{capability:9s} {strategy:9s} {row['outcome']:8s} {row['seconds']:6.1f} s  {row['message']}",
                  file=sys.stderr, flush=True)
    return 1 if any(r["outcome"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
