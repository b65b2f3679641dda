"""Pruning, quantization and GRPO under DDP (CPU, gloo, 2 processes; also as 2 "nodes") and the compression
callbacks and evaluation under FSDP (2 CPU processes through ``tests.fsdp_cpu``), via the ``litforge`` CLI
(pruning spec §7, §9 test 13).

Each case runs the same YAML in subprocesses, once on one process and once with
``--trainer.strategy <ddp|ddp_spawn|fsdp> --trainer.devices 2`` (or as 2 nodes), and checks that

- every rank ends validation with the same pruned weights (checked by ``tests.distributed_probe.RankProbe``
  independently of the callback's own all-gather; under FSDP on the full weights gathered by torch), equal to the
  1-process weights bit for bit;
- ``sparsity_report.json`` (written by rank 0) and the exported folder match the 1-process run;
- the ranks evaluate disjoint shards whose union is every window once (padding windows run but are not
  counted), and the synced perplexity equals the 1-process perplexity.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.strategy_check import free_port, run_nodes
from tests.pruning_helpers import TEXT
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
CPU_FSDP = "tests.fsdp_cpu.CPUFSDPStrategy"
# "fsdp": the whole LightningModule one FSDP unit (Lightning's default); "fsdp_blocks": each decoder layer a unit.
FSDP_STRATEGIES = {"fsdp": {"class_path": CPU_FSDP},
                   "fsdp_blocks": {"class_path": CPU_FSDP, "init_args": {"auto_wrap_policy": [
                       "transformers.models.llama.modeling_llama.LlamaDecoderLayer"]}}}
RUN_TIMEOUT_S = 180  # a hung collective must fail the test, not stall the suite
EVAL_WINDOWS = 5  # odd: a padding sampler would evaluate one window twice under 2 processes

PRUNING = "callbacks.pruning.callback.Pruning"
QUANTIZATION = "callbacks.quantization.callback.Quantization"
REPORTS = {PRUNING: "sparsity_report.json", QUANTIZATION: "quant_report.json"}
CASES = {
    "aptq_mixed": {"_class": QUANTIZATION, "method": "aptq", "target_avg_bits": 3.0, "candidate_bits": [2, 4],
                   "export_format": "hf"},
    "wanda": {"method": "wanda"},
    "wanda_barber": {"method": "wanda", "barber": True, "barber_threshold": 0.3},
    "sparsegpt_barber": {"method": "sparsegpt", "barber": True, "barber_threshold": 0.3,
                         "retain_reconstruction": True},
}


def _config(model_dir: Path, corpus: Path, run_dir: Path, case: dict) -> dict:
    pruning = dict(case)
    callback = pruning.pop("_class", PRUNING)
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(run_dir),
            # As in the shipped configs; the report lands in the logger's log_dir.
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(run_dir), "name": "tb", "version": 0}},
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": callback,
                 "init_args": {**pruning, "progress": False, "export_dir": str(run_dir / "export"),
                               "calibration": {"class_path": "datamodules.text.TextDataModule",
                                               "init_args": {"source": str(corpus), "seqlen": 24, "nsamples": 6,
                                                             "seed": 0}}}},
                {"class_path": "tests.distributed_probe.RankProbe", "init_args": {"out_dir": str(run_dir / "probe")}},
            ],
        },
        "model": {"class_path": "lit_modules.causal_lm.CausalLM", "init_args": {"model_name_or_path": str(model_dir)}},
        "data": {"class_path": "datamodules.text.TextDataModule",
                 "init_args": {"source": str(corpus), "seqlen": 24, "max_windows": EVAL_WINDOWS}},
    }


def launch(config: dict, run_dir: Path, strategy: str, subcommand: str = "validate", extra: Sequence[str] = ()
           ) -> float:  # fmt: skip
    """``litforge <subcommand>`` with ``strategy`` ("auto": 1 process, else 2 CPU processes; "fsdp" through
    ``tests.fsdp_cpu.CPUFSDPStrategy``); returns seconds.

    ``"multinode"`` runs Lightning's multi-node DDP on this machine: two ``litforge`` processes, one per "node"
    (``NODE_RANK`` 0 and 1, ``--trainer.num_nodes 2 --trainer.devices 1``), meeting at one ``MASTER_ADDR:PORT``
    exactly as two machines would. The rendezvous port is picked free just before the launch; if another process
    grabs it in between (the probe socket is closed by then), the launch is retried on a new port instead of failing
    the test.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lit_modules.cli", subcommand, "-c", str(config_path)]
    if strategy == "multinode":
        flags, nodes = ["--trainer.strategy", "ddp", "--trainer.num_nodes", "2", "--trainer.devices", "1"], 2
    elif strategy in FSDP_STRATEGIES:  # Lightning's FSDPStrategy, admitted on CPU (tests/fsdp_cpu.py)
        flags, nodes = ["--trainer.strategy", json.dumps(FSDP_STRATEGIES[strategy]), "--trainer.devices", "2"], 1
    else:
        flags, nodes = ["--trainer.strategy", strategy, "--trainer.devices", "1" if strategy == "auto" else "2"], 1
    for attempt in range(3):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               # Same kernels in both runs: Lightning would otherwise give each DDP process cpus/2 threads.
               "OMP_NUM_THREADS": "1"}
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
            env.pop(var, None)  # never inherit a launcher's rank from the pytest process
        started = time.perf_counter()
        code, output = run_nodes(command + flags + list(extra), run_dir, env, nodes, timeout=RUN_TIMEOUT_S)
        if code is None:
            pytest.fail(f"{strategy} run did not finish in {RUN_TIMEOUT_S}s (a collective that not every rank "
                        f"joined?)\n{output[-6000:]}")
        if code != 0 and "address already in use" in output.lower() and attempt < 2:
            continue
        assert code == 0, f"exit {code}\n{output[-12000:]}"
        return time.perf_counter() - started
    raise AssertionError("unreachable")


