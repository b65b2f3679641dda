from __future__ import annotations

import os
from pathlib import Path

import pytest

import callbacks
import datamodules
import lit_modules
from datamodules import assets

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", [callbacks, datamodules, lit_modules])
def test_generic_package_names_resolve_to_this_project(package):
    assert Path(package.__file__).resolve().parent.parent == REPO


def test_materialize_once_builds_once_and_reuses(tmp_path):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights.bin").write_text("w")

    first = assets.materialize_once("thing-1.0", build, root=tmp_path)
    second = assets.materialize_once("thing-1.0", build, root=tmp_path)
    assert first == second == tmp_path / "thing-1.0"
    assert len(calls) == 1
    assert (first / "weights.bin").read_text() == "w"
    # Only the final folder remains: no temporary folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing-1.0"]


def test_half_written_cache_is_never_used(tmp_path):
    stale = tmp_path / "thing-1.0"
    stale.mkdir()
    (stale / "weights.bin").write_text("truncated")  # no completion marker: a crashed earlier write
    result = assets.materialize_once("thing-1.0", lambda out: (out / "weights.bin").write_text("full"), root=tmp_path)
    assert (result / "weights.bin").read_text() == "full"


def test_failed_build_leaves_nothing_behind(tmp_path):
    def build(out: Path) -> None:
        (out / "part").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        assets.materialize_once("thing-1.0", build, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_key_includes_package_version(monkeypatch, tmp_path):
    monkeypatch.setenv("LITFORGE_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(assets, "materialize_once", lambda key, build, root=None: seen.append(key) or tmp_path)
    assets.embedded_model_dir()
    assert seen == ["smollm2-135m-instruct-0.1.2"]


def test_unknown_model_name_is_rejected_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"model='smollm9'.*smollm2-135m-instruct"):
        assets.check_model_source("smollm9")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        assets.check_model_source(str(tmp_path), option="model_name_or_path")


def test_split_is_deterministic_and_disjoint():
    calibration = assets.wiki_leads("calibration")
    evaluation = assets.wiki_leads("evaluation")
    assert len(calibration) > 8000 and 800 < len(evaluation) < 1300
    assert not set(calibration) & set(evaluation)
    assert assets.split_of("Alan Turing") == assets.split_of("Alan Turing")
    assert evaluation == assets.wiki_leads("evaluation")


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match=r"split='test'.*calibration.*evaluation"):
        assets.wiki_leads("test")


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LITFORGE_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    monkeypatch.delenv("LITFORGE_CACHE")
    assert assets.cache_root() == Path(os.path.expanduser("~")) / ".cache" / "litforge"


def test_model_folders_are_written_from_any_rank(monkeypatch, tmp_path):
    """On a first multi-process run, whichever rank needs the embedded model builds it; transformers' own
    save_pretrained writes nothing from a rank other than 0 once torch.distributed is up."""
    import transformers.distributed.mixin as mixin

    from tests.tiny_models import build_tiny_model

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    model = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "config.json").exists()  # the gate this helper exists for
    assets.save_model_folder(model, tmp_path / "ours")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "ours").iterdir()}
    assert "should_save_on_this_rank" not in vars(model)
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, out: None)  # a save that writes nothing
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no config/weights"):
        assets.save_model_folder(model, tmp_path / "empty")
