"""Tiny random Hugging Face models and a locally trained tokenizer, built without any hub access.

Every architecture the project claims to support gets a config small enough to run a forward pass in
milliseconds on a CPU; tests save them to a folder so that code paths which load "any HF path" are real.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import (
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model assigns probabilities to sequences of tokens.",
    "Pruning removes weights; quantization stores them with fewer bits.",
    "What is 12 + 7? Answer with just the number. 19",
    "Wikipedia is a free online encyclopedia written by volunteers.",
] * 4

VOCAB_SIZE = 320
HIDDEN = 32
LAYERS = 2


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences: every string encodes, nothing is unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def _common(**extra) -> dict:
    return dict(vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)


def tiny_config(arch: str):
    """Config of a 2-layer, 32-wide random model of the given architecture family."""
    if arch == "llama":
        return LlamaConfig(**_common(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    if arch == "qwen2":
        return Qwen2Config(**_common(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                     layer_types=["full_attention", "sliding_attention"]))
    if arch == "mistral":
        return MistralConfig(**_common(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       sliding_window=16))
    if arch == "gemma":
        return GemmaConfig(**_common(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                     max_position_embeddings=256))
    if arch == "opt":
        return OPTConfig(**_common(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                   max_position_embeddings=256, word_embed_proj_dim=HIDDEN))
    if arch == "gpt2":
        return GPT2Config(**_common(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=256))
    if arch == "gpt_neox":
        return GPTNeoXConfig(**_common(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, max_position_embeddings=256))
    raise ValueError(f"unknown tiny architecture {arch!r}")


ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma", "opt", "gpt2", "gpt_neox")


def build_tiny_model(arch: str, seed: int = 0):
    """A random model (fp32, eval mode) of the given family."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model and the tiny tokenizer as a plain HF folder that `from_pretrained` loads."""
    folder = Path(folder)
    build_tiny_model(arch, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
