"""Write the multi-view UNet (ImageDream base + optional Gen-3Diffusion weights) as a diffusers folder.

The official Gen-3Diffusion ``model.safetensors`` holds bare UNet tensors without a config; this script loads them
strictly on top of an ImageDream port folder (or hub id) and writes ``OUT/unet/{config.json, weights}`` with
``save_pretrained``, so the result loads with ``MultiViewUNet.from_pretrained(OUT, subfolder="unet")``.
``--copy-components`` also copies the port's other subfolders (vae, image_encoder, text_encoder, tokenizer,
feature_extractor, scheduler) so OUT is a complete folder in the port layout.

    python scripts/convert_to_diffusers.py --base ashawkey/imagedream-ipmv-diffusers \
        --weights checkpoints_obj/model.safetensors --out weights/gen3diffusion-objects --copy-components
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from gen3diffusion.models.loading import resolve_source
from gen3diffusion.models.mv_unet import load_mv_unet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder in the ImageDream port layout, or its hub id")
    parser.add_argument("--weights", help="model.safetensors (file, folder or hub id) loaded over the base UNet")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    parser.add_argument("--subfolder", default="unet", help="UNet subfolder of --base ('' for a bare UNet folder)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    parser.add_argument("--copy-components", action="store_true", help="also copy the base's other subfolders")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    """Load, then write into a temporary sibling folder renamed to ``args.out`` at the end (no half-written output)."""
    if args.out.exists():
        raise FileExistsError(f"{args.out}: already exists; pass a new --out folder")
    if args.copy_components and not args.subfolder:
        raise ValueError("--copy-components needs --base in the port layout (a --subfolder for the UNet)")
    unet = load_mv_unet(args.base, args.weights, subfolder=args.subfolder or None, torch_dtype=DTYPES[args.dtype])
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    unet.save_pretrained(partial / "unet")
    if args.copy_components:
        root = resolve_source(args.base)
        for item in sorted(root.iterdir()):
            if item.name in (args.subfolder, "unet") or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, partial / item.name)
            else:
                shutil.copy2(item, partial / item.name)
    partial.rename(args.out)
    logging.getLogger(__name__).info("wrote %s", args.out)
    return args.out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    convert(parse_args(argv))


if __name__ == "__main__":
    main()
