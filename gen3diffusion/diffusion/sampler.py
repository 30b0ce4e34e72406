"""Algorithm 2: 3D-guided joint sampling of the multi-view diffusion model (MVD) and the 3D-GS diffusion model.

Notation (paper -> code):

| paper                       | code            | shape                 |
|-----------------------------|-----------------|-----------------------|
| x_t, 4 target views + input | ``x_t``         | [B, F, 4, h, w]       |
| eps_theta (with CFG)        | ``eps``         | [B, F, 4, h, w]       |
| x0~ (Eq. 3, one-step 2D)    | ``x0_2d``       | [B, V, 4, h, w]       |
| G(x0~, x_t, c) (Eq. 8)      | ``gaussians``   | N = V * S * S         |
| x0^ (render, re-encoded)    | ``x0_3d``       | [B, V, 4, h, w]       |
| eps^ (Eq. 10)               | ``eps_3d``      | [B, V, 4, h, w]       |

Every DDIM step: CFG on the MVD -> x0~ -> decode x0~ and x_t -> 3D model -> Gaussians -> render the V target views ->
VAE-encode -> x0^ -> eps^ for the V targets (the input frame keeps the MVD's eps) -> ``scheduler.step``. After the
loop one more pass at the last timestep gives the output Gaussians. With ``refine=False`` the loop is plain
ImageDream sampling and only the final pass runs the 3D model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from ..cameras import Cameras, mvd_camera_vectors, plucker_rays, target_cameras
from ..config import CameraConfig, RenderConfig, SamplerConfig, SchedulerConfig, to_dict
from ..gaussians import Gaussians
from ..models.conditioning import MVConditioning, cfg_batch, combine_cfg, vae_decode, vae_encode
from ..render import rasterize

__all__ = [
    "Conditioning",
    "JointSampler",
    "SamplerOutput",
    "StepOutput",
    "build_scheduler",
    "eps_from_x0",
    "predict_x0",
]


### the paper's equations


def predict_x0(x_t: Tensor, eps: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """Eq. 3: the one-step clean estimate x0~ = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar_t: Tensor | float) -> Tensor:
    """Eq. 10: the noise that makes the DDIM update move toward ``x0``: eps^ = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t).

    Feeding eps^ to the DDIM step replaces the MVD's clean estimate by the 3D-consistent one.
    """
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=x_t.dtype, device=x_t.device)
    return (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()


def build_scheduler(cfg: SchedulerConfig | None = None) -> DDIMScheduler:
    """diffusers' DDIMScheduler with the ImageDream schedule (scaled_linear 0.00085..0.012, leading, offset 1)."""
    return DDIMScheduler(**to_dict(cfg or SchedulerConfig()))


### inputs and outputs


@dataclass
class Conditioning:
    """Everything the sampler needs from the input images, computed once per call."""

    image: Tensor  # [B, 3, H, W] input in [0, 1], composited on white
    mv: MVConditioning  # the MVD's guided conditioning ([uncond ; cond], see models.conditioning)

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]


@dataclass
class StepOutput:
    """What one joint step computed; ``x0_used`` is the clean estimate the DDIM update actually moved toward."""

    x_prev: Tensor  # [B, F, 4, h, w]
    eps: Tensor  # [B, F, 4, h, w] the noise passed to scheduler.step
    x0_2d: Tensor  # [B, V, 4, h, w] MVD one-step estimate (Eq. 3)
    x0_used: Tensor  # [B, F, 4, h, w] scheduler's pred_original_sample
    x0_3d: Optional[Tensor] = None  # [B, V, 4, h, w] VAE encoding of the renders (refine only)
    gaussians: Optional[Gaussians] = None  # refine only


@dataclass
class SamplerOutput:
    gaussians: Gaussians  # the output Gaussians (B samples)
    views: Tensor  # [B, V, 3, H, W] the final MVD views decoded to [0, 1]
    latents: Tensor  # [B, F, 4, h, w] final latents


### the sampler


