"""First command to run after installing: render a small analytic scene and check that the picture makes sense.

    python -m gen3diffusion.selfcheck [--output selfcheck.png] [--backend auto|gsplat|torch] [--size 128]

The scene is a grey ball of Gaussians with three coloured markers on the world axes (+x red, +y green, +z blue),
seen from 4 orbit views (elevation 0, azimuth 0/90/180/270, radius 1.5). It writes a PNG grid (colour on top,
depth below), logs the backend and the time, and exits with status 1 if the render is clearly wrong: nothing
drawn, depths off the object, or the axes not where the cameras say (world +x right and +y up in the front view).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen3diffusion.cameras import Cameras, orbit_camera
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.render import RenderOutput, rasterize

logger = logging.getLogger("gen3diffusion.selfcheck")

RADIUS = 1.5
BALL_RADIUS = 0.3
MARKER_OFFSET = 0.45
AZIMUTHS = (0.0, 90.0, 180.0, 270.0)


def build_scene(num_ball: int = 800) -> Gaussians:
    """A grey ball (Fibonacci sphere of flat-ish Gaussians) and a marker ball on +x (red), +y (green), +z (blue)."""
    k = torch.arange(num_ball, dtype=torch.float64) + 0.5
    polar = torch.acos(1 - 2 * k / num_ball)
    azimuth = math.pi * (1 + 5**0.5) * k
    normals = torch.stack([polar.sin() * azimuth.cos(), polar.cos(), polar.sin() * azimuth.sin()], dim=-1)
    axes = torch.eye(3, dtype=torch.float64)
    means = torch.cat([BALL_RADIUS * normals, MARKER_OFFSET * axes])
    colors = torch.cat([torch.full((num_ball, 3), 0.7, dtype=torch.float64), axes])
    scales = torch.cat([torch.full((num_ball, 3), 0.03), torch.full((3, 3), 0.04)]).double()
    n = means.shape[0]
    return Gaussians(
        means=means[None].float(),
        scales=scales[None].float(),
        rotations=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, n, 4).clone(),
        opacities=torch.full((1, n), 0.95),
        colors=colors[None].float(),
    )


def build_cameras(size: int) -> Cameras:
    az = torch.tensor(AZIMUTHS)
    return Cameras.from_fovy(orbit_camera(torch.zeros_like(az), az, RADIUS), 49.1, size)


def run_checks(out: RenderOutput) -> list[str]:
    """Reasons the render of ``build_scene`` from ``build_cameras`` is wrong (empty when it looks right)."""
    problems = []
    alpha, depth, rgb = out.alpha[0, :, 0], out.depth[0, :, 0], out.rgb[0]  # [V, H, W], [V, H, W], [V, 3, H, W]
    if not torch.isfinite(rgb).all() or not torch.isfinite(depth).all():
        return ["the render has NaN or infinite values"]
    for v, az in enumerate(AZIMUTHS):
        coverage = float((alpha[v] > 0.5).float().mean())
        if not 0.05 <= coverage <= 0.6:
            problems.append(f"view az={az:g}: {coverage:.1%} of the pixels covered, expected 5-60%")
    covered = alpha > 0.5
    if covered.any():
        d = depth[covered]
        near, far = RADIUS - MARKER_OFFSET - 0.1, RADIUS + BALL_RADIUS
        if float(d.min()) < near or float(d.max()) > far:
            span = f"[{float(d.min()):.3f}, {float(d.max()):.3f}]"
            problems.append(f"depths span {span}, expected within [{near}, {far}]")
    size = rgb.shape[-1]
    for channel, name, axis in ((0, "red +x marker", 0), (1, "green +y marker", 1)):
        others = [c for c in range(3) if c != channel]
        mask = (rgb[0, channel] > 0.6) & (rgb[0, others].max(0).values < 0.35)  # front view (azimuth 0)
        if mask.sum() < 4:
            problems.append(f"front view: the {name} is not visible")
            continue
        rows, cols = torch.nonzero(mask, as_tuple=True)
        if axis == 0:
            offset = float(cols.float().mean() + 0.5 - size / 2)  # to the right of the centre
        else:
            offset = float(size / 2 - rows.float().mean() - 0.5)  # above the centre (rows grow downwards)
        if offset < 0.1 * size:
            problems.append(f"front view: the {name} is not {'right of' if axis == 0 else 'above'} the centre")
    return problems


def save_grid(out: RenderOutput, path: Path) -> None:
    """PNG with the colour views on top and the depth views (near = bright) below."""
    rgb = out.rgb[0].clamp(0, 1)  # [V, 3, H, W]
    alpha, depth = out.alpha[0, :, 0], out.depth[0, :, 0]
    covered = alpha > 0.05
    near, far = (float(depth[covered].min()), float(depth[covered].max())) if covered.any() else (0.0, 1.0)
    shade = torch.where(covered, 1 - 0.8 * (depth - near) / max(far - near, 1e-6), torch.zeros_like(depth))
    top = torch.cat(list(rgb), dim=-1)  # [3, H, V * W]
    bottom = torch.cat(list(shade), dim=-1).expand_as(top)
    grid = torch.cat([top, bottom], dim=-2).permute(1, 2, 0)
    Image.fromarray((grid.detach().cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a small analytic scene and check it.")
    parser.add_argument("--output", type=Path, default=Path("selfcheck.png"), help="PNG grid to write")
    parser.add_argument("--backend", choices=["auto", "gsplat", "torch"], default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(args.device)
    backend = args.backend if args.backend != "auto" else ("gsplat" if device.type == "cuda" else "torch")
    gaussians, cameras = build_scene().to(device), build_cameras(args.size).to(device)
    start = time.perf_counter()
    try:
        out = rasterize(gaussians, cameras, background=(1.0, 1.0, 1.0), backend=backend)
    except (ImportError, ValueError) as err:
        logger.error("selfcheck: the %s backend failed: %s", backend, err)
        return 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_grid(out, args.output)
    logger.info(
        "selfcheck: %d Gaussians, %d views of %dx%d, backend %s on %s: %.2f s; wrote %s",
        gaussians.num_gaussians, len(AZIMUTHS), args.size, args.size, backend, device, seconds, args.output,
    )
    problems = run_checks(out)
    for problem in problems:
        logger.error("selfcheck FAILED: %s", problem)
    if not problems:
        logger.info("selfcheck passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
