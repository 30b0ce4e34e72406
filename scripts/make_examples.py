"""Write examples/: input views of procedural objects the demo model never saw (object set seed 1; it trained on
seed 0), as RGBA PNGs at 256 px, seen from the input camera of the training data (radius 1.5, elevation 0); and
photo_coffee.png, a real photograph (scikit-image's ``coffee``: CC0, by Rachel Michetti) cropped to the cup, to show
the demo model's domain limit.

    python scripts/make_examples.py [--output examples] [--indices 0 1 2 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen3diffusion.cameras import Cameras, target_cameras
from gen3diffusion.data.synthetic import make_object, render_object

HELD_OUT_SEED = 1  # configs/demo_train.yaml trains on data.seed 0


def render_example(index: int, size: int = 256, seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, torch.Tensor]:
    """RGBA uint8 [size, size, 4] of the input view, and the 4 target views [4, 3, size, size] (the ground truth)."""
    obj = make_object(index, seed)
    cams = Cameras.from_fovy(target_cameras(), 49.1, size, size)  # view 0 is the input view
    out = render_object(obj, cams, supersample=2)
    rgba = torch.cat([out.rgb[0], out.mask[0]]).permute(1, 2, 0)
    # un-composite the white background so the PNG's alpha carries the silhouette
    rgb = ((rgba[..., :3] - (1 - rgba[..., 3:])) / rgba[..., 3:].clamp(min=1e-6)).clamp(0, 1)
    rgba = torch.cat([rgb, rgba[..., 3:]], dim=-1)
    return (rgba.numpy() * 255 + 0.5).astype(np.uint8), out.rgb


def photo_example(size: int = 256) -> Image.Image:
    """scikit-image's ``coffee`` photo (400 x 600, CC0) cropped to a square around the cup, RGB, ``size`` px."""
    from skimage import data

    return Image.fromarray(data.coffee()[:, 60:460]).resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=Path("examples"))
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3])
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    for i in args.indices:
        rgba, _ = render_example(i)
        Image.fromarray(rgba, "RGBA").save(args.output / f"synthetic_{i}.png")
        print(args.output / f"synthetic_{i}.png")
    photo_example().save(args.output / "photo_coffee.png")
    print(args.output / "photo_coffee.png")


if __name__ == "__main__":
    main()
