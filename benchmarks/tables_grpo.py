"""README tables of the GRPO benchmarks (demo, noise study, throughput) and of the strategy check."""

from __future__ import annotations

import statistics

from benchmarks.table_format import DASH, Table, dates, number, order


# -- GRPO ------------------------------------------------------------------------------------------
NOISE_METHODS = ("vanilla", "phased", "phased_lam0.05", "phased_lam0.2", "min_only", "max_only", "reversed", "rent",
                 "intuitor", "ttrl")


def noise_cells(row: dict) -> list[str]:
    before, after = row["clean_acc_before"], row["clean_acc_after"]
    entropies = [s["entropy"] for s in row.get("train_curves", []) if "entropy" in s]
    agreement = [s["noisy_label_agreement"] for s in row.get("train_curves", []) if "noisy_label_agreement" in s]
    return [row["method"], f"{row['noise_rate']:g}", str(row["seed"]), number(before, 3), number(after, 3),
            f"{after - before:+.3f}", number(row.get("clean_acc_auc"), 3),
            number(entropies[-1], 3) if entropies else DASH, number(agreement[-1], 3) if agreement else DASH]


def noise_sort_key(row: dict) -> tuple:
    return (row["noise_rate"], order(NOISE_METHODS, row["method"]), row["method"], row["seed"])


def grid_note(rows: list[dict]) -> str:
    """``methods × noise × seeds``, one part per set of seeds when not every rate was run with the same ones."""
    methods = sorted({r["method"] for r in rows}, key=lambda m: order(NOISE_METHODS, m))
    seeds_by_rate: dict[float, set[int]] = {}
    for row in rows:
        seeds_by_rate.setdefault(row["noise_rate"], set()).add(row["seed"])
    parts: dict[tuple[int, ...], list[float]] = {}
    for rate, seeds in sorted(seeds_by_rate.items()):
        parts.setdefault(tuple(sorted(seeds)), []).append(rate)
    grid = [f"noise {', '.join(f'{r:g}' for r in rates)} × seed{'s' if len(seeds) > 1 else ''} "
            f"{', '.join(map(str, seeds))}" for seeds, rates in parts.items()]
    return f"methods {', '.join(methods)} × ({'; '.join(grid)})"


def noise_caption(meta: dict, rows: list[dict]) -> str:
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    return (f"_Mode {meta.get('mode', '?')}: grid actually run = {grid_note(rows)}; {meta.get('model', '?')} "
            f"on {meta.get('task', '?')} with near-miss label noise, {settings.get('steps', '?')} optimizer steps of "
            f"{settings.get('prompts_per_batch', '?')} prompts × G={settings.get('num_generations', '?')}, "
            f"lr {settings.get('learning_rate', '?')}, λ={meta.get('lambda', '?')}; clean accuracy = greedy decoding "
            f"on {settings.get('num_val', '?')} held-out examples with clean labels, before training and after the "
            f"last step; AUC = mean over the validations; entropy and noisy-label agreement (corrupted training rows "
            f"whose label the policy reproduced) at the last step; {machine.get('cpu_count', '?')} CPUs, "
            f"torch {machine.get('torch', '?')}; {dates(meta, rows)}, `{meta.get('command', '?')}`._")


