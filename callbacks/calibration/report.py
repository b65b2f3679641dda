"""Reports of a compression run: one JSON file, TensorBoard scalars and a per-layer figure."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_VERSIONS = ("torch", "transformers", "lightning", "litforge")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json_atomic(path: Path, payload: dict[str, Any]) -> Path:
    """Write JSON through a temporary file and a rename, so a crash never leaves a truncated report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def per_layer_series(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """Average each numeric ``key`` of module records over the modules of each decoder layer."""
    sums: dict[str, dict[int, list[float]]] = {k: defaultdict(list) for k in keys}
    for record in records:
        for key in keys:
            value = record.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                sums[key][record["layer"]].append(float(value))
    return {k: {layer: sum(v) / len(v) for layer, v in sorted(by_layer.items())} for k, by_layer in sums.items()}


def log_to_tensorboard(logger: Any, tag: str, records: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Per-layer scalars (x axis = decoder layer index) and, with matplotlib, one figure of all of them."""
    experiment = getattr(logger, "experiment", None)
    if experiment is None or not hasattr(experiment, "add_scalar"):
        return
    series = per_layer_series(records, keys)
    for key, by_layer in series.items():
        for layer, value in by_layer.items():
            experiment.add_scalar(f"{tag}/{key}", value, global_step=layer)
    figure = layer_figure(series, tag)
    if figure is not None:
        experiment.add_figure(f"{tag}/per_layer", figure, global_step=0)


def layer_figure(series: dict[str, dict[int, float]], title: str):
    """A matplotlib figure with one panel per series, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the per-layer figure")
        return None
    shown = {k: v for k, v in series.items() if v}
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.2 * len(shown)), sharex=True, squeeze=False)
    for ax, (key, by_layer) in zip(axes[:, 0], shown.items()):
        ax.plot(list(by_layer), list(by_layer.values()), marker="o", markersize=3)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("decoder layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
