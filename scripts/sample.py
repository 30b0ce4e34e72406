"""Image(s) -> 3D Gaussians (.ply), the generated views (PNG), a turntable video (.mp4) and a mesh (.ply/.glb).

    python scripts/sample.py --image photo.png
    python scripts/sample.py --image "inputs/*.png" --weights path/or/hub-id --task avatars --batch-size 4

One output folder per input image (named after it). A bad input is reported in one line and skipped; the other
images still finish. The exit status is non-zero when any image failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from gen3diffusion.cli import add_model_arguments, load_pipeline, sampler_config
from gen3diffusion.config import SamplerConfig
from gen3diffusion.mesh import MeshConfig
from gen3diffusion.pipeline import BORDER_RATIO
from gen3diffusion.preprocess import ImageError, list_images, load_image, preprocess_image
from gen3diffusion.outputs import require_video_writer, save_result

logger = logging.getLogger("sample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", required=True, help="an image file, a folder of images, or a glob pattern (quote it)")
    p.add_argument("--output", default="outputs", help="output folder; one subfolder per input image")
    add_model_arguments(p)
    p.add_argument("--task", choices=sorted(BORDER_RATIO), default="objects",
                   help="sets the input recentring border ratio (objects 0.45, avatars 0.227)")
    p.add_argument("--border-ratio", type=float, default=None, help="override the task's border ratio")
    p.add_argument("--no-recenter", action="store_true",
                   help="keep the input's framing (for renders already framed like the training data)")
    p.add_argument("--eta", type=float, default=SamplerConfig.eta, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="every image is sampled with this seed")
    p.add_argument("--mesh", action=argparse.BooleanOptionalAction, default=True, help="extract a TSDF mesh")
    p.add_argument("--video", action=argparse.BooleanOptionalAction, default=True, help="write a turntable video")
    p.add_argument("--video-frames", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=1, help="images sampled together")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    paths = list_images(args.image)
    if not paths:
        logger.error("%s: no images found", args.image)
        return 2
    if args.video:
        try:
            require_video_writer()  # before the long work, not after it
        except RuntimeError as err:
            logger.error("%s", err)
            return 2
    try:
        pipe = load_pipeline(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        logger.error("could not load weights: %s", err)
        return 2
    pipe.progress = not args.quiet
    size = pipe.image_size
    sampler_cfg = sampler_config(args, pipe, eta=args.eta)
    border = args.border_ratio if args.border_ratio is not None else BORDER_RATIO[args.task]
    failures = 0

    # 1. load and preprocess every image first, so bad inputs are reported before the long work
    inputs: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            inputs.append((path, preprocess_image(load_image(path), border, size, not args.no_recenter, name=str(path))))
        except ImageError as err:
            logger.error("%s", err)
            failures += 1

    # 2. sample in batches and write one folder per image
    out_root = Path(args.output)
    names = output_names([p for p, _ in inputs])
    bar = tqdm(total=len(inputs), desc="images", unit="img", disable=args.quiet)
    for i in range(0, len(inputs), args.batch_size):
        batch = inputs[i:i + args.batch_size]
        start = time.perf_counter()
        try:
            result = pipe(torch.stack([x for _, x in batch]), seed=args.seed, sampler_cfg=sampler_cfg)
        except (RuntimeError, ValueError) as err:
            logger.error("%s: sampling failed: %s", ", ".join(str(p) for p, _ in batch), err)
            failures += len(batch)
            bar.update(len(batch))
            continue
        seconds = (time.perf_counter() - start) / len(batch)
        for b, (path, _) in enumerate(batch):
            folder = out_root / names[path]
            try:
                written = save_result(
                    folder, result.images[b], result.views[b], result.gaussians[b], pipe.cfg.cameras,
                    video_frames=args.video_frames if args.video else 0, mesh_cfg=MeshConfig() if args.mesh else None,
                    meta={"input": str(path), "seed": args.seed, "weights": str(args.weights),
                          "seconds": round(seconds, 3), "sampler": OmegaConf.to_container(sampler_cfg)},
                )
            except (RuntimeError, OSError, ValueError) as err:
                logger.error("%s: writing outputs failed: %s", path, err)
                failures += 1
            else:
                logger.info("%s -> %s (%s)", path, folder, ", ".join(p.name for p in written))
            bar.update(1)
    bar.close()
    if failures:
        logger.error("%d of %d images failed", failures, len(paths))
    return 1 if failures else 0


def output_names(paths: list[Path]) -> dict[Path, str]:
    """One folder name per input: its stem, or ``<stem>_<suffix>`` where inputs share a stem (a.png, a.jpg)."""
    stems = Counter(p.stem for p in paths)
    return {p: p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths}


if __name__ == "__main__":
    sys.exit(main())
