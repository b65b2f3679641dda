"""The GRPO benchmark scripts' plumbing: run names, the grid, the summary, the figure and the README tables
(no model is loaded; the scripts themselves are run for the README)."""

from __future__ import annotations

import pytest

from benchmarks import noise_study, render_readme
from benchmarks.common import REPO_ROOT, read_results, write_results

META = {"mode": "reduced", "model": "smollm2-135m-instruct", "task": "add_1digit", "lambda": 0.01,
        "date": "2025-01-02T03:04:05+00:00", "command": "python benchmarks/noise_study.py --mode reduced --out n.json",
        "settings": {"steps": 16, "prompts_per_batch": 4, "num_generations": 8, "learning_rate": 2e-5, "num_val": 40},
        "machine": {"cpu_count": 2, "threads": 1, "torch": "2.13.0"}}


def study_row(method: str, rate: float, seed: int, before: float, after: float) -> dict:
    curves = [{"entropy": 2.0 - 0.1 * s, "entropy_coef": 0.01 if s < 12 else -0.01, "noisy_label_agreement": 0.1}
              for s in range(16)]
    return {"run": noise_study.run_name(method, rate, seed), "method": method, "noise_rate": rate, "seed": seed,
            "clean_acc_before": before, "clean_acc_after": after, "clean_acc_auc": (before + after) / 2,
            "train_curves": curves, "date": "2025-01-02T03:04:05+00:00"}


def rendered(table, results) -> tuple[str, list[str]]:
    """A table's rendered text and its data rows (the header row, which names "method", left out)."""
    text = render_readme.render_table(table, results)
    return text, [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]


def test_run_names_round_trip_and_the_grids_are_known_runs():
    names = noise_study.all_runs()
    assert len(names) == len(noise_study.METHODS) * len(noise_study.RATES) * len(noise_study.SEEDS)
    assert all(noise_study.run_name(*noise_study.parse_run(n)) == n for n in names)
    assert noise_study.parse_run("min_only-p0.4-s2") == ("min_only", 0.4, 2)
    for mode, runs in noise_study.BENCHMARK.modes.items():
        assert set(noise_study.BENCHMARK.selected_runs(mode, None)) <= set(names), mode
    reduced = noise_study.BENCHMARK.selected_runs("reduced", None)
    assert {noise_study.parse_run(n)[1] for n in reduced} == set(noise_study.RATES)
    with pytest.raises(SystemExit, match="unknown run"):
        noise_study.BENCHMARK.selected_runs("full", ["phased-p0.3-s0"])


def test_every_baseline_overlay_is_a_study_method():
    """The methods of the study are the phased config plus its overlays (spec §6.1, M1–M8)."""
    overlays = {p.stem for p in (REPO_ROOT / "configs" / "grpo" / "overlays").glob("*.yaml")}
    assert set(noise_study.METHODS) == overlays | {"phased"}
    assert {p.stem for p in (REPO_ROOT / "configs" / "grpo" / "vl_overlays").glob("*.yaml")} == overlays


def test_summary_averages_seeds_and_the_plot_is_written(tmp_path):
    rows = [study_row("phased", 0.4, 0, 0.7, 0.9), study_row("phased", 0.4, 1, 0.7, 0.8),
            study_row("vanilla", 0.4, 0, 0.7, 0.6), study_row("vanilla", 0.0, 0, 0.7, 0.95)]
    summary = noise_study.summary(rows)
    assert summary["phased"][0.4] == (pytest.approx(0.85), pytest.approx(0.05), 2)
    assert list(summary["vanilla"]) == [0.0, 0.4]
    results = tmp_path / "n.json"
    write_results(results, rows, META)
    png = noise_study.plot(results)
    assert png == tmp_path / "n.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_results(results, [], META)
    with pytest.raises(SystemExit, match="no rows"):
        noise_study.plot(results)


