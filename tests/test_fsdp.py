"""GRPOModule under FSDP: 2 CPU processes (gloo) through the ``litforge`` CLI, Lightning's FSDPStrategy admitted on
CPU by ``tests.fsdp_cpu.CPUFSDPStrategy``.

- Each rank holds only its shard of the policy, yet samples from the full policy, and after two optimizer steps the
  FSDP run holds the same policy as the DDP run of the same config (both ways of gathering for generation); the
  validation after it (5 prompts on 2 ranks) does not hang and agrees with DDP's.
- The checkpoint FSDP writes is an ordinary full Lightning checkpoint; a run resumed from it starts from exactly
  those weights and continues the optimizer's state (AdamW step counts), with the β > 0 reference copy sharded too.
- An image-text policy (tiny Qwen2-VL, vision tower frozen) trains under FSDP as under DDP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed_probe import state_checksum
from tests.test_distributed import launch, length_reward  # noqa: F401  (the reward is loaded by import path)
from tests.tiny_models import save_tiny_model

SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}


def grpo_config(model_dir: Path, run_dir: Path, max_steps: int, source: str = "add_1digit", **module_args) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "default_root_dir": str(run_dir), "logger": False, "max_steps": max_steps,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "callbacks": [{"class_path": "tests.distributed_probe.ShardProbe",
                                   "init_args": {"out_dir": str(run_dir / "probe")}}]},
        "model": {"class_path": "lit_modules.grpo.module.GRPOModule",
                  "init_args": {"model_name_or_path": str(model_dir), "num_generations": 3, "max_new_tokens": 4,
                                "rewards": ["tests.test_distributed.length_reward"], **module_args}},
        "data": {"class_path": "datamodules.rlvr.RLVRDataModule",
                 # 5 validation prompts: 3 on rank 0, 2 + 1 padding row on rank 1 (as many generate calls)
                 "init_args": {"source": source, "num_train": 8, "num_val": 5, "prompts_per_batch": 2}},
    }


def fit(config: dict, run_dir: Path, strategy: str, *extra: str) -> dict:
    """Run ``litforge fit``; the last checkpoint and the per-rank probe records."""
    launch(config, run_dir, strategy, "fit", extra)
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, f"no checkpoint under {run_dir}"
    probes = {int(p.stem[4:]): json.loads(p.read_text()) for p in (run_dir / "probe").glob("rank*.json")}
    return {"checkpoint": torch.load(checkpoints[-1], map_location="cpu", weights_only=False), "probes": probes,
            "path": checkpoints[-1]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("fsdp") / "tiny-llama")


@pytest.fixture(scope="module")
def ddp_run(model_dir, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("grpo-ddp")
    return fit(grpo_config(model_dir, run_dir, 2, optimizer=SGD), run_dir, "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("gather_for_generation", [True, False], ids=["whole-model", "per-block"])
def test_grpo_fsdp_shards_the_policy_and_trains_it_as_ddp_does(model_dir, ddp_run, tmp_path, gather_for_generation):
    run_dir = tmp_path / "fsdp"
    run = fit(grpo_config(model_dir, run_dir, 2, optimizer=SGD, gather_for_generation=gather_for_generation),
              run_dir, "fsdp")  # fmt: skip
    probes = run["probes"]
    full = probes[0]["full_numel"]
    assert probes[0]["local_numel"] + probes[1]["local_numel"] == full, "each rank should hold half the policy"
    assert max(probes[0]["local_numel"], probes[1]["local_numel"]) < full
    assert ddp_run["probes"][0]["local_numel"] == full  # ddp: a full replica per rank
    # Validation ran after the last step (uneven shards, evened out by padding rows) and agrees with ddp's.
    accuracy = [r["probes"][0]["metrics"]["val/clean_acc"] for r in (run, ddp_run)]
    assert accuracy[0] == pytest.approx(accuracy[1])

    fsdp_state, ddp_state = run["checkpoint"]["state_dict"], ddp_run["checkpoint"]["state_dict"]
    assert fsdp_state.keys() == ddp_state.keys()  # FSDP's wrapper names never reach the checkpoint
    assert run["checkpoint"]["global_step"] == ddp_run["checkpoint"]["global_step"] == 2
    from lit_modules.grpo.module import GRPOModule

    initial = GRPOModule(model_name_or_path=str(model_dir))
    initial.configure_model()
    assert state_checksum(ddp_state, "model.") != state_checksum(initial.state_dict(), "model."), "nothing trained"
    for name, tensor in ddp_state.items():
        torch.testing.assert_close(fsdp_state[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_grpo_fsdp_checkpoint_resumes_weights_optimizer_and_reference(model_dir, tmp_path):
    first = fit(grpo_config(model_dir, tmp_path / "first", 1, beta=0.04, learning_rate=1e-2), tmp_path / "first",
                "fsdp")  # fmt: skip
    resumed = fit(grpo_config(model_dir, tmp_path / "resumed", 2, beta=0.04, learning_rate=1e-2),
                  tmp_path / "resumed", "fsdp", "--ckpt_path", str(first["path"]))  # fmt: skip
    saved, final = first["checkpoint"], resumed["checkpoint"]
    # The resumed run started from the saved policy (gathered from the shards after loading)...
    assert resumed["probes"][0]["policy_sha256"] == state_checksum(saved["state_dict"], "model.")
    # ...continued AdamW's state (a fresh optimizer would count 1 step, not 2)...
    assert final["global_step"] == 2
    steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert steps == {2.0}, steps
    trainable = sum(1 for k in saved["state_dict"] if k.startswith("model."))
    assert len(final["optimizer_states"][0]["state"]) == trainable
    # ...and kept the frozen reference policy: the initial weights, in both checkpoints.
    from lit_modules.grpo.module import GRPOModule

    initial = GRPOModule(model_name_or_path=str(model_dir), beta=0.04)
    initial.configure_model()
    initial_state = initial.state_dict()
    ref = {k: v for k, v in final["state_dict"].items() if k.startswith("ref_model.")}
    assert len(ref) == trainable
    for name, tensor in ref.items():
        assert torch.equal(tensor, saved["state_dict"][name]), name
        assert torch.equal(tensor, initial_state[name]), name
    assert state_checksum(final["state_dict"], "model.") != state_checksum(saved["state_dict"], "model.")


@pytest.mark.slow
def test_grpo_fsdp_trains_an_image_text_policy_as_ddp_does(tiny_vlm_dir, tmp_path):
    """Qwen2-VL (vision tower frozen, its blocks FSDP units of their own) on image prompts, gathered block by
    block: the same policy as ddp after two steps."""
    model_dir = tiny_vlm_dir("qwen2_vl")
    runs = {strategy: fit(grpo_config(model_dir, tmp_path / strategy, 2, source="image_grounding", optimizer=SGD,
                                      gather_for_generation=False), tmp_path / strategy, strategy)
            for strategy in ("ddp", "fsdp")}  # fmt: skip
    probes = runs["fsdp"]["probes"]  # ddp's rank holds every parameter once (tied embeddings counted once)
    assert probes[0]["local_numel"] + probes[1]["local_numel"] == runs["ddp"]["probes"][0]["local_numel"]
    fsdp_state, ddp_state = runs["fsdp"]["checkpoint"]["state_dict"], runs["ddp"]["checkpoint"]["state_dict"]
    assert fsdp_state.keys() == ddp_state.keys()
    for name, tensor in ddp_state.items():
        torch.testing.assert_close(fsdp_state[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    from lit_modules.grpo.module import GRPOModule

    initial = GRPOModule(model_name_or_path=str(model_dir))
    initial.configure_model()
    before = initial.state_dict()
    vision = [n for n in before if ".visual." in n]
    assert vision and all(torch.equal(fsdp_state[n], before[n]) for n in vision)  # frozen under FSDP too
    assert any(not torch.equal(fsdp_state[n], before[n]) for n in before if n not in vision), "nothing trained"


def test_block_policy_names_the_blocks_and_refuses_a_model_without_any():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lit_modules.grpo.sharding import decoder_layer_policy, gathered
    from tests.tiny_models import build_tiny_model

    model = build_tiny_model("llama")
    policy = decoder_layer_policy(model)
    assert isinstance(policy, ModuleWrapPolicy)
    assert {c.__name__ for c in policy._module_classes} == {"LlamaDecoderLayer"}
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        decoder_layer_policy(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with gathered(model, whole_model=False) as lockstep:  # an unsharded policy: nothing to gather, no lockstep
        assert lockstep is False
