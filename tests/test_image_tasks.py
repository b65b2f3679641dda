"""Generated-image tasks: the pixels agree with the labels, the noise candidates are wrong and plausible."""

from __future__ import annotations

import random

import numpy as np
import pytest

from datamodules.image_tasks import (
    BACKGROUND, COLOURS, MAX_COUNT, NOISE_KINDS, SHAPES, TASKS, ImageTask, corrupt_label, generate_images)
from lit_modules.grpo.rewards import Accuracy


def _pixels(record) -> np.ndarray:
    return np.asarray(record["image"], dtype=np.int16)


def _cell_pixels(task: ImageTask, pixels: np.ndarray, box) -> np.ndarray:
    return pixels[box[1]:box[3] + 1, box[0]:box[2] + 1]


def _occupied_cells(task: ImageTask, pixels: np.ndarray) -> list[int]:
    return [c for c in range(task.grid**2) if (_cell_pixels(task, pixels, task.box(c)) != BACKGROUND).any()]


@pytest.mark.parametrize("name", TASKS)
def test_records_are_deterministic_per_seed_and_ids_are_unique(name):
    first, again, other = (generate_images(name, 12, seed) for seed in (0, 0, 1))
    assert [r["id"] for r in first] == [r["id"] for r in again] and len({r["id"] for r in first}) == 12
    assert all(np.array_equal(_pixels(a), _pixels(b)) and a["label"] == b["label"] for a, b in zip(first, again))
    assert any(not np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(first, other))
    assert all(r["image"].size == (112, 112) and r["image"].mode == "RGB" for r in first)


def test_grounding_box_holds_the_named_object_and_only_it():
    task = ImageTask("grounding")
    for record in generate_images(task, 30, seed=3):
        pixels = _pixels(record)
        cell = _cell_pixels(task, pixels, record["label"])
        colour = record["question"].split()[3]
        centre = cell[cell.shape[0] * 2 // 3, cell.shape[1] // 2]  # the lower middle is inside every shape
        assert tuple(centre) == COLOURS[colour], record["id"]
        # Every object sits in its own cell; the target's cell is one of them, the distractors are the others.
        occupied = _occupied_cells(task, pixels)
        assert len(occupied) == len(record["objects"]) and task.box(record["objects"][0][0]) == record["label"]


def test_classification_pixels_show_the_labelled_colour_and_shape():
    fill = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # filled fraction of the shape's bounding box
    for name in ("shape", "colour"):
        for record in generate_images(name, 20, seed=1):
            (cell, shape, colour), = record["objects"]
            assert record["label"] == (shape if name == "shape" else colour)
            pixels = _pixels(record)
            mask = (pixels != BACKGROUND).any(axis=2)
            ys, xs = np.nonzero(mask)
            assert {tuple(p) for p in pixels[mask]} == {COLOURS[colour]}
            box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert mask.sum() / box_area == pytest.approx(fill[shape], abs=0.08), (record["id"], shape)


def test_count_label_is_the_number_of_objects_of_the_named_shape():
    task = ImageTask("count")
    for record in generate_images(task, 30, seed=2):
        shape = record["question"].split()[2].removesuffix("s")
        assert shape in SHAPES
        assert int(record["label"]) == sum(o[1] == shape for o in record["objects"]) <= MAX_COUNT
        assert len(_occupied_cells(task, _pixels(record))) == len(record["objects"])


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_corrupted_labels_are_wrong_and_drawn_from_the_kind(name, kind):
    for record in generate_images(name, 25, seed=4):
        wrong = corrupt_label(record, kind, random.Random(0))
        assert wrong != record["label"]
        assert wrong in record["wrong"][kind] or wrong in record["wrong"]["uniform"]
    grounding = generate_images("grounding", 10, seed=5)
    for record in grounding:  # near misses are the distractors actually drawn in the image
        distractors = [ImageTask("grounding").box(o[0]) for o in record["objects"][1:]]
        assert sorted(record["wrong"]["near_miss"]) == sorted(distractors)


def test_accuracy_reward_scores_points_inside_the_box():
    record = generate_images("grounding", 1, seed=6)[0]
    x1, y1, x2, y2 = record["label"]
    dx1, dy1, dx2, dy2 = record["wrong"]["near_miss"][0]
    completions = [f"({(x1 + x2) // 2}, {(y1 + y2) // 2})", f"({(dx1 + dx2) // 2}, {(dy1 + dy2) // 2})", "none"]
    assert Accuracy()(["p"] * 3, completions, label=[record["label"]] * 3) == [1.0, 0.0, 0.0]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="task='detect'"):
        ImageTask("detect")
    with pytest.raises(ValueError, match="grid=4"):
        ImageTask("shape", size=16, grid=4)
    with pytest.raises(ValueError, match="n=-1"):
        generate_images("shape", -1)
    with pytest.raises(ValueError, match="noise_kind='flip'"):
        corrupt_label(generate_images("shape", 1)[0], "flip", random.Random(0))


def test_pattern_pixels_show_the_labelled_fill():
    """A square drawn solid, in 3-pixel stripes every 6 rows, or 2 × 2 dots every 5 pixels: the painted share of
    its bounding box tells the three apart."""
    share = {"solid": 1.0, "striped": 0.5, "dotted": 4 / 25}
    labels = set()
    for record in generate_images("pattern", 24, seed=6):
        (cell, shape, colour, pattern), = record["objects"]
        assert record["label"] == pattern and shape == "square"
        labels.add(pattern)
        pixels = _pixels(record)
        mask = (pixels != BACKGROUND).any(axis=2)
        assert {tuple(p) for p in pixels[mask]} == {COLOURS[colour]}
        x1, y1, x2, y2 = ImageTask("pattern").box(cell)
        margin = (x2 - x1 + 1) // 6
        inner = mask[y1 + margin:y2 - margin + 1, x1 + margin:x2 - margin + 1]
        assert inner.mean() == pytest.approx(share[pattern], abs=0.1), (record["id"], pattern)
    assert labels == {"solid", "striped", "dotted"}