def test_noise_table_lists_every_run_with_its_gain_and_the_grid_in_the_caption(tmp_path):
    rows = [study_row("vanilla", 0.4, 0, 0.7, 0.6), study_row("phased", 0.4, 0, 0.7, 0.925),
            study_row("phased", 0.0, 0, 0.7, 0.95)]
    results = tmp_path / "n.json"
    write_results(results, rows, META)
    text, lines = rendered(render_readme.TABLES["noise_study"], results)
    assert lines == ["| phased | 0 | 0 | 0.700 | 0.950 | +0.250 | 0.825 | 0.500 | 0.100 |",
                     "| vanilla | 0.4 | 0 | 0.700 | 0.600 | -0.100 | 0.650 | 0.500 | 0.100 |",
                     "| phased | 0.4 | 0 | 0.700 | 0.925 | +0.225 | 0.812 | 0.500 | 0.100 |"]
    assert "methods vanilla, phased × (noise 0, 0.4 × seed 0)" in text
    rows.append(study_row("phased", 0.4, 1, 0.7, 0.9))
    write_results(results, rows, META)
    text = render_readme.render_table(render_readme.TABLES["noise_study"], results)
    assert "methods vanilla, phased × (noise 0 × seed 0; noise 0.4 × seeds 0, 1)" in text


def test_demo_and_throughput_tables_render_their_rows(tmp_path):
    demo = tmp_path / "d.json"
    write_results(demo, [{"run": "grpo_phased_quick", "config": "configs/demo/grpo_phased_quick.yaml",
                          "task": "add_1digit", "noise_rate": 0.4, "steps": 16, "num_val": 40,
                          "clean_acc_before": 0.7, "clean_acc_after": 0.925, "wall_seconds": 305.2, "threads": 2,
                          "date": "2025-01-02"}], {"command": "python benchmarks/grpo_demo.py --out d.json"})
    text = render_readme.render_table(render_readme.TABLES["grpo_demo"], demo)
    assert "| add_1digit | 0.4 | 16 | 40 | 0.700 | 0.925 | +0.225 | 305 | 2 |" in text
    speed = tmp_path / "t.json"
    write_results(speed, [{"run": "mu1-beta0", "num_generations": 8, "prompts": 8, "max_new_tokens": 32,
                           "seconds_per_optimizer_step": 20.0, "generation_seconds": 5.0, "update_seconds": 15.0,
                           "completion_tokens": 640.0, "completion_tokens_per_second": 32.0, "peak_rss_mb": 3000.0,
                           "device": "cpu", "date": "2025-01-02"}],
                  {"mode": "full", "settings": {"batches": 5}, "model": "smollm2-135m-instruct"})
    text = render_readme.render_table(render_readme.TABLES["grpo_throughput"], speed)
    assert "| mu1-beta0 | 8 | 8 | 32 | 20.00 | 5.00 | 15.00 | 640 | 32.0 | 3000 |" in text
    assert read_results(speed)["rows"][0]["device"] == "cpu"


def test_seed_summary_table_averages_each_method_and_rate_over_the_seeds_run(tmp_path):
    rows = [study_row("phased", 0.4, 0, 0.3, 0.5), study_row("phased", 0.4, 1, 0.3, 0.3),
            study_row("vanilla", 0.4, 2, 0.3, 0.35), study_row("vanilla", 0.0, 0, 0.3, 0.4)]
    results = tmp_path / "vl.json"
    write_results(results, rows, {**META, "settings": {**META["settings"], "num_val": 256}})
    text, lines = rendered(render_readme.TABLES["noise_study_vl_summary"], results)
    assert lines == ["| vanilla | 0 | 0 | 0.300 | 0.400 ± 0.000 | +0.100 | 0.350 |",
                     "| vanilla | 0.4 | 2 | 0.300 | 0.350 ± 0.000 | +0.050 | 0.325 |",
                     "| phased | 0.4 | 0, 1 | 0.300 | 0.400 ± 0.100 | +0.100 | 0.350 |"]
    assert "one image = 0.0039" in text


def test_the_multimodal_study_runs_known_methods_at_the_grounding_settings():
    from benchmarks import noise_study_vl

    names = noise_study_vl.all_runs()
    assert set(noise_study_vl.BENCHMARK.selected_runs("full", None)) <= set(names)
    settings = noise_study_vl.MODES["full"][0]
    assert (settings.model, settings.task) == ("tiny-qwen2-vl-grounding", "image_grounding")
    assert settings.steps * settings.prompts_per_batch <= settings.num_train  # one pass: no image seen twice
