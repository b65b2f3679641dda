"""The ``litforge`` command: LightningCLI over any litforge LightningModule and LightningDataModule."""

from __future__ import annotations

import os

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LitforgeCLI(LightningCLI):
    """``litforge fit|validate|test|predict -c CONFIG``; model and data are chosen by ``class_path`` in YAML."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    # No machine of this project can reach a model hub; fail fast instead of waiting on timeouts.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    LitforgeCLI(args=args)


if __name__ == "__main__":
    main()
