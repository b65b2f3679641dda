"""Shared set-up for the pruning-callback tests: a tiny model, calibration text and a Trainer."""

from __future__ import annotations

import torch
from lightning import Trainer

from callbacks.calibration.layers import compressible_linears, find_decoder_layers, weight_matrix
from datamodules.text import TextDataModule
from lit_modules.causal_lm import CausalLM

TEXT = ("The quick brown fox jumps over the lazy dog. Wikipedia is a free online encyclopedia. "
        "Pruning removes weights; quantization stores them with fewer bits. ") * 60


def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def calibration(path, nsamples: int = 6, seqlen: int = 24) -> TextDataModule:
    return TextDataModule(source=str(path), seqlen=seqlen, nsamples=nsamples, seed=0)


def validate(model_dir, path, callbacks, root, **trainer_kwargs):
    module = CausalLM(model_name_or_path=str(model_dir))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, default_root_dir=str(root), **trainer_kwargs)
    metrics = trainer.validate(module, datamodule=TextDataModule(source=str(path), seqlen=24, max_windows=4))
    return module, metrics[0]


def linear_weights(model) -> dict[str, torch.Tensor]:
    name, layers = find_decoder_layers(model)
    return {f"{name}.{i}.{n}": weight_matrix(m).detach().clone()
            for i, layer in enumerate(layers) for n, m in compressible_linears(layer).items()}
