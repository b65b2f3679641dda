"""Every shipped YAML instantiates with the CLI, and the console script works end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lit_modules.cli import LitforgeCLI

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cli = LitforgeCLI(args=["--config", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


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
