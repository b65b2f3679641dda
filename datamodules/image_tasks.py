"""Generated-image tasks with verifiable labels, mirroring the paper's multimodal tasks at toy scale.

Every image is a ``size × size`` RGB canvas divided into a ``grid × grid`` board; each object (a filled circle,
square or triangle in one of four colours) occupies one cell. Four tasks:

- ``grounding``: "Point to the red circle." — the label is the target's box ``[x1, y1, x2, y2]`` in pixels; the
  accuracy reward checks that the answered point lies inside it (GUI grounding, point-in-box);
- ``shape`` / ``colour`` / ``pattern``: one object, "What shape / colour / pattern is the object?" (fine-grained
  classification; a pattern is a solid, striped or dotted fill);
- ``count``: 1–5 objects of one shape among distractors, "How many squares are there?".

A record is ``{"id", "question", "label", "image", "wrong"}``; ``wrong`` lists, per label-noise kind, the wrong
labels a corruption may pick, so the noise is "active" (spec §4.2): a near miss is a distractor's box, a
confusable shape or colour, or a count off by one — answers the policy can plausibly produce.
Everything is a pure function of ``(task, n, seed)``: no global random state, the same records on every rank.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageChops, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "yellow": (235, 200, 30),
                                            "green": (40, 160, 60), "blue": (40, 80, 220)}
BACKGROUND = (245, 245, 245)
# Near misses: neighbours on the hue circle, and the shapes most alike in outline.
NEAR_COLOURS = {"red": ("yellow",), "yellow": ("red", "green"), "green": ("yellow", "blue"), "blue": ("green",)}
NEAR_SHAPES = {"circle": ("square",), "square": ("circle", "triangle"), "triangle": ("square",)}
# Systematic noise: one fixed derangement per class set (every class maps to another one).
SYSTEMATIC_SHAPES = {"circle": "square", "square": "triangle", "triangle": "circle"}
SYSTEMATIC_COLOURS = {"red": "yellow", "yellow": "green", "green": "blue", "blue": "red"}
PATTERNS = ("solid", "striped", "dotted")
NEAR_PATTERNS = {"solid": ("dotted",), "striped": ("dotted",), "dotted": ("solid", "striped")}
SYSTEMATIC_PATTERNS = {"solid": "striped", "striped": "dotted", "dotted": "solid"}
TASKS = ("grounding", "shape", "colour", "pattern", "count")
NOISE_KINDS = ("near_miss", "uniform", "systematic")
MAX_COUNT = 5


@dataclass(frozen=True)
class ImageTask:
    """A task name with its canvas: ``size`` pixels square, ``grid`` cells per side (one object per cell)."""

    name: str
    size: int = 112
    grid: int = 4

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"task={self.name!r} is not allowed; allowed: {list(TASKS)}")
        if self.grid < 2 or self.size < 8 * self.grid:
            raise ValueError(f"size={self.size}, grid={self.grid} is not allowed; allowed: grid >= 2 and at least "
                             "8 pixels per cell")

    @property
    def cell(self) -> int:
        return self.size // self.grid

    def box(self, cell: int) -> list[int]:
        """Pixel box ``[x1, y1, x2, y2]`` (inclusive) of grid cell ``cell`` (row-major)."""
        row, col = divmod(cell, self.grid)
        return [col * self.cell, row * self.cell, (col + 1) * self.cell - 1, (row + 1) * self.cell - 1]


def draw_object(draw: ImageDraw.ImageDraw, box: list[int], shape: str, fill: tuple[int, ...] | int) -> None:
    """A filled ``shape`` inside ``box`` with a margin of 1/6 of the cell, so neighbours never touch."""
    margin = (box[2] - box[0] + 1) // 6
    x1, y1, x2, y2 = box[0] + margin, box[1] + margin, box[2] - margin, box[3] - margin
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def pattern_mask(size: int, pattern: str) -> Image.Image:
    """255 where a ``pattern`` fill paints: everywhere (solid), 3-pixel horizontal bands (striped), or 2 × 2 dots
    every 5 pixels (dotted)."""
    if pattern == "solid":
        return Image.new("L", (size, size), 255)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for y in range(0, size, 6 if pattern == "striped" else 5):
        if pattern == "striped":
            draw.rectangle((0, y, size - 1, y + 2), fill=255)
        else:
            for x in range(0, size, 5):
                draw.rectangle((x, y, x + 1, y + 1), fill=255)
    return mask


def render(task: ImageTask, objects: list[tuple]) -> Image.Image:
    """The canvas with ``(cell, shape, colour[, pattern])`` objects drawn (pattern: solid unless given)."""
    image = Image.new("RGB", (task.size, task.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for cell, shape, colour, *pattern in objects:
        if not pattern or pattern[0] == "solid":
            draw_object(draw, task.box(cell), shape, COLOURS[colour])
            continue
        mask = Image.new("L", image.size, 0)
        draw_object(ImageDraw.Draw(mask), task.box(cell), shape, 255)
        image.paste(COLOURS[colour], mask=ImageChops.multiply(mask, pattern_mask(task.size, pattern[0])))
    return image


def _grounding(task: ImageTask, rng: random.Random) -> dict[str, Any]:
    """2–4 distinct (shape, colour) objects; the target is named by colour and shape, so it is unique."""
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], rng.randint(2, 4))
    cells = rng.sample(range(task.grid**2), len(kinds))
    objects = [(cell, shape, colour) for cell, (shape, colour) in zip(cells, kinds)]
    target = objects[0]
    others = sorted(objects[1:], key=lambda o: _cell_distance(task, o[0], target[0]))
    empty = [c for c in range(task.grid**2) if c not in cells]
    right = target[0] - target[0] % task.grid + (target[0] % task.grid + 1) % task.grid  # wraps within the row
    return {"question": f"Point to the {target[2]} {target[1]}. Answer with the (x, y) pixel coordinates.",
            "label": task.box(target[0]), "objects": objects,
            "wrong": {"near_miss": [task.box(o[0]) for o in others],
                      "uniform": [task.box(c) for c in sorted(empty + [o[0] for o in others])],
                      "systematic": [task.box(right)]}}


def _cell_distance(task: ImageTask, a: int, b: int) -> float:
    (ra, ca), (rb, cb) = divmod(a, task.grid), divmod(b, task.grid)
    return math.hypot(ra - rb, ca - cb)


# attribute -> (its classes, near misses, systematic derangement)
ATTRIBUTES = {"shape": (SHAPES, NEAR_SHAPES, SYSTEMATIC_SHAPES),
              "colour": (tuple(COLOURS), NEAR_COLOURS, SYSTEMATIC_COLOURS),
              "pattern": (PATTERNS, NEAR_PATTERNS, SYSTEMATIC_PATTERNS)}


def _classify(task: ImageTask, rng: random.Random, attribute: str) -> dict[str, Any]:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    objects = [(rng.randrange(task.grid**2), shape, colour)]
    if attribute == "pattern":  # drawn on a square, the shape that shows a fill best
        objects = [(objects[0][0], "square", colour, rng.choice(PATTERNS))]
    label = {"shape": shape, "colour": colour, "pattern": objects[0][-1]}[attribute]
    classes, near, systematic = ATTRIBUTES[attribute]
    return {"question": f"What {attribute} is the object? Answer with one word.", "label": label, "objects": objects,
            "wrong": {"near_miss": list(near[label]), "uniform": [c for c in classes if c != label],
                      "systematic": [systematic[label]]}}


def _count(task: ImageTask, rng: random.Random) -> dict[str, Any]:
    shape = rng.choice(SHAPES)
    count = rng.randint(1, MAX_COUNT)
    distractors = rng.randint(0, 2)
    cells = rng.sample(range(task.grid**2), count + distractors)
    objects = [(c, shape, rng.choice(list(COLOURS))) for c in cells[:count]]
    objects += [(c, rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLOURS))) for c in cells[count:]]
    near = [str(c) for c in (count - 1, count + 1) if 1 <= c <= MAX_COUNT]
    return {"question": f"How many {shape}s are there? Answer with a number.", "label": str(count),
            "objects": objects,
            "wrong": {"near_miss": near, "uniform": [str(c) for c in range(1, MAX_COUNT + 1) if c != count],
                      "systematic": [str(count + 1 if count < MAX_COUNT else count - 1)]}}


def generate_images(task: str | ImageTask, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` records of ``task`` drawn with a private ``random.Random(seed)``; ids are ``"<task>-<seed>-<i>"``."""
    task = task if isinstance(task, ImageTask) else ImageTask(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r} is not allowed; allowed: an integer >= 0")
    rng = random.Random(f"{task.name}:{seed}")
    records = []
    for i in range(n):
        if task.name == "grounding":
            example = _grounding(task, rng)
        elif task.name == "count":
            example = _count(task, rng)
        else:
            example = _classify(task, rng, task.name)
        example["image"] = render(task, example["objects"])
        records.append({"id": f"{task.name}-{seed}-{i}", **example})
    return records


def answer_text(label: Any) -> str:
    """The supervised answer for a label: a box's centre as ``"(x, y)"`` (grounding), any other label as text."""
    if isinstance(label, (list, tuple)) and len(label) == 4:
        return f"({(label[0] + label[2]) // 2}, {(label[1] + label[3]) // 2})"
    return str(label)


def corrupt_label(record: dict[str, Any], kind: str, rng: random.Random) -> Any:
    """A wrong label for ``record`` of noise ``kind`` (never the clean one); ``systematic`` is deterministic."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind={kind!r} is not allowed; allowed: {list(NOISE_KINDS)}")
    candidates = [c for c in record["wrong"][kind] if c != record["label"]] or \
        [c for c in record["wrong"]["uniform"] if c != record["label"]]
    if not candidates:
        raise ValueError(f"record {record['id']!r} has no wrong label of kind {kind!r} (nor a uniform one)")
    return candidates[0] if kind == "systematic" else rng.choice(candidates)
