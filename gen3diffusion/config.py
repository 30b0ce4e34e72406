"""Structured configs shared by the library and the scripts.

Every component has one typed dataclass; presets in ``configs/*.yaml`` are partial YAML files over these schemas and
command-line ``key=value`` overrides are merged last, so a typo in a key or a wrong type fails at once with the key's
name. Model dataclasses hold exactly the constructor arguments of their model class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

T = TypeVar("T")


### cameras and rendering


@dataclass
class CameraConfig:
    # orbit radius of every camera (world units; objects are normalised to max extent 0.8, avatars 1.0)
    radius: float = 1.5
    # vertical field of view in degrees
    fovy: float = 49.1
    # clipping planes of the projection matrix (the renderer culls Gaussians nearer than render.near_plane)
    znear: float = 0.5
    zfar: float = 2.5


@dataclass
class RenderConfig:
    # "auto" picks gsplat on CUDA tensors and the pure-PyTorch rasterizer otherwise
    backend: str = "auto"
    # 2D dilation added to every projected covariance (pixels^2); 0 matches the authors' GOF renders
    eps2d: float = 0.0
    # Gaussians whose centre is nearer than this (camera z) are culled
    near_plane: float = 0.01
    # extent of a splat in standard deviations (3.33: gsplat's tile extent, so both backends agree)
    sigma_cutoff: float = 3.33
    # per-Gaussian alpha is clamped to this maximum (0.999: hard-coded in gsplat's kernels)
    alpha_max: float = 0.999
    # fragments with alpha below this are skipped
    alpha_min: float = 1.0 / 255.0
    # gsplat: side of its square pixel tiles. The image does not depend on it: a splat's bounding box already holds
    # every pixel where its alpha reaches alpha_min (GPU test: tiles of 32 give the image of 16). Larger tiles mean
    # fewer tile intersections to sort, more splats per tile. 32 (gsplat's default: 16) made full-size sampling 10%
    # faster on an H100 with large splats and forward renders of trained-size splats no slower (docs/benchmarks.md)
    tile_size: int = 32
    # gsplat: how the splats are listed per tile, front to back; the lists, so the image, are the same either way.
    # "sort": gsplat's own (a 64-bit key per tile a splat touches, radix-sorted: its time grows with the splats'
    # size); "dense": each view's splats sorted by depth once, then every (view, tile, splat) pair tested
    # (render/_binning.py; power-of-two tiles). Dense made the render of the random full-size model's large splats
    # 1.2 ms faster on an H100 and that of trained-size splats 0.3 ms slower (docs/benchmarks.md), hence the default
    tile_binning: str = "sort"
    # torch backend: Gaussians composited per tile in one vectorised step (larger = fewer steps, more wasted work)
    torch_gaussians_per_step: int = 64
    # torch backend: bound on tiles x Gaussians x 256 pixels evaluated at once (~100 bytes each in float32 with
    # gradients); 2^20 keeps the blocks cache-sized, which is also the fastest on CPU
    torch_chunk_elements: int = 1 << 20


### models


@dataclass
class MVUNetConfig:
    """ImageDream multi-view UNet; defaults are the official size (unet/config.json of the ImageDream port)."""

    # latent resolution
    image_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    # base width; the levels are model_channels * channel_mult
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    # downsampling factors (1, 2, 4, ...) at which a transformer follows each residual block
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    num_head_channels: int = 64
    transformer_depth: int = 1
    # width of the text tokens and of the image-prompt tokens
    context_dim: int = 1024
    # camera vector length (flattened 4x4 c2w)
    camera_dim: int = 16
    # number of image-prompt tokens produced by the Resampler
    ip_dim: int = 16
    # weight of the decoupled image-prompt attention
    ip_weight: float = 1.0
    # CLIP vision hidden size fed to the Resampler (ViT-H/14: 1280)
    ip_in_dim: int = 1280
    # Resampler: layers, heads and head width (official: 4 layers of 12 heads x 64)
    resampler_depth: int = 4
    resampler_heads: int = 12
    resampler_dim_head: int = 64
    # GroupNorm groups (32 in SD; tiny test models need fewer)
    norm_num_groups: int = 32


@dataclass
class GaussianUNetConfig:
    """Time-conditioned LGM asymmetric U-Net; defaults are the official (LGM big) size."""

    # per view: [x0 RGB | x_t RGB | Plücker 6]
    in_channels: int = 12
    # per pixel: xyz, opacity, scale, rotation, rgb
    out_channels: int = 14
    down_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 1024])
    down_attention: list[bool] = field(default_factory=lambda: [False, False, False, True, True, True])
    mid_attention: bool = True
    up_channels: list[int] = field(default_factory=lambda: [1024, 1024, 512, 256, 128])
    up_attention: list[bool] = field(default_factory=lambda: [True, True, True, False, False])
    layers_per_block: int = 2
    up_layers_per_block: int = 3
    attention_heads: int = 16
    # sinusoidal timestep features and the embedding width added in every residual block
    time_freq_dim: int = 64
    time_embed_dim: int = 256
    # GroupNorm groups (32 in LGM; tiny test models need fewer)
    norm_num_groups: int = 32
    # input resolution of each view; the Gaussian grid (splat size) follows from the channel lists
    input_size: int = 256
    # read the MVD's one-step estimate x0~ (Eq. 8); False = the paper's "w/o 2D prior" ablation (Eq. 6), in_channels 9
    use_prior: bool = True


### sampling


@dataclass
class SchedulerConfig:
    """The MVD noise schedule (diffusers DDIMScheduler arguments, as the ImageDream port ships them)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    clip_sample: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"


