"""Every shipped YAML instantiates with the CLI, and the console script works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lit_modules.cli import LitforgeCLI

REPO = Path(__file__).resolve().parents[1]
# Overlays change a base config and are not runnable alone: they are composed with their base below.
OVERLAYS = sorted((REPO / "configs").rglob("*overlays/*.yaml"))
# Paper-scale configs need a GPU and weights on disk; they are instantiated below with tiny models of their classes.
REAL_SCALE = sorted((REPO / "configs" / "grpo" / "real").glob("*.yaml"))
CONFIGS = sorted(set((REPO / "configs").rglob("*.yaml")) - set(OVERLAYS) - set(REAL_SCALE))


def _stand_in_for_built_models(config: Path, monkeypatch, tmp_path) -> None:
    """Configs that load the SFT warm start's output get a tiny random stand-in in a private cache (the real one
    is built by configs/sft/tiny_vl_grounding.yaml; instantiating a config must not depend on having run it)."""
    from datamodules.assets import TINY_VLM_GROUNDING, built_model_dir, replace_folder
    from lit_modules.vlm.build import save_initial_vlm

    if TINY_VLM_GROUNDING in config.read_text():
        monkeypatch.setenv("LITFORGE_CACHE", str(tmp_path / "cache"))
        replace_folder(built_model_dir(TINY_VLM_GROUNDING),
                       lambda out: save_initial_vlm(out, hidden=32, layers=1, heads=2, vision_width=32, vision_depth=1))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _stand_in_for_built_models(config, monkeypatch, tmp_path)
    cli = LitforgeCLI(args=["--config", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_composes_with_its_base(overlay, monkeypatch, tmp_path):
    """Each overlay names its base in its usage line; composed, it changes the entropy schedule or the reward."""
    from lit_modules.grpo.entropy import NoEntropy

    base = REPO / overlay.read_text().split(" -c ")[1].split()[0]
    monkeypatch.chdir(tmp_path)
    _stand_in_for_built_models(base, monkeypatch, tmp_path)
    plain = LitforgeCLI(args=["--config", str(base)], run=False).model
    model = LitforgeCLI(args=["--config", str(base), "--config", str(overlay)], run=False).model
    changed = (type(model.entropy_schedule), model.entropy_schedule.hparams(), model.reward_set.names)
    assert changed != (type(plain.entropy_schedule), plain.entropy_schedule.hparams(), plain.reward_set.names)
    if model.reward_set.names != ["accuracy"]:  # label-free baselines add no entropy term of their own
        assert isinstance(model.entropy_schedule, NoEntropy)


def test_print_config_runs_as_a_console_command():
    result = subprocess.run(
        [sys.executable, "-m", "lit_modules.cli", "validate", "-c", str(REPO / "configs/eval/smollm2_wiki.yaml"),
         "--print_config"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "lit_modules.causal_lm.CausalLM" in result.stdout


def test_bad_option_in_yaml_reports_the_option(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_modules.cli", "validate", "-c", str(REPO / "configs/eval/smollm2_wiki.yaml"),
         "--model.init_args.model_name_or_path", "no-such-model"], capture_output=True, text=True, timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "no-such-model" in result.stderr


@pytest.mark.parametrize("config", REAL_SCALE, ids=lambda p: p.stem)
def test_real_scale_config_runs_as_written_on_a_tiny_model_of_the_same_class(config, tiny_vlm_dir, monkeypatch,
                                                                              tmp_path):
    """Only the model folder and the device are swapped (no GPU, no 2-7B weights here); every other option is the
    config's own, and the policy loads as the config's model class in bf16."""
    import torch

    family = "qwen2_5_vl" if "qwen2_5_vl" in config.stem else "qwen2_vl"
    monkeypatch.chdir(tmp_path)
    cli = LitforgeCLI(args=["--config", str(config), "--model.init_args.model_name_or_path", str(tiny_vlm_dir(family)),
                            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"],
                      run=False)
    assert cli.model.dtype_name == "bfloat16" and cli.model.freeze_vision and cli.datamodule.source == "image_grounding"
    assert cli.config["trainer"]["precision"] == "bf16-true"
    cli.model.configure_model()
    expected = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
    assert type(cli.model.model).__name__ == expected[family]
    assert cli.model.model.dtype == torch.bfloat16
