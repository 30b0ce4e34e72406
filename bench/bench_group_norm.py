"""Time GroupNorm + SiLU at the activation shapes of one sampling step, three ways, in bfloat16 on CUDA:

- ``nchw``: ``F.group_norm`` then ``F.silu`` on NCHW tensors (the layout without channels_last);
- ``nhwc-torch``: the same ops on channels_last tensors (PyTorch converts to NCHW and back inside);
- ``nhwc-fused``: this project's Triton kernels (``gen3diffusion.models.kernels``).

For each it prints microseconds per call (CUDA graphs, so launch overhead does not count) and the effective
bandwidth of one read and one write of the activation. ``--sweep`` instead times the fused kernel (with a per-sample
shift, as the blocks call it) under every combination of its launch constants and prints the best eight, which is
how the constants at the top of ``models/kernels.py`` were chosen.

    python bench/bench_group_norm.py
    python bench/bench_group_norm.py --sweep
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from _timing import time_us
from gen3diffusion.models import kernels
from gen3diffusion.models.kernels import triton_group_norm

# (label, N, C, H, W): the largest activations of the VAE decoder (8 images), the 3D U-Net (5 views) and the MV UNet
SHAPES = [
    ("VAE decoder 256^2 x 128", 8, 128, 256, 256),
    ("VAE decoder 128^2 x 256", 8, 256, 128, 128),
    ("VAE decoder 64^2 x 512", 8, 512, 64, 64),
    ("VAE encoder 256^2 x 128", 4, 128, 256, 256),
    ("3D U-Net 256^2 x 64", 5, 64, 256, 256),
    ("3D U-Net 128^2 x 128", 5, 128, 128, 128),
    ("MV UNet 32^2 x 320", 10, 320, 32, 32),
    ("MV UNet 8^2 x 1280", 10, 1280, 8, 8),
]


# kernels.py's launch constants and the values --sweep tries
SWEEP = {"_STATS_BLOCK_R": (32, 64, 128), "_STATS_WARPS": (4, 8), "_TARGET_PROGRAMS": (512, 1024, 2048, 4096),
         "_NORM_BLOCK_R": (32, 64, 128), "_NORM_WARPS": (4, 8)}


def sweep(iters: int) -> None:
    """Total microseconds over SHAPES of the fused kernel for every combination of SWEEP; the best eight."""
    inputs = []
    for _, n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        inputs.append((x, *(torch.randn(*shape, device="cuda", dtype=x.dtype) for shape in ((c,), (c,), (n, c)))))
    current = {name: getattr(kernels, name) for name in SWEEP}
    results = []
    for values in itertools.product(*SWEEP.values()):
        for name, value in zip(SWEEP, values):
            setattr(kernels, name, value)
        times = [time_us(lambda: triton_group_norm(x, 32, w, b, 1e-6, True, s), iters) for x, w, b, s in inputs]
        results.append((sum(times), dict(zip(SWEEP, values)), times))
    for name, value in current.items():
        setattr(kernels, name, value)
    results.sort(key=lambda r: r[0])
    print("total us | " + " | ".join(SWEEP) + " | per shape")
    for total, values, times in [r for r in results if r[1] == current] + results[:8]:
        mark = " (current)" if values == current else ""
        print(f"{total:.0f}{mark} | " + " | ".join(str(v) for v in values.values()) + " | " +
              " ".join(f"{t:.0f}" for t in times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="time every combination of the kernels' launch constants")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_group_norm.py needs a CUDA device")
    if args.sweep:
        return sweep(max(1, args.iters // 2))
    print(f"{torch.cuda.get_device_name()}, bfloat16, 32 groups, GroupNorm + SiLU, us per call (GB/s of 1 read + 1 "
          "write)\n")
    print("| activation | N x C x H x W | nchw | nhwc-torch | nhwc-fused |")
    print("|---|---|---|---|---|")
    for label, n, c, h, w in SHAPES:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
        x_cl = x.to(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, device="cuda", dtype=x.dtype), torch.randn(c, device="cuda", dtype=x.dtype)
        runs = {
            "nchw": lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-6)),
            "nhwc-torch": lambda: F.silu(F.group_norm(x_cl, 32, weight, bias, 1e-6)),
            "nhwc-fused": lambda: triton_group_norm(x_cl, 32, weight, bias, 1e-6, silu=True),
        }
        cells = []
        for fn in runs.values():
            us = time_us(fn, args.iters)
            cells.append(f"{us:.0f} ({2 * x.numel() * x.element_size() / us / 1e3:.0f})")
        print(f"| {label} | {n}x{c}x{h}x{w} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
