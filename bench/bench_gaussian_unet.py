"""Time a training step of the full-size 3D-GS model on CUDA: forward + backward under bf16 autocast (random weights).

One call runs ``GaussianDiffusionModel`` on B objects (V target views plus the context view, 12 x 256 x 256 each),
activates the Gaussians, and backpropagates a scalar made of every Gaussian attribute, so every parameter gets a
gradient (no renderer, no LPIPS: this isolates the network). Reports the median milliseconds per step (CUDA events)
and the peak GPU memory per batch size, optionally with gradient checkpointing, and the forward alone under
``torch.inference_mode`` (the sampler's use).

    python bench/bench_gaussian_unet.py --batch-sizes 1 4 --json bench_gaussian_unet.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _timing import time_calls

from gen3diffusion.cameras import Cameras, plucker_rays, target_cameras
from gen3diffusion.config import GaussianUNetConfig, to_dict
from gen3diffusion.models.gaussian_unet import GaussianDiffusionModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--views", type=int, default=4, help="target views (the context view is added)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (weights stay fp32)")
    parser.add_argument("--checkpointing", action="store_true", help="also time with gradient checkpointing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def make_inputs(batch: int, views: int, size: int) -> dict[str, torch.Tensor]:
    """Random images in [0, 1], the target cameras' Plücker rays and random timesteps, on CUDA."""
    cams = Cameras.from_fovy(target_cameras(num_views=views, device="cuda"), 49.1, size)
    return {
        "x0_hat": torch.rand(batch, views, 3, size, size, device="cuda"),
        "x_t": torch.rand(batch, views, 3, size, size, device="cuda"),
        "rays": plucker_rays(cams).expand(batch, -1, -1, -1, -1).contiguous(),
        "t": torch.randint(1, 1000, (batch,), device="cuda"),
        "context": torch.rand(batch, 3, size, size, device="cuda"),
    }




def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gaussian_unet.py needs a CUDA device")
    with torch.device("cuda"):
        model = GaussianDiffusionModel(**to_dict(GaussianUNetConfig()))
    dtype = DTYPES[args.dtype]
    size = model.config.input_size
    results = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "autocast": args.dtype,
        "views": f"{args.views} targets + 1 context at {size}x{size}", "splat_size": model.splat_size,
        "weights_gib": torch.cuda.memory_allocated() / 2**30, "runs": {},
    }

    def train_step(inputs: dict[str, torch.Tensor]) -> None:
        with torch.autocast("cuda", dtype=dtype):
            gs = model(**inputs)
        loss = gs.means.mean() + gs.scales.mean() + gs.rotations.mean() + gs.opacities.mean() + gs.colors.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward_only(inputs: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            model(**inputs)

    for batch in args.batch_sizes:
        inputs = make_inputs(batch, args.views, size)
        results["runs"][f"B={batch} forward"] = time_calls(lambda: forward_only(inputs), args.warmup, args.iters)
        for checkpointing in [False, True] if args.checkpointing else [False]:
            if checkpointing:
                model.enable_gradient_checkpointing()
            else:
                model.disable_gradient_checkpointing()
            name = f"B={batch} fwd+bwd" + (" ckpt" if checkpointing else "")
            try:
                results["runs"][name] = time_calls(lambda: train_step(inputs), args.warmup, args.iters)
            except torch.OutOfMemoryError:
                results["runs"][name] = {"error": "out of memory"}
            torch.cuda.empty_cache()

    for name, r in results["runs"].items():
        if "error" in r:
            print(f"{name:24s} {r['error']}")
        else:
            print(f"{name:24s} {r['ms_median']:8.1f} ms (min {r['ms_min']:.1f}), peak {r['peak_gib']:.2f} GiB")
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
