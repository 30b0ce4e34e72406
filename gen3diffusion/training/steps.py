"""Algorithm 1: one training step of each stage, as a pure function of the models, the frozen parts and a batch.

- Stage A, :func:`train_step_mvd`: fine-tune the multi-view diffusion model (MVD) on the eps-MSE of the V target
  latents. One timestep t ~ U[0, T) per sample, shared by its V views; the input frame (last) holds the clean input
  latent at timestep 0; with probability ``cond_drop_prob`` the input image is replaced by an all-white image for
  both the CLIP tokens and the input latent (what classifier-free guidance needs at inference).
- Stage B, :func:`train_step_3d`: train the 3D-GS model G(x0, x_t, t, c) (Eq. 6) with x0 = the VAE reconstruction
  decode(encode(gt)) of the target views and x_t = decode(add_noise(latent, eps, t)), t ~ U[1, T): both decoded
  from latent space, as at inference. Loss: Eq. 7 at the supervision views (and the target views).
- Stage C, :func:`train_step_joint`: both models, loss_mvd + loss_3d (Eq. 9). The 3D model reads the MVD's one-step
  estimate x0~ = predict_x0(x_t, eps_pred) (Eq. 3, 8), which is not detached unless ``detach_x0``: the 3D loss then
  reaches the MVD through the frozen VAE decoder, as in the authors' joint script.

Randomness: every random draw of a step (timesteps, noise, condition dropout, VAE posterior samples) comes from the
``generator`` argument, in a fixed order. A step is therefore a deterministic function of (models, batch, generator
state); the loop seeds one generator per micro-batch from (seed, global batch index), which makes resuming exact and
makes N processes x 1 micro-batch equal 1 process x N accumulated micro-batches.

Each step returns a dict of named scalar losses; ``loss`` is the one to backpropagate. Passing an ``images`` dict
collects the step's intermediate images ([B, K, 3, H, W] in [0, 1], detached) for validation sheets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import AutoencoderKL, DDIMScheduler
from torch import Tensor, nn

from ..cameras import Cameras
from ..config import CameraConfig, RenderConfig, TrainConfig
from ..diffusion.losses import LossWeights, loss_3d, loss_joint, loss_mvd
from ..diffusion.sampler import predict_x0
from ..gaussians import Gaussians
from ..models.conditioning import build_conditioning, encode_condition_image, vae_decode, vae_encode
from ..render import rasterize

__all__ = ["MVDenoiser", "TrainContext", "STAGES", "check_stage", "train_step", "train_step_3d", "train_step_joint",
           "train_step_mvd"]

# stage name -> the models it trains
STAGES = {"mvd": ("mvd",), "model_3d": ("model_3d",), "joint": ("mvd", "model_3d")}


def check_stage(stage: str) -> str:
    """``stage`` if it names a stage of Algorithm 1, else a ValueError listing them."""
    if stage not in STAGES:
        raise ValueError(f"train.stage must be one of {list(STAGES)}, got {stage!r}")
    return stage


@dataclass
class TrainContext:
    """Everything a step needs besides the trained models and the batch: the frozen networks and the settings."""

    vae: AutoencoderKL  # frozen; differentiable w.r.t. its input (stage C decodes x0~ with gradient)
    image_encoder: nn.Module  # frozen CLIPVisionModel
    prompt_embeds: Tensor  # [2, 77, C] (negative, positive); training uses the positive one
    scheduler: DDIMScheduler  # the noise schedule (alphas_cumprod, add_noise)
    lpips: nn.Module | None  # None when lambda_lpips is 0
    cfg: TrainConfig
    camera: CameraConfig
    render: RenderConfig

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.cfg.lambda_lpips, self.cfg.lambda_distortion, self.cfg.lpips_resolution)


class MVDenoiser(nn.Module):
    """The MV UNet's training forward, Resampler included, in one ``forward`` so that DDP sees every trained
    parameter used inside the call it wraps. Layout as the sampler's conditional branch, except that the input frame
    gets timestep 0 (the authors' training)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        x_t: Tensor,  # [B, V, 4, h, w] noisy target latents
        t: Tensor,  # [B] one timestep per sample, shared by its V views
        clip_hidden: Tensor,  # [B, L, ip_in_dim] CLIP penultimate hidden state of the input image
        ip_img: Tensor,  # [B, 4, h, w] clean latent of the input image (the input frame)
        camera: Tensor,  # [B, F, camera_dim] with F = V + 1
        prompt_embeds: Tensor,  # [2, 77, C]
    ) -> Tensor:  # eps [B, F, 4, h, w]
        B, V = x_t.shape[:2]
        if camera.ndim != 3 or camera.shape[:2] != (B, V + 1):
            raise ValueError(f"camera must be [B={B}, F={V + 1}, D] for x_t {tuple(x_t.shape)}, "
                             f"got {tuple(camera.shape)}")
        cond = build_conditioning(self.unet, prompt_embeds, clip_hidden, ip_img, camera, guidance=False)
        x = torch.cat([x_t, ip_img[:, None].to(x_t.dtype)], dim=1).flatten(0, 1)  # [B*F, 4, h, w]
        timesteps = torch.cat([t[:, None].expand(B, V), t.new_zeros(B, 1)], dim=1).flatten()  # [B*F]
        eps = self.unet(x, timesteps, **cond.unet_kwargs())
        return eps.unflatten(0, (B, V + 1))


