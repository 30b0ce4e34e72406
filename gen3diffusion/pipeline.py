"""Gen3DiffusionPipeline: image -> 3D Gaussians (+ the generated views), with the weights loaded from a folder or hub.

Two weight layouts load:

* **This project's** (what ``scripts/train.py`` exports and :meth:`Gen3DiffusionPipeline.save_pretrained` writes)::

      mv_unet/  model_3d/  vae/  image_encoder/  scheduler/  prompt_embeds.safetensors  gen3d.yaml

* **The authors' release**: ``model.safetensors`` (MV UNet) and ``model_1.safetensors`` (3D model), on top of the
  ImageDream diffusers folder (``unet/ vae/ image_encoder/ text_encoder/ tokenizer/ scheduler/``), either in the same
  folder or given as ``base`` (default: the hub id ``ashawkey/imagedream-ipmv-diffusers``). The text encoder runs
  once to embed the two constant prompts; the embeddings are cached next to the weights when that folder is
  writable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor

from .cameras import mvd_camera_vectors
from .config import CameraConfig, RenderConfig, SamplerConfig, SchedulerConfig, to_dict
from .diffusion.graphs import CUDAGraphs
from .diffusion.sampler import Conditioning, JointSampler, StepOutput, build_scheduler
from .gaussians import Gaussians
from .models.conditioning import (
    PromptConfig,
    build_conditioning,
    clip_image_hidden,
    load_image_encoder,
    load_prompt_embeddings,
    load_vae,
)
from .models.gaussian_unet import GaussianDiffusionModel, load_gaussian_model
from .models.kernels import fuse_vae_blocks
from .models.loading import resolve_source
from .models.mv_unet import MultiViewUNet, load_mv_unet

logger = logging.getLogger(__name__)

IMAGEDREAM_BASE = "ashawkey/imagedream-ipmv-diffusers"
# the small demo model trained by this project (configs/demo*.yaml, docs/reproduction.md)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "demo"
PROJECT_FILES = ("mv_unet/config.json", "model_3d/config.json", "vae/config.json", "image_encoder/config.json",
                 "scheduler/scheduler_config.json", "prompt_embeds.safetensors")
OFFICIAL_BASE_FILES = ("unet/config.json", "vae/config.json", "image_encoder/config.json", "scheduler/scheduler_config.json")
COMPILABLE_NETWORKS = ("mv_unet", "vae", "model_3d")  # what Gen3DiffusionPipeline.compile can compile
BORDER_RATIO = {"objects": 0.45, "avatars": 0.227}


@dataclass
class PipelineConfig:
    """What a weights folder says about how its models were trained (saved as ``gen3d.yaml``)."""

    cameras: CameraConfig = field(default_factory=CameraConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)


@dataclass
class Gen3DOutput:
    gaussians: Gaussians  # B samples of V * S * S Gaussians
    views: Tensor  # [B, V, 3, H, W] final multi-view images in [0, 1]
    images: Tensor  # [B, 3, H, W] the preprocessed inputs in [0, 1]


class Gen3DiffusionPipeline:
    """Wires the models of Gen-3Diffusion; see :class:`~gen3diffusion.diffusion.sampler.JointSampler` for Algorithm 2."""

    sampler_cls: type[JointSampler] = JointSampler  # a subclass may change how a step runs (see bench_sample.py)

    def __init__(
        self,
        mv_unet: MultiViewUNet,
        vae: torch.nn.Module,
        image_encoder: torch.nn.Module,
        model_3d: GaussianDiffusionModel,
        prompt_embeds: Tensor,  # [2, 77, C] (negative, positive)
        scheduler_cfg: SchedulerConfig | None = None,
        cfg: PipelineConfig | None = None,
    ) -> None:
        self.mv_unet, self.vae, self.image_encoder, self.model_3d = mv_unet, vae, image_encoder, model_3d
        self.prompt_embeds = prompt_embeds
        self.scheduler_cfg = scheduler_cfg or SchedulerConfig()
        self.cfg = cfg or OmegaConf.structured(PipelineConfig)
        self.progress = True
        # CUDA graphs of the sampler's fixed-shape parts, kept across calls (captured on the first call per batch
        # size); call ``self.graphs.clear()`` after replacing or moving a model
        self.graphs = CUDAGraphs()

    @property
    def device(self) -> torch.device:
        return next(self.mv_unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.mv_unet.parameters()).dtype

    @property
    def image_size(self) -> int:
        """Input and view resolution: the MV UNet's latent size times the VAE's downsampling factor (256 = 32 x 8)."""
        return self.mv_unet.config.image_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    # --- loading and saving --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        base: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        model_3d_config: dict | None = None,
    ) -> "Gen3DiffusionPipeline":
        """Load from this project's folder layout or the authors' release (see the module docstring).

        ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA and float32 on CPU. On CUDA the
        convolutional models are switched to channels_last (:meth:`use_channels_last`), the fast layout there.
        ``model_3d_config``: constructor arguments of the 3D model for the authors' layout, which stores none
        (default: the official size).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if Path(source) == DEFAULT_WEIGHTS and not DEFAULT_WEIGHTS.is_dir():
            raise FileNotFoundError(f"{DEFAULT_WEIGHTS}: the bundled demo weights are missing; pass a weights folder "
                                    "or hub id (e.g. --weights yuxuanx/gen3diffusion with the authors' release)")
        root = resolve_source(source)
        if root.is_file():
            raise FileNotFoundError(f"{root}: is a file; pass the folder that holds the weights")
        if (root / "mv_unet").is_dir() or (root / "model_3d").is_dir():
            pipe = cls._load_project(root, device, dtype)
        elif (root / "model.safetensors").is_file() or (root / "model_1.safetensors").is_file():
            pipe = cls._load_official(root, base, device, dtype, model_3d_config or {})
        else:
            raise FileNotFoundError(
                f"{root}: not a gen3diffusion weights folder: expected {', '.join(PROJECT_FILES)} "
                "(this project's layout) or model.safetensors + model_1.safetensors (the authors' release)"
            )
        return pipe.use_channels_last() if device.type == "cuda" else pipe

    @classmethod
    def _load_project(cls, root: Path, device: torch.device, dtype: torch.dtype) -> "Gen3DiffusionPipeline":
        _require_files(root, PROJECT_FILES, "this project's weights layout")
        cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), OmegaConf.load(root / "gen3d.yaml")) \
            if (root / "gen3d.yaml").is_file() else OmegaConf.structured(PipelineConfig)
        mv_unet = load_mv_unet(root, subfolder="mv_unet", torch_dtype=dtype, device=device)
        model_3d = GaussianDiffusionModel.from_pretrained(root / "model_3d", torch_dtype=dtype).to(device).eval()
        vae = load_vae(root, torch_dtype=dtype, device=device)
        image_encoder = load_image_encoder(root, torch_dtype=dtype, device=device)
        prompts = load_prompt_embeddings(cfg.prompts, cache=root / "prompt_embeds.safetensors", device=device)
        scheduler_cfg = _scheduler_config(root / "scheduler")
        return cls(mv_unet, vae, image_encoder, model_3d, prompts, scheduler_cfg, cfg)

    @classmethod
    def _load_official(
        cls, root: Path, base: str | Path | None, device: torch.device, dtype: torch.dtype, model_3d_config: dict
    ) -> "Gen3DiffusionPipeline":
        _require_files(root, ("model.safetensors", "model_1.safetensors"), "the authors' release")
        base_root = root if (root / "unet").is_dir() else resolve_source(base or IMAGEDREAM_BASE)
        _require_files(base_root, OFFICIAL_BASE_FILES, "the ImageDream diffusers folder")
        cfg = OmegaConf.structured(PipelineConfig)
        mv_unet = load_mv_unet(base_root, weights=root / "model.safetensors", torch_dtype=dtype, device=device)
        model_3d = load_gaussian_model(root / "model_1.safetensors", model_3d_config, torch_dtype=dtype, device=device)
        vae = load_vae(base_root, torch_dtype=dtype, device=device)
        image_encoder = load_image_encoder(base_root, torch_dtype=dtype, device=device)
        cache = root / "prompt_embeds.safetensors" if os.access(root, os.W_OK) else None
        prompts = load_prompt_embeddings(cfg.prompts, cache=cache, source=base_root, device=device)
        scheduler_cfg = _scheduler_config(base_root / "scheduler")
        return cls(mv_unet, vae, image_encoder, model_3d, prompts, scheduler_cfg, cfg)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write this project's layout (loadable by :meth:`from_pretrained` and ``scripts/sample.py --weights``),
        atomically: into a hidden sibling folder, then renamed over ``folder`` (an existing one is replaced)."""
        import shutil

        from .models.conditioning import save_prompt_embeddings

        folder = Path(folder)
        tmp = folder.with_name(f".tmp-{folder.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.mv_unet.save_pretrained(tmp / "mv_unet")
        self.model_3d.save_pretrained(tmp / "model_3d")
        self.vae.save_pretrained(tmp / "vae")
        self.image_encoder.save_pretrained(tmp / "image_encoder")
        build_scheduler(self.scheduler_cfg).save_pretrained(tmp / "scheduler")
        save_prompt_embeddings(tmp / "prompt_embeds.safetensors", self.prompt_embeds.detach().cpu(), self.cfg.prompts)
        OmegaConf.save(self.cfg, tmp / "gen3d.yaml")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def use_channels_last(self) -> "Gen3DiffusionPipeline":
        """Store the convolutional models' weights as NHWC (``torch.channels_last``), the layout of cuDNN's tensor-core
        kernels, so their activations follow and the blocks run the fused NHWC kernels of
        :mod:`~gen3diffusion.models.kernels` (for the VAE, whose blocks are diffusers', this switches them in place:
        :func:`~gen3diffusion.models.kernels.fuse_vae_blocks`); the numbers change only by rounding. The default on
        CUDA."""
        fuse_vae_blocks(self.vae)
        for module in (self.mv_unet, self.vae, self.model_3d):
            module.to(memory_format=torch.channels_last)
        self.graphs.clear()
        return self

    def compile(self, mode: str = "default", networks: Sequence[str] = COMPILABLE_NETWORKS
                ) -> "Gen3DiffusionPipeline":
        """``torch.compile`` the chosen ``networks`` in place, channels_last: ``"mv_unet"``, ``"vae"`` (its encoder
        and decoder) and ``"model_3d"`` (the 3D U-Net); by default all three.

        Inductor fuses what the eager default fuses with its own kernels (:mod:`~gen3diffusion.models.kernels`), so on
        an H100 at full size it has not paid: minutes of compiling, then slower with all three and no faster with the
        MV UNet alone (docs/benchmarks.md). Kept for other cards and versions. Compiled kernels round differently from
        eager ones, within the dtype's precision."""
        modules = {"mv_unet": [self.mv_unet], "vae": [self.vae.encoder, self.vae.decoder],
                   "model_3d": [self.model_3d.unet]}  # keys: COMPILABLE_NETWORKS
        unknown = sorted(set(networks) - modules.keys())
        if unknown:
            raise ValueError(f"compile: unknown networks {unknown}; choose from {list(modules)}")
        self.use_channels_last()  # the measured configuration: inductor then keeps convolutions and norms in NHWC
        for name in networks:
            for module in modules[name]:
                module.compile(mode=mode)
        self.graphs.clear()
        return self

    # --- sampling -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, images: Tensor, seed: int = 0, sampler_cfg: SamplerConfig | None = None
                ) -> tuple[JointSampler, Conditioning, list[torch.Generator]]:
        """Check a batch of preprocessed inputs [B, 3, H, W] in [0, 1] and build what Algorithm 2 needs: the sampler,
        the conditioning (CLIP tokens, input latent, Resampler, prompts, cameras, CFG halves) and one generator per
        image, seeded with ``seed``."""
        size = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"images: expected [B, 3, {size}, {size}] in [0, 1], got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        generators = [torch.Generator(self.device).manual_seed(seed) for _ in range(images.shape[0])]
        sampler_cfg = sampler_cfg or SamplerConfig()
        graphs = self.graphs if sampler_cfg.cuda_graphs and self.device.type == "cuda" else None
        sampler = self.sampler_cls(
            self.mv_unet, self.vae, self.model_3d, build_scheduler(self.scheduler_cfg), sampler_cfg,
            self.cfg.cameras, self.cfg.render, mvd_camera_vectors().to(self.device), graphs,
        )
        sampler.progress = self.progress
        clip_hidden = clip_image_hidden(self.image_encoder, (images * 2 - 1).to(self.dtype))  # [B, 257, 1280]
        noise = sampler.posterior_noise(generators, 1, self.device)
        image_latent = sampler.encode(images[:, None], noise)[:, 0]  # [B, 4, h, w]
        mv_cond = build_conditioning(
            self.mv_unet, self.prompt_embeds.to(self.dtype), clip_hidden, image_latent.to(self.dtype),
            sampler.mvd_cameras.to(self.dtype), guidance=True,
        )
        return sampler, Conditioning(images, mv_cond), generators

    @torch.no_grad()
    def __call__(
        self,
        images: Tensor,  # [B, 3, H, W] preprocessed inputs in [0, 1] on white
        seed: int = 0,
        sampler_cfg: SamplerConfig | None = None,
        callback: Callable[[int, int, StepOutput], None] | None = None,
    ) -> Gen3DOutput:
        """Generate Gaussians for each input image. Every image uses its own generator seeded with ``seed``, so a
        result does not depend on the other images in the batch."""
        sampler, cond, generators = self.prepare(images, seed, sampler_cfg)
        out = sampler(cond, generators, callback)  # Algorithm 2
        return Gen3DOutput(out.gaussians, out.views, cond.image)


def _require_files(root: Path, files: Sequence[str], what: str) -> None:
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: incomplete weights folder ({what}): missing {', '.join(missing)}")


def _scheduler_config(folder: Path) -> SchedulerConfig:
    """Our SchedulerConfig from a diffusers ``scheduler_config.json`` (unknown keys ignored, missing ones default)."""
    import json

    saved = json.loads((folder / "scheduler_config.json").read_text())
    known = to_dict(SchedulerConfig())
    return OmegaConf.merge(OmegaConf.structured(SchedulerConfig), {k: v for k, v in saved.items() if k in known})
