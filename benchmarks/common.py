"""Helpers shared by the benchmark scripts: memory, timing, one plain forward pass, JSON result files.

A result file is ``{"meta": {...}, "rows": [{...}, ...]}``: one row per measured configuration and a header
saying when, where and by which command the rows were produced, so a README table can cite its origin.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, ``perf_counter``)."""

    def __enter__(self) -> Timer:
        self.seconds = 0.0
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def forward_seconds(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Wall time of one plain forward pass over ``windows`` (``[n, seqlen]`` token ids), batch 1, no grad.

    Unstructured zeros are still multiplied by dense kernels, so this shows what pruning alone buys (or not)
    at inference time next to the perplexity it costs.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), Timer() as timer:
        for row in windows:
            model(input_ids=row.unsqueeze(0).to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously; stop the clock when they are done
    model.train(was_training)
    return timer.seconds


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def machine_info() -> dict[str, Any]:
    """What the timings depend on: CPU count, threads, torch build and accelerator."""
    info = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a file, as one could paste it back into a shell."""
    argv = sys.argv if argv is None else argv
    return " ".join(shlex.quote(a) for a in ["python", *argv])


def metadata(**extra: Any) -> dict[str, Any]:
    """A result-file header: date, machine and command line, plus benchmark-specific settings."""
    return {"date": now_iso(), "machine": machine_info(), "command": command_line(), **extra}


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write through a temporary file in the same folder and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates mode 0600; keep the target's mode (or the umask default) so a README stays readable.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def read_results(path: str | Path) -> dict[str, Any]:
    """A result file's ``{"meta", "rows"}``; a missing file reads as no rows."""
    path = Path(path)
    if not path.is_file():
        return {"meta": {}, "rows": []}
    payload = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark result file (expected an object with a 'rows' list)")
    payload.setdefault("meta", {})
    return payload


def merge_rows(old: Iterable[dict], new: Iterable[dict], key: Sequence[str]) -> list[dict]:
    """``old`` rows in their order with those sharing a key with a ``new`` row replaced, then the other new rows."""
    new = list(new)
    fresh = {tuple(r.get(k) for k in key): r for r in new}
    merged, used = [], set()
    for row in old:
        k = tuple(row.get(name) for name in key)
        if k in fresh:
            merged.append(fresh[k])
            used.add(k)
        else:
            merged.append(row)
    merged.extend(r for r in new if tuple(r.get(k) for k in key) not in used)
    return merged


def write_results(path: str | Path, rows: list[dict], meta: dict[str, Any], merge_key: Sequence[str] | None = None
                  ) -> Path:
    """Write ``rows`` under ``meta``; with ``merge_key``, rows already in the file are kept unless replaced."""
    if merge_key is not None:
        rows = merge_rows(read_results(path)["rows"], rows, merge_key)
    text = json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n"
    return atomic_write_text(path, text)


def compress_and_evaluate(callback_factory, model: str, nsamples: int, calib_seqlen: int, eval_seqlen: int,
                          eval_windows: int) -> dict[str, Any]:
    """One benchmark run on the wiki-leads splits: validate ``model`` with the callback (or none: dense).

    ``callback_factory(calibration)`` returns the compression callback for a calibration datamodule, or
    ``None`` for the dense baseline. Returns the perplexity, the callback's report, the time of one plain
    forward over the calibration windows, the wall time, and the number of evaluation windows.
    """
    from lightning import Trainer

    from datamodules.text import TextDataModule
    from lit_modules.causal_lm import CausalLM

    calibration = TextDataModule(source="wiki-leads", split="calibration", tokenizer=model, seqlen=calib_seqlen,
                                 nsamples=nsamples, seed=0)
    data = TextDataModule(source="wiki-leads", split="evaluation", tokenizer=model, seqlen=eval_seqlen,
                          max_windows=eval_windows)
    callback = callback_factory(calibration)
    module = CausalLM(model)
    with tempfile.TemporaryDirectory() as root, Timer() as wall:
        trainer = Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[callback] if callback else [],
                          default_root_dir=root)
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        calibration.setup("calibrate")  # runs without a calibrating callback never set it up; a no-op otherwise
        forward = forward_seconds(module.model, calibration.calibration_windows())
    return {"ppl": metrics["val/ppl"], "report": callback.report if callback else None, "forward_seconds": forward,
            "wall_seconds": wall.seconds, "eval_windows": len(data.eval_windows())}


@dataclass(frozen=True)
class Settings:
    """The sizes of a compression benchmark mode, and the runs it measures by default."""

    nsamples: int
    calib_seqlen: int
    eval_windows: int
    runs: tuple[str, ...] | None  # None: every run

    def header(self) -> dict[str, Any]:
        """The sizes, as recorded in a result file's header (the run list is not a setting)."""
        return {k: v for k, v in asdict(self).items() if k != "runs"}


def measure_compression(callback_factory: Callable, model: str, settings: Settings, eval_seqlen: int
                        ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One run of :func:`compress_and_evaluate` at ``settings``: the row fields every compression benchmark
    records (perplexity, compression seconds, memory, timings, sizes), and the callback's report."""
    import torch

    run = compress_and_evaluate(callback_factory, model, settings.nsamples, settings.calib_seqlen, eval_seqlen,
                                settings.eval_windows)
    report = run["report"]
    fields = {"ppl": run["ppl"], "seconds": report["seconds"] if report else 0.0, "peak_rss_mb": peak_rss_mb(),
              "forward_seconds": run["forward_seconds"], "wall_seconds": run["wall_seconds"],
              "threads": torch.get_num_threads(), "calib_nsamples": settings.nsamples,
              "calib_seqlen": settings.calib_seqlen, "eval_windows": run["eval_windows"], "eval_seqlen": eval_seqlen,
              "summary": report["summary"] if report else None, "date": now_iso()}
    return fields, report