def seed_summary(rows: list[dict]) -> list[dict]:
    """One row per (method, noise rate): mean ± std over the seeds actually run, and which seeds those were."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["noise_rate"]), []).append(row)
    out = []
    for (method, rate), runs in groups.items():
        after = [r["clean_acc_after"] for r in runs]
        before = [r["clean_acc_before"] for r in runs]
        auc = [r["clean_acc_auc"] for r in runs if r.get("clean_acc_auc") is not None]
        out.append({"method": method, "noise_rate": rate, "seeds": sorted(r["seed"] for r in runs),
                    "before": statistics.mean(before), "after_mean": statistics.mean(after),
                    "after_std": statistics.pstdev(after), "auc_mean": statistics.mean(auc) if auc else None,
                    "gain": statistics.mean(a - b for a, b in zip(after, before))})
    return out


def summary_cells(row: dict) -> list[str]:
    return [row["method"], f"{row['noise_rate']:g}", ", ".join(map(str, row["seeds"])), number(row["before"], 3),
            f"{row['after_mean']:.3f} ± {row['after_std']:.3f}", f"{row['gain']:+.3f}", number(row["auc_mean"], 3)]


def summary_caption(meta: dict, rows: list[dict]) -> str:
    settings = meta.get("settings", {})
    return (f"_Mean ± population std over the seeds listed (each seed: its own corrupted labels and sampling); "
            f"{meta.get('model', '?')} on {meta.get('task', '?')}, {settings.get('steps', '?')} optimizer steps of "
            f"{settings.get('prompts_per_batch', '?')} prompts × G={settings.get('num_generations', '?')}, lr "
            f"{settings.get('learning_rate', '?')}; clean accuracy on {settings.get('num_val', '?')} held-out images "
            f"(one image = {1 / max(settings.get('num_val', 1), 1):.4f}); the per-run table below lists every run._")


# The demo fits in the order `make demo` runs them (the multimodal GRPO demo loads the warm start's output).
DEMO_ORDER = ("grpo_phased_quick", "tiny_vl_grounding", "grpo_phased_vl_quick")


def demo_cells(row: dict) -> list[str]:
    before, after = row["clean_acc_before"], row["clean_acc_after"]
    return [f"`{row['config']}`", row["task"], f"{row['noise_rate']:g}", str(row["steps"]), str(row["num_val"]),
            number(before, 3), number(after, 3), f"{after - before:+.3f}", number(row["wall_seconds"], 0),
            str(row["threads"])]


def demo_caption(meta: dict, rows: list[dict]) -> str:
    machine = meta.get("machine", {})
    return (f"_Clean accuracy = greedy decoding on the config's held-out examples scored against their clean "
            f"labels, before training and after the last step; wall time of the whole fit (model load included) on "
            f"{machine.get('cpu_count', '?')} CPUs, torch {machine.get('torch', '?')}; {dates(meta, rows)}, "
            f"`{meta.get('command', '?')}`._")


def throughput_cells(row: dict) -> list[str]:
    return [row["run"], str(row["num_generations"]), str(row["prompts"]), str(row["max_new_tokens"]),
            number(row["seconds_per_optimizer_step"], 2), number(row["generation_seconds"], 2),
            number(row["update_seconds"], 2), number(row["completion_tokens"], 0),
            number(row["completion_tokens_per_second"], 1), number(row["peak_rss_mb"], 0)]


def throughput_caption(meta: dict, rows: list[dict]) -> str:
    machine = meta.get("machine", {})
    devices = sorted({r.get("device", "?") for r in rows})
    return (f"_Mode {meta.get('mode', '?')}: {meta.get('model', '?')}, fp32 on {', '.join(devices)}, "
            f"{machine.get('cpu_count', '?')} CPUs / {machine.get('threads', '?')} threads, torch "
            f"{machine.get('torch', '?')}; mean over {meta.get('settings', {}).get('batches', '?')} generated batches "
            f"after 1 warm-up; generation and update are per generated batch (μ optimizer steps share one); "
            f"completion tokens = mean tokens generated per batch (EOS included); {dates(meta, rows)}, "
            f"`{meta.get('command', '?')}`._")


# -- strategies ------------------------------------------------------------------------------------
STRATEGY_COLUMNS = ("auto", "ddp", "fsdp", "deepspeed", "multinode")
CAPABILITY_NAMES = {"evaluate": "`CausalLM` evaluation", "prune": "`Pruning` (Wanda + LLM-Barber)",
                    "quantize": "`Quantization` (APTQ mixed precision)", "grpo": "`GRPOModule` fit"}
# The tests behind a "tested" cell: single device, the capability's own test module; ddp / fsdp / multi-node, the
# test that compares the 2-process result with the single-process (GRPO under FSDP: the ddp) one, not just that it
# runs. On CPU, FSDP runs through tests/fsdp_cpu.py (Lightning admits FSDPStrategy on GPUs only).
_DDP = "tests/test_distributed.py::"
STRATEGY_TESTS = {("evaluate", "auto"): "tests/test_causal_lm.py", ("prune", "auto"): "tests/test_pruning_callback.py",
                  ("quantize", "auto"): "tests/test_quant_callback.py", ("grpo", "auto"): "tests/test_grpo_module.py",
                  ("evaluate", "ddp"): _DDP + "test_perplexity_counts_each_window_once_and_matches_single_process",
                  ("prune", "ddp"): _DDP + "test_compression_matches_single_process",
                  ("quantize", "ddp"): _DDP + "test_compression_matches_single_process",
                  ("grpo", "ddp"): _DDP + "test_grpo_ddp_fit_keeps_identical_weights_on_both_ranks",
                  ("evaluate", "multinode"): _DDP + "test_perplexity_counts_each_window_once_and_matches_single_"
                                                    "process[multinode]",
                  ("prune", "multinode"): _DDP + "test_compression_matches_single_process[wanda-multinode]",
                  ("quantize", "multinode"): _DDP + "test_compression_matches_single_process[aptq_mixed-multinode]",
                  ("grpo", "multinode"): _DDP + "test_grpo_ddp_fit_keeps_identical_weights_on_both_ranks[multinode]",
                  ("evaluate", "fsdp"): _DDP + "test_perplexity_counts_each_window_once_and_matches_single_process"
                                               "[fsdp]",
                  ("prune", "fsdp"): _DDP + "test_compression_matches_single_process[wanda_barber-fsdp]",
                  ("quantize", "fsdp"): _DDP + "test_compression_matches_single_process[aptq_mixed-fsdp]",
                  ("grpo", "fsdp"): "tests/test_fsdp.py"}


def strategy_rows(rows: list[dict]) -> list[dict]:
    """One table row per capability with its check result per strategy."""
    table: dict[str, dict] = {}
    for row in rows:
        table.setdefault(row["capability"], {"capability": row["capability"]})[row["strategy"]] = row
    return list(table.values())


def strategy_cell(capability: str, cell: dict | None) -> str:
    if cell is None:
        return "not checked"
    test = STRATEGY_TESTS.get((capability, cell["strategy"]))
    text = {"ok": "runs", "refused": "refused", "failed": "**fails**", "skipped": "not run"}[cell["outcome"]]
    if cell["outcome"] != "ok":
        text += f": {_short_reason(cell['message'])}"
    return text + (f"; tested: `{test}`" if test else "")


def _short_reason(message: str) -> str:
    for marker, reason in (("requires a GPU accelerator", "Lightning allows FSDP on GPUs only"),
                           ("must have DeepSpeed installed", "DeepSpeed is not installed"),
                           ("does not support the", "cannot gather its weights (message names the alternatives)")):
        if marker in message:
            return reason
    return message.split(": ", 1)[-1][:120]


def strategy_cells(row: dict) -> list[str]:
    return [CAPABILITY_NAMES.get(row["capability"], row["capability"]),
            *(strategy_cell(row["capability"], row.get(s)) for s in STRATEGY_COLUMNS)]


def strategy_caption(meta: dict, rows: list[dict]) -> str:
    cells = [c for r in rows for c in r.values() if isinstance(c, dict) and c["outcome"] != "skipped"]
    accelerators = sorted({c["accelerator"] for c in cells})
    devices = sorted({f"{c['strategy']} {'2 nodes × ' if c['strategy'] == 'multinode' else ''}{c['devices']}"
                      for c in cells if c["strategy"] != "auto"})
    commands = {c["strategy"]: c["command"].replace(f"<{c['capability']} config>", "<config>").replace(
        "litforge fit ", "litforge validate|fit ").replace("litforge validate ", "litforge validate|fit ")
        for c in cells}  # fmt: skip
    return (f"_Each cell ran `litforge` on {meta.get('model', '?')} with check-size data ({', '.join(accelerators)}; "
            f"devices: {', '.join(devices)}); \"runs\" = exit 0, \"refused\" = stopped before any work with "
            f"the message summarised; \"tested\" names the tests (ddp, fsdp, multi-node: a comparison with the "
            f"1-process result; GRPO under fsdp: with the ddp run); on CPU, fsdp runs Lightning's FSDPStrategy "
            f"through `tests/fsdp_cpu.py` (Lightning admits it on GPUs only); {dates(meta, cells)}, `{meta.get('command', '?')}`. The command of each column: "
            + "; ".join(f"{strategy}: `{command}`" for strategy, command in commands.items()) + "._")


def noise_table(results: str, producer: str) -> Table:
    """The per-run table of a noise study (text or multimodal: the same row format)."""
    headers = ("method", "noise", "seed", "clean acc before", "clean acc after", "Δ", "AUC", "entropy",
               "noisy-label agreement")
    return Table(results=results, headers=headers, cells=noise_cells, sort_key=noise_sort_key, caption=noise_caption,
                 producer=producer)


TABLES: dict[str, Table] = {
    "noise_study": noise_table(
        "benchmarks/results/noise_study.json",
        "python benchmarks/noise_study.py --mode reduced --out benchmarks/results/noise_study.json"),
    "noise_study_vl_summary": Table(
        results="benchmarks/results/noise_study_vl.json",
        headers=("method", "noise", "seeds", "clean acc before", "clean acc after (mean ± std)", "mean Δ",
                 "mean AUC"),
        cells=summary_cells, sort_key=lambda row: (row["noise_rate"], order(NOISE_METHODS, row["method"])),
        caption=summary_caption, regroup=seed_summary,
        producer="python benchmarks/noise_study_vl.py --out benchmarks/results/noise_study_vl.json"),
    "noise_study_vl": noise_table("benchmarks/results/noise_study_vl.json",
                                  "python benchmarks/noise_study_vl.py --out benchmarks/results/noise_study_vl.json"),
    "strategies": Table(
        results="benchmarks/results/strategy_check.json",
        headers=("capability", "single device", "ddp", "fsdp", "deepspeed", "multi-node (2 nodes)"),
        cells=strategy_cells, sort_key=lambda row: list(CAPABILITY_NAMES).index(row["capability"]),
        caption=strategy_caption, regroup=strategy_rows,
        producer="python benchmarks/strategy_check.py --out benchmarks/results/strategy_check.json"),
    "grpo_demo": Table(
        results="benchmarks/results/grpo_demo.json",
        headers=("config", "task", "label noise", "steps", "held-out", "clean acc before", "clean acc after", "Δ",
                 "wall s", "threads"),
        cells=demo_cells, sort_key=lambda row: (order(DEMO_ORDER, row["run"]), row["run"]), caption=demo_caption,
        producer="python benchmarks/grpo_demo.py --out benchmarks/results/grpo_demo.json"),
    "grpo_throughput": Table(
        results="benchmarks/results/grpo_throughput.json",
        headers=("run", "G", "prompts", "max new tokens", "s / optimizer step", "generation s", "update s",
                 "completion tokens", "completion tok/s", "peak RSS MB"),
        cells=throughput_cells, sort_key=lambda row: row["run"], caption=throughput_caption,
        producer="python benchmarks/grpo_throughput.py --out benchmarks/results/grpo_throughput.json"),
}
