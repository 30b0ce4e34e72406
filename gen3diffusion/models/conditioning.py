"""The frozen conditioning networks of the multi-view UNet and the classifier-free-guidance batch layout.

* VAE: diffusers ``AutoencoderKL`` in the SD-2.1 configuration; latents are scaled by its ``scaling_factor``
  (0.18215) so that the UNet sees unit-variance latents.
* CLIP image encoder: transformers ``CLIPVisionModel`` (OpenCLIP ViT-H/14); the UNet's Resampler reads its
  penultimate hidden state [B, 257, 1280] of the 224x224 input.
* Text encoder: only ever embeds the two constant prompts (negative, positive). They are embedded once and cached in
  a .safetensors file; with a cache present, sampling never loads the text encoder.

Classifier-free guidance (authors' convention): the unconditional branch uses the negative prompt, zeroed CLIP
hidden states (zeroed *before* the Resampler) and a zeroed input-frame latent; both branches see the same cameras.
Batches are laid out [unconditional B*F ; conditional B*F].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .loading import StateDictMismatchError, resolve_source

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    from .mv_unet import MultiViewUNet, ProjectedContext

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SD21_VAE_CONFIG",
    "MVConditioning",
    "PromptConfig",
    "build_conditioning",
    "cfg_batch",
    "clip_image_hidden",
    "clip_preprocess",
    "combine_cfg",
    "encode_condition_image",
    "encode_prompts",
    "load_image_encoder",
    "load_prompt_embeddings",
    "load_vae",
    "read_prompt_embeddings",
    "save_prompt_embeddings",
    "vae_decode",
    "vae_encode",
]

# OpenAI CLIP normalisation (also used by OpenCLIP ViT-H/14 laion2b)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The SD-2.1 VAE (``vae/config.json`` of the ImageDream port): f8, 4 latent channels, 83.65 M parameters
SD21_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)


@dataclass
class PromptConfig:
    """The constant text prompts of the MV UNet (authors' values; they use the human-scan prompt for objects too)."""

    # conditional branch
    prompt: str = ", 3d asset photorealistic human scan"
    # unconditional branch (the double space before "obscure" is the authors')
    negative_prompt: str = (
        "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  obscure, unnatural colors, "
        "poor lighting, dull, and unclear."
    )


### VAE


def load_vae(
    source: str | Path, subfolder: str | None = "vae", torch_dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> AutoencoderKL:
    """The ``AutoencoderKL`` of a diffusers folder (port layout: ``vae/``) or hub id; fails on missing keys."""
    from diffusers import AutoencoderKL

    root = resolve_source(source, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    vae, info = AutoencoderKL.from_pretrained(
        root, subfolder=subfolder, torch_dtype=torch_dtype, output_loading_info=True
    )
    _require_complete(f"{root}/{subfolder or ''}", info)
    return vae.to(device).eval().requires_grad_(False)


def vae_encode(
    vae: AutoencoderKL,
    images: Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
    noise: Tensor | None = None,
) -> Tensor:
    """Images [..., 3, H, W] in [-1, 1] -> scaled latents [..., 4, H/8, W/8] (posterior sample, or its mean).

    Leading dims are flattened into one VAE batch; ``generator`` (one for the whole batch) makes the sample
    reproducible. ``noise`` (the latents' shape) gives the standard-normal draw explicitly instead, e.g. drawn per
    sample so a result does not depend on the rest of the batch. The result has ``images``' dtype.
    """
    if images.ndim < 4 or images.shape[-3] != 3:
        raise ValueError(f"images: expected [..., 3, H, W] with a batch dim, got {tuple(images.shape)}")
    lead = images.shape[:-3]
    dist = vae.encode(images.flatten(0, -4).to(vae.dtype)).latent_dist
    if not sample:
        z = dist.mean
    elif noise is not None:
        z = dist.mean + dist.std * noise.flatten(0, -4).to(dist.mean)
    else:
        z = dist.sample(generator=generator)
    return (z * vae.config.scaling_factor).unflatten(0, lead).to(images.dtype)


def vae_decode(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Scaled latents [..., 4, h, w] -> images [..., 3, 8h, 8w], about [-1, 1] (not clamped, so gradients pass)."""
    if latents.ndim < 4 or latents.shape[-3] != vae.config.latent_channels:
        raise ValueError(f"latents: expected [..., {vae.config.latent_channels}, h, w], got {tuple(latents.shape)}")
    lead = latents.shape[:-3]
    images = vae.decode(latents.flatten(0, -4).to(vae.dtype) / vae.config.scaling_factor).sample
    return images.unflatten(0, lead).to(latents.dtype)


### CLIP image encoder


def load_image_encoder(
    source: str | Path,
    subfolder: str | None = "image_encoder",
    torch_dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
) -> CLIPVisionModel:
    """The ``CLIPVisionModel`` of a folder (port layout: ``image_encoder/``) or hub id; fails on missing keys."""
    from transformers import CLIPVisionModel

    root = resolve_source(source, allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    model, info = CLIPVisionModel.from_pretrained(root / (subfolder or ""), output_loading_info=True)
    _require_complete(f"{root}/{subfolder or ''}", info)
    return model.to(device, torch_dtype).eval().requires_grad_(False)


def clip_preprocess(images: Tensor, size: int = 224) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> CLIP pixel values [B, 3, size, size]; differentiable, tensor-only.

    Bicubic resize with ``align_corners=True`` and no antialiasing (what kornia's ``resize`` does in the authors'
    pipeline), then [-1, 1] -> [0, 1] and the CLIP mean/std normalisation.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=True)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def clip_image_hidden(encoder: CLIPVisionModel, images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> the penultimate hidden state [B, 1 + patches, hidden] ([B, 257, 1280])."""
    pixels = clip_preprocess(images, encoder.config.image_size).to(encoder.dtype)
    hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    return hidden.to(images.dtype)


def encode_condition_image(
    image: Tensor,
    vae: AutoencoderKL,
    image_encoder: CLIPVisionModel,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> tuple[Tensor, Tensor]:
    """The input image [B, 3, H, W] in [-1, 1] (on white, 256x256) -> (CLIP hidden [B, 257, 1280], ip_img [B, 4, h, w]).

    ``ip_img`` is the VAE latent that replaces the input frame; the authors take a posterior sample (``sample=True``).
    """
    return clip_image_hidden(image_encoder, image), vae_encode(vae, image, generator, sample)


def _require_complete(name: str, info: dict[str, Any]) -> None:
    """Raise when a library loader left weights randomly initialised; unexpected extra keys are only logged."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise StateDictMismatchError(name, [(k, None) for k in missing], [], [])
    if info.get("unexpected_keys"):
        logger.warning("%s: ignored %d unexpected keys", name, len(info["unexpected_keys"]))


### text prompts


@torch.no_grad()
def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> Tensor:
    """Prompts -> last hidden states [N, 77, C] (SD-2.x: the 23-layer OpenCLIP-H text tower, padded to 77 tokens)."""
    length = text_encoder.config.max_position_embeddings
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids.to(text_encoder.device)).last_hidden_state


def save_prompt_embeddings(path: str | Path, embeddings: Tensor, prompts: PromptConfig) -> None:
    """Write (negative, positive) embeddings [2, 77, C] with the prompt strings as metadata (checked on read)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"negative": embeddings[0].float().contiguous(), "positive": embeddings[1].float().contiguous()}
    save_file(tensors, str(path), metadata={"negative_prompt": prompts.negative_prompt, "prompt": prompts.prompt})


def read_prompt_embeddings(path: str | Path, prompts: PromptConfig) -> Tensor | None:
    """Cached (negative, positive) embeddings [2, 77, C] (float32), or None when absent or made for other prompts."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if (meta.get("negative_prompt"), meta.get("prompt")) != (prompts.negative_prompt, prompts.prompt):
            logger.info("%s: cached for other prompts (%r / %r)", path, meta.get("negative_prompt"), meta.get("prompt"))
            return None
        return torch.stack([f.get_tensor("negative"), f.get_tensor("positive")])


def load_prompt_embeddings(
    prompts: PromptConfig | None = None,
    cache: str | Path | None = None,
    source: str | Path | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
) -> Tensor:
    """(negative, positive) prompt embeddings [2, 77, C]: from ``cache`` when it holds these prompts, else embedded by
    the text encoder of ``source`` (port layout: ``text_encoder/``, ``tokenizer/``), written to ``cache`` and freed."""
    prompts = prompts or PromptConfig()
    cached = read_prompt_embeddings(cache, prompts) if cache is not None else None
    if cached is not None:
        return cached.to(device, torch_dtype)
    if source is None:
        raise FileNotFoundError(
            f"{cache}: no prompt-embedding cache for these prompts; pass the text-encoder source (folder or hub id)"
        )
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_source(source, allow_patterns=["text_encoder/*", "tokenizer/*"])
    text_encoder, info = CLIPTextModel.from_pretrained(root / "text_encoder", output_loading_info=True)
    _require_complete(f"{root}/text_encoder", info)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = text_encoder.to(device, torch.float32).eval()  # run once: full precision for the cache
    embeddings = encode_prompts(text_encoder, tokenizer, [prompts.negative_prompt, prompts.prompt])
    del text_encoder  # only the two embeddings are kept
    if cache is not None:
        save_prompt_embeddings(cache, embeddings, prompts)
        logger.info("%s: cached the prompt embeddings", cache)
    return embeddings.to(device, torch_dtype)


### classifier-free guidance


@dataclass
class MVConditioning:
    """Per-frame conditioning of :meth:`MultiViewUNet.forward` for N samples (N = 2B with guidance: [uncond ; cond])."""

    context: Tensor | ProjectedContext  # [N*F, 77, C] text tokens, or with ip_tokens projected (project_context)
    camera: Tensor  # [N*F, camera_dim]
    ip_tokens: Tensor | None  # [N*F, ip_dim, C] Resampler tokens, repeated per frame; None when context is projected
    ip_img: Tensor  # [N, 4, h, w] input-frame latents
    num_frames: int
    guided: bool

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``MultiViewUNet.forward`` besides ``x`` and ``timesteps``."""
        return dict(
            context=self.context, camera=self.camera, ip_tokens=self.ip_tokens, ip_img=self.ip_img,
            num_frames=self.num_frames,
        )


def build_conditioning(
    unet: MultiViewUNet,
    prompt_embeddings: Tensor,  # [2, 77, C] (negative, positive)
    clip_hidden: Tensor,  # [B, 257, ip_in_dim]
    ip_img: Tensor,  # [B, 4, h, w]
    camera: Tensor,  # [F, camera_dim] shared, or [B, F, camera_dim]
    guidance: bool = True,
) -> MVConditioning:
    """Lay out the UNet's conditioning once per image (the Resampler runs here, not at every step).

    With ``guidance`` the batch is [unconditional B*F ; conditional B*F]: the unconditional half gets the negative
    prompt, Resampler(zeros) tokens and zero input latents; both halves get the same cameras. Without it (training)
    only the conditional half is built. Gradients flow into the Resampler when enabled.
    """
    b = clip_hidden.shape[0]
    if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[0] != 2:
        got = tuple(prompt_embeddings.shape)
        raise ValueError(f"prompt_embeddings: expected [2, 77, C] (negative, positive), got {got}")
    if ip_img.shape[0] != b:
        raise ValueError(f"ip_img has {ip_img.shape[0]} samples, clip_hidden {b}")
    camera = camera.expand(b, *camera.shape[-2:]) if camera.ndim == 2 else camera  # [B, F, D]
    if camera.ndim != 3 or camera.shape[0] != b:
        raise ValueError(f"camera: expected [F, D] or [{b}, F, D], got {tuple(camera.shape)}")
    frames = camera.shape[1]
    if guidance:
        clip_hidden = torch.cat([torch.zeros_like(clip_hidden), clip_hidden])  # [2B, 257, ip_in_dim]
        ip_img = torch.cat([torch.zeros_like(ip_img), ip_img])  # [2B, 4, h, w]
        camera = torch.cat([camera, camera])  # [2B, F, D]
        text = prompt_embeddings.repeat_interleave(b * frames, dim=0)  # [2B*F, 77, C]
    else:
        text = prompt_embeddings[1:].expand(b * frames, -1, -1)  # [B*F, 77, C]
    tokens = unet.encode_image_prompt(clip_hidden).repeat_interleave(frames, dim=0)  # [N*F, ip_dim, C]
    return MVConditioning(text, camera.flatten(0, 1), tokens, ip_img, frames, guidance)


def cfg_batch(x: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
    """Noisy latents [B*F, 4, h, w] and timesteps [B*F] -> the guided batch [2B*F, ...] (the same for both halves)."""
    return torch.cat([x, x]), torch.cat([timesteps, timesteps])


def combine_cfg(eps: Tensor, scale: float) -> Tensor:
    """Guided noise eps_u + s (eps_c - eps_u) from the UNet output [2B*F, ...] laid out [uncond ; cond]."""
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + scale * (eps_cond - eps_uncond)