### shared pieces


@dataclass
class _Diffused:
    latents: Tensor  # [B, V, 4, h, w] clean target latents (scaled)
    eps: Tensor  # [B, V, 4, h, w]
    t: Tensor  # [B] long
    x_t: Tensor  # [B, V, 4, h, w]


def _randn(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved: the same numbers on CPU and CUDA."""
    return torch.randn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


@torch.no_grad()
def _diffuse_targets(ctx: TrainContext, batch: dict[str, Any], generator: torch.Generator, t_min: int) -> _Diffused:
    """Eq. 1 on the VAE latents of the target views: t ~ U[t_min, T) per sample, x_t = add_noise(z, eps, t)."""
    images = batch["target_images"]  # [B, V, 3, H, W] in [0, 1]
    latents = vae_encode(ctx.vae, images * 2 - 1, generator, ctx.cfg.sample_posterior)  # [B, V, 4, h, w]
    B = images.shape[0]
    T = ctx.scheduler.config.num_train_timesteps
    t = torch.randint(t_min, T, (B,), generator=generator, device=generator.device).to(images.device)
    eps = _randn(latents.shape, generator, latents)
    return _Diffused(latents, eps, t, ctx.scheduler.add_noise(latents, eps, t))


@torch.no_grad()
def _condition(ctx: TrainContext, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """CLIP hidden state [B, L, C] and input latent [B, 4, h, w] of the input image, white with p = cond_drop_prob."""
    image = batch["input_image"]  # [B, 3, H, W] in [0, 1]
    drop = torch.rand(image.shape[0], generator=generator, device=generator.device) < ctx.cfg.cond_drop_prob
    image = torch.where(drop.to(image.device)[:, None, None, None], torch.ones_like(image), image)
    return encode_condition_image(image * 2 - 1, ctx.vae, ctx.image_encoder, generator, ctx.cfg.sample_posterior)


def _mvd_eps(mvd: nn.Module, ctx: TrainContext, batch: dict[str, Any], noisy: _Diffused,
             generator: torch.Generator) -> Tensor:
    """The MVD's noise prediction for all F frames [B, F, 4, h, w]."""
    clip_hidden, ip_img = _condition(ctx, batch, generator)
    return mvd(noisy.x_t, noisy.t, clip_hidden, ip_img, batch["mvd_cameras"], ctx.prompt_embeds)


def _decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """[B, K, 4, h, w] scaled latents -> [B, K, 3, H, W] in [0, 1] (unclamped, so gradients pass)."""
    return (vae_decode(vae, latents).float() + 1) / 2


def _render_loss(ctx: TrainContext, gaussians: Gaussians, cameras: Cameras, gt_rgb: Tensor,
                 gt_mask: Tensor | None) -> tuple[dict[str, Tensor], Tensor]:
    """Eq. 7 at one group of views, in float32 outside autocast; a missing mask leaves out the alpha term."""
    with torch.autocast(gt_rgb.device.type, enabled=False):
        render = rasterize(gaussians.to(torch.float32), cameras, background=(1.0, 1.0, 1.0), cfg=ctx.render)
        mask = render.alpha.detach() if gt_mask is None else gt_mask.float()
        losses = loss_3d(render, gt_rgb.float(), mask, ctx.lpips, ctx.loss_weights)
    return losses, render.rgb


def _loss_3d(ctx: TrainContext, gaussians: Gaussians, batch: dict[str, Any],
             images: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Eq. 7 at the S supervision views and, if ``render_targets``, the V target views, every view weighted alike.

    The samples carry no masks for the target views (``target_masks`` is used when a dataset provides it), so there
    the alpha term averages over the supervision views only.
    """
    sup_images = batch["sup_images"]  # [B, S, 3, Hs, Ws]
    Hs, Ws = sup_images.shape[-2:]
    sup_cams = Cameras(batch["sup_c2w"], batch["sup_K"], width=Ws, height=Hs)
    losses, sup_render = _render_loss(ctx, gaussians, sup_cams, sup_images, batch["sup_masks"])
    if images is not None:
        images["sup_gt"], images["sup_render"] = sup_images.detach(), sup_render.detach()
    if not ctx.cfg.render_targets:
        return losses
    targets = batch["target_images"]  # [B, V, 3, H, W]
    H, W = targets.shape[-2:]
    target_cams = Cameras.from_fovy(batch["target_c2w"], ctx.camera.fovy, W, H)
    target_masks = batch.get("target_masks")
    tgt, target_render = _render_loss(ctx, gaussians, target_cams, targets, target_masks)
    if images is not None:
        images["target_render"] = target_render.detach()
    S, V = sup_images.shape[1], targets.shape[1]
    counts = {k: (S, V) for k in ("loss_rgb", "loss_lpips", "loss_distortion")}
    counts["loss_alpha"] = (S, V if target_masks is not None else 0)
    merged = {k: (a * losses[k] + b * tgt[k]) / (a + b) for k, (a, b) in counts.items()}
    w = ctx.loss_weights
    merged["loss"] = (merged["loss_rgb"] + merged["loss_alpha"] + w.lambda_lpips * merged["loss_lpips"]
                      + w.lambda_distortion * merged["loss_distortion"])
    merged["psnr"] = -10.0 * torch.log10(merged["loss_rgb"].detach().clamp_min(1e-10))
    return merged


def _model_3d(model_3d: nn.Module, x0_images: Tensor | None, xt_images: Tensor, t: Tensor,
              batch: dict[str, Any]) -> Gaussians:
    """Eq. 8: the 3D-GS model on decoded [0, 1] views with the targets' Plücker rays and the clean input image."""
    return model_3d(x0_images, xt_images, batch["target_rays"], t, batch["input_image"])


### the three stages


def train_step_mvd(mvd: nn.Module, ctx: TrainContext, batch: dict[str, Any], generator: torch.Generator,
                   images: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Stage A: eps-MSE of the MVD on the V target views; returns ``loss`` and ``loss_mvd``."""
    noisy = _diffuse_targets(ctx, batch, generator, t_min=0)
    eps_pred = _mvd_eps(mvd, ctx, batch, noisy, generator)  # [B, F, 4, h, w]
    loss = loss_mvd(eps_pred.float(), noisy.eps.float())
    if images is not None:
        _collect_mvd_images(ctx, batch, noisy, eps_pred, images)
    return {"loss": loss, "loss_mvd": loss}


def train_step_3d(model_3d: nn.Module, ctx: TrainContext, batch: dict[str, Any], generator: torch.Generator,
                  images: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Stage B: the 3D-GS model on [VAE reconstruction of the targets | decoded x_t], Eq. 7 loss. A model without
    the 2D prior (``use_prior=False``, the paper's ablation, Eq. 6) reads the decoded x_t only."""
    noisy = _diffuse_targets(ctx, batch, generator, t_min=1)
    V = noisy.latents.shape[1]
    use_prior = extract_model_from_parallel(model_3d).config.use_prior
    with torch.no_grad():
        decoded = _decode(ctx.vae, torch.cat([noisy.latents, noisy.x_t] if use_prior else [noisy.x_t], dim=1))
    x0_images, xt_images = (decoded[:, :V], decoded[:, V:]) if use_prior else (None, decoded)  # [B, V, 3, H, W]
    gaussians = _model_3d(model_3d, x0_images, xt_images, noisy.t, batch)
    if images is not None:
        images.update(input=batch["input_image"][:, None], target=batch["target_images"], x_t=xt_images)
        if use_prior:
            images["x0"] = x0_images
    losses = _loss_3d(ctx, gaussians, batch, images)
    return {**losses, "loss_3d": losses["loss"]}


def train_step_joint(mvd: nn.Module, model_3d: nn.Module, ctx: TrainContext, batch: dict[str, Any],
                     generator: torch.Generator, images: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Stage C: loss_mvd + loss_3d (Eq. 9); the 3D model reads the MVD's x0~, with gradient unless ``detach_x0``."""
    if not extract_model_from_parallel(model_3d).config.use_prior:
        raise ValueError("stage joint needs a 3D model that reads the 2D prior (gaussian_unet.use_prior=true); "
                         "a model without it trains in stage model_3d only")
    noisy = _diffuse_targets(ctx, batch, generator, t_min=0)
    V = noisy.latents.shape[1]
    eps_pred = _mvd_eps(mvd, ctx, batch, noisy, generator)  # [B, F, 4, h, w]
    mvd_loss = loss_mvd(eps_pred.float(), noisy.eps.float())
    alpha_bar_t = ctx.scheduler.alphas_cumprod.to(noisy.x_t.device)[noisy.t].view(-1, 1, 1, 1, 1)  # [B, 1, 1, 1, 1]
    x0_2d = predict_x0(noisy.x_t, eps_pred[:, :V].float(), alpha_bar_t)  # [B, V, 4, h, w]
    if ctx.cfg.detach_x0:
        x0_2d = x0_2d.detach()
    x0_images = _decode(ctx.vae, x0_2d)  # [B, V, 3, H, W], differentiable w.r.t. x0_2d
    with torch.no_grad():
        xt_images = _decode(ctx.vae, noisy.x_t)
    gaussians = _model_3d(model_3d, x0_images, xt_images, noisy.t, batch)
    if images is not None:
        images.update(input=batch["input_image"][:, None], target=batch["target_images"], x_t=xt_images,
                      x0=x0_images.detach())
    out = loss_joint(mvd_loss, _loss_3d(ctx, gaussians, batch, images))
    out["loss"] = ctx.cfg.lambda_mvd * out["loss_mvd"] + ctx.cfg.lambda_3d * out["loss_3d"]
    return out


def train_step(stage: str, models: dict[str, nn.Module], ctx: TrainContext, batch: dict[str, Any],
               generator: torch.Generator, images: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Dispatch to the step of ``stage`` ("mvd", "model_3d" or "joint"); ``models`` maps "mvd" / "model_3d"."""
    if stage == "mvd":
        return train_step_mvd(models["mvd"], ctx, batch, generator, images)
    if stage == "model_3d":
        return train_step_3d(models["model_3d"], ctx, batch, generator, images)
    check_stage(stage)
    return train_step_joint(models["mvd"], models["model_3d"], ctx, batch, generator, images)


@torch.no_grad()
def _collect_mvd_images(ctx: TrainContext, batch: dict[str, Any], noisy: _Diffused, eps_pred: Tensor,
                        images: dict[str, Tensor]) -> None:
    """Stage A sheet: input, targets, decoded x_t and the decoded one-step estimate x0~."""
    V = noisy.latents.shape[1]
    alpha_bar_t = ctx.scheduler.alphas_cumprod.to(noisy.x_t.device)[noisy.t].view(-1, 1, 1, 1, 1)
    x0_2d = predict_x0(noisy.x_t, eps_pred[:, :V].float(), alpha_bar_t)
    decoded = _decode(ctx.vae, torch.cat([noisy.x_t, x0_2d], dim=1))
    images.update(input=batch["input_image"][:, None], target=batch["target_images"], x_t=decoded[:, :V],
                  x0=decoded[:, V:])
