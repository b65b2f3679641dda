"""Loading the GRPO policy: a causal LM, or an image-text-to-text model (Qwen2-VL, Qwen2.5-VL, ...) + its processor."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from callbacks.calibration.distributed import ungathered_strategy

log = logging.getLogger(__name__)


def refuse_unsupported_strategy(strategy: object) -> None:
    """One clear error, before any model is loaded, for a strategy GRPOModule cannot run under yet: generation needs
    gathered parameters, and only FSDP's gathering is implemented (``sharding.py``) and tested."""
    refused = ungathered_strategy(strategy)
    if refused:
        raise MisconfigurationException(
            f"GRPOModule does not support the {refused} strategy yet: generating completions needs the full "
            "parameters, and gathering them is implemented for FSDP only. Use strategy='fsdp' (shards the policy; "
            "tested), strategy='ddp' (replicates it; tested), or a single device.")

# Attribute names of vision encoders in transformers' image-text models (Qwen2-VL: model.visual).
VISION_TOWERS = ("visual", "vision_tower", "vision_model")


@lru_cache(maxsize=None)
def is_image_text_model(folder: Path) -> bool:
    """True when the folder's config belongs to transformers' image-text-to-text auto class (it has a vision tower)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(folder)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


def load_policy(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForImageTextToText`` for image-text folders, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_image_text_model(folder) else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=dtype)


# Config fields naming the tokens that mark where image/video features go; a completion must never contain one.
PLACEHOLDER_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                      "image_token_index", "video_token_index")


def placeholder_token_ids(model: torch.nn.Module) -> list[int]:
    """Image/video placeholder ids of an image-text model's config (empty for a text-only model)."""
    config = model.config
    if not hasattr(config, "vision_config"):
        return []
    return sorted({v for f in PLACEHOLDER_FIELDS if isinstance(v := getattr(config, f, None), int) and v >= 0})


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze every vision-encoder submodule (spec §5 default: only the language model trains); returns how many
    parameters were frozen. A model without a recognisable vision tower is refused rather than silently trained."""
    frozen = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWERS:
            for p in module.parameters():
                frozen += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
    if frozen == 0 and not any(n.rsplit(".", 1)[-1] in VISION_TOWERS for n, _ in model.named_modules()):
        raise ValueError(f"freeze_vision=True but {type(model).__name__} has no submodule named one of "
                         f"{list(VISION_TOWERS)}; allowed: freeze_vision=False for this model")  # fmt: skip
    log.info("froze %d vision-tower parameters", frozen)
    return frozen
