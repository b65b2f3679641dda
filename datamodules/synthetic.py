"""Generated verifiable tasks for demos and tests: arithmetic questions with exact integer answers.

A task is a finite space of operand pairs ``(a, b)``; drawing ``n`` examples samples ``n`` *distinct* pairs with a
private ``random.Random(seed)``, so every rank and every run draws the same questions, and a train/val split taken
from one draw never shares a question. Records are ``{"id": str, "question": str, "label": str}``; the id is the
pair's index in the task's space, so one question keeps one id whatever the seed or the number drawn.

Difficulty for SmolLM2-135M-Instruct (ASSETS.md, G = 8, T = 1.0): one-digit sums are answered right 21% of the
time with 25% of groups all-equal (no GRPO signal); 0–20 and 10–49 sums fall to 7–9% and 50% all-equal groups.
``add_1digit`` is therefore the default: most of its groups carry signal.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
_QUESTION = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class ArithmeticTask:
    """Questions ``"a <op> b"`` with ``a, b`` in ``[low, high]`` (``b <= a`` when ``non_negative``)."""

    name: str
    op: str
    low: int
    high: int
    difficulty: int  # rank, 1 = easiest; measured for add_1digit < add_0_20 ≈ add_10_49, guessed for the rest
    non_negative: bool = False  # subtraction: keep answers >= 0, as a small model is asked to produce them

    def answer(self, a: int, b: int) -> int:
        """The exact result of ``a <op> b``."""
        return _OPERATIONS[self.op](a, b)

    def question(self, a: int, b: int) -> str:
        """Question text, e.g. ``"3 + 4"``; the prompt template wraps it."""
        return f"{a} {self.op} {b}"

    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Every operand pair of the task, in a fixed order (the index is the example id)."""
        return _pairs(self)

    def answer_range(self) -> tuple[int, int]:
        """Smallest and largest answer over the space: the range ``uniform`` label noise draws from."""
        answers = [self.answer(a, b) for a, b in self.pairs()]
        return min(answers), max(answers)

    def systematic_rules(self) -> tuple[str, ...]:
        """Names of the consistent corruption rules (see :data:`SYSTEMATIC_RULES`) that make sense here."""
        base = ("off_by_one_up", "off_by_one_down")
        return ("carry_flip", *base) if self.op == "+" else base


@lru_cache(maxsize=None)
def _pairs(task: ArithmeticTask) -> tuple[tuple[int, int], ...]:
    values = range(task.low, task.high + 1)
    return tuple((a, b) for a in values for b in values if not (task.non_negative and b > a))


TASKS: dict[str, ArithmeticTask] = {
    task.name: task
    for task in (
        ArithmeticTask("add_1digit", "+", 0, 9, difficulty=1),
        ArithmeticTask("sub_0_20", "-", 0, 20, difficulty=2, non_negative=True),
        ArithmeticTask("add_0_20", "+", 0, 20, difficulty=3),
        ArithmeticTask("mul_1digit", "*", 0, 9, difficulty=4),
        ArithmeticTask("add_10_49", "+", 10, 49, difficulty=5),
        ArithmeticTask("add_2digit", "+", 10, 99, difficulty=6),
    )
}
# Level names -> task, so configs can say ``source: easy``.
DIFFICULTY: dict[str, str] = {"easy": "add_1digit", "medium": "add_0_20", "hard": "add_10_49"}
DEFAULT_TASK = DIFFICULTY["easy"]


# Generated-image tasks (``datamodules/image_tasks.py``: grounding, shape, colour, count) by source name.
IMAGE_TASKS: dict[str, str] = {f"image_{name}": name for name in ("grounding", "shape", "colour", "pattern", "count")}


def is_image_task(name: str) -> bool:
    """True when ``name`` is a generated-image task (``image_grounding``, ``image_shape``, ...)."""
    return name in IMAGE_TASKS


def task_names() -> list[str]:
    """Every accepted task name: the tasks from easiest to hardest, the difficulty levels, then the image tasks."""
    return sorted(TASKS, key=lambda n: TASKS[n].difficulty) + list(DIFFICULTY) + list(IMAGE_TASKS)


def is_task(name: str) -> bool:
    """True when ``name`` is a synthetic task or a difficulty level (no file lookup)."""
    return name in TASKS or name in DIFFICULTY


def get_task(name: str, option: str = "task") -> ArithmeticTask:
    """The task named ``name`` (a task name or a difficulty level); ValueError naming what is allowed."""
    name = DIFFICULTY.get(name, name)
    if name not in TASKS:
        raise ValueError(f"{option}={name!r} is not a synthetic task; allowed: {task_names()}")
    return TASKS[name]


def check_size(task: ArithmeticTask, n: int, option: str = "n") -> None:
    """ValueError unless ``0 <= n <=`` the number of distinct questions of ``task``."""
    if not 0 <= n <= len(task.pairs()):
        raise ValueError(
            f"{option}={n} exceeds the {len(task.pairs())} distinct questions of task {task.name!r}; "
            f"allowed: 0..{len(task.pairs())}, or a larger task from {task_names()}"
        )


def generate(name: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` records with distinct questions, drawn without replacement by ``random.Random(seed)``."""
    task = get_task(name)
    check_size(task, n)
    pairs = task.pairs()
    # sample() over a range is a seeded, order-stable draw of distinct indices.
    indices = random.Random(seed).sample(range(len(pairs)), n)
    return [_record(task, i, *pairs[i]) for i in indices]


def _record(task: ArithmeticTask, index: int, a: int, b: int) -> dict[str, str]:
    return {"id": f"{task.name}-{index}", "question": task.question(a, b), "label": str(task.answer(a, b))}


def parse_question(question: str) -> tuple[int, str, int] | None:
    """``"12 + 7"`` -> ``(12, "+", 7)``; None for any other text."""
    match = _QUESTION.match(question)
    return (int(match.group(1)), match.group(2), int(match.group(3))) if match else None


def _carry_flip(question: str, clean: int) -> int:
    """Addition with the ones-column carry flipped: dropped when there is one, invented when there is none.

    Dropping the carry alone ("ignore the carry") would leave carry-free sums correct, and a corrupted label
    must always differ from the clean one; flipping is one rule that always changes the answer by 10.
    """
    parsed = parse_question(question)
    if parsed is None or parsed[1] != "+":
        raise ValueError(f"systematic rule 'carry_flip' needs an addition question 'a + b', got {question!r}")
    a, _, b = parsed
    return clean - 10 if abs(a) % 10 + abs(b) % 10 >= 10 else clean + 10


# name -> f(question, clean integer answer) -> wrong answer; every rule returns a value != clean.
SYSTEMATIC_RULES: dict[str, Callable[[str, int], int]] = {
    "carry_flip": _carry_flip,
    "off_by_one_up": lambda question, clean: clean + 1,
    "off_by_one_down": lambda question, clean: clean - 1,
}


def near_miss_answer(clean: int, rng: random.Random, floor: int = 0) -> int:
    """``clean ± 1`` or ``± 10`` (an off-by-one slip or a dropped/extra carry), never below ``floor``."""
    return rng.choice([clean + d for d in (-10, -1, 1, 10) if clean + d >= floor])


def uniform_answer(clean: int, low: int, high: int, rng: random.Random) -> int:
    """Uniform over ``[low, high]`` without ``clean``: one draw, no rejection loop."""
    if not low <= clean <= high:
        return rng.randint(low, high)
    if low == high:
        return clean + 1  # a one-value range has no other value in it
    value = rng.randint(low, high - 1)
    return value + 1 if value >= clean else value

