"""The model and sampling options that scripts/sample.py and scripts/eval_gso.py share, and the pipeline they set up
from them (weights, precision, cuDNN autotuning, optional compilation, the sampler settings)."""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from .config import SamplerConfig
from .pipeline import DEFAULT_WEIGHTS, Gen3DiffusionPipeline

__all__ = ["add_model_arguments", "load_pipeline", "sampler_config"]


def add_model_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--weights --base --device --dtype --steps --guidance-scale --no-refine --render-size --cuda-graphs --compile."""
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                        help="weights: a local folder (this project's layout or the authors' release) or a hub id")
    parser.add_argument("--base", default=None,
                        help="ImageDream diffusers folder or hub id, for the authors' release when it is not in --weights")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="network precision (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=SamplerConfig.num_steps, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=SamplerConfig.guidance_scale)
    parser.add_argument("--no-refine", action="store_true",
                        help="plain multi-view sampling, then the 3D model once (the paper's ablation)")
    parser.add_argument("--render-size", type=int, default=None,
                        help="refinement render size (default: twice the image size, the authors' 512 at 256)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=SamplerConfig.cuda_graphs,
                        help="replay each step's fixed-shape parts as CUDA graphs (CUDA only; same numbers, faster)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks: minutes of compiling first, and slower than the "
                             "default's fused kernels on an H100 (docs/benchmarks.md)")


def load_pipeline(args: argparse.Namespace) -> Gen3DiffusionPipeline:
    """The pipeline of ``--weights`` on ``--device`` in ``--dtype``; on CUDA cuDNN times its kernels once per shape
    (as bench/bench_sample.py measures), and ``--compile`` compiles the networks."""
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    pipe = Gen3DiffusionPipeline.from_pretrained(args.weights, base=args.base, device=args.device, dtype=dtype)
    if pipe.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.compile:
        pipe.compile()
    return pipe


def sampler_config(args: argparse.Namespace, pipe: Gen3DiffusionPipeline, **extra) -> SamplerConfig:
    """The SamplerConfig of the options (``extra``: further fields, e.g. ``eta``)."""
    return OmegaConf.structured(SamplerConfig(
        num_steps=args.steps, guidance_scale=args.guidance_scale, refine=not args.no_refine,
        render_size=args.render_size or 2 * pipe.image_size, cuda_graphs=args.cuda_graphs, **extra,
    ))
