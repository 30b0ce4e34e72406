"""Building a training run: its config schema, and the models from weights or from scratch.

``load_train_config`` merges the schema, the model sections of ``model_preset`` (e.g. ``configs/tiny.yaml``), a
training preset and ``key=value`` overrides. ``build_parts`` loads or creates the MV UNet, the 3D-GS model, the frozen
VAE and CLIP image encoder and the prompt embeddings (see :class:`WeightsConfig` for the sources), and puts each on its
device in its dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from ..config import (
    CameraConfig,
    GaussianUNetConfig,
    MVUNetConfig,
    RenderConfig,
    SchedulerConfig,
    TrainConfig,
    resolve_preset,
    to_dict,
)
from ..data import DataConfig
from ..models.conditioning import SD21_VAE_CONFIG, PromptConfig
from .steps import STAGES, MVDenoiser, TrainContext, check_stage

logger = logging.getLogger(__name__)

__all__ = ["TrainParts", "TrainRunConfig", "WeightsConfig", "build_parts", "load_train_config"]

# sections of a model preset (e.g. configs/tiny.yaml) that a training preset may take over via `model_preset`
MODEL_SECTIONS = ("mv_unet", "gaussian_unet", "vae", "image_encoder", "camera", "render", "scheduler")
# OpenCLIP ViT-H/14 vision tower, as transformers' CLIPVisionConfig (random init only: benchmarks, tests)
VIT_H14_CONFIG: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)

### config


@dataclass
class WeightsConfig:
    """Where the models start from. A component with no source is randomly initialised (a warning names it)."""

    # a folder in the export layout (training.checkpoint; what the pipeline loads): every component
    init_from: str | None = None
    # the ImageDream diffusers port (folder or hub id): vae/, image_encoder/, unet/, text_encoder/ + tokenizer/
    imagedream: str | None = None
    # the authors' MVD weights (model.safetensors; file, folder or hub id), loaded over imagedream's unet/
    mv_unet: str | None = None
    # the authors' 3D-GS model (model_1.safetensors; file, folder or hub id)
    model_3d: str | None = None
    # cache file of the prompt embeddings (read if it holds the configured prompts, else written from imagedream)
    prompt_cache: str | None = None
    # a folder holding vae/ (e.g. the output of scripts/train_vae.py), used when imagedream gives none
    vae: str | None = None
    # with init_from: build the 3D model fresh from gaussian_unet instead of loading it (e.g. the "w/o 2D prior"
    # ablation, gaussian_unet.use_prior=false, next to a trained MVD)
    fresh_model_3d: bool = False


@dataclass
class TrainRunConfig:
    """Everything ``scripts/train.py`` reads: models, data, Algorithm 1 and the run (paths, logs, checkpoints)."""

    # checkpoints, tracker logs, metrics.jsonl, validation sheets and the export go here
    output_dir: str = "runs/train"
    # a preset (name in configs/ or a YAML path) whose model sections (MODEL_SECTIONS) are merged under this one
    model_preset: str | None = None
    # seeds model init, the sampler order and every per-batch random draw
    seed: int = 42
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    mv_unet: MVUNetConfig = field(default_factory=MVUNetConfig)
    gaussian_unet: GaussianUNetConfig = field(default_factory=GaussianUNetConfig)
    # AutoencoderKL / CLIPVisionConfig arguments, used only when no weights give the VAE / image encoder
    vae: dict[str, Any] = field(default_factory=lambda: _listify(SD21_VAE_CONFIG))
    image_encoder: dict[str, Any] = field(default_factory=lambda: dict(VIT_H14_CONFIG))
    prompts: PromptConfig = field(default_factory=PromptConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # "tensorboard", "wandb" or "none"
    tracker: str = "tensorboard"
    # tracker logging and tqdm postfix every N steps
    log_every: int = 10
    progress: bool = True
    # checkpoint every N steps (and at the end); keep the last N checkpoints (0 keeps all)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    # every N steps (0: never) a PNG sheet of the first val_samples objects (main process, fixed draws)
    validate_every: int = 1000
    val_samples: int = 2
    # at the end, write the models in the pipeline layout to <output_dir>/export
    export: bool = True


def _listify(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_train_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- model sections of ``model_preset`` <- ``preset`` <- ``key=value`` overrides.

    Unknown keys and wrong types raise ``ValueError`` naming the key.
    """
    try:
        cfg = OmegaConf.structured(TrainRunConfig)
        layer = OmegaConf.load(resolve_preset(preset)) if preset is not None else OmegaConf.create()
        cli = OmegaConf.from_dotlist(list(overrides))
        model_preset = cli.get("model_preset", layer.get("model_preset"))
        if model_preset:
            models = OmegaConf.load(resolve_preset(model_preset))
            cfg = OmegaConf.merge(cfg, {k: models[k] for k in MODEL_SECTIONS if k in models})
        cfg = OmegaConf.merge(cfg, layer, cli)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"config error: {str(err).splitlines()[0]}" + (f" (key: {key})" if key else "")) from err
    if cfg.train.mixed_precision == "False":  # YAML and the command line read a bare `no` as false
        cfg.train.mixed_precision = "no"
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"config error: train.mixed_precision must be no, bf16 or fp16, got "
                         f"{cfg.train.mixed_precision!r}")
    return cfg  # type: ignore[return-value]


