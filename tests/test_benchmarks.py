"""The benchmark plumbing: result-file helpers and the README table renderer (no model is loaded)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import render_readme, tables_compression
from benchmarks.common import REPO_ROOT, atomic_write_text, merge_rows, peak_rss_mb, read_results, write_results

META = {"mode": "full", "model": "smollm2-135m-instruct", "eval_seqlen": 512, "date": "2025-01-02T03:04:05+00:00",
        "command": "python benchmarks/pruning.py --out x.json", "settings": {"nsamples": 64, "calib_seqlen": 512,
                                                                             "eval_windows": 64},
        "machine": {"cpu_count": 2, "threads": 2, "torch": "2.13.0"}}


def row(method, pattern, ppl, sparsity=0.5, seconds=12.34, run=None):
    return {"run": run or f"{method}-{pattern}", "mode": "full", "method": method, "pattern": pattern,
            "sparsity": sparsity, "ppl": ppl, "seconds": seconds, "peak_rss_mb": 1234.4, "forward_seconds": 3.456}


ROWS = [{**row("barber_wanda", "2:4", 40.0), "barber": True, "barber_granularity": "output1", "barber_threshold": 0.01},
        row("wanda", "unstructured", 22.5), row("dense", None, 14.049, 0.0, 0.0),
        row("wanda", "2:4", 45.0), row("magnitude", "unstructured", 99.0)]

README = """# project

intro

<!-- table:pruning -->
old text that must go
<!-- /table:pruning -->

