"""Time the full-size multi-view UNet with classifier-free guidance on CUDA (random weights).

One call is the guided batch of one object: 2 x 5 frames of 4 x 32 x 32 latents, 77 text + 16 image-prompt tokens
(the image-prompt tokens are made once, outside the timed call, as the sampler does). Reports the median
milliseconds per call (CUDA events) and the peak GPU memory, eager and, with ``--compile MODE ...``, under
``torch.compile`` (compile time reported separately).

    python bench/bench_mv_unet.py --dtype bf16 --compile default reduce-overhead --json bench_mv_unet.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _timing import time_calls

from gen3diffusion.config import MVUNetConfig, to_dict
from gen3diffusion.models.mv_unet import MultiViewUNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--objects", type=int, default=1, help="objects per call (the guided batch is 2x this)")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                        help="torch.compile modes to time after eager (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (fp32 runs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def make_inputs(model: MultiViewUNet, objects: int, frames: int, size: int) -> dict:
    """Random guided-batch inputs on the model's device and dtype, [uncond ; cond] like the sampler's."""
    cfg, dev, dtype = model.config, model.device, model.compute_dtype
    samples = 2 * objects
    n = samples * frames
    with torch.no_grad():
        clip_hidden = torch.randn(samples, 257, cfg.ip_in_dim, device=dev, dtype=dtype)
        ip_tokens = model.encode_image_prompt(clip_hidden).repeat_interleave(frames, dim=0)
    return dict(
        x=torch.randn(n, cfg.in_channels, size, size, device=dev, dtype=dtype),
        timesteps=torch.full((n,), 981, device=dev),
        context=torch.randn(n, 77, cfg.context_dim, device=dev, dtype=dtype),
        camera=torch.randn(n, cfg.camera_dim, device=dev, dtype=dtype),
        ip_tokens=ip_tokens,
        ip_img=torch.randn(samples, cfg.in_channels, size, size, device=dev, dtype=dtype),
        num_frames=frames,
    )




def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mv_unet.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    with torch.device("cuda"):
        model = MultiViewUNet(**to_dict(MVUNetConfig())).to(DTYPES[args.dtype]).eval()
    inputs = make_inputs(model, args.objects, args.frames, args.latent_size)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "batch": f"2 x {args.objects} x {args.frames} frames at {args.latent_size}x{args.latent_size}",
        "weights_and_inputs_gib": weights_gib,
        "modes": {},
    }

    with torch.inference_mode():
        results["modes"]["eager"] = time_calls(lambda: model(**inputs), args.warmup, args.iters)
        for mode in args.compile:
            torch.compiler.reset()
            compiled = torch.compile(model, mode=mode)
            start = time.perf_counter()
            compiled(**inputs)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            results["modes"][f"compile:{mode}"] = {
                **time_calls(lambda: compiled(**inputs), args.warmup, args.iters),
                "compile_s": compile_s,
            }

    for name, r in results["modes"].items():
        extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
        print(f"{name:28s} {r['ms_median']:7.2f} ms/call (min {r['ms_min']:.2f}), peak {r['peak_gib']:.2f} GiB{extra}")
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
