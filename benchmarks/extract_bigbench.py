"""Extract a deterministic sample of a BIG-bench multiple-choice task into a JSONL file.

    python benchmarks/extract_bigbench.py --archive /tmp/bb/bigbench-0.0.1.tar.gz \
        --task web_of_lies --n 200 --seed 0 --out datamodules/data/zeroshot/bigbench_web_of_lies.jsonl

The archive is a BIG-bench source tarball, read in place (never pip-installed). Two task layouts are
handled:

* JSON tasks: `bigbench/benchmark_tasks/<task>/task.json` (or `<task>/<subtask>/task.json`), as in
  the GitHub repository and the bigbench 1.0.0 release.
* Programmatic tasks: `bigbench/benchmark_tasks/<task>/task.py`. The only BIG-bench archive PyPI
  serves (bigbench==0.0.1) ships no task.json at all, but it does ship these generators. The task's
  own `evaluate_model` is run (zero-shot, its default seed) against a recording model, so the prompts
  and choices are exactly the ones BIG-bench scores. The correct answer of each prompt is recomputed
  by a small solver below, and the run is accepted only if BIG-bench's own scoring gives that solver
  a perfect grade, i.e. our labels agree with BIG-bench's on every example.

Either way the examples go through `datamodules.bigbench.convert_bigbench_task`; then `--n` of them
are drawn with `random.Random(seed)` and written in their original order.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from datamodules.bigbench import convert_bigbench_task  # noqa: E402

TASKS_DIR = "bigbench/benchmark_tasks"


# --- solvers: the right answer of a programmatic task's prompt, computed from the prompt alone -------

def solve_web_of_lies(prompt: str) -> str:
    """Each 'lies' flips the truth value, starting from true, so the parity of 'lies' decides."""
    flips = len(re.findall(r"\blies\.", prompt))
    return "Yes" if flips % 2 == 0 else "No"


def _parse_or(tokens: list[str]) -> bool:
    value = _parse_and(tokens)
    while tokens and tokens[0] == "or":
        tokens.pop(0)
        rhs = _parse_and(tokens)  # parse first: `or` must consume its operand even when value is True
        value = value or rhs
    return value


def _parse_and(tokens: list[str]) -> bool:
    value = _parse_not(tokens)
    while tokens and tokens[0] == "and":
        tokens.pop(0)
        rhs = _parse_not(tokens)
        value = value and rhs
    return value


def _parse_not(tokens: list[str]) -> bool:
    if tokens[0] == "not":
        tokens.pop(0)
        return not _parse_not(tokens)
    token = tokens.pop(0)
    if token == "(":
        value = _parse_or(tokens)
        if tokens.pop(0) != ")":
            raise ValueError("unbalanced parentheses")
        return value
    if token in ("True", "False"):
        return token == "True"
    raise ValueError(f"unexpected token {token!r}")


def solve_boolean_expressions(prompt: str) -> str:
    """Evaluate 'EXPR is ' with Python's precedence (not > and > or) without calling eval()."""
    expression = prompt.strip().removesuffix(" is")
    tokens = expression.split()
    value = _parse_or(tokens)
    if tokens:
        raise ValueError(f"trailing tokens in {prompt!r}")
    return str(value)


SOLVERS: dict[str, Callable[[str], str]] = {
    "web_of_lies": solve_web_of_lies,
    "boolean_expressions": solve_boolean_expressions,
}


class SolverModel:
    """Stands in for a BIG-bench model: records every scored prompt and answers it with the solver."""

    def __init__(self, solver: Callable[[str], str]):
        self.solver = solver
        self.examples: list[dict[str, Any]] = []

    def cond_log_prob(self, inputs, targets, absolute_normalization=False):
        scores = []
        for prompt, choices in zip(inputs, targets):
            answer = self.solver(prompt)
            self.examples.append({"input": prompt, "target_scores": {c: int(c == answer) for c in choices}})
            scores.append([0.0 if c == answer else -10.0 for c in choices])
        return scores


# --- reading the archive ----------------------------------------------------------------------------

def members_under(archive: tarfile.TarFile, folder: str) -> list[tarfile.TarInfo]:
    """Members whose path (below the archive's top folder) starts with `folder`."""
    found = []
    for member in archive.getmembers():
        inner = member.name.split("/", 1)[-1]
        if member.isfile() and (inner.startswith(folder) or member.name.startswith(folder)):
            found.append(member)
    return sorted(found, key=lambda m: m.name)


def json_task_examples(archive: tarfile.TarFile, task: str) -> list[dict[str, Any]] | None:
    """Records of a JSON task (all subtasks, in path order), or None if the task has no task.json."""
    files = [m for m in members_under(archive, f"{TASKS_DIR}/{task}/") if m.name.endswith("/task.json")]
    if not files:
        return None
    records = []
    for member in files:
        records += convert_bigbench_task(json.load(archive.extractfile(member)))
    return records


def programmatic_task_examples(archive: tarfile.TarFile, task: str) -> list[dict[str, Any]] | None:
    """Records of a programmatic task run zero-shot against the solver model, or None if absent."""
    task_files = members_under(archive, f"{TASKS_DIR}/{task}/")
    if not any(m.name.endswith("/task.py") for m in task_files):
        return None
    if task not in SOLVERS:
        raise SystemExit(f"--task {task!r} is programmatic; a solver exists only for {sorted(SOLVERS)}")
    api_files = members_under(archive, "bigbench/api/") + members_under(archive, "bigbench/__init__.py")
    api_files += members_under(archive, f"{TASKS_DIR}/__init__.py")
    with tempfile.TemporaryDirectory() as tmp:
        archive.extractall(tmp, members=api_files + task_files, filter="data")
        sys.path.insert(0, str(next(Path(tmp).iterdir())))
        task_module = importlib.import_module(f"bigbench.benchmark_tasks.{task}.task")
        base = importlib.import_module("bigbench.api.task").Task
        task_class = next(c for _, c in inspect.getmembers(task_module, inspect.isclass)
                          if issubclass(c, base) and c is not base)
        model = SolverModel(SOLVERS[task])
        score_data = task_class(num_shots=0).evaluate_model(model)
    grades = [s.score_dict["multiple_choice_grade"] for s in score_data]
    if min(grades) != 1.0:
        raise SystemExit(f"solver disagrees with BIG-bench's scoring of {task!r}: grades {grades}")
    task_json = {"name": task, "example_input_prefix": "", "example_output_prefix": "", "examples": model.examples}
    return convert_bigbench_task(task_json)


def select(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n records drawn with a seeded RNG, kept in their original order."""
    if n >= len(records):
        return records
    picked = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in picked]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", required=True, type=Path, help="BIG-bench source tarball (.tar.gz)")
    parser.add_argument("--task", required=True, help="task folder name, e.g. web_of_lies")
    parser.add_argument("--n", type=int, default=200, help="examples to keep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection")
    parser.add_argument("--out", required=True, type=Path, help="output .jsonl")
    args = parser.parse_args(argv)

    with tarfile.open(args.archive) as archive:
        records = json_task_examples(archive, args.task)
        if records is None:
            records = programmatic_task_examples(archive, args.task)
    if records is None:
        raise SystemExit(f"--task {args.task!r}: no {TASKS_DIR}/{args.task}/task.json or task.py in {args.archive}")
    chosen = select(records, args.n, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for record in chosen:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{args.task}: {len(records)} usable examples, wrote {len(chosen)} to {args.out}")


if __name__ == "__main__":
    main()
