"""Train one stage of Gen-3Diffusion (Algorithm 1) on one or many GPUs, or on the CPU.

    accelerate launch scripts/train.py --config configs/objects.yaml train.stage=mvd
    accelerate launch --config_file configs/accelerate_multi_gpu.yaml scripts/train.py --config ... --resume latest
    python scripts/train.py --config configs/train_tiny.yaml train.stage=joint

Trailing ``key=value`` arguments override the preset (``train.optim.joint.lr=3e-5``, ``tracker=none``). Output:
``<output_dir>/checkpoints/step_N``, ``metrics.jsonl``, ``logs/`` (TensorBoard), ``validation/*.png`` and
``export/`` (the models in the pipeline's layout).
"""

from __future__ import annotations

import argparse
import logging

from gen3diffusion.training.build import load_train_config
from gen3diffusion.training.loop import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="preset YAML (path or name in configs/)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder <output_dir>/checkpoints/step_N")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(args.config, args.overrides)
    result = train(cfg, resume=args.resume)
    logging.getLogger("train").info("done at step %d; last checkpoint %s; export %s", result.step,
                                    result.last_checkpoint, result.export_dir)


if __name__ == "__main__":
    main()
