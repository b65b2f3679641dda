from __future__ import annotations

import pytest

from tests.tiny_models import ARCHITECTURES, save_tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: `tiny_model_dir("llama")` -> path of a saved tiny random model with a tokenizer (cached per session)."""
    cache: dict[str, object] = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = save_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """Factory: `tiny_vlm_dir("qwen2_vl")` -> a saved tiny random Qwen2-VL / Qwen2.5-VL with its locally built
    processor (task tokenizer, PIL image processor, chat template); cached per session."""
    from lit_modules.vlm.build import save_initial_vlm

    cache: dict[str, object] = {}

    def make(family: str = "qwen2_vl"):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            save_initial_vlm(folder, family=family, hidden=32, layers=2, heads=2, vision_width=32, vision_depth=1)
            cache[family] = folder
        return cache[family]

    return make
