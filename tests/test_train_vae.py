"""The small-VAE trainer: its loss falls on procedural views, and it saves a loadable VAE whose scaling factor makes
the latents unit-variance."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from gen3diffusion.config import load_config
from gen3diffusion.models.conditioning import load_vae, vae_encode
from gen3diffusion.training.vae import VAETrainConfig, train_vae


def test_train_vae_learns_and_saves(tmp_path, caplog):
    cfg = load_config(VAETrainConfig, overrides=[
        f"output_dir={tmp_path}", "device=cpu", "steps=40", "batch_size=10", "lr=2e-3", "log_every=10",
        "vae.block_out_channels=[8,8]", "vae.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
        "vae.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]", "vae.norm_num_groups=4", "vae.sample_size=16",
        "data.image_size=16", "data.sup_size=8", "data.num_sup_views=1", "data.num_objects=8",
    ])
    with caplog.at_level("INFO"):
        folder = train_vae(cfg)
    psnrs = [float(r.getMessage().rsplit("psnr", 1)[1].split()[0]) for r in caplog.records if "vae step" in r.getMessage()]
    assert psnrs[-1] > psnrs[0] + 3  # reconstruction improves by several dB in 40 steps
    vae = load_vae(folder.parent)
    scale = json.loads((folder / "config.json").read_text())["scaling_factor"]
    assert scale == vae.config.scaling_factor and scale != 0.18215
    from gen3diffusion.data import make_dataset

    views = torch.stack([make_dataset(OmegaConf.structured(cfg.data))[i]["target_images"] for i in range(2)])
    with torch.no_grad():
        z = vae_encode(vae, views.flatten(0, 1) * 2 - 1, sample=False)
    assert 0.5 < float(z.std()) < 2.0  # measured on training batches, so about unit variance here too
    assert not list(tmp_path.glob(".vae.tmp"))
