"""README tables of the compression benchmarks: pruning (full grid and 128 × 512) and quantization."""

from __future__ import annotations


from benchmarks.table_format import DASH, Table, dates, number, order, setup


# -- pruning ---------------------------------------------------------------------------------------
PRUNING_METHODS = ("dense", "magnitude", "wanda", "barber_wanda", "sparsegpt", "barber_sparsegpt")
PRUNING_PATTERNS = (None, "unstructured", "2:4", "4:8")




def pruning_cells(row: dict) -> list[str]:
    dense = row["method"] == "dense"
    return [row["method"], row.get("pattern") or DASH, f"{100 * row['sparsity']:.1f}%", number(row["ppl"], 2),
            DASH if dense else number(row["seconds"], 1), DASH if dense else _times_forward(row),
            number(row.get("peak_rss_mb"), 0), number(row.get("forward_seconds"), 2)]


def _times_forward(row: dict) -> str:
    """Compression time as a multiple of one forward pass over the same calibration tokens."""
    forward = row.get("forward_seconds")
    return f"{row['seconds'] / forward:.1f}×" if forward else DASH




def sweep_cells(row: dict) -> list[str]:
    """One LLM-Barber setting per row (Wanda's own mask as the reference)."""
    barber = row.get("barber")
    return [row["method"], row.get("barber_granularity") if barber else DASH,
            f"{row['barber_threshold']:g}" if barber else DASH, number(row["ppl"], 3), number(row["seconds"], 1),
            _times_forward(row)]


def pruning_sort_key(row: dict) -> tuple:
    # Dense first, then grouped by pattern so each initial method sits next to its Barber rebuild.
    return (row["method"] != "dense", order(PRUNING_PATTERNS, row.get("pattern")),
            order(PRUNING_METHODS, row["method"]), row["method"])


def pruning_caption(meta: dict, rows: list[dict]) -> str:
    modes = sorted({r.get("mode", "?") for r in rows})
    calib, evaluation, where = setup(meta)
    return (f"_Mode {'/'.join(modes)}: {meta.get('model', '?')}, {calib}, {evaluation} (wiki-leads); sparsity of the "
            f"decoder linears{barber_note(rows)}; forward s = one no-grad forward over the calibration windows, "
            f"batch 1; times on {where}; {dates(meta, rows)}, `{meta.get('command', '?')}`._")






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
    text = f"avg {number(avg, 2)} of {{{','.join(str(b) for b in row.get('candidate_bits') or [])}}}"
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
    return [row["method"], quant_bits(row), quant_group(row), quant_allocation(row), number(row["ppl"], 2),
            DASH if dense else number(row["seconds"], 1), number(pass1, 1), number(row.get("peak_rss_mb"), 0),
            number(row.get("forward_seconds"), 2)]


def quantization_sort_key(row: dict) -> tuple:
    # Dense first; then uniform widths (widest first, per channel before groups), each setting as RTN, GPTQ,
    # APTQ; then the mixed budgets (largest first), each APTQ run followed by its ablations.
    mixed = row.get("target_avg_bits") is not None
    width = row.get("target_avg_bits") if mixed else row.get("bits")
    group = row.get("group_size")
    return (row["method"] != "dense", mixed, -(width or 0), 0 if group in (None, -1) else group,
            quant_is_ablation(row), order(QUANT_METHODS, row["method"]), row.get("run", ""))


def quantization_caption(meta: dict, rows: list[dict]) -> str:
    modes = sorted({r.get("mode", "?") for r in rows})
    threads = sorted({r["threads"] for r in rows if r.get("threads")})  # --threads; rows merged later may differ
    if threads:
        meta = {**meta, "machine": {**meta.get("machine", {}), "threads": "/".join(map(str, threads))}}
    calib, evaluation, where = setup(meta)
    if any(r["method"] == "rtn" and r.get("target_avg_bits") is None for r in rows):
        calib += " (uniform RTN uses none)"
    caveat = "[Caveat on quantization numbers](#caveat-on-quantization-numbers)"
    return (f"_Mode {'/'.join(modes)}: {meta.get('model', '?')}, {calib}, {evaluation} (wiki-leads); dense = the "
            f"shipped Q4_1 weights dequantized, so 4-bit group 32 is left out (see {caveat}); {grid_note(rows)} "
            f"on every decoder linear, bits averaged over their parameters; mixed precision from HAWQ sensitivities, "
            f"q/k/v and gate/up sharing a width; weights are fake-quantized, so forward s (one no-grad forward over "
            f"the calibration windows, batch 1) shows no speed-up; times on {where}; {dates(meta, rows)}, "
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
    "pruning_sweep": Table(
        results="benchmarks/results/pruning_sweep.json",
        headers=("method", "granularity", "τ", "ppl", "compression s", "× forward"),
        cells=sweep_cells, sort_key=lambda row: (row["method"] != "wanda", row.get("barber_granularity") or "",
                                                 row.get("barber_threshold") or 0.0),
        caption=pruning_caption,
        producer="python benchmarks/pruning.py --mode sweep --out benchmarks/results/pruning_sweep.json"),
    "quantization": Table(
        results="benchmarks/results/quantization.json",
        headers=("method", "bits", "group size", "allocation", "ppl", "compression s", "of which pass 1 s",
                 "peak RSS MB", "forward s"),
        cells=quantization_cells, sort_key=quantization_sort_key, caption=quantization_caption,
        producer="python benchmarks/quantization.py --out benchmarks/results/quantization.json"),
}
