"""Train a small VAE on procedural (or folder) renders, for a model trained from scratch (the demo model).

    python scripts/train_vae.py --config configs/demo_vae.yaml [key=value ...]

Writes <output_dir>/vae (diffusers AutoencoderKL folder); pass that run folder to training as weights.vae=...
"""

from __future__ import annotations

import argparse
import logging
import sys

from gen3diffusion.config import load_config
from gen3diffusion.training.vae import VAETrainConfig, train_vae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a preset name in configs/ or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=100 data.image_size=64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = load_config(VAETrainConfig, args.config, args.overrides)
    train_vae(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
