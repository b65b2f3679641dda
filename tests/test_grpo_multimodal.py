"""Per-generation expansion of image inputs and the image-token check (GRPO spec §5, test 17), on plain tensors."""

from __future__ import annotations

import pytest
import torch

from lit_modules.grpo.multimodal import check_image_tokens, expand_image_inputs

IMAGE = 99  # the image placeholder token id of these toys


def _batch():
    """Two samples with one image each: grids (1,4,4) and (1,2,4), i.e. 16 and 8 patch rows of width 3."""
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])
    pixels = torch.cat([torch.full((16, 3), 0.0), torch.full((8, 3), 1.0)]) + torch.arange(24.0)[:, None] / 100
    return pixels, grid


def test_each_sample_block_is_repeated_as_a_block():
    pixels, grid = _batch()
    expanded, grid_g = expand_image_inputs(pixels, grid, [1, 1], repeats=2)
    assert expanded.shape == (48, 3)
    assert torch.equal(expanded, torch.cat([pixels[:16], pixels[:16], pixels[16:], pixels[16:]]))
    assert grid_g.tolist() == [[1, 4, 4], [1, 4, 4], [1, 2, 4], [1, 2, 4]]
    # What the spec warns about: repeat_interleave on the rows is a different (wrong) layout.
    assert not torch.equal(expanded, pixels.repeat_interleave(2, dim=0))
    ids = torch.tensor([[IMAGE] * 4 + [1, 2], [0, 0, IMAGE, IMAGE, 1, 2]])
    check_image_tokens(ids.repeat_interleave(2, dim=0), grid_g, [1, 1, 1, 1], IMAGE)


def test_several_images_per_sample_and_a_sample_without_images():
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 2]])  # sample 0: images 0 and 1; sample 1: none; sample 2: 2
    pixels = torch.arange(4 + 8 + 8, dtype=torch.float32)[:, None]
    expanded, grid_g = expand_image_inputs(pixels, grid, [2, 0, 1], repeats=3)
    assert expanded[:, 0].tolist() == (list(range(12)) * 3) + (list(range(12, 20)) * 3)
    assert grid_g.tolist() == [[1, 2, 2], [1, 2, 4]] * 3 + [[1, 4, 2]] * 3


def test_mismatches_are_refused_before_any_forward():
    pixels, grid = _batch()
    with pytest.raises(ValueError, match="pixel_values has 23 rows but image_grid_thw describes 24"):
        expand_image_inputs(pixels[:23], grid, [1, 1], repeats=2)
    with pytest.raises(ValueError, match=r"images_per_sample=\[2, 1\] does not add up to the 2 images"):
        expand_image_inputs(pixels, grid, [2, 1], repeats=2)
    with pytest.raises(ValueError, match="repeats=0"):
        expand_image_inputs(pixels, grid, [1, 1], repeats=0)
    ids = torch.tensor([[IMAGE] * 4 + [1, 2], [0, 0, 0, IMAGE, 1, 2]])  # sample 1 lost an image token
    with pytest.raises(ValueError, match=r"sample 1 has 1 image tokens but its 1 image\(s\) need 2"):
        check_image_tokens(ids, grid, [1, 1], IMAGE)
