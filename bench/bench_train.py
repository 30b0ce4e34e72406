"""Time training steps (stage C by default) on CUDA: steps/s, samples/s and peak GPU memory per precision mode.

One step = the stage's forward on one fixed batch, backward, gradient clipping and an AdamW update, as the loop does
it on one GPU (no DDP, no data loading). Models are randomly initialised unless the config names weights; LPIPS uses
a random VGG unless ``train.lpips_weights`` is set (timing only). Modes:

- ``bf16-gc``: bf16 autocast, frozen VAE / CLIP in bf16, gradient checkpointing (the paper's setup);
- ``bf16``: the same without gradient checkpointing;
- ``fp32``: float32 everywhere, no checkpointing.

    python bench/bench_train.py                                    # full size, batch 1, bf16-gc and fp32
    python bench/bench_train.py --config demo --batch 2 --modes bf16-gc
    python bench/bench_train.py --find-max-batch --modes bf16-gc   # largest batch that fits, per mode
    python bench/bench_train.py train.stage=model_3d data.num_sup_views=8 --json bench_train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate

from gen3diffusion.config import CONFIG_DIR
from gen3diffusion.data import make_dataset
from gen3diffusion.training.build import build_parts, load_train_config
from gen3diffusion.training.loop import batch_generator
from gen3diffusion.training.steps import STAGES, train_step

MODES = {
    "bf16-gc": ("bf16", True),
    "bf16": ("bf16", False),
    "fp32": ("no", False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"training preset (name in {CONFIG_DIR} or a YAML path); default: full size")
    parser.add_argument("--modes", default="bf16-gc,fp32", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--batch", type=int, default=1, help="samples per step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--find-max-batch", action="store_true", help="search the largest batch that fits, per mode")
    parser.add_argument("--max-batch", type=int, default=256, help="upper bound of the search")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)


class Bench:
    """Models, optimizer and one sample of one precision mode, reused across batch sizes."""

    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        precision, checkpointing = MODES[mode]
        overrides = [f"train.mixed_precision={precision}", f"train.gradient_checkpointing={checkpointing}",
                     "train.lpips_allow_random=true", "data.kind=synthetic", "data.device=cuda", *args.overrides]
        self.cfg = load_train_config(args.config, overrides)
        self.stage = self.cfg.train.stage
        self.amp = torch.bfloat16 if precision == "bf16" else None
        self.parts = build_parts(self.cfg, "cuda")
        self.modules = {n: m for n, m in self.parts.modules.items() if n in STAGES[self.stage]}
        self.params = [p for m in self.modules.values() for p in m.parameters()]
        o = self.cfg.train.optim[self.stage]
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                           fused=True)
        self.max_grad_norm = o.max_grad_norm
        self.sample = make_dataset(self.cfg.data)[0]

    def batch(self, size: int) -> dict:
        batch = default_collate([self.sample] * size)
        return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def step(self, batch: dict, index: int) -> None:
        with torch.autocast("cuda", dtype=self.amp or torch.float32, enabled=self.amp is not None):
            losses = train_step(self.stage, self.parts.modules, self.parts.context, batch, batch_generator(0, index))
        losses["loss"].backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, size: int, warmup: int, steps: int) -> dict[str, float]:
        batch = self.batch(size)
        for i in range(warmup):
            self.step(batch, i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            start = time.perf_counter()
            self.step(batch, warmup + i)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return {"batch": size, "s_per_step": median, "steps_per_s": 1 / median, "samples_per_s": size / median,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    def fits(self, size: int) -> bool:
        try:
            self.step(self.batch(size), 0)
            torch.cuda.synchronize()
            return True
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False

    def max_batch(self, limit: int) -> int:
        """Double until a step runs out of memory, then bisect: the largest batch whose step fits."""
        good, bad = 0, None
        size = 1
        while size <= limit and self.fits(size):
            good, size = size, size * 2
        bad = min(size, limit + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if self.fits(mid) else (good, mid)
        return good


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")
        bench = Bench(args, mode)
        row = {"mode": mode, "stage": bench.stage, "gpu": torch.cuda.get_device_name()}
        if args.find_max_batch:
            row["max_batch"] = bench.max_batch(args.max_batch)
            size = row["max_batch"]
        else:
            size = args.batch
        if size > 0:
            row.update(bench.time(size, args.warmup, args.steps))
        results.append(row)
        print(json.dumps(row), flush=True)
        del bench
        torch.cuda.empty_cache()
    extra = " max batch |" if args.find_max_batch else ""
    print("\n| mode | stage | batch | steps/s | samples/s | peak GiB |" + extra)
    print("|---|---|---|---|---|---|" + ("---|" if args.find_max_batch else ""))
    for r in results:
        cells = [r["mode"], r["stage"], r.get("batch", 0), f"{r.get('steps_per_s', 0):.3f}",
                 f"{r.get('samples_per_s', 0):.3f}", f"{r.get('peak_gib', 0):.1f}"]
        if args.find_max_batch:
            cells.append(r["max_batch"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
