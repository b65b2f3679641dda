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