### building


@dataclass
class TrainParts:
    """The models of a run: both networks, the modules a step calls, and the step context (frozen parts)."""

    mv_unet: nn.Module
    model_3d: nn.Module
    modules: dict[str, nn.Module]  # "mvd" (MVDenoiser around mv_unet), "model_3d"
    context: TrainContext


def build_parts(cfg: DictConfig, device: torch.device | str) -> TrainParts:
    """Models on the right devices: trained ones on ``device`` (fp32 master weights), the frozen encoders there in
    the autocast dtype, an untrained second model on the CPU (kept only for the export)."""
    from ..diffusion.losses import build_lpips
    from ..diffusion.sampler import build_scheduler

    tcfg: TrainConfig = cfg.train
    check_stage(tcfg.stage)
    device = torch.device(device)
    for key in ("radius", "fovy"):  # the data's rays and the renders of the 3D loss must share one rig
        if cfg.data[key] != cfg.camera[key]:
            raise ValueError(f"data.{key}={cfg.data[key]} differs from camera.{key}={cfg.camera[key]}; set both")
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.mixed_precision, torch.float32)
    mv_unet, model_3d, vae, image_encoder, prompt_embeds = _load_models(cfg)
    trained = STAGES[tcfg.stage]
    for name, model in (("mvd", mv_unet), ("model_3d", model_3d)):
        if name in trained:
            model.to(device).train().requires_grad_(True)
            if tcfg.gradient_checkpointing:
                model.enable_gradient_checkpointing()
        else:
            model.eval().requires_grad_(False)
    vae = vae.to(device, frozen_dtype).eval().requires_grad_(False)
    image_encoder = image_encoder.to(device, frozen_dtype).eval().requires_grad_(False)
    lpips = build_lpips(tcfg.lpips_weights, tcfg.lpips_allow_random, tcfg.lambda_lpips)
    if lpips is not None:
        lpips = lpips.to(device)
    context = TrainContext(vae=vae, image_encoder=image_encoder, prompt_embeds=prompt_embeds.to(device),
                           scheduler=build_scheduler(cfg.scheduler), lpips=lpips, cfg=tcfg, camera=cfg.camera,
                           render=cfg.render)
    return TrainParts(mv_unet, model_3d, {"mvd": MVDenoiser(mv_unet), "model_3d": model_3d}, context)


