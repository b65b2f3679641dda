"""A tiny Qwen2-VL and its processor, built from code: task tokenizer, chat template, image processor, config.

No pretrained VLM can be installed offline, so the multimodal path runs on a Qwen2-VL-architecture model that the
project initialises here and warm-starts with its own SFT recipe (``lit_modules/sft.py``). Qwen2-VL rather than
SmolVLM's design (a vision tower feeding the 135M SmolLM2 decoder): a 0.9M-parameter Qwen2-VL reaches 0.36-0.41 clean
grounding accuracy (by machine) in about 5 minutes on 2 CPU cores, where the 135M decoder would make every step ~150× larger (not
measured); and Qwen2-VL is the paper's own family, so the same code path (M-RoPE, 2-D ``pixel_values``,
``image_grid_thw``) serves the real models.

The 112-pixel canvases of ``datamodules/image_tasks.py`` give 8 × 8 patches of 14 pixels; the 2 × 2 merge leaves 16
image tokens, one per cell of the 4 × 4 board.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from datamodules.assets import save_model_folder
from datamodules.image_tasks import COLOURS, SHAPES

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD]
VOCAB_SIZE = 384
INIT_VERSION = "v1"  # bump when the tokenizer, the processor or the default architecture changes (cache key)

# ChatML with Qwen2-VL's image placeholder: an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the processor then widens to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _task_text() -> list[str]:
    """Every word and number the image tasks and their answers use, so the BPE merges cover them."""
    words = [f"Point to the {c} {s}. Answer with the (x, y) pixel coordinates." for c in COLOURS for s in SHAPES]
    words += [f"How many {s}s are there? Answer with a number." for s in SHAPES]
    words += ["What shape is the object? Answer with one word.", "What colour is the object? Answer with one word."]
    words += list(SHAPES) + list(COLOURS) + ["system", "user", "assistant", "You are a helpful assistant."]
    words += [f"({x}, {y})" for x in range(0, 112, 7) for y in range(0, 112, 7)]
    return words * 4


def task_tokenizer():
    """A byte-level BPE tokenizer trained on the task vocabulary, digits split one per token (any string encodes)."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_task_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer=None):
    """A Qwen2-VL processor for 112-pixel canvases (kept at their size: 8 × 8 patches, 16 image tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lit_modules.vlm.processor import image_only_processor

    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    return image_only_processor(images, tokenizer or task_tokenizer(), CHAT_TEMPLATE)


def tiny_qwen2_vl_config(tokenizer, *, hidden: int = 128, layers: int = 4, heads: int = 4, vision_width: int = 64,
                         vision_depth: int = 2, rope_theta: float = 20.0, family: str = "qwen2_vl"):
    """Config of a small Qwen2-VL (or Qwen2.5-VL) whose special-token ids are ``tokenizer``'s.

    ``rope_theta`` is 20, not Qwen2-VL's 1e6: M-RoPE gives the height and width of image tokens the *lowest* rotary
    frequencies, and with a 32-dim head and θ = 1e6 those turn by under 1e-3 rad per position, so a small model
    cannot tell image tokens apart by position (measured: SFT on grounding stays at chance for 800+ steps; with
    θ = 20 single-object pointing reaches 100% by step 700). The temporal section, unused by still images, gets the
    fewest frequencies.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END)]}
    half = hidden // heads // 2
    temporal = max(1, half // 8)
    sections = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": rope_theta},
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden, num_heads=4, mlp_ratio=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=vision_depth, hidden_size=vision_width, out_hidden_size=hidden, num_heads=4,
                      intermediate_size=2 * vision_width, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      in_channels=3, window_size=56, fullatt_block_indexes=[vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    raise ValueError(f"family={family!r} is not allowed; allowed: 'qwen2_vl', 'qwen2_5_vl'")


def save_initial_vlm(out: Path, *, seed: int = 0, **config) -> None:
    """A randomly initialised tiny VLM + its processor as a Hugging Face folder (``from_pretrained`` loads it)."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    processor = build_processor()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_qwen2_vl_config(processor.tokenizer, **config))
    model.generation_config = GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id,
                                               pad_token_id=processor.tokenizer.pad_token_id)
    save_model_folder(model, out)
    processor.save_pretrained(out)