@dataclass
class SamplerConfig:
    """Algorithm 2 (3D-guided joint DDIM sampling)."""

    # DDIM steps (the paper and the authors' code: 50)
    num_steps: int = 50
    # classifier-free guidance scale of the MVD (authors: 5)
    guidance_scale: float = 5.0
    # DDIM eta (0 = deterministic DDIM)
    eta: float = 0.0
    # replace the MVD's x0 by the re-encoded render of the 3D model at every step (False = the paper's
    # "w/o trajectory refinement" ablation: plain ImageDream sampling, then the 3D model once)
    refine: bool = True
    # refinement renders are made at this size, then resized to the image size before VAE encoding (authors: 512)
    render_size: int = 512
    # VAE-encode renders with a posterior sample, as the authors do (False: the posterior mean)
    sample_posterior: bool = True
    # on CUDA, replay the fixed-shape parts of each step as CUDA graphs (same kernels and numbers, far fewer launches)
    cuda_graphs: bool = True


### training


@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule of one training stage; defaults: the paper (Sec. 5.1.2)."""

    # peak learning rate (the paper's value is not in the text we have; the authors' scripts: 1e-4 for stages A
    # and B, 3e-5 for stage C, which are the per-stage defaults in TrainConfig.optim)
    lr: float = 1e-4
    # AdamW (paper: weight decay 0.05, betas (0.9, 0.95); authors' scripts: 0.01, (0.9, 0.999))
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # "cosine": linear warmup, then cosine annealing to 0 (paper); "onecycle": torch OneCycleLR (authors' scripts);
    # "constant": linear warmup, then constant
    schedule: str = "cosine"
    # optimizer updates of linear warmup (cosine, constant)
    warmup_steps: int = 100
    # onecycle: fraction of the updates spent raising the learning rate (authors: 0.005)
    pct_start: float = 0.005
    # clip the global gradient norm of the trained parameters (paper: 1); 0 disables clipping
    max_grad_norm: float = 1.0


@dataclass
class StageOptimConfig:
    """One optimizer setting per stage of Algorithm 1, so one preset can hold all three."""

    # stage A: the multi-view diffusion model alone
    mvd: OptimConfig = field(default_factory=OptimConfig)
    # stage B: the 3D-GS model alone
    model_3d: OptimConfig = field(default_factory=OptimConfig)
    # stage C: both models jointly (one AdamW, one parameter group per model)
    joint: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))


@dataclass
class TrainConfig:
    """Algorithm 1 (the training stages) and the training loop; defaults: the paper's setup."""

    # "mvd" (stage A: fine-tune the MVD on eps-MSE), "model_3d" (stage B: the 3D-GS model on VAE reconstructions of
    # the ground truth), "joint" (stage C: loss_mvd + loss_3d, the 3D loss reaching the MVD through x0~)
    stage: str = "joint"
    # stages A, C: probability of replacing the input image by an all-white image, for both the CLIP tokens and the
    # input-frame latent (authors: 2 x 0.1); this is what classifier-free guidance needs at inference
    cond_drop_prob: float = 0.2
    # stage C: detach x0~ before the VAE decode (False: the 3D loss trains the MVD through the decoder, as the
    # authors' joint script does)
    detach_x0: bool = False
    # 3D loss also at the 4 target views (paper: 4 targets + 12 novel views); False: supervision views only
    render_targets: bool = True
    # VAE-encode ground-truth images with a posterior sample (authors) instead of the posterior mean
    sample_posterior: bool = True
    # weights of the two losses of stage C (Eq. 9; the authors' script adds them with weight 1)
    lambda_mvd: float = 1.0
    lambda_3d: float = 1.0
    # 3D loss terms (Eq. 7): LPIPS-VGG and depth distortion (authors: 1 and 100); 0 disables a term
    lambda_lpips: float = 1.0
    lambda_distortion: float = 100.0
    # LPIPS: images are resized to this size first (authors: 256); VGG16 / LPIPS weights file (None: torch hub
    # dir); allow a random VGG (tests only)
    lpips_resolution: int = 256
    lpips_weights: str | None = None
    lpips_allow_random: bool = False
    # samples per process and per micro-batch; the global batch is batch_size * processes * accumulation
    # (paper: 2 x 8 GPUs x 16 = 256)
    batch_size: int = 2
    gradient_accumulation_steps: int = 16
    # optimizer updates to run (the cosine schedule anneals to 0 over this many)
    max_steps: int = 100_000
    # accelerate mixed precision: "no" | "bf16" | "fp16" (the authors train in bf16)
    mixed_precision: str = "bf16"
    # recompute activations in the backward pass of both U-Nets (less memory, about 30 % more time)
    gradient_checkpointing: bool = True
    # exponential moving average of the trained weights; 0 disables it (the export then holds the raw weights)
    ema_decay: float = 0.0
    # optimizer per stage
    optim: StageOptimConfig = field(default_factory=StageOptimConfig)
    # DDP: let the reducer look for parameters that got no gradient (slower; only for models with unused branches)
    find_unused_parameters: bool = False
    # DataLoader worker processes (0: load in the main process)
    num_workers: int = 4


### loading


def load_config(schema: type[T], preset: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Merge ``schema`` defaults, a preset YAML and ``key=value`` overrides into a typed config.

    ``preset`` is a path to a YAML file or the name of one in ``configs/`` (``"tiny"`` -> ``configs/tiny.yaml``).
    Unknown keys and wrong types raise ``ValueError`` naming the key.
    """
    cfg = OmegaConf.structured(schema)
    try:
        if preset is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_preset(preset)))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ValueError(f"config error: {err}".splitlines()[0] + _key_hint(err)) from err
    return cfg  # type: ignore[return-value]


def resolve_preset(preset: str | Path) -> Path:
    """A preset name (``tiny``) or a path to a YAML file -> an existing path."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"{path}: no such config; presets in {CONFIG_DIR}: {', '.join(names)}")
    return path


def to_dict(cfg: Any) -> dict[str, Any]:
    """A structured config (or a section of one) as plain Python containers, e.g. for a model constructor."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _key_hint(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    return f" (key: {key})" if key else ""
