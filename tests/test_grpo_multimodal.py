"""Per-generation expansion of image inputs and the image-token check (GRPO spec §5, test 17), on plain tensors."""

from __future__ import annotations

import pytest
import torch

from lit_modules.grpo.multimodal import check_image_tokens, expand_image_inputs, expand_prompts

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


def test_prompt_expansion_repeats_per_token_and_batch_major_inputs_row_by_row():
    """Idefics3/SmolVLM-style inputs: ``pixel_values`` [B, images, C, H, W] and ``pixel_attention_mask`` go with their
    prompt row, like ``input_ids``; Qwen2-VL's per-token ``mm_token_type_ids`` likewise."""
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    extras = {"pixel_values": torch.arange(2.0).view(2, 1, 1, 1, 1).expand(2, 1, 3, 2, 2),
              "pixel_attention_mask": torch.ones(2, 1, 2, 2, dtype=torch.bool),
              "mm_token_type_ids": torch.tensor([[0, 1, 0], [1, 0, 0]])}  # fmt: skip
    out_ids, out_mask, out = expand_prompts(ids, ids > 0, extras, [1, 1], repeats=3)
    assert out_ids.tolist() == [[0, 5, 6]] * 3 + [[7, 8, 9]] * 3 and out_mask.shape == (6, 3)
    assert out["pixel_values"][:, 0, 0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert out["pixel_attention_mask"].shape == (6, 1, 2, 2)
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0]] * 3 + [[1, 0, 0]] * 3


def test_prompt_expansion_refuses_what_it_cannot_repeat():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="image_grid_thw"):  # 2-D patch rows without their grid
        expand_prompts(ids, ids, {"pixel_values": torch.zeros(10, 4)}, [1, 1], repeats=2)
    with pytest.raises(ValueError, match="2 prompts"):
        expand_prompts(ids, ids, {"pixel_values": torch.zeros(3, 1, 3, 2, 2)}, [1, 1], repeats=2)
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        expand_prompts(ids, ids, {"aspect_ratio_ids": torch.zeros(2, 1)}, [1, 1], repeats=2)
