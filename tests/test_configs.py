"""Every shipped YAML instantiates with the CLI, and the console script works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lit_modules.cli import LitforgeCLI

REPO = Path(__file__).resolve().parents[1]
# Overlays change a base config and are not runnable alone: they are composed with their base below.
OVERLAYS = sorted((REPO / "configs").rglob("overlays/*.yaml"))
CONFIGS = sorted(set((REPO / "configs").rglob("*.yaml")) - set(OVERLAYS))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cli = LitforgeCLI(args=["--config", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_composes_with_its_base(overlay, monkeypatch, tmp_path):
    """Each overlay names its base in its usage line; composed, it changes the entropy schedule or the reward."""
    from lit_modules.grpo.entropy import NoEntropy

    base = REPO / overlay.read_text().split(" -c ")[1].split()[0]
    monkeypatch.chdir(tmp_path)
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