## Tests
"""


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "pruning.json"
    write_results(path, ROWS, META)
    return path


def render_file(tmp_path, results, *extra):
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(README)
    code = render_readme.main(["--readme", str(readme), "--results", f"pruning={results}", *extra])
    return code, readme.read_text()


def test_write_results_round_trips_and_merges_by_key(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_results(path, [row("wanda", "2:4", 1.0), row("dense", None, 2.0)], {"mode": "full"})
    assert read_results(path) == {"meta": {"mode": "full"}, "rows": [row("wanda", "2:4", 1.0), row("dense", None, 2.0)]}
    write_results(path, [row("dense", None, 3.0), row("magnitude", "4:8", 4.0)], {"mode": "full", "n": 2},
                  merge_key=("run",))
    payload = read_results(path)
    # Replaced in place, new rows appended, header from the latest write.
    assert [(r["run"], r["ppl"]) for r in payload["rows"]] == [("wanda-2:4", 1.0), ("dense-None", 3.0),
                                                                ("magnitude-4:8", 4.0)]
    assert payload["meta"] == {"mode": "full", "n": 2}
    write_results(path, [row("dense", None, 5.0)], {})
    assert [r["ppl"] for r in read_results(path)["rows"]] == [5.0]  # no merge key: the file is replaced


def test_merge_rows_keeps_order_and_uses_every_key_field():
    old = [{"a": 1, "b": 1, "v": "old"}, {"a": 1, "b": 2, "v": "old"}]
    new = [{"a": 1, "b": 2, "v": "new"}, {"a": 2, "b": 1, "v": "new"}]
    assert merge_rows(old, new, ("a", "b")) == [old[0], new[0], new[1]]


def test_read_results_of_a_missing_file_is_empty_and_a_foreign_file_is_refused(tmp_path):
    assert read_results(tmp_path / "none.json") == {"meta": {}, "rows": []}
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="rows"):
        read_results(tmp_path / "bad.json")


def test_atomic_write_keeps_the_file_mode_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("a")
    path.chmod(0o644)
    atomic_write_text(path, "b")
    assert path.read_text() == "b" and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_peak_rss_is_in_megabytes():
    assert 10 < peak_rss_mb() < 100_000  # KiB misread as bytes or MB would fall outside


def test_renderer_formats_sorts_and_captions_the_table(tmp_path, results):
    code, text = render_file(tmp_path, results)
    assert code == 0 and "old text" not in text and text.endswith("## Tests\n")
    lines = text.split("<!-- table:pruning -->\n")[1].split("\n<!-- /table:pruning -->")[0].strip().splitlines()
    assert lines[0] == "| method | pattern | sparsity | ppl | compression s | × forward | peak RSS MB | forward s |"
    assert lines[2] == "| dense | — | 0.0% | 14.05 | — | — | 1234 | 3.46 |"
    assert lines[3] == "| magnitude | unstructured | 50.0% | 99.00 | 12.3 | 3.6× | 1234 | 3.46 |"
    # Within a pattern, each initial method is followed by its Barber rebuild.
    assert [line.split(" | ")[0][2:] for line in lines[2:7]] == ["dense", "magnitude", "wanda", "wanda",
                                                                 "barber_wanda"]
    caption = lines[-1]
    assert caption.startswith("_Mode full: smollm2-135m-instruct, calibration 64 × 512 tokens")
    assert "LLM-Barber: barber_wanda output1 τ=0.01 (2:4);" in caption
    assert "2025-01-02" in caption and "python benchmarks/pruning.py --out x.json" in caption


def test_rendering_is_idempotent_and_check_detects_staleness(tmp_path, results, capsys):
    assert render_file(tmp_path, results, "--check")[0] == 1  # "old text" is stale
    _, first = render_file(tmp_path, results)
    code, second = render_file(tmp_path, results)
    assert code == 0 and first == second
    assert render_file(tmp_path, results, "--check")[0] == 0
    write_results(results, [row("dense", None, 15.0, 0.0, 0.0)], META, merge_key=("run",))
    code, after_check = render_file(tmp_path, results, "--check")
    assert code == 1 and after_check == second  # --check never writes
    assert "stale" in capsys.readouterr().err


def test_missing_results_render_a_note_naming_the_producer(tmp_path):
    code, text = render_file(tmp_path, tmp_path / "absent.json")
    assert code == 0 and "_No results yet: run `python benchmarks/pruning.py --out" in text


@pytest.mark.parametrize("bad", ["<!-- table:pruning -->\nno end\n", "<!-- table:nosuch -->x<!-- /table:nosuch -->",
                                 "<!-- table:pruning --><!-- table:pruning --><!-- /table:pruning -->"])
def test_broken_markers_are_refused(tmp_path, results, bad):
    (tmp_path / "README.md").write_text(bad)
    code, text = render_file(tmp_path, results)
    assert code == 2 and text == bad


def test_unknown_results_override_is_refused(tmp_path, results):
    with pytest.raises(SystemExit, match="NAME=PATH"):
        render_file(tmp_path, results, "--results", "nosuch=x.json")


def test_full_pruning_runs_match_the_shipped_configs():
    yaml = pytest.importorskip("yaml")
    from benchmarks import pruning

    specs = pruning.run_specs()
    full_runs = pruning.BENCHMARK.selected_runs("full", None)
    assert len(full_runs) == 1 + 5 * 3 and set(pruning.MODES["quick"].runs) <= set(specs)
    sweep = pruning.BENCHMARK.selected_runs("sweep", None)
    assert len(sweep) == len(pruning.SWEEP) and not set(sweep) & set(full_runs)
    assert {specs[n].callback_kwargs["barber_threshold"] for n in sweep} == {0.05, 0.1}
    full = pruning.MODES["full"]
    configs = sorted((REPO_ROOT / "configs" / "prune").glob("*_smollm2*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        callback = dict(config["trainer"]["callbacks"][0]["init_args"])
        calibration = callback.pop("calibration")["init_args"]
        if not callback.get("barber"):
            callback.pop("barber", None)
        method, _, suffix = path.stem.partition("_smollm2")
        spec = specs[f"{method}-{suffix.removeprefix('_') or 'unstructured'}"]
        assert spec.callback_kwargs == callback, path.name
        # Same window length and method options; the table calibrates on fewer windows than the configs'
        # 64 to fit the CPU budget (see MODES["full"]), which its caption states.
        assert calibration["seqlen"] == full.calib_seqlen and calibration["nsamples"] >= full.nsamples, path.name
        assert config["data"]["init_args"]["max_windows"] >= full.eval_windows, path.name


def test_unknown_pruning_run_names_are_refused():
    from benchmarks import pruning

    with pytest.raises(SystemExit, match="unknown run"):
        pruning.BENCHMARK.selected_runs("full", ["wanda-3of7"])


def test_merging_runs_keeps_the_first_command_and_refuses_another_mode(tmp_path):
    from benchmarks.driver import merged_meta

    path = tmp_path / "r.json"
    assert merged_meta(path, {"mode": "full", "date": "d1", "command": "first"})["command"] == "first"
    write_results(path, [row("dense", None, 1.0)], {"mode": "full", "date": "d1", "command": "first"})
    meta = merged_meta(path, {"mode": "full", "date": "d2", "command": "second --runs x"})
    assert meta["command"] == "first" and meta["updates"] == [{"date": "d2", "command": "second --runs x"}]
    with pytest.raises(SystemExit, match="cannot merge"):
        merged_meta(path, {"mode": "quick", "date": "d3", "command": "third"})


def test_caption_spans_the_days_rows_were_measured():
    rows = [{**row("dense", None, 1.0), "date": "2025-01-02T00:00:00"},
            {**row("wanda", "2:4", 2.0), "date": "2025-01-05T00:00:00"}]
    assert "2025-01-02 to 2025-01-05" in tables_compression.pruning_caption(META, rows)


def test_forward_seconds_runs_each_window_once_at_batch_one_without_grad():
    import torch

    from benchmarks.common import forward_seconds

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.calls = []

        def forward(self, input_ids):
            self.calls.append((tuple(input_ids.shape), torch.is_grad_enabled(), self.training))
            return input_ids * self.weight

    model = Recorder().train()
    seconds = forward_seconds(model, torch.zeros(3, 5, dtype=torch.long))
    assert seconds >= 0 and model.calls == [((1, 5), False, False)] * 3 and model.training


# -- quantization ----------------------------------------------------------------------------------
QUANT_META = {**META, "command": "python benchmarks/quantization.py --out q.json",
              "settings": {"nsamples": 16, "calib_seqlen": 512, "eval_windows": 32}}
GRID = {"symmetric": False, "mse": False, "act_order": True, "static_groups": True, "true_sequential": True}


def qrow(method, ppl, bits=None, group_size=-1, target=None, candidates=None, avg=None, allocation=None,
         attention_aware=None, run=None):
    dense = method == "dense"
    mixed = target is not None
    return {"run": run or f"{method}-{bits or target}-{group_size}", "mode": "full", "method": method,
            "bits": bits, "avg_bits": None if dense else (avg if mixed else float(bits)), "target_avg_bits": target,
            "candidate_bits": candidates, "group_size": None if dense else group_size,
            "allocation": (allocation or "sensitivity") if mixed else None,
            "attention_aware": (True if attention_aware is None else attention_aware) if method == "aptq" else None,
            "ppl": ppl, "seconds": 0.0 if dense else 56.78, "peak_rss_mb": 1500.2, "forward_seconds": 2.345,
            "config": None if dense else {"method": method, **GRID},
            "summary": {"pass1_seconds": 12.34} if mixed else {}}


QROWS = [qrow("aptq", 30.0, target=3.5, candidates=[2, 4], avg=3.4987, run="aptq-avg3.5"),
         qrow("gptq", 25.0, bits=3, group_size=64), qrow("rtn", 90.0, bits=3),
         qrow("aptq", 35.0, target=3.5, candidates=[2, 4], avg=3.49, attention_aware=False),
         qrow("gptq", 40.0, target=3.5, candidates=[2, 4], avg=3.3333, allocation="by_type"),
         qrow("dense", 13.29), qrow("gptq", 16.0, bits=4), qrow("aptq", 28.0, bits=3),
         qrow("aptq", 50.0, target=3.0, candidates=[2, 3, 4], avg=3.0), qrow("gptq", 29.0, bits=3)]

QUANT_README = """# project

