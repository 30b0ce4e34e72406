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
ImageDream sampling and only the final pass runs the 3D model. A 3D model trained without the 2D prior
(``use_prior=False``) samples on its own: decode x_t -> 3D model -> render -> encode -> eps^, no MVD.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from ..cameras import Cameras, mvd_camera_vectors, plucker_rays, target_cameras
from ..config import CameraConfig, RenderConfig, SamplerConfig, SchedulerConfig, to_dict
from ..gaussians import Gaussians, activate
from ..models.conditioning import MVConditioning, cfg_batch, combine_cfg, vae_decode, vae_encode
from ..models.gaussian_unet import ContextViewCache
from ..render import rasterize
from .graphs import CUDAGraphs

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
    # the 3D model's context view up to its first attention (GaussianDiffusionModel.encode_context_view), set by
    # JointSampler.prepare when ``cache_context_view``; None: the 3D model runs it from ``image`` at every step
    context_3d: Optional[ContextViewCache] = None

    @property
    def batch_size(self) -> int:
        return self.image.shape[0]


@dataclass
class StepOutput:
    """What one joint step computed; ``x0_used`` is the clean estimate the DDIM update actually moved toward."""

    x_prev: Tensor  # [B, F, 4, h, w]
    eps: Tensor  # [B, F, 4, h, w] the noise passed to scheduler.step
    x0_2d: Optional[Tensor]  # [B, V, 4, h, w] MVD one-step estimate (Eq. 3); None without the 2D prior
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
    ``GaussianDiffusionModel.forward_raw`` (see their docstrings). With ``graphs`` (CUDA only) the two fixed-shape
    parts of each step (MVD + decodes + 3D model, then resize + encode + Eq. 10) replay as CUDA graphs; the renderer,
    whose work depends on the Gaussians, and the scheduler run eagerly in between.
    """

    # compute the MVD's cross-attention keys and values of the prompt and image-prompt tokens once per call
    # (MultiViewUNet.project_context) rather than at every step: the same numbers, less work per step
    project_context = True
    # run the 3D U-Net's layers before its first attention for the context view (the input image, timestep 0) once
    # per call (GaussianDiffusionModel.encode_context_view) rather than at every step: the same numbers, less work
    cache_context_view = True

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
        graphs: CUDAGraphs | None = None,
    ) -> None:
        self.mv_unet, self.vae, self.model_3d, self.scheduler = mv_unet, vae, model_3d, scheduler
        self.cfg = cfg or SamplerConfig()
        self.camera_cfg = camera_cfg or CameraConfig()
        self.render_cfg = render_cfg or RenderConfig()
        self.mvd_cameras = mvd_camera_vectors() if mvd_cameras is None else mvd_cameras
        self.num_frames = self.mvd_cameras.shape[0]  # F = V + 1
        self.num_views = self.num_frames - 1
        self.graphs = graphs
        self.progress = True

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mv_unet.parameters()).dtype

    @property
    def uses_prior(self) -> bool:
        """False for a 3D model trained without the 2D prior (the paper's ablation): then the MVD never runs and the
        loop is the 3D model's own sampling, x_t of the V target views denoised toward its re-encoded renders."""
        return getattr(self.model_3d.config, "use_prior", True)

    # --- the parts of one step (tensor in, tensor out; ``t`` and ``alpha_bar_t`` are 0-dim tensors) ------------

    def mvd_eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The MVD's noise estimate with classifier-free guidance, for all F frames."""
        B, Fr = x_t.shape[:2]
        x_in, t_in = cfg_batch(x_t.flatten(0, 1).to(self.dtype), t.reshape(1).expand(B * Fr))  # [2B*F, 4, h, w]
        eps = self.mv_unet(x_in, t_in, **cond.mv.unet_kwargs())
        return combine_cfg(eps.float(), self.cfg.guidance_scale).unflatten(0, (B, Fr))

    def decode_views(self, x0_2d: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """Decode x0~ and x_t of the V target views [B, V, 4, h, w] in one VAE batch -> two [B, V, 3, H, W] in [0, 1]."""
        V = x0_2d.shape[1]
        images = self.decode(torch.cat([x0_2d, x_t], dim=1))  # [B, 2V, 3, H, W]
        return images[:, :V], images[:, V:]

    def predict_gaussians(self, x_t: Tensor, t: Tensor, alpha_bar_t: Tensor, cond: Conditioning,
                          rays: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """MVD with CFG -> x0~ (Eq. 3) -> decode x0~ and x_t -> 3D model (Eq. 8).

        Returns eps [B, F, 4, h, w], x0~ [B, V, 4, h, w], the raw Gaussians [B, N, 14] and the decoded x_t views
        [B, V, 3, H, W]."""
        V = self.num_views
        eps = self.mvd_eps(x_t, t, cond)  # [B, F, 4, h, w]
        x0_2d = predict_x0(x_t[:, :V], eps[:, :V], alpha_bar_t)  # [B, V, 4, h, w]
        x0_images, xt_images = self.decode_views(x0_2d, x_t[:, :V])
        B = x_t.shape[0]
        raw = self.model_3d.forward_raw(
            x0_images.to(self.dtype), xt_images.to(self.dtype), rays.expand(B, -1, -1, -1, -1).to(self.dtype),
            t.reshape(1).expand(B), self.context_3d(cond),
        )  # [B, N, 14]
        return eps, x0_2d, raw, xt_images

    def predict_gaussians_3d_only(self, x_t: Tensor, t: Tensor, cond: Conditioning,
                                  rays: Tensor) -> tuple[Tensor, Tensor]:
        """Without the 2D prior (a 3D model trained with ``use_prior=False``, Eq. 6): decode x_t [B, V, 4, h, w] ->
        3D model. Returns the raw Gaussians [B, N, 14] and the decoded x_t views [B, V, 3, H, W]."""
        B = x_t.shape[0]
        xt_images = self.decode(x_t)  # [B, V, 3, H, W]
        raw = self.model_3d.forward_raw(None, xt_images.to(self.dtype), rays.expand(B, -1, -1, -1, -1).to(self.dtype),
                                        t.reshape(1).expand(B), self.context_3d(cond))
        return raw, xt_images

    def context_3d(self, cond: Conditioning) -> Tensor | ContextViewCache:
        """What the 3D model gets as its context view: the cached activations, else the input image."""
        return cond.image.to(self.dtype) if cond.context_3d is None else cond.context_3d

    def refine_eps(self, rgb: Tensor, noise: Tensor | None, x_t: Tensor, alpha_bar_t: Tensor) -> tuple[Tensor, Tensor]:
        """Renders [B, V, 3, s, s] -> resize to the image size -> VAE-encode: x0^ -> eps^ (Eq. 10) for the V targets.

        ``noise`` is the posterior draw (None: the posterior mean). Returns eps^ and x0^, both [B, V, 4, h, w]."""
        V = self.num_views
        size = self.image_size
        if tuple(rgb.shape[-2:]) != (size, size):
            rgb = F.interpolate(rgb.flatten(0, 1), size=(size, size), mode="bilinear",
                                align_corners=False).unflatten(0, rgb.shape[:2])
        x0_3d = self.encode(rgb, noise)  # [B, V, 4, h, w]
        return eps_from_x0(x_t[:, :V], x0_3d, alpha_bar_t), x0_3d

    def render(self, raw: Tensor, cameras: Cameras) -> Tensor:
        """The V target views [B, V, 3, s, s] of the Gaussians, on white, clamped to [0, 1]."""
        out = rasterize(activate(raw.float()), cameras, background=(1.0, 1.0, 1.0), cfg=self.render_cfg, depth=False)
        return out.rgb.clamp(0, 1)

    # --- one step and the whole loop ---------------------------------------------------------------------------

    def step(self, x_t: Tensor, t: int, cond: Conditioning, generators: list[torch.Generator]) -> StepOutput:
        """One step of Algorithm 2 at timestep ``t`` (without the 2D prior: of the 3D model's own sampling loop)."""
        V = self.num_views
        alpha_bar_t = self.alphas_cumprod[t]  # 0-dim view on the device: no copy
        x0_2d = x0_3d = gaussians = None
        if not self.uses_prior or self.cfg.refine:
            eps, x0_2d, raw, _ = self._predict(x_t, t, cond)
            # drawn before the render, whose tile count waits for the GPU: queued now, it runs while the GPU is busy
            noise = self.posterior_noise(generators, V, x_t.device)
            rgb = self.render(raw, self.render_cameras)  # [B, V, 3, s, s]
            eps_3d, x0_3d = self._run("refine", self.refine_eps, rgb, noise, x_t, alpha_bar_t)
            eps = torch.cat([eps_3d, eps[:, V:]], dim=1) if self.uses_prior else eps_3d  # the input frame keeps its eps
            gaussians = activate(raw)
        else:
            (eps,) = self._run("mvd", lambda *a: (self.mvd_eps(*a),), x_t, self.timestep_tensors[t], cond)
            x0_2d = predict_x0(x_t[:, :V], eps[:, :V], alpha_bar_t)
        variance_noise = self._noise(generators, tuple(x_t.shape[1:]), x_t.device) if self.cfg.eta > 0 else None
        out = self.scheduler.step(eps, t, x_t, eta=self.cfg.eta, variance_noise=variance_noise)
        return StepOutput(out.prev_sample, eps, x0_2d, out.pred_original_sample, x0_3d, gaussians)

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
        device = cond.image.device
        h, w = cond.mv.ip_img.shape[-2:]
        self.scheduler.set_timesteps(self.cfg.num_steps, device=device)
        cond = self.prepare(cond)
        frames = self.num_frames if self.uses_prior else self.num_views  # 3D-only sampling has no input frame
        x_t = self._noise(generators, (frames, self.mv_unet.config.in_channels, h, w), device)  # [B, F, 4, h, w]
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
        _, _, raw, views = self._predict(x_t, t, cond)
        return SamplerOutput(gaussians=activate(raw), views=views.float(), latents=x_t)

    def _predict(self, x_t: Tensor, t: int, cond: Conditioning
                 ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
        """eps, x0~, raw Gaussians and decoded x_t views at timestep ``t`` (with graphs, replayed): through the MVD
        (:meth:`predict_gaussians`), or, without the 2D prior, the 3D model alone (eps and x0~ are then None)."""
        t_dev = self.timestep_tensors[t]
        if self.uses_prior:
            return self._run("predict", self.predict_gaussians, x_t, t_dev, self.alphas_cumprod[t], cond, self.rays)
        raw, views = self._run("predict_3d_only", self.predict_gaussians_3d_only, x_t, t_dev, cond, self.rays)
        return None, None, raw, views

    # --- helpers -----------------------------------------------------------------------------------------------

    def decode(self, latents: Tensor) -> Tensor:
        """[B, K, 4, h, w] latents -> [B, K, 3, H, W] images in [0, 1] (one batched VAE call)."""
        return ((vae_decode(self.vae, latents.float()) + 1) / 2).clamp(0, 1)

    def encode(self, images: Tensor, noise: Tensor | None) -> Tensor:
        """[B, K, 3, H, W] images in [0, 1] -> latents: the posterior mean plus std * ``noise`` (None: the mean)."""
        return vae_encode(self.vae, images.float() * 2 - 1, sample=noise is not None, noise=noise)

    def posterior_noise(self, generators: list[torch.Generator], num_images: int, device: torch.device) -> Tensor | None:
        """[B, K, C, h, w] standard-normal draw for the VAE posterior sample of K images per sample (one generator per
        sample), or None when ``sample_posterior`` is off (encode the mean)."""
        if not self.cfg.sample_posterior:
            return None
        h = self.mv_unet.config.image_size  # the latent size
        return self._noise(generators, (num_images, self.vae.config.latent_channels, h, h), device)

    def prepare(self, cond: Conditioning) -> Conditioning:
        """Per-call constants, set as attributes: ``image_size`` (the inputs'), ``render_cameras``, the Plücker maps
        ``rays`` [1, V, 6, H, W], and on the device ``alphas_cumprod`` and ``timestep_tensors`` (0-dim views by
        timestep). Returns the conditioning with the MVD's cross-attention keys and values projected once (when
        ``project_context``) and the 3D model's context view run to its first attention (when
        ``cache_context_view``), copied into the graphs' persistent buffers with graphs. ``__call__`` runs this."""
        device = cond.image.device
        s, size = self.cfg.render_size, cond.image.shape[-1]
        self.image_size = size
        c2w = target_cameras(self.camera_cfg.radius).to(device)
        self.render_cameras = Cameras.from_fovy(c2w, self.camera_cfg.fovy, s, s)
        self.rays = plucker_rays(Cameras.from_fovy(c2w, self.camera_cfg.fovy, size, size)).unsqueeze(0)  # [1, V, 6, H, W]
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)  # [T_train]
        self.timestep_tensors = torch.arange(len(self.alphas_cumprod), device=device)  # [T_train]
        if self.project_context and self.uses_prior:
            mv = cond.mv
            context = self.mv_unet.project_context(mv.context, mv.ip_tokens)
            cond = replace(cond, mv=replace(mv, context=context, ip_tokens=None))
        if self.cache_context_view and getattr(self.model_3d, "can_cache_context_view", False):
            cond = replace(cond, context_3d=self.model_3d.encode_context_view(cond.image.to(self.dtype)))
        if self.graphs is None:
            return cond
        return self._pin("cond", cond)

    def _pin(self, name: str, value: Any) -> Any:
        """``value`` with every tensor in it (alone, or in the dataclasses, dicts and tuples of the conditioning)
        copied by ``graphs.pin``."""
        if isinstance(value, Tensor):
            return self.graphs.pin(name, value)
        if is_dataclass(value):
            return replace(value, **{f.name: self._pin(f"{name}.{f.name}", getattr(value, f.name))
                                     for f in fields(value)})
        if isinstance(value, dict):  # named by position: the keys (modules of a projected context) may print alike
            return {key: self._pin(f"{name}.{i}", x) for i, (key, x) in enumerate(value.items())}
        if isinstance(value, tuple):
            return tuple(self._pin(f"{name}.{i}", x) for i, x in enumerate(value))
        return value

    def _run(self, name: str, fn: Callable[..., tuple[Tensor, ...]], *args) -> tuple[Tensor, ...]:
        """``fn(*args)``; with graphs, replayed from the graph for ``name`` (tensor args are its inputs; the rest,
        pinned by :meth:`prepare`, are read in place)."""
        if self.graphs is None:
            return fn(*args)
        slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]

        def tensor_fn(*tensors: Tensor) -> tuple[Tensor, ...]:
            full = list(args)
            for i, x in zip(slots, tensors):
                full[i] = x
            return fn(*full)

        key = (name, self.cfg.guidance_scale)  # the Python value the graphs bake in besides the inputs' shapes
        return self.graphs.run(key, tensor_fn, *(args[i] for i in slots))

    @staticmethod
    def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> Tensor:
        """[B, *shape] standard normal noise, sample b drawn from ``generators[b]`` (on the generator's device)."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)
