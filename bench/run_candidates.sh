#!/usr/bin/env bash
# Device run for the candidates of branch perf/step-candidates (bench/CANDIDATES.md):
#   source .device/env.sh && bash bench/run_candidates.sh
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python bench/bench_conv.py > "$OUT/bench_conv.log" 2>&1
python bench/probe_candidates.py "$OUT/probe.json" > "$OUT/probe.log" 2>&1
# the official benchmark with the best configuration of the probe
python - > "$OUT/bench_sample.log" 2>&1 <<PY
import json, runpy, sys
from gen3diffusion.diffusion.sampler import JointSampler
from gen3diffusion.models import kernels, mv_unet
best = json.load(open("$OUT/probe.json"))["best_config"]
print("best configuration of the probe:", best, flush=True)
JointSampler.cache_context_view = best["cache"]
mv_unet.EFFICIENT_ATTENTION_MAX_KEYS = best["eff"]
kernels.GEMM_CONV_MAX_PIXELS = best["gemm"]
sys.argv = ["bench/bench_sample.py", "--modes", "reference", "fast", "--batch-sizes", "1", "--iters", "3",
            "--analyse", "fast", "--json", "$OUT/bench_sample.json"]
runpy.run_path("bench/bench_sample.py", run_name="__main__")
PY
python -m pytest -m gpu -q -rs > "$OUT/gpu_tests.log" 2>&1
tail -3 "$OUT"/*.log
