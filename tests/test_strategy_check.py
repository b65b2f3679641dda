"""benchmarks/strategy_check.py: every cell's config is a valid litforge config, and outcomes are classified
from real runs (a tiny model; on this CPU-only machine FSDP runs through ``tests.fsdp_cpu``, DeepSpeed is refused)."""

from __future__ import annotations

import pytest

from benchmarks import render_readme, strategy_check
from benchmarks.common import REPO_ROOT as REPO
from benchmarks.common import write_results
from benchmarks.strategy_check import CPU_FSDP
from lit_modules.cli import LitforgeCLI


@pytest.mark.parametrize("capability", strategy_check.CAPABILITIES)
def test_every_capability_config_instantiates(capability, tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    subcommand, config = strategy_check.config(capability, str(tiny_model_dir("llama")), tmp_path)
    assert subcommand in ("fit", "validate")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    cli = LitforgeCLI(args=["--config", str(path)], run=False)
    assert cli.model is not None and cli.datamodule is not None


def test_cells_end_as_ok_or_refused_and_the_matrix_renders(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    strategies = ("auto", "fsdp", "deepspeed", "multinode")
    rows = [strategy_check.run_cell("evaluate", strategy, "cpu", model) for strategy in strategies]
    assert [r["outcome"] for r in rows] == ["ok", "ok", "refused", "ok"], [r["message"] for r in rows]
    assert "DeepSpeed" in rows[2]["message"] and rows[1]["devices"] == 2
    assert CPU_FSDP in rows[1]["command"]  # on CPU, FSDP runs through the subclass Lightning admits there
    assert rows[3]["command"].startswith("NODE_RANK=<0|1> litforge validate") and "--trainer.num_nodes 2" in rows[3][
        "command"]  # fmt: skip
    results = tmp_path / "s.json"
    write_results(results, rows, {"model": model, "command": "python benchmarks/strategy_check.py --out s.json"})
    text = render_readme.render_table(render_readme.TABLES["strategies"], results)
    assert ("| `CausalLM` evaluation | runs; tested: `tests/test_causal_lm.py` | not checked | runs; tested: "
            "`tests/test_distributed.py::test_perplexity_counts_each_window_once_and_matches_single_process[fsdp]` "
            "| refused: DeepSpeed is not installed | runs; tested: `tests/test_distributed.py::test_perplexity_counts_"
            "each_window_once_and_matches_single_process[multinode]` |") in text


def test_every_tested_cell_names_tests_that_exist():
    """The matrix's "tested" cells must point at real tests: each id (file, file::test or file::test[params]) is
    matched against what pytest collects."""
    import subprocess
    import sys

    from benchmarks.tables_grpo import STRATEGY_TESTS

    files = sorted({test.split("::")[0] for test in STRATEGY_TESTS.values()})
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *files], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    def names(line: str, test: str) -> bool:
        if "[" in test:  # one parametrisation
            return line == test
        if "::" in test:  # a test function, parametrised or not
            return line == test or line.startswith(test + "[")
        return line.startswith(test + "::")  # a test file

    for test in STRATEGY_TESTS.values():
        assert any(names(line, test) for line in collected), test


def test_the_error_line_of_a_traceback_is_kept():
    output = "Traceback (most recent call last):\n  File x\nValueError: bad strategy\n\n"
    assert strategy_check.last_error_line(output) == "ValueError: bad strategy"
    assert strategy_check.last_error_line("just text\nlast") == "last"


def test_multinode_on_one_gpu_is_skipped_not_failed(monkeypatch):
    from benchmarks import tables_grpo

    monkeypatch.setattr(strategy_check, "devices_for", lambda strategy, accelerator: 1)  # a machine with one GPU
    row = strategy_check.run_cell("grpo", "multinode", "gpu", "unused")
    assert row["outcome"] == "skipped" and "2 GPUs" in row["message"]
    assert tables_grpo.strategy_cell("grpo", row).startswith("not run: needs 2 GPUs")