<!-- table:quantization -->
stale
<!-- /table:quantization -->
"""


def quant_table_lines(tmp_path, rows, meta=QUANT_META):
    results, readme = tmp_path / "quantization.json", tmp_path / "README.md"
    write_results(results, rows, meta)
    readme.write_text(QUANT_README)
    code = render_readme.main(["--readme", str(readme), "--results", f"quantization={results}"])
    body = readme.read_text().split("<!-- table:quantization -->\n")[1].split("\n<!-- /table:quantization -->")[0]
    return code, body.strip().splitlines()


def test_quantization_table_formats_sorts_and_captions(tmp_path):
    code, lines = quant_table_lines(tmp_path, QROWS)
    assert code == 0
    assert lines[0] == ("| method | bits | group size | allocation | ppl | compression s | of which pass 1 s | "
                        "peak RSS MB | forward s |")
    table = [line.split(" | ") for line in lines[2:2 + len(QROWS)]]
    assert lines[2] == "| dense | — | — | — | 13.29 | — | — | 1500 | 2.35 |"
    assert lines[3] == "| gptq | 4 | per channel | uniform | 16.00 | 56.8 | — | 1500 | 2.35 |"
    # Uniform widths (widest first, per channel before groups, RTN/GPTQ/APTQ), then the mixed budgets
    # (largest first), each APTQ row followed by its ablations; the target shows where the average misses it.
    assert [(cells[0].lstrip("| "), cells[1], cells[2]) for cells in table[2:]] == [
        ("rtn", "3", "per channel"), ("gptq", "3", "per channel"), ("aptq", "3", "per channel"),
        ("gptq", "3", "64"), ("aptq", "avg 3.50 of {2,4}", "per channel"),
        ("gptq", "avg 3.33 of {2,4} (target 3.5)", "per channel"),
        ("aptq", "avg 3.49 of {2,4} (target 3.5)", "per channel"), ("aptq", "avg 3.00 of {2,3,4}", "per channel")]
    assert [cells[3] for cells in table[6:9]] == ["sensitivity", "by module type (ablation)",
                                                  "sensitivity, plain q/k/v Hessians (ablation)"]
    assert [cells[6] for cells in table[5:7]] == ["—", "12.3"]  # pass 1 only where a plan was computed
    caption = lines[-1]
    assert caption.startswith("_Mode full: smollm2-135m-instruct, calibration 16 × 512 tokens (uniform RTN uses "
                              "none), evaluation 32 windows of 512 (wiki-leads); dense = the shipped Q4_1")
    assert "asymmetric min-max quantizer (GPTQ/APTQ: act-order, static-groups, true-sequential)" in caption
    assert "2025-01-02" in caption and "`python benchmarks/quantization.py --out q.json`" in caption


def test_quantization_caption_names_the_grid_the_rows_share():
    rtn = {**qrow("rtn", 2.0, bits=3), "config": {"method": "rtn", **GRID, "act_order": False}}
    rows = [qrow("gptq", 1.0, bits=3), rtn]
    assert tables_compression.grid_note(rows) == ("asymmetric min-max quantizer "
                                             "(GPTQ/APTQ: act-order, static-groups, true-sequential)")
    rows[0]["config"] = {**GRID, "symmetric": True, "act_order": False}
    assert tables_compression.grid_note(rows) == ("symmetric/asymmetric min-max quantizer "
                                             "(GPTQ/APTQ: static-groups, true-sequential)")
    assert tables_compression.grid_note([qrow("dense", 1.0)]) == "asymmetric min-max quantizer"  # the defaults


def test_quantization_caption_gives_the_threads_the_rows_ran_with(tmp_path):
    rows = [{**qrow("dense", 13.0), "threads": 1}, {**qrow("gptq", 20.0, bits=3), "threads": 1}]
    assert "2 CPUs, 1 threads, torch 2.13.0" in quant_table_lines(tmp_path, rows)[1][-1]
    rows[1]["threads"] = 2  # one run re-measured with another --threads
    assert "2 CPUs, 1/2 threads" in quant_table_lines(tmp_path, rows)[1][-1]
    assert "2 CPUs, 2 threads" in quant_table_lines(tmp_path, QROWS)[1][-1]  # rows without it: the header's


def test_missing_quantization_results_render_a_note_naming_the_producer(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(QUANT_README)
    code = render_readme.main(["--readme", str(readme), "--results", f"quantization={tmp_path / 'absent.json'}"])
    assert code == 0 and "_No results yet: run `python benchmarks/quantization.py --out" in readme.read_text()


def test_the_readme_has_the_quantization_table_after_the_pruning_one():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    render_readme.check_markers(text)
    pruning, quantization = text.index("<!-- table:pruning -->"), text.index("<!-- table:quantization -->")
    heading = text.index("## Results: quantizing SmolLM2-135M")
    assert pruning < heading < quantization
    assert "\n## " not in text[text.index("<!-- /table:pruning -->"):heading]  # right after the pruning section


def _config_callback(path):
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(path.read_text())
    callback = dict(config["trainer"]["callbacks"][0]["init_args"])
    return config, callback, callback.pop("calibration")["init_args"]


def test_full_quantization_runs_match_the_shipped_configs():
    from benchmarks import quantization

    specs = quantization.run_specs()
    # dense; rtn/gptq/aptq × (w4, w3, w3 g64); aptq at 2 budgets; 2 ablations at each budget; 1 diagnostic.
    assert len(specs) == 1 + 3 * 3 + 2 + 2 * 2 + 1 and set(quantization.MODES["quick"].runs) <= set(specs)
    full = quantization.MODES["full"]
    configs = sorted((REPO_ROOT / "configs" / "quant").glob("*_smollm2_*.yaml"))
    # The export config writes a symmetric g64 checkpoint; no table row corresponds to it.
    configs = [p for p in configs if not p.stem.endswith("_export")]
    assert len(configs) == 11
    for path in configs:
        config, callback, calibration = _config_callback(path)
        method, _, suffix = path.stem.partition("_smollm2_")
        spec = specs[f"{method}-{suffix.replace('_', '-')}"]
        assert spec.method == method and spec.callback_kwargs == callback, path.name
        # Same window length and options; the table calibrates and evaluates on fewer windows than the configs
        # (see MODES["full"]), which its caption states.
        assert calibration["seqlen"] == full.calib_seqlen and calibration["nsamples"] >= full.nsamples, path.name
        assert calibration["seed"] == 0 and config["data"]["init_args"]["seqlen"] == quantization.EVAL_SEQLEN
        assert config["data"]["init_args"]["max_windows"] >= full.eval_windows, path.name
    # The ablations change exactly one option of the APTQ run at the same budget.
    for budget in quantization.MIXED:
        aptq = specs[f"aptq-{budget}"].callback_kwargs
        assert specs[f"aptq-noattn-{budget}"].callback_kwargs == {**aptq, "attention_aware": False}
        assert specs[f"gptq-bytype-{budget}"].callback_kwargs == {**aptq, "method": "gptq", "allocation": "by_type"}
    aptq = specs["aptq-avg3.5"].callback_kwargs
    assert specs["aptq-layertraces-avg3.5"].callback_kwargs == {**aptq, "sensitivity": "layer"}


def test_quantization_run_rows_record_uniform_and_mixed_settings():
    from benchmarks import quantization

    specs = quantization.run_specs()
    report = {"summary": {"avg_bits": 3.47}}
    assert quantization.quant_fields(specs["dense"], None) == {
        "bits": None, "avg_bits": None, "target_avg_bits": None, "candidate_bits": None, "group_size": None,
        "allocation": None, "sensitivity": None, "attention_aware": None}
    assert quantization.quant_fields(specs["rtn-w3-g64"], {"summary": {"avg_bits": 3.0}}) == {
        "bits": 3, "avg_bits": 3.0, "target_avg_bits": None, "candidate_bits": None, "group_size": 64,
        "allocation": None, "sensitivity": None, "attention_aware": None}
    assert quantization.quant_fields(specs["aptq-noattn-avg3.5"], report) == {
        "bits": None, "avg_bits": 3.47, "target_avg_bits": 3.5, "candidate_bits": [2, 4], "group_size": -1,
        "allocation": "sensitivity", "sensitivity": "loss", "attention_aware": False}
    assert quantization.quant_fields(specs["gptq-bytype-avg3.0"], report)["allocation"] == "by_type"
    modules = [{"name": "model.layers.0.self_attn.q_proj", "bits": 4, "params": 3},
               {"name": "model.layers.1.self_attn.q_proj", "bits": 2, "params": 1},
               {"name": "model.layers.0.mlp.down_proj", "bits": 2, "params": 8}]
    assert quantization.bits_by_type(modules) == {"q_proj": 3.5, "down_proj": 2.0}


def test_unknown_quantization_runs_are_refused_and_modes_are_not_mixed(tmp_path, monkeypatch):
    from benchmarks import quantization

    from benchmarks import driver

    bench = dataclasses.replace(quantization.BENCHMARK, spawn=lambda *args: pytest.fail("a run started"))
    monkeypatch.setattr(driver, "set_threads", lambda threads: None)  # keep this process's torch threads

    with pytest.raises(SystemExit, match="unknown run"):
        bench.selected_runs("full", ["gptq-w5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "q.json", "--threads", "0"])
    path = tmp_path / "q.json"
    write_results(path, [qrow("dense", 1.0)], {"mode": "quick", "date": "d1", "command": "first"})
    with pytest.raises(SystemExit, match="cannot merge"):
        bench.drive(path, "full", ["dense"])
