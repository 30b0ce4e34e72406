"""The step-time candidates of this branch (bench/CANDIDATES.md), whole pipeline, full size, in alternation on one
machine: each switched off from "all on", the GEMM-conv pixel limit swept; then one step's parts against main
(rounding only) and the time of each part for main and the best configuration. Writes a JSON summary.

    python bench/probe_candidates.py probe.json
"""
from __future__ import annotations

import json
import sys

import torch

import bench_sample as bs
from gen3diffusion.config import SamplerConfig
from gen3diffusion.diffusion.sampler import JointSampler
from gen3diffusion.models import kernels
from gen3diffusion.models import mv_unet as mv_unet_module

torch.backends.cudnn.benchmark = True
device = torch.device("cuda")
out_path = sys.argv[1]
pipe, _ = bs.setup("fast", device)
images = torch.rand(1, 3, 256, 256, device=device, generator=torch.Generator(device).manual_seed(1))
cfg = SamplerConfig(cuda_graphs=True)
NoCache = type("NoCache", (JointSampler,), {"cache_context_view": False})
ALL = dict(cache=True, eff=128, gemm=640, split=True, pad=True)
CONFIGS = {  # name -> the switches: cached 3D context view, efficient-attention key limit, GEMM-conv pixels, the up
    # path's concatenation read in parts, the encoder downsamplers' padding written by the residual kernel
    "main": dict(cache=False, eff=0, gemm=0, split=False, pad=False),
    "all (cache, eff 128, gemm 640, split, pad)": ALL,
    "all - cache": dict(ALL, cache=False),
    "all - eff": dict(ALL, eff=0),
    "all - split": dict(ALL, split=False),
    "all - pad": dict(ALL, pad=False),
    "all, gemm 0": dict(ALL, gemm=0),
    "all, gemm 320": dict(ALL, gemm=320),
    "all, gemm 1280": dict(ALL, gemm=1280),
    "all, gemm 2560": dict(ALL, gemm=2560),
}


def switch(c, sampler_cls=None):
    pipe.sampler_cls = sampler_cls or (JointSampler if c["cache"] else NoCache)
    mv_unet_module.EFFICIENT_ATTENTION_MAX_KEYS = c["eff"]
    kernels.GEMM_CONV_MAX_PIXELS = c["gemm"]
    kernels.SPLIT_CONCAT = c["split"]
    kernels.PAD_IN_RESIDUAL = c["pad"]
    pipe.graphs.clear()


def use(name):
    switch(CONFIGS[name])


results = {name: [] for name in CONFIGS}
for rnd in range(2):
    for name in CONFIGS:
        use(name)
        r = bs.time_sampling(pipe, images, cfg, 2)
        results[name].append(r["s_per_object"])
        print(f"round {rnd} {name}: {r['s_per_object']:.4f} s/object, {r['peak_alloc_gib']:.2f} GiB alloc", flush=True)
summary = {name: min(v) for name, v in results.items()}
print(json.dumps(results, indent=1))

# one step's parts from identical inputs, each configuration against main (eager, bf16): rounding only
h = pipe.mv_unet.config.image_size
x_t = torch.randn(1, 5, 4, h, h, device=device, generator=torch.Generator(device).manual_seed(0))
parts = {}
for name in CONFIGS:
    use(name)
    with torch.no_grad():
        sampler, cond, _ = pipe.prepare(images, sampler_cfg=SamplerConfig(cuda_graphs=False))
        cond = sampler.prepare(cond)
        parts[name] = [o.float() for o in sampler.predict_gaussians(x_t, sampler.timestep_tensors[501],
                                                                    sampler.alphas_cumprod[501], cond, sampler.rays)]
base = parts["main"]
part_err = {name: [float((a - b).norm() / b.norm()) for a, b in zip(p, base)] for name, p in parts.items()}
print("relative L2 vs main of (eps, x0_2d, raw, decoded x_t):", json.dumps(part_err, indent=1), flush=True)

# per-part times for main and the best configuration
best = min((n for n in CONFIGS if n != "main"), key=summary.get)
breakdowns = {}
for name in ("main", best, "main", best):
    c = CONFIGS[name]
    bs.TimedSampler.cache_context_view = c["cache"]
    switch(c, bs.TimedSampler)
    b = bs.breakdown(pipe, images, cfg)
    breakdowns.setdefault(name, []).append(b)
    print(name, {k: round(v, 3) for k, v in b.items()}, flush=True)
json.dump(dict(results=results, part_err=part_err, breakdowns=breakdowns, best=best, best_config=CONFIGS[best]),
          open(out_path, "w"), indent=1)
print("BEST", best, CONFIGS[best])
