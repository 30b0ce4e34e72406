"""Time full-size joint sampling (Algorithm 2) with random weights: seconds per object and peak GPU memory.

Builds the official-size models directly on the device (MV UNet 0.94 B, SD-2.1 VAE, CLIP ViT-H/14 vision tower,
the 3D-GS model 0.42 B; no text encoder: random prompt embeddings stand in for the cached ones), then runs the
pipeline for ``--steps`` DDIM steps with CFG and refinement, once to warm up and ``--iters`` times timed.

    python bench/bench_sample.py --dtype bf16 fp32 --batch-sizes 1 --json bench_sample.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from gen3diffusion.config import SamplerConfig
from gen3diffusion.pipeline import Gen3DiffusionPipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the CLIP ViT-H/14 vision tower of the ImageDream port (image_encoder/config.json)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-refine", action="store_true")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def build_pipeline(dtype: torch.dtype, device: torch.device) -> Gen3DiffusionPipeline:
    """Official-size models with random weights, created directly on ``device`` in ``dtype``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from gen3diffusion.models.conditioning import SD21_VAE_CONFIG
    from gen3diffusion.models.gaussian_unet import GaussianDiffusionModel
    from gen3diffusion.models.mv_unet import MultiViewUNet

    torch.manual_seed(0)
    with device:
        mv_unet = MultiViewUNet().to(dtype).eval()
        model_3d = GaussianDiffusionModel().to(dtype).eval()
        vae = AutoencoderKL(**SD21_VAE_CONFIG).to(dtype).eval()
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).to(dtype).eval()
        prompts = torch.randn(2, 77, 1024, dtype=dtype)
    pipe = Gen3DiffusionPipeline(mv_unet, vae, image_encoder, model_3d, prompts)
    pipe.progress = False
    return pipe


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sample.py needs a CUDA device")
    device = torch.device("cuda")
    rows = []
    for name in args.dtype:
        pipe = build_pipeline(DTYPES[name], device)
        weights_gib = torch.cuda.memory_allocated() / 2**30
        cfg = SamplerConfig(num_steps=args.steps, refine=not args.no_refine)
        for b in args.batch_sizes:
            images = torch.rand(b, 3, pipe.image_size, pipe.image_size, device=device)
            pipe(images, seed=0, sampler_cfg=cfg)  # warm-up (kernels, gsplat JIT, allocator)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                pipe(images, seed=0, sampler_cfg=cfg)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row = dict(dtype=name, batch=b, steps=args.steps, refine=not args.no_refine,
                       s_per_object=statistics.median(times) / b, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                       weights_gib=weights_gib, device=torch.cuda.get_device_name())
            rows.append(row)
            print(f"| {name} | {b} | {args.steps} | {row['refine']} | {row['s_per_object']:.2f} s | "
                  f"{row['peak_gib']:.1f} GiB | {weights_gib:.1f} GiB |", flush=True)
        del pipe
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
