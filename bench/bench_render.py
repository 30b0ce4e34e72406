"""Renderer speed: 65,536 random Gaussians (the size of one Gen-3Diffusion output) into 4 orbit views.

    python bench/bench_render.py --device cuda            # gsplat, 512x512, forward and forward+backward
    python bench/bench_render.py --device cpu             # torch backend, 256x256
    python bench/bench_render.py --device cuda --backend torch
    python bench/bench_render.py --device cuda --scales 0.054 0.099 --tile-size 16   # the random 3D model's splats

Prints one Markdown table row per run (median over ``--repeats`` timed runs after ``--warmup`` untimed ones) for
docs/benchmarks.md. The scene: means uniform in [-0.5, 0.5]^3, scales uniform in ``--scales`` (default 0.005-0.03,
the size of trained splats), random rotations, opacities and colours, cameras at radius 1.5, fovy 49.1, white
background. ``--tile-size`` sets gsplat's tile side (``RenderConfig.tile_size``; the torch backend's tiles are fixed
at 16) and ``--tile-binning`` how it lists the splats per tile (``RenderConfig.tile_binning``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from gen3diffusion.cameras import Cameras, orbit_camera
from gen3diffusion.config import RenderConfig
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.render import rasterize
from gen3diffusion.render._torch import TILE as TORCH_TILE


def random_scene(n: int, device: torch.device, scales: tuple[float, float] = (0.005, 0.03), seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = scales
    g = Gaussians(
        means=torch.rand(1, n, 3, generator=gen) - 0.5,
        scales=lo + (hi - lo) * torch.rand(1, n, 3, generator=gen),
        rotations=torch.nn.functional.normalize(torch.randn(1, n, 4, generator=gen), dim=-1),
        opacities=torch.rand(1, n, generator=gen),
        colors=torch.rand(1, n, 3, generator=gen),
    )
    return g.to(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["auto", "gsplat", "torch"], default="auto")
    parser.add_argument("--num-gaussians", type=int, default=65536)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="image side; default 512 on cuda, 256 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on cuda, 1 on cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default 20 on cuda, 3 on cpu")
    parser.add_argument("--scales", type=float, nargs=2, default=[0.005, 0.03], metavar=("LO", "HI"),
                        help="splat scales are uniform in [LO, HI] (the random full-size 3D model's: 0.054 0.099)")
    parser.add_argument("--tile-size", type=int, default=RenderConfig.tile_size, help="gsplat's tile side")
    parser.add_argument("--tile-binning", choices=["sort", "dense"], default=RenderConfig.tile_binning,
                        help="gsplat's tile binning (RenderConfig.tile_binning)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (512 if cuda else 256)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    repeats = args.repeats or (20 if cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend if args.backend != "auto" else ("gsplat" if cuda else "torch")

    if not 0 < args.scales[0] <= args.scales[1]:
        parser.error(f"--scales needs 0 < LO <= HI, got {args.scales}")
    g = random_scene(args.num_gaussians, device, tuple(args.scales))
    params = [g.means, g.scales, g.rotations, g.opacities, g.colors]
    azimuths = torch.arange(args.views, dtype=torch.float32) * (360.0 / args.views)
    cams = Cameras.from_fovy(orbit_camera(torch.zeros(args.views), azimuths, 1.5), 49.1, size).to(device)
    cfg = RenderConfig(backend=backend, tile_size=args.tile_size, tile_binning=args.tile_binning)

    def forward() -> None:
        with torch.no_grad():
            rasterize(g, cams, cfg=cfg)

    def forward_backward() -> None:
        for p in params:
            p.requires_grad_(True)
        out = rasterize(g, cams, cfg=cfg)
        loss = out.rgb.mean() + out.alpha.mean() + out.depth.mean() + out.distortion.mean()
        torch.autograd.grad(loss, params)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fwd = timed(forward, device, warmup, repeats)
    fwd_bwd = timed(forward_backward, device, warmup, repeats)
    if cuda:
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU peak"
        name = torch.cuda.get_device_name(device)
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS peak"
        name = f"CPU, {torch.get_num_threads()} threads"
    tiles = args.tile_size if backend == "gsplat" else TORCH_TILE
    print("| device | backend | tile | binning | Gaussians | scales | views | size | forward (ms) "
          "| forward+backward (ms) | memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    scales = f"{args.scales[0]:g}-{args.scales[1]:g}"
    binning = args.tile_binning if backend == "gsplat" else "-"
    print(f"| {name} | {backend} | {tiles} | {binning} | {args.num_gaussians:,} | {scales} | {args.views} "
          f"| {size}x{size} | {fwd:.1f} | {fwd_bwd:.1f} | {memory} |")


if __name__ == "__main__":
    main()
