"""Convert BIG-bench multiple-choice tasks (the `task.json` schema) into zero-shot records.

A record is `{"context": str, "choices": [str, ...], "label": int}`, the format `ZeroShotDataModule`
reads. BIG-bench marks the right answer(s) of an example with `target_scores`; we keep only examples
with exactly one best-scoring, positive choice, so that accuracy has a single correct answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# BIG-bench's own defaults (bigbench/api/json_task.py) for tasks that do not set them.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "


def load_task_json(task_json: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Accept a parsed task.json or a path to one."""
    if isinstance(task_json, dict):
        return task_json
    with open(task_json, encoding="utf-8") as f:
        return json.load(f)


def best_choice(target_scores: dict[str, float]) -> int | None:
    """Index of the single highest-scoring choice, or None when the maximum is tied or not positive."""
    scores = list(target_scores.values())
    if len(scores) < 2:
        return None
    top = max(scores)
    if top <= 0 or scores.count(top) > 1:
        return None
    return scores.index(top)


def format_context(task: dict[str, Any], example_input: str) -> str:
    """The zero-shot prompt BIG-bench builds: task prefix + input prefix + input + output prefix.

    Choices are not appended to the prompt: they are scored as continuations instead. Leading whitespace
    is dropped because BIG-bench's default input prefix starts with a newline that only separates
    few-shot examples, and a zero-shot prompt should not open with it.
    """
    input_prefix = task.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    context = str(task.get("task_prefix", "")) + input_prefix + example_input + output_prefix
    return context.lstrip()


def convert_bigbench_task(task_json: dict[str, Any] | str | Path) -> list[dict[str, Any]]:
    """BIG-bench `examples` with `target_scores` -> zero-shot records, in the task's order.

    Examples without `target_scores` (generative ones), with fewer than two choices, a tied best score
    or no positive score are skipped.
    """
    task = load_task_json(task_json)
    records = []
    for example in task.get("examples", []):
        scores = example.get("target_scores")
        if not isinstance(scores, dict):
            continue
        label = best_choice(scores)
        if label is None:
            continue
        records.append(
            {"context": format_context(task, str(example["input"])), "choices": [str(c) for c in scores], "label": label}
        )
    return records
