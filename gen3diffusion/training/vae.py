"""Train a small VAE (diffusers AutoencoderKL) on multi-view renders, for models that cannot use SD's.

Gen-3Diffusion keeps the SD-2.1 VAE frozen. A small demo model trained from scratch needs a VAE of its own size; this
trains one with the usual objective: L1 + MSE reconstruction of images in [-1, 1] plus a small KL term, so the
latent posterior stays close to N(0, I) and ``scaling_factor`` (set from the latents' measured std at the end) makes
them unit-variance for the diffusion model.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..config import to_dict
from ..data import DataConfig, make_dataset

logger = logging.getLogger(__name__)


@dataclass
class VAETrainConfig:
    """``scripts/train_vae.py``: the VAE's architecture, its data and the optimisation."""

    output_dir: str = "runs/vae"
    seed: int = 0
    device: str = "auto"
    # AutoencoderKL arguments
    vae: dict[str, Any] = field(default_factory=lambda: dict(
        block_out_channels=[32, 64, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=1, norm_num_groups=16, latent_channels=4,
        sample_size=64,
    ))
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 2000
    # images per step (each dataset sample gives its input view and its 4 target views)
    batch_size: int = 32
    lr: float = 4e-4
    # weight of KL(q(z|x) || N(0, I)), per latent element relative to the per-pixel reconstruction terms
    kl_weight: float = 1e-6
    log_every: int = 100
    num_workers: int = 0


def vae_loss(vae: torch.nn.Module, images: torch.Tensor, generator: torch.Generator, kl_weight: float) -> dict:
    """images [N, 3, H, W] in [-1, 1] -> named losses of one reconstruction through a posterior sample."""
    dist = vae.encode(images).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator, device=generator.device).to(dist.mean)
    recon = vae.decode(z).sample
    l1, mse = F.l1_loss(recon, images), F.mse_loss(recon, images)
    kl = dist.kl().mean() / dist.mean[0].numel()
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "mse": mse, "kl": kl}


def _images(sample_batch: dict) -> torch.Tensor:
    """The input and target views of a batch of samples, as [N, 3, H, W] in [-1, 1]."""
    views = torch.cat([sample_batch["input_image"][:, None], sample_batch["target_images"]], dim=1)
    return views.flatten(0, 1) * 2 - 1


def train_vae(cfg: VAETrainConfig | DictConfig) -> Path:
    """Train and save the VAE (``save_pretrained`` into ``<output_dir>/vae``, written to a temporary folder and
    renamed). Returns the saved folder."""
    from diffusers import AutoencoderKL

    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(cfg.vae).items()}).to(device)
    per_sample = 5  # input view + 4 targets
    loader = torch.utils.data.DataLoader(
        make_dataset(cfg.data), batch_size=max(1, cfg.batch_size // per_sample), shuffle=True,
        num_workers=cfg.num_workers, drop_last=True, generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    step, stds = 0, []
    bar = tqdm(total=cfg.steps, desc="vae")
    epoch = 0
    while step < cfg.steps:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for batch in loader:
            images = _images(batch).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses = vae_loss(vae, images, generator, cfg.kl_weight)
            if not torch.isfinite(losses["loss"]):
                raise FloatingPointError(f"vae step {step}: non-finite loss {losses['loss'].item()}")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                psnr = -10 * torch.log10(losses["mse"].detach().float() / 4)  # images span 2
                bar.set_postfix(loss=f"{losses['loss'].item():.4f}", psnr=f"{psnr.item():.1f}")
                logger.info("vae step %d: loss %.4f, psnr %.2f dB", step, losses["loss"].item(), psnr.item())
            if step > cfg.steps - 20:  # the latent scale is measured on the last batches
                with torch.no_grad():
                    stds.append(vae.encode(images).latent_dist.mean.float().std().item())
            if step >= cfg.steps:
                break
        epoch += 1
    bar.close()
    vae.register_to_config(scaling_factor=1.0 / (sum(stds) / len(stds)))
    out = Path(cfg.output_dir) / "vae"
    tmp = out.with_name(".vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.to(torch.float32).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("saved %s (scaling_factor %.4f)", out, vae.config.scaling_factor)
    return out
