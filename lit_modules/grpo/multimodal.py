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


# Processor outputs with one value per prompt *token* (Qwen2-VL's M-RoPE reads which tokens are image tokens): they
# are repeated like input_ids and extended with zeros (text) over the completion.
PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
# Processor outputs with one entry per prompt (Idefics3 / SmolVLM): repeated like input_ids.
BATCH_MAJOR_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes")


def images_per_sample(images: Sequence) -> list[int]:
    """Images of each prompt: an ``image`` column entry is one image or a list of them (``None``: none)."""
    return [0 if im is None else len(im) if isinstance(im, (list, tuple)) else 1 for im in images]


def encode_image_prompts(processor, prompts: Sequence[str], images: Sequence, device: torch.device,
                         dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """Left-padded ``input_ids``/``attention_mask`` and the image tensors of chat-templated prompts, processed once.

    Never truncated (spec §5): cutting a prompt would cut image tokens away from their features. ``pixel_values``
    are cast to the model's dtype; every other tensor the processor returns is kept as is.
    """
    flat = [im for entry in images if entry is not None
            for im in (entry if isinstance(entry, (list, tuple)) else [entry])]  # fmt: skip
    processor.tokenizer.padding_side = "left"
    enc = processor(text=list(prompts), images=flat or None, return_tensors="pt", padding=True)
    ids, mask = enc.pop("input_ids").to(device), enc.pop("attention_mask").to(device)
    extras = {k: v.to(device, dtype=dtype if k == "pixel_values" else None) for k, v in enc.items()
              if isinstance(v, Tensor)}  # fmt: skip
    return ids, mask, extras


def expand_prompts(ids: Tensor, mask: Tensor, extras: dict[str, Tensor], counts: Sequence[int],
                   repeats: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """Every prompt's tensors repeated ``repeats`` times in place (spec §5): Qwen2-VL's 2-D patch rows as per-sample
    blocks (with ``image_grid_thw``); batch-major image tensors (Idefics3/SmolVLM's ``[B, images, C, H, W]``
    ``pixel_values`` and ``pixel_attention_mask``) and per-token ones row by row, like ``input_ids``."""
    _check_image_layout(extras, len(counts))
    out = {}
    if "image_grid_thw" in extras:
        out["pixel_values"], out["image_grid_thw"] = expand_image_inputs(
            extras["pixel_values"], extras["image_grid_thw"], counts, repeats)
    for key, value in extras.items():
        if key not in out and (key in PER_TOKEN_KEYS or key in BATCH_MAJOR_KEYS):
            out[key] = value.repeat_interleave(repeats, dim=0)
    unknown = sorted(set(extras) - set(out))
    if unknown:
        raise ValueError(f"the processor returned {unknown}, which GRPOModule does not know how to repeat per "
                         "generation; allowed: pixel_values (+ image_grid_thw, or batch-major), "
                         f"{list(BATCH_MAJOR_KEYS[1:])} and the per-token {list(PER_TOKEN_KEYS)}")  # fmt: skip
    return ids.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0), out


def _check_image_layout(inputs: dict[str, Tensor], rows: int | None = None) -> None:
    """``pixel_values`` are either Qwen2-VL's 2-D patch rows, which need ``image_grid_thw`` (to assign rows to
    samples, and for the M-RoPE positions of every later pass), or batch-major with one entry per prompt row."""
    pixels = inputs.get("pixel_values")
    if pixels is None or "image_grid_thw" in inputs:
        return
    if pixels.dim() == 2:
        raise ValueError("pixel_values are 2-D patch rows without image_grid_thw: the rows cannot be assigned to "
                         "samples and the model cannot place the 3-D positions of the completion tokens; every "
                         "pass needs the image_grid_thw that generation used")  # fmt: skip
    if rows is not None and pixels.shape[0] != rows:
        raise ValueError(f"batch-major pixel_values have {pixels.shape[0]} entries for {rows} prompts")


def extend_over_completion(image_inputs: dict[str, Tensor], completion_ids: Tensor) -> dict[str, Tensor]:
    """The model inputs of a ``prompt ⊕ completion`` pass: per-token ones get zeros (text) for the completion."""
    _check_image_layout(image_inputs, completion_ids.shape[0])
    out = dict(image_inputs)
    for key in PER_TOKEN_KEYS:
        if key in out:
            out[key] = torch.cat([out[key], torch.zeros_like(completion_ids, dtype=out[key].dtype)], dim=1)
    return out


def image_prompts(processor, prompts: Sequence[str], images: Sequence, repeats: int, model
                  ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """Image prompts processed once on the model's device, checked (image tokens vs grids), then repeated
    ``repeats`` times per prompt: the tensors generation and every later pass use."""
    ids, mask, extras = encode_image_prompts(processor, prompts, images, model.device, model.dtype)
    counts = images_per_sample(images)
    if "image_grid_thw" in extras:
        check_image_tokens(ids, extras["image_grid_thw"], counts, model.config.image_token_id,
                           processor.image_processor.merge_size)  # fmt: skip
    return expand_prompts(ids, mask, extras, counts, repeats)
