"""Loading a VLM's processor from a local folder, also where transformers cannot build its video half.

transformers 5 builds Qwen2-VL processors with a video processor that needs torchvision; without it
``AutoProcessor.from_pretrained`` fails even for image-only use. litforge does not depend on torchvision (its wheels
are tied to one torch build), so :func:`load_processor` falls back to the same processor class without the video
part: the image processor (PIL backend), tokenizer and chat template of the folder, the same token expansion.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _image_only_class(base: type) -> type:
    """``base`` (a Qwen2-VL-style processor class) with ``image_processor`` and ``tokenizer`` as its only parts."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The attributes Qwen2VLProcessor.__init__ sets before its (video-requiring) base call.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    from transformers import ProcessorMixin

    # Same class name as the base: save_pretrained writes it as processor_class, which other tools then load.
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": __name__})


def image_only_processor(image_processor, tokenizer, chat_template: str | None, base: type | None = None):
    """A Qwen2-VL-family processor built from its image processor and tokenizer, without a video processor."""
    if base is None:
        from transformers import Qwen2VLProcessor as base
    return _image_only_class(base)(image_processor, tokenizer, chat_template=chat_template)


def _processor_class_name(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and (cls := json.loads(path.read_text()).get("processor_class")):
            return cls
    return None


def load_processor(folder: str | Path):
    """``AutoProcessor.from_pretrained(folder)``, or its image-only equivalent when the video half cannot be built."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        if getattr(processor, "image_processor", None) is None:  # AutoProcessor falls back to a bare tokenizer
            raise ValueError(f"{folder} holds no image processor (a text-only model?); allowed: an image-text model "
                             "folder with its processor files (Qwen2-VL, Qwen2.5-VL, ...)")  # fmt: skip
        return processor
    except (AttributeError, ImportError, OSError, TypeError, ValueError) as err:
        class_name = _processor_class_name(folder)
        base = getattr(transformers, class_name, None) if class_name else None
        if base is None or "video_processor" not in base.get_attributes() or "holds no image processor" in str(err):
            raise
        log.info("building %s without its video processor (%s)", class_name, err)
    template = folder / "chat_template.jinja"
    return image_only_processor(AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                                template.read_text() if template.is_file() else None, base)
