"""Image inputs of Qwen2-VL-style processors repeated per generation, and checked before any forward (spec §5).

A processor batch holds ``pixel_values`` with every image's patch rows concatenated (2-D, not batch-major) and
``image_grid_thw`` ``[num_images, 3]``; image k owns ``prod(thw_k)`` consecutive rows and, after the 2×2 spatial
merge, ``prod(thw_k) / merge²`` placeholder tokens in ``input_ids``. Expanding a batch to G completions per
prompt must repeat each *sample's block* of rows G times; ``repeat_interleave`` on the rows would interleave
single patch rows and silently pair images with the wrong prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_counts(images_per_sample: Sequence[int], image_grid_thw: Tensor) -> None:
    if any(n < 0 for n in images_per_sample) or sum(images_per_sample) != image_grid_thw.shape[0]:
        raise ValueError(f"images_per_sample={list(images_per_sample)} does not add up to the "
                         f"{image_grid_thw.shape[0]} images of image_grid_thw")


def expand_image_inputs(pixel_values: Tensor, image_grid_thw: Tensor, images_per_sample: Sequence[int],
                        repeats: int) -> tuple[Tensor, Tensor]:
    """``(pixel_values, image_grid_thw)`` with each sample's block of rows and of grid rows repeated ``repeats``
    times, in sample order: samples ``[s0, s1]`` become ``[s0, s0, s1, s1]`` for ``repeats = 2``."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed; allowed: an int >= 1")
    _check_counts(images_per_sample, image_grid_thw)
    rows_per_image = image_grid_thw.prod(dim=-1)
    if pixel_values.shape[0] != int(rows_per_image.sum()):
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but image_grid_thw describes "
                         f"{int(rows_per_image.sum())} (the sum of t·h·w over its images)")
    pixel_blocks, grid_blocks = [], []
    image, row = 0, 0
    for count in images_per_sample:
        rows = int(rows_per_image[image:image + count].sum())
        pixel_blocks += [pixel_values[row:row + rows]] * repeats
        grid_blocks += [image_grid_thw[image:image + count]] * repeats
        image, row = image + count, row + rows
    return torch.cat(pixel_blocks), torch.cat(grid_blocks)


def check_image_tokens(input_ids: Tensor, image_grid_thw: Tensor, images_per_sample: Sequence[int],
                       image_token_id: int, merge_size: int = 2) -> None:
    """Raise before a forward whose prompts and images disagree ("Image features and image tokens do not match"):
    row i of ``input_ids`` must hold ``Σ prod(thw)/merge²`` image tokens over its own images."""
    if input_ids.shape[0] != len(images_per_sample):
        raise ValueError(f"input_ids has {input_ids.shape[0]} rows for {len(images_per_sample)} samples")
    _check_counts(images_per_sample, image_grid_thw)
    tokens_per_image = image_grid_thw.prod(dim=-1) // merge_size**2
    found = (input_ids == image_token_id).sum(dim=1)
    image = 0
    for i, count in enumerate(images_per_sample):
        expected = int(tokens_per_image[image:image + count].sum())
        if int(found[i]) != expected:
            raise ValueError(f"sample {i} has {int(found[i])} image tokens but its {count} image(s) need {expected} "
                             f"(prod(image_grid_thw) / merge_size²; merge_size={merge_size})")
        image += count
