#!/usr/bin/env bash
# Train the demo model from scratch: the VAE, then Algorithm 1's stages A (MVD), B (3D model) and C (joint), each
# starting from the previous stage's export. Extra key=value arguments go to every training stage (e.g. smaller
# max_steps for a smoke test). Usage:  bash scripts/train_demo.sh RUN_DIR [STEPS_VAE STEPS_A STEPS_B STEPS_C] [key=value ...]
set -euo pipefail
run="${1:-runs/demo}"; shift || true
vae_steps="${1:-1500}"; a_steps="${2:-2000}"; b_steps="${3:-2000}"; c_steps="${4:-1500}"
shift $(( $# < 4 ? $# : 4 )) || true
python scripts/train_vae.py --config demo_vae output_dir="$run" steps="$vae_steps"
python scripts/train.py --config demo_train output_dir="$run/stage_a" train.stage=mvd train.max_steps="$a_steps" \
  weights.vae="$run" "$@"
python scripts/train.py --config demo_train output_dir="$run/stage_b" train.stage=model_3d train.max_steps="$b_steps" \
  weights.init_from="$run/stage_a/export" "$@"
python scripts/train.py --config demo_train output_dir="$run/stage_c" train.stage=joint train.max_steps="$c_steps" \
  weights.init_from="$run/stage_b/export" "$@"
echo "demo weights: $run/stage_c/export"
