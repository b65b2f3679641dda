"""benchmarks/strategy_check.py: every cell's config is a valid litforge config, and outcomes are classified
from real runs (a tiny model; FSDP and DeepSpeed are refused on this CPU-only machine before any work)."""

from __future__ import annotations

import pytest

from benchmarks import render_readme, strategy_check
from benchmarks.common import write_results
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
    rows = [strategy_check.run_cell("evaluate", strategy, "cpu", model) for strategy in ("auto", "fsdp", "multinode")]
    assert [r["outcome"] for r in rows] == ["ok", "refused", "ok"], [r["message"] for r in rows]
    assert "fsdp" in rows[1]["message"] and rows[1]["devices"] == 2
    assert rows[2]["command"].startswith("NODE_RANK=<0|1> litforge validate") and "--trainer.num_nodes 2" in rows[2][
        "command"]  # fmt: skip
    results = tmp_path / "s.json"
    write_results(results, rows, {"model": model, "command": "python benchmarks/strategy_check.py --out s.json"})
    text = render_readme.render_table(render_readme.TABLES["strategies"], results)
    assert ("| `CausalLM` evaluation | runs; tested: `tests/test_causal_lm.py` | not checked | refused: Lightning "
            "allows FSDP on GPUs only | not checked | runs; tested: `tests/test_distributed.py::test_ddp_perplexity_"
            "shards_without_padding_and_matches_single_process[multinode]` |") in text


def test_the_error_line_of_a_traceback_is_kept():
    output = "Traceback (most recent call last):\n  File x\nValueError: bad strategy\n\n"
    assert strategy_check.last_error_line(output) == "ValueError: bad strategy"
    assert strategy_check.last_error_line("just text\nlast") == "last"
