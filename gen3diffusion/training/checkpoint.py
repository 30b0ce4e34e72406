"""Checkpoints, resume, EMA and the export of trained models in the pipeline's folder layout.

Checkpoints are ``accelerator.save_state`` folders (models, optimizer, LR scheduler, RNG states, registered objects
such as the EMA) named ``<output_dir>/checkpoints/step_<N>``, N = optimizer updates done. Each is written to
``.tmp-step_<N>`` and renamed when complete, so a crash while saving never leaves a half checkpoint under a valid
name; ``latest`` is the highest complete ``step_<N>``. The resolved run config is saved beside the state
(``config.yaml``) and compared on resume.

Export layout (:func:`export_models`; ``Gen3DiffusionPipeline`` loads exactly this)::

    <folder>/mv_unet/              MultiViewUNet.save_pretrained (config.json + diffusion_pytorch_model.safetensors)
    <folder>/model_3d/             GaussianDiffusionModel.save_pretrained
    <folder>/vae/                  AutoencoderKL.save_pretrained
    <folder>/image_encoder/        CLIPVisionModel.save_pretrained (config.json + model.safetensors)
    <folder>/scheduler/            DDIMScheduler.save_pretrained (scheduler_config.json)
    <folder>/prompt_embeds.safetensors   (negative, positive) prompt embeddings [2, 77, C], prompts in the metadata
    <folder>/gen3d.yaml            how the models were trained (``pipeline.PipelineConfig``): sections cameras
                                   (radius, fovy, znear, zfar), render (rasterizer settings) and prompts
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "EMA",
    "CHECKPOINT_DIR",
    "CONFIG_NAME",
    "checkpoint_step",
    "config_differences",
    "export_models",
    "find_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "remove_partial_checkpoints",
    "save_checkpoint",
]

CHECKPOINT_DIR = "checkpoints"
CONFIG_NAME = "config.yaml"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d+)")


### EMA


class EMA:
    """Exponential moving average of a model's floating-point parameters: ema = d * ema + (1 - d) * param.

    Kept in float32 on the parameters' device; ``state_dict`` / ``load_state_dict`` let
    ``accelerator.register_for_checkpointing`` save it with every checkpoint.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Swap the averaged weights into ``model`` for the duration of the block, then restore the raw ones."""
        params = dict(model.named_parameters())
        raw = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, value in raw.items():
                    params[n].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) ^ set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state does not fit the model: differing parameters {missing[:5]}")
        self.decay = float(state["decay"])
        for n, value in state["shadow"].items():
            self.shadow[n].copy_(value)


### checkpoint folders


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint folder holds, read from its name ``step_<N>``."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint folder (expected a name step_<N>)")
    return int(match.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``<output_dir>/checkpoints``, oldest first (``.tmp-*`` folders are not listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(folders, key=checkpoint_step)


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """``resume`` = "latest" (the highest complete step in ``output_dir``) or a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"{Path(output_dir) / CHECKPOINT_DIR}: no complete checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder (pass --resume latest or a step_<N> folder)")
    checkpoint_step(path)
    return path


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete ``.tmp-step_*`` folders left by a save that was interrupted; returns what was removed."""
    root = Path(output_dir) / CHECKPOINT_DIR
    removed = sorted(root.glob(f"{TMP_PREFIX}step_*")) if root.is_dir() else []
    for path in removed:
        logger.warning("removing %s: an interrupted checkpoint save", path)
        shutil.rmtree(path)
    return removed


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, config: DictConfig, keep: int) -> Path:
    """``accelerator.save_state`` into ``.tmp-step_<step>``, add the config, rename to ``step_<step>``, prune.

    Every process must call this (each saves its own RNG state); only the main process renames and prunes.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    tmp, final = root / f"{TMP_PREFIX}step_{step}", root / f"step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        OmegaConf.save(config, tmp / CONFIG_NAME)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the ``keep`` most recent complete checkpoints (``keep`` <= 0 keeps all)."""
    if keep <= 0:
        return
    for path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def config_differences(saved: DictConfig, current: DictConfig) -> list[str]:
    """``key: saved -> current`` for every leaf that differs between two configs (dotted keys)."""
    a = _flatten(OmegaConf.to_container(saved, resolve=True))
    b = _flatten(OmegaConf.to_container(current, resolve=True))
    return [f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


### export


def export_models(
    folder: str | Path,
    *,
    mv_unet: nn.Module,
    model_3d: nn.Module,
    vae: nn.Module,
    image_encoder: nn.Module,
    prompt_embeds: Tensor,
    prompts: Any,
    config: DictConfig,
) -> Path:
    """Write the trained models in the pipeline's layout (module docstring) to ``folder``, atomically, through
    ``Gen3DiffusionPipeline.save_pretrained``.

    ``config`` is the run config (its ``scheduler`` goes to ``scheduler/``, its ``camera`` and ``render`` sections to
    ``gen3d.yaml``; the networks' architectures are in their own ``config.json``); ``prompts`` is the
    ``PromptConfig`` the embeddings were made for (saved in their metadata and in ``gen3d.yaml``).
    """
    from ..pipeline import Gen3DiffusionPipeline, PipelineConfig

    pipe_cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig),
                               {"cameras": config.camera, "render": config.render, "prompts": prompts})
    pipe = Gen3DiffusionPipeline(mv_unet, vae, image_encoder, model_3d, prompt_embeds, config.scheduler, pipe_cfg)
    pipe.save_pretrained(folder)
    logger.info("exported the models to %s", folder)
    return Path(folder)