def read_probes(out_dir: Path, devices: int) -> dict[int, dict]:
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    assert sorted(probes) == list(range(devices)), f"probe files: {sorted(probes)}"
    return probes


def _run(config: dict, run_dir: Path, strategy: str) -> dict:
    """One compression run through ``litforge validate``: the per-rank probe records and rank 0's report."""
    seconds = launch(config, run_dir, strategy)
    probes = read_probes(run_dir / "probe", 1 if strategy == "auto" else 2)
    callback = config["trainer"]["callbacks"][0]["class_path"]
    report = json.loads((run_dir / "tb" / "version_0" / REPORTS[callback]).read_text())
    return {"probes": probes, "report": report, "seconds": seconds, "export": run_dir / "export"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(case, strategy)`` -> (1-process run, 2-process run) of that case; each run happens once per module."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    model_dir = save_tiny_model("llama", root / "tiny-llama")
    cache: dict[tuple[str, str], dict | BaseException] = {}

    def run(case: str, strategy: str) -> dict:
        key = (case, strategy)
        if key not in cache:
            try:
                run_dir = root / case / strategy
                cache[key] = _run(_config(model_dir, corpus, run_dir, CASES[case]), run_dir, strategy)
                print(f"{case} {strategy}: {cache[key]['seconds']:.1f}s")
            except BaseException as err:  # a second test of the same run fails at once instead of rerunning
                cache[key] = err
                raise
        if isinstance(cache[key], BaseException):
            raise cache[key]
        return cache[key]

    return lambda case, strategy="ddp": (run(case, "auto"), run(case, strategy))


@pytest.mark.slow
@pytest.mark.parametrize(("case", "strategy"), [(case, "ddp") for case in CASES] + [("wanda_barber", "ddp_spawn"),
                                                                                      ("wanda", "multinode"),
                                                                                      ("aptq_mixed", "multinode"),
                                                                                      ("wanda_barber", "fsdp"),
                                                                                      ("aptq_mixed", "fsdp"),
                                                                                      ("sparsegpt_barber",
                                                                                       "fsdp_blocks")])
def test_compression_matches_single_process(case, strategy, runs):
    single, ddp = runs(case, strategy)
    reference = single["probes"][0]
    if CASES[case].get("_class", PRUNING) == PRUNING:
        assert reference["zeros"] > 0, "the run pruned nothing; the comparison would be vacuous"
    else:  # the same mixed-precision plan on every rank and in the 1-process run
        bits = [{r["name"]: r["bits"] for r in run["report"]["modules"]} for run in (single, ddp)]
        assert bits[0] == bits[1] and set(bits[0].values()) == {2, 4}
    assert reference["report_sha256"] == [reference["weights_sha256"]]
    for rank, probe in ddp["probes"].items():
        assert probe["world_size"] == 2
        # Same masks and same weights on every rank, equal to the 1-process result bit for bit.
        assert probe["mask_sha256"] == reference["mask_sha256"], f"rank {rank} mask differs"
        assert probe["weights_sha256"] == reference["weights_sha256"], f"rank {rank} weights differ"
        assert probe["report_sha256"] == [reference["weights_sha256"]], f"rank {rank} callback digest differs"

    # The report written by rank 0 describes the same result, from a 2-process run.
    assert ddp["report"]["weights_sha256"] == single["report"]["weights_sha256"] == reference["weights_sha256"]
    assert ddp["report"]["world_size"] == 2 and single["report"]["world_size"] == 1
    assert ddp["report"]["calibration"] == single["report"]["calibration"]
    untimed = [{k: v for k, v in run["report"]["summary"].items() if not k.endswith("seconds")} for run in (ddp, single)]
    assert untimed[0] == untimed[1]

    # The exported checkpoints hold identical tensors.
    exported = load_file(ddp["export"] / "model.safetensors")
    expected = load_file(single["export"] / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "multinode", "fsdp"])