def _load_models(cfg: DictConfig) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, Tensor]:
    """MV UNet, 3D model, VAE, CLIP image encoder and prompt embeddings [2, 77, C] from ``cfg.weights``."""
    from ..models.conditioning import load_image_encoder, load_prompt_embeddings, load_vae, read_prompt_embeddings
    from ..models.gaussian_unet import GaussianDiffusionModel, load_official_weights
    from ..models.mv_unet import MultiViewUNet, load_mv_unet

    w: WeightsConfig = cfg.weights
    random_parts = []
    torch.manual_seed(cfg.seed)  # random inits are reproducible
    if w.init_from:
        root = Path(w.init_from)
        # fp32 master weights, also from a folder stored in half precision (e.g. weights/demo)
        mv_unet = MultiViewUNet.from_pretrained(root / "mv_unet").to(torch.float32)
        if w.fresh_model_3d:
            model_3d = GaussianDiffusionModel(**to_dict(cfg.gaussian_unet))
            logger.warning("model_3d: randomly initialised from gaussian_unet (weights.fresh_model_3d)")
        else:
            model_3d = GaussianDiffusionModel.from_pretrained(root / "model_3d").to(torch.float32)
        vae, image_encoder = load_vae(root), load_image_encoder(root)
        prompt_embeds = read_prompt_embeddings(root / "prompt_embeds.safetensors", cfg.prompts)
        if prompt_embeds is None:
            raise FileNotFoundError(f"{root}: no prompt_embeds.safetensors for the configured prompts")
        return mv_unet, model_3d, vae, image_encoder, prompt_embeds
    if w.imagedream:
        mv_unet = load_mv_unet(w.imagedream, w.mv_unet)
        vae, image_encoder = load_vae(w.imagedream), load_image_encoder(w.imagedream)
    else:
        mv_unet = MultiViewUNet(**to_dict(cfg.mv_unet))
        vae, image_encoder = load_vae(w.vae) if w.vae else _random_vae(cfg.vae), _random_image_encoder(cfg.image_encoder)
        random_parts += ["mv_unet", "image_encoder"] + ([] if w.vae else ["vae"])
    model_3d = GaussianDiffusionModel(**to_dict(cfg.gaussian_unet))
    if w.model_3d:
        load_official_weights(model_3d, w.model_3d)
    else:
        random_parts.append("model_3d")
    if w.imagedream or w.prompt_cache:
        prompt_embeds = load_prompt_embeddings(cfg.prompts, w.prompt_cache, w.imagedream)
    else:
        context_dim = cfg.mv_unet.context_dim
        prompt_embeds = torch.randn(2, 77, context_dim, generator=torch.Generator().manual_seed(cfg.seed))
        random_parts.append("prompt_embeds")
    if random_parts:
        logger.warning("randomly initialised (no weights configured): %s", ", ".join(random_parts))
    _check_widths(mv_unet, vae, image_encoder, prompt_embeds)
    return mv_unet, model_3d, vae, image_encoder, prompt_embeds


def _random_vae(kwargs: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(kwargs).items()})


def _random_image_encoder(kwargs: dict[str, Any]) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**to_dict(kwargs)))


def _check_widths(mv_unet: nn.Module, vae: nn.Module, image_encoder: nn.Module, prompt_embeds: Tensor) -> None:
    ucfg = mv_unet.config
    pairs = {
        "vae latent_channels vs mv_unet.in_channels": (vae.config.latent_channels, ucfg.in_channels),
        "image_encoder hidden_size vs mv_unet.ip_in_dim": (image_encoder.config.hidden_size, ucfg.ip_in_dim),
        "prompt embedding width vs mv_unet.context_dim": (prompt_embeds.shape[-1], ucfg.context_dim),
    }
    bad = [f"{name}: {a} != {b}" for name, (a, b) in pairs.items() if a != b]
    if bad:
        raise ValueError("the frozen encoders do not fit the MV UNet: " + "; ".join(bad))
