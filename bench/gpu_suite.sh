#!/usr/bin/env bash
# Everything this project measures on the GPU machine, in one command (see ../shared/device/README.md):
#   source .device/env.sh && bash bench/gpu_suite.sh
# Logs go to $OUT (or ./gpu_out).
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
python -m pytest -m gpu -q -rs 2>&1 | tail -40 > "$out/gpu_tests.log"
python -m gen3diffusion.selfcheck --output "$out/selfcheck.png" > "$out/selfcheck.log" 2>&1
for args in "" "--tile-size 16" "--scales 0.054 0.099" "--scales 0.054 0.099 --tile-size 16"; do
    python bench/bench_render.py --device cuda $args
done > "$out/bench_render.log" 2>&1
python bench/bench_sample.py --modes reference fast --batch-sizes 1 8 --profile "$out/profile.txt" \
    --json "$out/bench_sample.json" > "$out/bench_sample.log" 2>&1
python bench/bench_group_norm.py > "$out/bench_group_norm.log" 2>&1
python bench/bench_conv.py > "$out/bench_conv.log" 2>&1
# gsplat's own tile of 16 (the image does not depend on it) and trained-size splats, against the default
for args in "--tile-size 16" "--gaussian-size trained" "--gaussian-size trained --tile-size 16"; do
    python bench/bench_sample.py --modes fast --batch-sizes 1 --analyse none --iters 3 $args
done > "$out/bench_render_options.log" 2>&1
python bench/bench_sample.py --modes reference fast-nchw compile --batch-sizes 1 --analyse none \
    --json "$out/bench_compile.json" > "$out/bench_compile.log" 2>&1
tail -3 "$out"/*.log
