"""Data parallelism: 2 processes x 1 micro-batch (torch.distributed, gloo on CPU) compute the same step as
1 process x 2 accumulated micro-batches. Runs scripts/train.py exactly as a user would (torchrun; accelerate picks the
process group up from the environment)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
# Adam's first update is lr * g / (|g| + eps), i.e. lr * sign(g) for the default eps: rounding noise on near-zero
# gradient components (the all-reduce sums in another order) would become lr-sized weight differences. eps = 1
# makes the first update linear in g, so equal gradients give equal weights.
COMMON = ["--config", "configs/train_tiny.yaml", "train.stage=joint", "train.max_steps=1", "export=false",
          "train.optim.joint.eps=1.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out: Path, env_extra: dict[str, str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.run([*args, *COMMON, f"output_dir={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_gradient_accumulation(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "scripts/train.py", "train.gradient_accumulation_steps=2"], single, {})
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), "scripts/train.py"], ddp, {"ACCELERATE_USE_CPU": "true"})

    rec_single, rec_ddp = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (single, ddp))
    for key in ("loss", "loss_mvd", "loss_3d"):
        assert abs(rec_single[key] - rec_ddp[key]) <= 1e-5, (key, rec_single[key], rec_ddp[key])

    step = "checkpoints/step_1"
    for name in ("model.safetensors", "model_1.safetensors"):  # MV UNet (via MVDenoiser), 3D model
        a, b = load_file(single / step / name), load_file(ddp / step / name)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, (name, worst)
    # the averaged gradients themselves (Adam's first moment after one step is (1 - beta1) g)
    opt_a = torch.load(single / step / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(ddp / step / "optimizer.bin", weights_only=False)["state"]
    worst = max((opt_a[i]["exp_avg"] - opt_b[i]["exp_avg"]).abs().max().item() for i in opt_a)
    scale = max(s["exp_avg"].abs().max().item() for s in opt_a.values())
    assert worst <= 1e-5 * scale, (worst, scale)
