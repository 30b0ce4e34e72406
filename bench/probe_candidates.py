"""Second probe of this branch's candidates (bench/CANDIDATES.md): the two left undecided by the first (the GEMM-conv
pixel limit, 0 or 320, and the encoder's padding written by the residual kernel), as a 2 x 2 with the kept ones on
(the cached 3D context view, the up path's concatenation read in parts), and main; four rounds, each in a different
order so that no configuration always runs early or late. Writes a JSON summary with the best configuration.

    python bench/probe_candidates.py probe.json
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

import bench_sample as bs
from gen3diffusion.config import SamplerConfig
from gen3diffusion.diffusion.sampler import JointSampler
from gen3diffusion.models import kernels

torch.backends.cudnn.benchmark = True
device = torch.device("cuda")
out_path = sys.argv[1]
pipe, _ = bs.setup("fast", device)
images = torch.rand(1, 3, 256, 256, device=device, generator=torch.Generator(device).manual_seed(1))
cfg = SamplerConfig(cuda_graphs=True)
NoCache = type("NoCache", (JointSampler,), {"cache_context_view": False})
KEPT = dict(cache=True, split=True)
CONFIGS = {  # name -> the switches: cached 3D context view, up path read in parts, GEMM-conv pixels, encoder padding
    "main": dict(cache=False, split=False, gemm=0, pad=False),
    "kept, gemm 0, no pad": dict(KEPT, gemm=0, pad=False),
    "kept, gemm 320, no pad": dict(KEPT, gemm=320, pad=False),
    "kept, gemm 0, pad": dict(KEPT, gemm=0, pad=True),
    "kept, gemm 320, pad": dict(KEPT, gemm=320, pad=True),
}
names = list(CONFIGS)
orders = [names, names[::-1], names[2:] + names[:2], (names[2:] + names[:2])[::-1]]
results = {name: [] for name in names}
for rnd, order in enumerate(orders):
    for name in order:
        c = CONFIGS[name]
        pipe.sampler_cls = JointSampler if c["cache"] else NoCache
        kernels.GEMM_CONV_MAX_PIXELS, kernels.SPLIT_CONCAT, kernels.PAD_IN_RESIDUAL = c["gemm"], c["split"], c["pad"]
        pipe.graphs.clear()
        r = bs.time_sampling(pipe, images, cfg, 3)
        results[name].append(r["s_per_object"])
        print(f"round {rnd} {name}: {r['s_per_object']:.4f} s/object", flush=True)
medians = {name: statistics.median(v) for name, v in results.items()}
best = min((n for n in names if n != "main"), key=medians.get)
print(json.dumps(dict(results=results, medians=medians), indent=1))
json.dump(dict(results=results, medians=medians, best=best, best_config=CONFIGS[best]), open(out_path, "w"), indent=1)
print("BEST", best, CONFIGS[best])
