"""Time the residual blocks' convolutions at the U-Nets' small levels two ways, in bfloat16 channels_last on CUDA:

- ``cudnn``: ``F.conv2d`` (cuDNN's implicit GEMM, what the blocks call above ``kernels.GEMM_CONV_MAX_PIXELS``);
- ``gemm``: ``kernels.gemm_conv``: the im2col columns (one Triton pass) times the weight matrix (cuBLAS).

At 10 frames of 4x4 a 1280-channel 3x3 conv has 160 output pixels: cuDNN's output tiles then number a few dozen
while it streams 29.5 MB of weights, so most of the GPU waits, where cuBLAS can split the long reduction. This table
is how ``GEMM_CONV_MAX_PIXELS`` was chosen: the pixel count (batch x H x W) up to which ``gemm`` wins. Microseconds
per call replayed from a CUDA graph, with the weights' GB/s (the floor at these sizes) and TFLOP/s.

    python bench/bench_conv.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _timing import time_us
from gen3diffusion.models.kernels import gemm_conv, triton_im2col

# (label, N, Ci, Co, H, W, kernel): the residual blocks' convolutions of the MV UNet (10 frames: 5 views, CFG) and the
# 3D U-Net (5 views) from their deepest level up, and one of the VAE decoder's (8 images) for scale
SHAPES = [
    ("MV UNet 4^2, 1280 -> 1280", 10, 1280, 1280, 4, 4, 3),
    ("MV UNet 4^2, 2560 -> 1280 (up, with skip)", 10, 2560, 1280, 4, 4, 3),
    ("MV UNet 4^2, 2560 -> 1280 shortcut", 10, 2560, 1280, 4, 4, 1),
    ("3D U-Net 8^2, 1024 -> 1024", 5, 1024, 1024, 8, 8, 3),
    ("3D U-Net 8^2, 2048 -> 1024 (up, with skip)", 5, 2048, 1024, 8, 8, 3),
    ("MV UNet 8^2, 1280 -> 1280", 10, 1280, 1280, 8, 8, 3),
    ("MV UNet 8^2, 2560 -> 1280 (up, with skip)", 10, 2560, 1280, 8, 8, 3),
    ("MV UNet 8^2, 640 -> 1280", 10, 640, 1280, 8, 8, 3),
    ("3D U-Net 16^2, 1024 -> 1024", 5, 1024, 1024, 16, 16, 3),
    ("MV UNet 16^2, 640 -> 640", 10, 640, 640, 16, 16, 3),
    ("MV UNet 16^2, 1280 -> 640 (up, with skip)", 10, 1280, 640, 16, 16, 3),
    ("3D U-Net 32^2, 512 -> 512", 5, 512, 512, 32, 32, 3),
    ("MV UNet 32^2, 320 -> 320", 10, 320, 320, 32, 32, 3),
    ("VAE decoder 32^2, 512 -> 512", 8, 512, 512, 32, 32, 3),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, bfloat16, channels_last; us per call (weights GB/s, TFLOP/s)\n")
    print("| convolution | N x Ci -> Co x H x W, k | pixels | cudnn | gemm | of which im2col | gemm / cudnn |")
    print("|---|---|---|---|---|---|---|")
    for label, n, ci, co, h, w, k in SHAPES:
        x = torch.randn(n, ci, h, w, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        weight = (torch.randn(co, ci, k, k, device="cuda", dtype=torch.bfloat16) / (ci * k * k) ** 0.5).to(
            memory_format=torch.channels_last)
        with torch.no_grad():
            cudnn = time_us(lambda: F.conv2d(x, weight, padding=k // 2), args.iters)
            gemm = time_us(lambda: gemm_conv(x, weight), args.iters)
            im2col = time_us(lambda: triton_im2col(x), args.iters) if k == 3 else 0.0
        weight_bytes, flops = weight.numel() * weight.element_size(), 2 * n * h * w * co * ci * k * k

        def cell(us: float) -> str:
            return f"{us:.1f} ({weight_bytes / us / 1e3:.0f}, {flops / us / 1e6:.0f})"

        print(f"| {label} | {n} x {ci} -> {co} x {h} x {w}, {k} | {n * h * w} | {cell(cudnn)} | {cell(gemm)} | "
              f"{im2col:.1f} | {gemm / cudnn:.2f} |", flush=True)


if __name__ == "__main__":
    main()