def test_perplexity_counts_each_window_once_and_matches_single_process(runs, strategy):
    """Validation perplexity on 2 processes equals the 1-process value (spec §5.1: no window counted twice)."""
    # The runs of test_compression_matches_single_process[wanda-...] (wanda_barber under FSDP).
    single, ddp = runs("wanda_barber" if strategy == "fsdp" else "wanda", strategy)
    windows = single["probes"][0]["windows"]
    assert len(windows) == EVAL_WINDOWS
    shards = [ddp["probes"][rank]["windows"] for rank in (0, 1)]
    assert shards == [windows[0::2], windows[1::2]]  # disjoint, 3 + 2 counted windows, nothing counted twice

    expected = single["probes"][0]["metrics"]["val/ppl"]
    for rank in (0, 1):
        assert ddp["probes"][rank]["metrics"]["val/ppl"] == pytest.approx(expected, rel=1e-6), f"rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "multinode"])
def test_grpo_ddp_fit_keeps_identical_weights_on_both_ranks(tmp_path, strategy):
    """GRPOModule, 2 CPU processes (one machine, or two "nodes"): each rank samples its own prompts, DDP averages
    the gradients, so after every optimizer step both ranks hold the same policy — and that policy moved away from
    the initial one."""
    model_dir = save_tiny_model("llama", tmp_path / "tiny-llama")
    run_dir = tmp_path / "grpo"
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "default_root_dir": str(run_dir), "logger": False, "max_steps": 2,
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "tests.distributed_probe.WeightsProbe",
                                   "init_args": {"out_dir": str(run_dir / "probe")}}]},
        "model": {"class_path": "lit_modules.grpo.module.GRPOModule",
                  "init_args": {"model_name_or_path": str(model_dir), "num_generations": 3, "max_new_tokens": 4,
                                "learning_rate": 1e-2, "rewards": ["tests.test_distributed.length_reward"]}},
        "data": {"class_path": "datamodules.rlvr.RLVRDataModule",
                 "init_args": {"source": "add_1digit", "num_train": 8, "num_val": 4, "prompts_per_batch": 2}},
    }
    launch(config, run_dir, strategy, subcommand="fit")
    probes = read_probes(run_dir / "probe", 2)
    assert probes[0]["world_size"] == 2 and probes[0]["global_step"] == probes[1]["global_step"] == 2
    assert probes[0]["weights_sha256"] == probes[1]["weights_sha256"]

    from lit_modules.grpo.module import GRPOModule
    from callbacks.calibration.distributed import checksum

    initial = GRPOModule(model_name_or_path=str(model_dir))
    initial.configure_model()
    assert checksum([p.detach() for p in initial.parameters()]) != probes[0]["weights_sha256"], "nothing trained"


def length_reward(prompts, completions, **columns):
    """A label-free reward that varies inside a group (the tiny model's completions are random text)."""
    return [float(len(c) % 3) for c in completions]
