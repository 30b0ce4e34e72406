"""Algorithm 1: the training stages (``steps``), the run's config and models (``build``), the accelerate loop
(``loop``), checkpoints and export (``checkpoint``).

Stage A ``mvd`` fine-tunes the multi-view diffusion model, stage B ``model_3d`` pretrains the 3D-GS model on
VAE reconstructions of the ground truth, stage C ``joint`` trains both with loss_mvd + loss_3d. Run a stage with
``accelerate launch scripts/train.py --config configs/<preset>.yaml train.stage=<stage>``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MVDenoiser": "steps",
    "TrainContext": "steps",
    "train_step": "steps",
    "train_step_mvd": "steps",
    "train_step_3d": "steps",
    "train_step_joint": "steps",
    "NonFiniteLossError": "loop",
    "TrainResult": "loop",
    "TrainParts": "build",
    "TrainRunConfig": "build",
    "WeightsConfig": "build",
    "build_parts": "build",
    "load_train_config": "build",
    "train": "loop",
    "EMA": "checkpoint",
    "export_models": "checkpoint",
    "find_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
