#!/usr/bin/env bash
# Second device run for branch perf/step-candidates (bench/CANDIDATES.md):
#   source .device/env.sh && bash bench/run_candidates.sh
# Logs under $OUT.
set -u
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -m pytest -m gpu -q -rs > "$OUT/gpu_tests.log" 2>&1
python bench/probe_candidates.py "$OUT/probe.json" > "$OUT/probe.log" 2>&1

# bench_sample.py with the probe's best configuration of the switches
with_best() {
  python - "$@" <<PY
import json, runpy, sys
from gen3diffusion.models import kernels
best = json.load(open("$OUT/probe.json"))["best_config"]
print("the probe's best configuration:", best, flush=True)
kernels.GEMM_CONV_MAX_PIXELS = best["gemm"]
kernels.PAD_IN_RESIDUAL = best["pad"]
sys.argv = ["bench/bench_sample.py", *sys.argv[1:]]
runpy.run_path("bench/bench_sample.py", run_name="__main__")
PY
}
with_best --modes reference fast --batch-sizes 1 --iters 3 --analyse fast --json "$OUT/bench_sample.json" \
  > "$OUT/bench_sample.log" 2>&1
if [ "$SECONDS" -lt 480 ]; then
  with_best --modes fast --batch-sizes 1 8 --iters 3 --analyse none --gaussian-size trained \
    > "$OUT/bench_sample_trained.log" 2>&1
fi
for f in "$OUT"/*.log; do echo "== $f"; tail -n 3 "$f"; done
