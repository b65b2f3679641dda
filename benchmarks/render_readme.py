"""Regenerate the README's result tables from the benchmark JSON files.

    python benchmarks/render_readme.py            # rewrite every table in README.md
    python benchmarks/render_readme.py --check    # exit 1 if README.md differs from what the JSON files give
    python benchmarks/render_readme.py --readme /tmp/README.md --results pruning=benchmarks/results/pruning_quick.json

The README holds one marker pair per table, ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->``; everything
between them is generated, so hand edits there are lost. A table is registered in ``TABLES`` with its
result file and how to turn its rows into cells; adding a benchmark means adding one entry.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # see benchmarks/pruning.py

from benchmarks.common import REPO_ROOT, atomic_write_text, read_results  # noqa: E402

MARKER = re.compile(r"<!-- table:(?P<name>[\w-]+) -->(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL)
OPENING = re.compile(r"<!-- (/?)table:([\w-]+) -->")
DASH = "—"


@dataclass(frozen=True)
class Table:
    results: str  # JSON file, relative to the repository root
    headers: tuple[str, ...]
    cells: Callable[[dict], list[str]]  # one row dict -> its cells, in header order
    sort_key: Callable[[dict], Any]
    caption: Callable[[dict, list[dict]], str]  # (meta, rows) -> one line under the table
    producer: str  # the command that writes ``results``, shown while there are none
    regroup: Callable[[list[dict]], list[dict]] | None = None  # rows -> table rows (a pivot), before sorting


# -- pruning ---------------------------------------------------------------------------------------
PRUNING_METHODS = ("dense", "magnitude", "wanda", "barber_wanda", "sparsegpt", "barber_sparsegpt")
PRUNING_PATTERNS = (None, "unstructured", "2:4", "4:8")


def _number(value: Any, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def pruning_cells(row: dict) -> list[str]:
    dense = row["method"] == "dense"
    return [row["method"], row.get("pattern") or DASH, f"{100 * row['sparsity']:.1f}%", _number(row["ppl"], 2),
            DASH if dense else _number(row["seconds"], 1), DASH if dense else _times_forward(row),
            _number(row.get("peak_rss_mb"), 0), _number(row.get("forward_seconds"), 2)]


def _times_forward(row: dict) -> str:
    """Compression time as a multiple of one forward pass over the same calibration tokens."""
    forward = row.get("forward_seconds")
    return f"{row['seconds'] / forward:.1f}×" if forward else DASH


def _order(values: tuple, value: Any) -> int:
    return values.index(value) if value in values else len(values)


def pruning_sort_key(row: dict) -> tuple:
    # Dense first, then grouped by pattern so each initial method sits next to its Barber rebuild.
    return (row["method"] != "dense", _order(PRUNING_PATTERNS, row.get("pattern")),
            _order(PRUNING_METHODS, row["method"]), row["method"])


def pruning_caption(meta: dict, rows: list[dict]) -> str:
    modes = sorted({r.get("mode", "?") for r in rows})
    calib, evaluation, where = _setup(meta)
    return (f"_Mode {'/'.join(modes)}: {meta.get('model', '?')}, {calib}, {evaluation} (wiki-leads); sparsity of the "
            f"decoder linears{barber_note(rows)}; forward s = one no-grad forward over the calibration windows, "
            f"batch 1; times on {where}; {_dates(meta, rows)}, `{meta.get('command', '?')}`._")


def _setup(meta: dict) -> tuple[str, str, str]:
    """A caption's calibration size, evaluation size and machine, from a result file's header."""
    settings = meta.get("settings", {})
    machine = meta.get("machine", {})
    calib = f"calibration {settings.get('nsamples', '?')} × {settings.get('calib_seqlen', '?')} tokens"
    evaluation = f"evaluation {settings.get('eval_windows', '?')} windows of {meta.get('eval_seqlen', '?')}"
    where = (f"{machine.get('cpu_count', '?')} CPUs, {machine.get('threads', '?')} threads, "
             f"torch {machine.get('torch', '?')}")
    return calib, evaluation, where


def _dates(meta: dict, rows: list[dict]) -> str:
    """The day(s) the rows were measured (several when ``--runs`` re-measured some later)."""
    days = sorted({str(r.get("date") or meta.get("date", "?"))[:10] for r in rows})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def barber_note(rows: list[dict]) -> str:
    """The LLM-Barber settings of the rebuilt rows, grouped: they differ by initial method and pattern."""
    groups: dict[tuple, list[str]] = {}
    for row in rows:
        if row.get("barber"):
            key = (row["method"], row.get("barber_granularity"), row.get("barber_threshold"))
            groups.setdefault(key, []).append(row.get("pattern") or DASH)
    parts = [f"{method} {granularity} τ={threshold} ({', '.join(patterns)})"
             for (method, granularity, threshold), patterns in groups.items()]
    return f"; LLM-Barber: {'; '.join(parts)}" if parts else ""


# -- quantization ----------------------------------------------------------------------------------
QUANT_METHODS = ("dense", "rtn", "gptq", "aptq")


def quant_bits(row: dict) -> str:
    """``3`` for a uniform run; ``avg 3.50 of {2,4}`` (the achieved average) for a mixed-precision one."""
    if row["method"] == "dense":
        return DASH
    target = row.get("target_avg_bits")
    if target is None:
        return str(row["bits"])
    avg = row.get("avg_bits")
    text = f"avg {_number(avg, 2)} of {{{','.join(str(b) for b in row.get('candidate_bits') or [])}}}"
    return text if avg is not None and abs(avg - target) < 0.005 else f"{text} (target {target:g})"


def quant_group(row: dict) -> str:
    group = row.get("group_size")
    return DASH if group is None else "per channel" if group == -1 else str(group)


def quant_allocation(row: dict) -> str:
    """How the widths were chosen, and which ablation (if any) the row is."""
    if row["method"] == "dense":
        return DASH
    if row.get("target_avg_bits") is None:
        note = "uniform"
    elif row.get("allocation") == "by_type":
        note = "by module type (ablation)"
    elif row.get("sensitivity") == "layer":
        note = "sensitivity from per-layer Hessian traces (diagnostic)"
    else:
        note = "sensitivity"
    if row["method"] == "aptq" and row.get("attention_aware") is False:
        note += ", plain q/k/v Hessians (ablation)"
    return note


def quant_is_ablation(row: dict) -> bool:
    return row.get("allocation") == "by_type" or row.get("attention_aware") is False


def quantization_cells(row: dict) -> list[str]:
    dense = row["method"] == "dense"
    pass1 = (row.get("summary") or {}).get("pass1_seconds")
    return [row["method"], quant_bits(row), quant_group(row), quant_allocation(row), _number(row["ppl"], 2),
            DASH if dense else _number(row["seconds"], 1), _number(pass1, 1), _number(row.get("peak_rss_mb"), 0),
            _number(row.get("forward_seconds"), 2)]


def quantization_sort_key(row: dict) -> tuple:
    # Dense first; then uniform widths (widest first, per channel before groups), each setting as RTN, GPTQ,
    # APTQ; then the mixed budgets (largest first), each APTQ run followed by its ablations.
    mixed = row.get("target_avg_bits") is not None
    width = row.get("target_avg_bits") if mixed else row.get("bits")
    group = row.get("group_size")
    return (row["method"] != "dense", mixed, -(width or 0), 0 if group in (None, -1) else group,
            quant_is_ablation(row), _order(QUANT_METHODS, row["method"]), row.get("run", ""))


def quantization_caption(meta: dict, rows: list[dict]) -> str:
    modes = sorted({r.get("mode", "?") for r in rows})
    threads = sorted({r["threads"] for r in rows if r.get("threads")})  # --threads; rows merged later may differ
    if threads:
        meta = {**meta, "machine": {**meta.get("machine", {}), "threads": "/".join(map(str, threads))}}
    calib, evaluation, where = _setup(meta)
    if any(r["method"] == "rtn" and r.get("target_avg_bits") is None for r in rows):
        calib += " (uniform RTN uses none)"
    caveat = "[Caveat on quantization numbers](#caveat-on-quantization-numbers)"
    return (f"_Mode {'/'.join(modes)}: {meta.get('model', '?')}, {calib}, {evaluation} (wiki-leads); dense = the "
            f"shipped Q4_1 weights dequantized, so 4-bit group 32 is left out (see {caveat}); {grid_note(rows)} "
            f"on every decoder linear, bits averaged over their parameters; mixed precision from HAWQ sensitivities, "
            f"q/k/v and gate/up sharing a width; weights are fake-quantized, so forward s (one no-grad forward over "
            f"the calibration windows, batch 1) shows no speed-up; times on {where}; {_dates(meta, rows)}, "
            f"`{meta.get('command', '?')}`._")


def grid_note(rows: list[dict]) -> str:
    """The quantizer options the quantized rows share (from each row's callback config)."""
    configs = [r["config"] for r in rows if r.get("config")]

    def shared(option: str, yes: str, no: str) -> str:
        values = {c.get(option) for c in configs}
        return yes if values == {True} else no if values <= {False} else f"{yes}/{no}"  # none: the defaults

    text = f"{shared('symmetric', 'symmetric', 'asymmetric')} {shared('mse', 'MSE-clipped', 'min-max')} quantizer"
    solvers = [c for c in configs if c.get("method") != "rtn"]
    options = [name.replace("_", "-") for name in ("act_order", "static_groups", "true_sequential")
               if solvers and all(c.get(name) for c in solvers)]
    return text + (f" (GPTQ/APTQ: {', '.join(options)})" if options else "")


# -- GRPO ------------------------------------------------------------------------------------------
NOISE_METHODS = ("vanilla", "phased", "min_only", "max_only", "reversed", "rent", "intuitor", "ttrl")


def noise_cells(row: dict) -> list[str]:
    before, after = row["clean_acc_before"], row["clean_acc_after"]
    entropies = [s["entropy"] for s in row.get("train_curves", []) if "entropy" in s]
    agreement = [s["noisy_label_agreement"] for s in row.get("train_curves", []) if "noisy_label_agreement" in s]
    return [row["method"], f"{row['noise_rate']:g}", str(row["seed"]), _number(before, 3), _number(after, 3),
            f"{after - before:+.3f}", _number(row.get("clean_acc_auc"), 3),
            _number(entropies[-1], 3) if entropies else DASH, _number(agreement[-1], 3) if agreement else DASH]


def noise_sort_key(row: dict) -> tuple:
    return (row["noise_rate"], _order(NOISE_METHODS, row["method"]), row["method"], row["seed"])


def noise_caption(meta: dict, rows: list[dict]) -> str:
    settings = meta.get("settings", {})
    methods = sorted({r["method"] for r in rows}, key=lambda m: _order(NOISE_METHODS, m))
    rates = sorted({r["noise_rate"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    machine = meta.get("machine", {})
    return (f"_Mode {meta.get('mode', '?')}: grid actually run = methods {', '.join(methods)} × noise "
            f"{', '.join(f'{r:g}' for r in rates)} × seeds {', '.join(map(str, seeds))}; {meta.get('model', '?')} "
            f"on {meta.get('task', '?')} with near-miss label noise, {settings.get('steps', '?')} optimizer steps of "
            f"{settings.get('prompts_per_batch', '?')} prompts × G={settings.get('num_generations', '?')}, "
            f"lr {settings.get('learning_rate', '?')}, λ={meta.get('lambda', '?')}; clean accuracy = greedy decoding "
            f"on {settings.get('num_val', '?')} held-out questions with clean labels, before training and after the "
            f"last step; AUC = mean over the validations; entropy and noisy-label agreement (corrupted training rows "
            f"whose label the policy reproduced) at the last step; {machine.get('cpu_count', '?')} CPUs, "
            f"torch {machine.get('torch', '?')}; {_dates(meta, rows)}, `{meta.get('command', '?')}`._")


def demo_cells(row: dict) -> list[str]:
    before, after = row["clean_acc_before"], row["clean_acc_after"]
    return [f"`{row['config']}`", row["task"], f"{row['noise_rate']:g}", str(row["steps"]), _number(before, 3),
            _number(after, 3), f"{after - before:+.3f}", _number(row["wall_seconds"], 0), str(row["threads"])]


def demo_caption(meta: dict, rows: list[dict]) -> str:
    machine = meta.get("machine", {})
    return (f"_Clean accuracy = greedy decoding on {rows[0]['num_val']} held-out questions scored against their "
            f"clean labels, before training and after the last step; wall time of the whole fit (model load "
            f"included) on {machine.get('cpu_count', '?')} CPUs, torch {machine.get('torch', '?')}; "
            f"{_dates(meta, rows)}, `{meta.get('command', '?')}`._")


def throughput_cells(row: dict) -> list[str]:
    return [row["run"], str(row["num_generations"]), str(row["prompts"]), str(row["max_new_tokens"]),
            _number(row["seconds_per_optimizer_step"], 2), _number(row["generation_seconds"], 2),
            _number(row["update_seconds"], 2), _number(row["completion_tokens"], 0),
            _number(row["completion_tokens_per_second"], 1), _number(row["peak_rss_mb"], 0)]


def throughput_caption(meta: dict, rows: list[dict]) -> str:
    machine = meta.get("machine", {})
    devices = sorted({r.get("device", "?") for r in rows})
    return (f"_Mode {meta.get('mode', '?')}: {meta.get('model', '?')}, fp32 on {', '.join(devices)}, "
            f"{machine.get('cpu_count', '?')} CPUs / {machine.get('threads', '?')} threads, torch "
            f"{machine.get('torch', '?')}; mean over {meta.get('settings', {}).get('batches', '?')} generated batches "
            f"after 1 warm-up; generation and update are per generated batch (μ optimizer steps share one); "
            f"completion tokens = mean tokens generated per batch (EOS included); {_dates(meta, rows)}, "
            f"`{meta.get('command', '?')}`._")


# -- strategies ------------------------------------------------------------------------------------
STRATEGY_COLUMNS = ("auto", "ddp", "fsdp", "deepspeed")
CAPABILITY_NAMES = {"evaluate": "`CausalLM` evaluation", "prune": "`Pruning` (Wanda + LLM-Barber)",
                    "quantize": "`Quantization` (APTQ mixed precision)", "grpo": "`GRPOModule` fit"}
# The tests behind a "tested" cell: single device, the capability's own test module; ddp, the test that compares
# the 2-process result with the single-process one (not just that it runs).
_DDP = "tests/test_distributed.py::"
STRATEGY_TESTS = {("evaluate", "auto"): "tests/test_causal_lm.py", ("prune", "auto"): "tests/test_pruning_callback.py",
                  ("quantize", "auto"): "tests/test_quant_callback.py", ("grpo", "auto"): "tests/test_grpo_module.py",
                  ("evaluate", "ddp"): _DDP + "test_ddp_perplexity_shards_without_padding_and_matches_single_process",
                  ("prune", "ddp"): _DDP + "test_ddp_compression_matches_single_process",
                  ("quantize", "ddp"): _DDP + "test_ddp_compression_matches_single_process",
                  ("grpo", "ddp"): _DDP + "test_grpo_ddp_fit_keeps_identical_weights_on_both_ranks"}


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
    text = {"ok": "runs", "refused": "refused", "failed": "**fails**"}[cell["outcome"]]
    if cell["outcome"] != "ok":
        text += f": {_short_reason(cell['message'])}"
    return text + (f"; tested: `{test}`" if test else "")


def _short_reason(message: str) -> str:
    for marker, reason in (("requires a GPU accelerator", "Lightning allows FSDP on GPUs only"),
                           ("must have DeepSpeed installed", "DeepSpeed is not installed"),
                           ("does not support the", "sharded weights (message names strategy and alternative)")):
        if marker in message:
            return reason
    return message.split(": ", 1)[-1][:120]


def strategy_cells(row: dict) -> list[str]:
    return [CAPABILITY_NAMES.get(row["capability"], row["capability"]),
            *(strategy_cell(row["capability"], row.get(s)) for s in STRATEGY_COLUMNS)]


def strategy_caption(meta: dict, rows: list[dict]) -> str:
    cells = [c for r in rows for c in r.values() if isinstance(c, dict)]
    accelerators = sorted({c["accelerator"] for c in cells})
    devices = sorted({f"{c['strategy']} {c['devices']}" for c in cells if c["strategy"] != "auto"})
    return (f"_Each cell ran `litforge` on {meta.get('model', '?')} with check-size data ({', '.join(accelerators)}; "
            f"devices: {', '.join(devices)}); \"runs\" = exit 0, \"refused\" = stopped before any work with "
            f"the message summarised; \"tested\" names the tests (for ddp, a comparison with the 1-process "
            f"result); {_dates(meta, cells)}, `{meta.get('command', '?')}`._")


TABLES: dict[str, Table] = {
    "pruning": Table(
        results="benchmarks/results/pruning.json",
        headers=("method", "pattern", "sparsity", "ppl", "compression s", "× forward", "peak RSS MB", "forward s"),
        cells=pruning_cells, sort_key=pruning_sort_key, caption=pruning_caption,
        producer="python benchmarks/pruning.py --out benchmarks/results/pruning.json"),
    # The pruning issue's acceptance protocol (50% unstructured, 128 x 512 calibration), kept in its own file.
    "pruning_calib128": Table(
        results="benchmarks/results/pruning_calib128.json",
        headers=("method", "pattern", "sparsity", "ppl", "compression s", "× forward", "peak RSS MB", "forward s"),
        cells=pruning_cells, sort_key=pruning_sort_key, caption=pruning_caption,
        producer="python benchmarks/pruning.py --mode calib128 --out benchmarks/results/pruning_calib128.json"),
    "quantization": Table(
        results="benchmarks/results/quantization.json",
        headers=("method", "bits", "group size", "allocation", "ppl", "compression s", "of which pass 1 s",
                 "peak RSS MB", "forward s"),
        cells=quantization_cells, sort_key=quantization_sort_key, caption=quantization_caption,
        producer="python benchmarks/quantization.py --out benchmarks/results/quantization.json"),
    "noise_study": Table(
        results="benchmarks/results/noise_study.json",
        headers=("method", "noise", "seed", "clean acc before", "clean acc after", "Δ", "AUC", "entropy",
                 "noisy-label agreement"),
        cells=noise_cells, sort_key=noise_sort_key, caption=noise_caption,
        producer="python benchmarks/noise_study.py --mode reduced --out benchmarks/results/noise_study.json"),
    "strategies": Table(
        results="benchmarks/results/strategy_check.json",
        headers=("capability", "single device", "ddp", "fsdp", "deepspeed"),
        cells=strategy_cells, sort_key=lambda row: list(CAPABILITY_NAMES).index(row["capability"]),
        caption=strategy_caption, regroup=strategy_rows,
        producer="python benchmarks/strategy_check.py --out benchmarks/results/strategy_check.json"),
    "grpo_demo": Table(
        results="benchmarks/results/grpo_demo.json",
        headers=("config", "task", "label noise", "steps", "clean acc before", "clean acc after", "Δ", "wall s",
                 "threads"),
        cells=demo_cells, sort_key=lambda row: row["run"], caption=demo_caption,
        producer="python benchmarks/grpo_demo.py --out benchmarks/results/grpo_demo.json"),
    "grpo_throughput": Table(
        results="benchmarks/results/grpo_throughput.json",
        headers=("run", "G", "prompts", "max new tokens", "s / optimizer step", "generation s", "update s",
                 "completion tokens", "completion tok/s", "peak RSS MB"),
        cells=throughput_cells, sort_key=lambda row: row["run"], caption=throughput_caption,
        producer="python benchmarks/grpo_throughput.py --out benchmarks/results/grpo_throughput.json"),
}


# -- rendering -------------------------------------------------------------------------------------
def markdown_table(headers: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def render_table(table: Table, results: Path) -> str:
    """The text between a table's markers: the table and its caption, or a note while there are no rows."""
    payload = read_results(results)
    rows = payload["rows"] if table.regroup is None or not payload["rows"] else table.regroup(payload["rows"])
    rows = sorted(rows, key=table.sort_key)
    if not rows:
        return f"\n_No results yet: run `{table.producer}`, then `python benchmarks/render_readme.py`._\n"
    body = markdown_table(table.headers, [table.cells(r) for r in rows])
    return f"\n{body}\n\n{table.caption(payload['meta'], rows)}\n"


def check_markers(text: str) -> None:
    """Unpaired or unknown markers would silently leave a table stale; refuse them."""
    opened: list[str] = []
    for closing, name in OPENING.findall(text):
        if name not in TABLES:
            raise ValueError(f"README marker table:{name} names no registered table; allowed: {sorted(TABLES)}")
        if not closing:
            if opened:
                raise ValueError(f"README marker table:{name} is nested inside table:{opened[-1]}")
            opened.append(name)
        elif not opened or opened.pop() != name:
            raise ValueError(f"README marker /table:{name} closes no open table:{name}")
    if opened:
        raise ValueError(f"README marker table:{opened[-1]} is never closed by <!-- /table:{opened[-1]} -->")


def render(text: str, results: dict[str, Path]) -> str:
    """``text`` with every marked table regenerated; ``results`` maps table names to their JSON files."""
    check_markers(text)

    def replace(match: re.Match) -> str:
        name = match["name"]
        return f"<!-- table:{name} -->{render_table(TABLES[name], results[name])}<!-- /table:{name} -->"

    return MARKER.sub(replace, text)


def result_paths(overrides: list[str]) -> dict[str, Path]:
    """Each table's JSON file: the registered one under the repository, or ``NAME=PATH`` from the command line."""
    paths = {name: REPO_ROOT / table.results for name, table in TABLES.items()}
    for item in overrides:
        name, sep, path = item.partition("=")
        if not sep or name not in TABLES:
            raise SystemExit(f"--results {item!r}: expected NAME=PATH with NAME one of {sorted(TABLES)}")
        paths[name] = Path(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--results", action="append", default=[], metavar="NAME=PATH",
                        help="read table NAME from PATH instead of its registered file")
    parser.add_argument("--check", action="store_true", help="only report whether the README is up to date")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        fresh = render(text, result_paths(args.results))
    except ValueError as error:
        print(f"{args.readme}: {error}", file=sys.stderr)
        return 2
    if args.check:
        if fresh != text:
            same = " ".join(a for a in (sys.argv[1:] if argv is None else argv) if a != "--check")
            print(f"{args.readme} is stale: run python benchmarks/render_readme.py {same}".rstrip(), file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        atomic_write_text(args.readme, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