class JointSampler:
    """Algorithm 2. Wires the MVD UNet, the VAE, the 3D-GS model and the renderer; owns no weights of its own.

    The caller prepares :class:`Conditioning`; ``mv_unet`` follows ``MultiViewUNet.forward`` and ``model_3d`` follows
    ``GaussianDiffusionModel.forward`` (see their docstrings).
    """

    def __init__(
        self,
        mv_unet: torch.nn.Module,
        vae: AutoencoderKL,
        model_3d: torch.nn.Module,
        scheduler: DDIMScheduler,
        cfg: SamplerConfig | None = None,
        camera_cfg: CameraConfig | None = None,
        render_cfg: RenderConfig | None = None,
        mvd_cameras: Tensor | None = None,  # [F, 16]; default: cameras.mvd_camera_vectors()
    ) -> None:
        self.mv_unet, self.vae, self.model_3d, self.scheduler = mv_unet, vae, model_3d, scheduler
        self.cfg = cfg or SamplerConfig()
        self.camera_cfg = camera_cfg or CameraConfig()
        self.render_cfg = render_cfg or RenderConfig()
        self.mvd_cameras = mvd_camera_vectors() if mvd_cameras is None else mvd_cameras
        self.num_frames = self.mvd_cameras.shape[0]  # F = V + 1
        self.num_views = self.num_frames - 1
        self.progress = True

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mv_unet.parameters()).dtype

    # --- Algorithm 2, one step -------------------------------------------------------------------------------

    def mvd_eps(self, x_t: Tensor, t: int, cond: Conditioning) -> Tensor:
        """The MVD's noise estimate with classifier-free guidance, for all F frames."""
        B, Fr = x_t.shape[:2]
        timesteps = torch.full((B * Fr,), t, device=x_t.device, dtype=torch.long)
        x_in, t_in = cfg_batch(x_t.flatten(0, 1).to(self.dtype), timesteps)  # [2B*F, 4, h, w]
        eps = self.mv_unet(x_in, t_in, **cond.mv.unet_kwargs())
        return combine_cfg(eps.float(), self.cfg.guidance_scale).unflatten(0, (B, Fr))

    def predict_gaussians(self, x0_2d: Tensor, x_t: Tensor, t: int, cond: Conditioning) -> tuple[Gaussians, Tensor]:
        """Eq. 8: the 3D-GS model on the decoded x0~ and x_t of the V target views (one batched VAE decode).

        Returns the Gaussians and the decoded x_t views [B, V, 3, H, W] in [0, 1]."""
        B, V = x0_2d.shape[:2]
        images = self.decode(torch.cat([x0_2d, x_t[:, :V]], dim=1))  # [B, 2V, 3, H, W] in [0, 1]
        H, W = images.shape[-2:]
        rays = self.target_rays(H, W, x0_2d.device).expand(B, -1, -1, -1, -1)  # [B, V, 6, H, W]
        timesteps = torch.full((B,), t, device=x0_2d.device, dtype=torch.long)
        gaussians = self.model_3d(
            images[:, :V].to(self.dtype), images[:, V:].to(self.dtype), rays.to(self.dtype), timesteps,
            cond.image.to(self.dtype),
        )
        return gaussians, images[:, V:]

    def render_latents(self, gaussians: Gaussians, size: tuple[int, int], generators: list[torch.Generator]) -> Tensor:
        """Render the V target views of ``gaussians`` at ``render_size``, resize to ``size``, VAE-encode: x0^."""
        s = self.cfg.render_size
        dev = gaussians.means.device
        cams = Cameras.from_fovy(target_cameras(self.camera_cfg.radius).to(dev), self.camera_cfg.fovy, s, s)
        out = rasterize(gaussians.to(torch.float32), cams, background=(1.0, 1.0, 1.0), cfg=self.render_cfg)
        rgb = out.rgb.clamp(0, 1)  # [B, V, 3, s, s]
        if (s, s) != tuple(size):
            rgb = F.interpolate(rgb.flatten(0, 1), size=size, mode="bilinear", align_corners=False).unflatten(0, rgb.shape[:2])
        return self.encode(rgb, generators)

    def step(self, x_t: Tensor, t: int, cond: Conditioning, generators: list[torch.Generator]) -> StepOutput:
        """One step of Algorithm 2 at timestep ``t``."""
        V = self.num_views
        alpha_bar_t = self.scheduler.alphas_cumprod[t].to(x_t.device)
        eps = self.mvd_eps(x_t, t, cond)  # [B, F, 4, h, w]
        x0_2d = predict_x0(x_t[:, :V], eps[:, :V], alpha_bar_t)  # [B, V, 4, h, w]
        x0_3d = gaussians = None
        if self.cfg.refine:
            gaussians, _ = self.predict_gaussians(x0_2d, x_t, t, cond)
            H, W = cond.image.shape[-2:]
            x0_3d = self.render_latents(gaussians, (H, W), generators)  # [B, V, 4, h, w]
            eps = torch.cat([eps_from_x0(x_t[:, :V], x0_3d, alpha_bar_t), eps[:, V:]], dim=1)
        variance_noise = self._eta_noise(x_t, generators) if self.cfg.eta > 0 else None
        out = self.scheduler.step(eps, t, x_t, eta=self.cfg.eta, variance_noise=variance_noise)
        return StepOutput(out.prev_sample, eps, x0_2d, out.pred_original_sample, x0_3d, gaussians)

    # --- the whole loop ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        cond: Conditioning,
        generators: list[torch.Generator],
        callback: Callable[[int, int, StepOutput], None] | None = None,
    ) -> SamplerOutput:
        """Sample B objects. ``generators`` holds one generator per sample, so a sample's result does not depend
        on what else is in the batch."""
        B = cond.batch_size
        if len(generators) != B:
            raise ValueError(f"got {len(generators)} generators for a batch of {B}; pass one per input image")
        h, w = cond.mv.ip_img.shape[-2:]
        self.scheduler.set_timesteps(self.cfg.num_steps, device=cond.image.device)
        x_t = self._noise(generators, (self.num_frames, self.mv_unet.config.in_channels, h, w), cond.image.device)  # [B, F, 4, h, w]
        x_t = x_t * self.scheduler.init_noise_sigma
        timesteps = [int(t) for t in self.scheduler.timesteps]
        for i, t in enumerate(tqdm(timesteps, desc="denoising", leave=False, disable=not self.progress)):
            out = self.step(x_t, t, cond, generators)
            if callback is not None:
                callback(i, t, out)
            x_t = out.x_prev
        return self.final_pass(x_t, timesteps[-1], cond)

    def final_pass(self, x_t: Tensor, t: int, cond: Conditioning) -> SamplerOutput:
        """One more MVD pass at the last timestep; its x0~ and the final latents give the output Gaussians."""
        V = self.num_views
        eps = self.mvd_eps(x_t, t, cond)
        x0_2d = predict_x0(x_t[:, :V], eps[:, :V], self.scheduler.alphas_cumprod[t].to(x_t.device))
        gaussians, views = self.predict_gaussians(x0_2d, x_t, t, cond)  # views: decoded final latents
        return SamplerOutput(gaussians=gaussians.to(torch.float32), views=views.float(), latents=x_t)

    # --- VAE and noise helpers ---------------------------------------------------------------------------------

    def decode(self, latents: Tensor) -> Tensor:
        """[B, K, 4, h, w] latents -> [B, K, 3, H, W] images in [0, 1] (one batched VAE call)."""
        return ((vae_decode(self.vae, latents.float()) + 1) / 2).clamp(0, 1)

    def encode(self, images: Tensor, generators: list[torch.Generator]) -> Tensor:
        """[B, K, 3, H, W] images in [0, 1] -> latents; posterior sample drawn per sample from its generator."""
        B, K, _, H, W = images.shape
        noise = None
        if self.cfg.sample_posterior:
            f = 2 ** (len(self.vae.config.block_out_channels) - 1)
            noise = self._noise(generators, (K, self.vae.config.latent_channels, H // f, W // f), images.device)
        return vae_encode(self.vae, images.float() * 2 - 1, sample=self.cfg.sample_posterior, noise=noise)

    def target_rays(self, H: int, W: int, device: torch.device) -> Tensor:
        """[1, V, 6, H, W] Plücker maps of the V target cameras at the image size."""
        cams = Cameras.from_fovy(target_cameras(self.camera_cfg.radius).to(device), self.camera_cfg.fovy, W, H)
        return plucker_rays(cams).unsqueeze(0)

    @staticmethod
    def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
        """[B, *shape] standard normal noise, sample b drawn from ``generators[b]`` (on the generator's device)."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)

    def _eta_noise(self, x_t: Tensor, generators: list[torch.Generator]) -> Tensor:
        return self._noise(generators, tuple(x_t.shape[1:]), x_t.device)
