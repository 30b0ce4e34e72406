"""Time full-size joint sampling (Algorithm 2): the authors' structure against this project's fast default.

Builds the official-size models with random weights directly on the GPU (MV UNet 0.94 B, SD-2.1 VAE, CLIP ViT-H/14
vision tower, 3D-GS model 0.42 B; no text encoder: random prompt embeddings stand in for the cached ones) and samples
``--steps`` DDIM steps with CFG 5 and refinement, in two modes:

- ``reference``: the authors' structure: float32, eager, one VAE decode call per tensor (x0~, then x_t), the MV
  UNet's cross-attention keys and values of the prompt tokens projected at every step, the 3D U-Net run in full for
  the context view at every step (``trim_context_view=False``), gsplat tiles of 16;
- ``fast``: the default of ``Gen3DiffusionPipeline.from_pretrained`` on CUDA: bfloat16 weights in channels_last
  with the fused NHWC kernels, sub-pixel upsampling convolutions, the deepest convolutions as im2col GEMMs and the up
  paths' concatenations read in parts (``models/kernels.py``), one batched decode of x0~ and x_t, those keys and
  values projected once per call (``MultiViewUNet.project_context``), the 3D U-Net's layers before its first
  attention run for the context view once per call
  (``GaussianDiffusionModel.encode_context_view``) and those after its last attention on the target views only,
  colour-only renders with gsplat tiles of 32 (``RenderConfig.tile_size``), and CUDA graphs for the fixed-shape
  parts of each step (``SamplerConfig.cuda_graphs``).

Optional extra modes: ``fast-fp32`` (fast in float32), ``bf16-eager`` (fast without CUDA graphs), ``fast-nchw``
(fast in NCHW, where the kernels do not apply), ``compile`` (fast plus ``Gen3DiffusionPipeline.compile`` of all
three networks) and ``compile-mv-unet`` (fast with only the MV UNet, the network of the most small kernels,
compiled; the VAE and 3D U-Net keep the fused kernels). For
every mode and batch size it prints seconds per object, peak GPU memory and the speed-up over ``reference``, and the
parity of each mode's Gaussians against the reference ones on the same seed (after the full run and after two
steps). Then, unless ``--analyse none``: the FLOPs of one step and the fraction of the card's bf16 peak each mode
reaches, the bf16-vs-float32 error of one step's parts from identical inputs, the time of each part of a step, how
long the GPU idles in a step with CUDA graphs and how much of that is waiting for the CPU (from a profiler trace),
and optionally a torch.profiler table. ``--gaussian-size trained`` runs every mode with the random 3D model's
Gaussians shrunk to the size of trained ones, whose render costs what a user's does; ``--tile-binning dense`` runs
every mode but the reference with the exact dense tile binning (``RenderConfig.tile_binning``).

    python bench/bench_sample.py --json bench_sample.json
    python bench/bench_sample.py --modes reference fast bf16-eager --batch-sizes 1 --profile profile.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from gen3diffusion.cameras import Cameras, target_cameras
from gen3diffusion.config import CameraConfig, RenderConfig, SamplerConfig
from gen3diffusion.diffusion.sampler import JointSampler, predict_x0
from gen3diffusion.pipeline import COMPILABLE_NETWORKS, Gen3DiffusionPipeline
from gen3diffusion.render import rasterize

# the CLIP ViT-H/14 vision tower of the ImageDream port (image_encoder/config.json)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense tensor-core peak (vendor data sheets)
# --gaussian-size trained: added to the random 3D model's scale logits (channels 4:7 of its last conv's bias). The
# random model's Gaussians have scales of 0.054-0.099 (5-95%; 3-sigma radius about 100 px at 512), five times those
# of trained Gaussians (0.005-0.03), so they touch about 20 times as many tiles and the render costs what no trained
# model costs; shifted by -2 they have scales of 0.009-0.021.
TRAINED_SCALE_LOGIT_SHIFT = -2.0
# mode -> (dtype, the authors' structure (separate decodes, no trimmed context view), CUDA graphs, channels_last,
# the networks to torch.compile)
MODES = {
    "reference": (torch.float32, True, False, False, ()),
    "fast": (torch.bfloat16, False, True, True, ()),
    "fast-fp32": (torch.float32, False, True, True, ()),
    "bf16-eager": (torch.bfloat16, False, False, True, ()),
    "fast-nchw": (torch.bfloat16, False, True, False, ()),
    "compile": (torch.bfloat16, False, True, True, COMPILABLE_NETWORKS),
    "compile-mv-unet": (torch.bfloat16, False, True, True, ("mv_unet",)),
}


# GPU kernels by kind for the profile summary (first match wins: cuDNN's attention kernels say "fprop", its
# implicit-GEMM convolutions "gemm")
KERNEL_KINDS = {
    "attention (SDPA)": ("sdpa", "fmha", "flash"),
    "convolution (cuDNN)": ("fprop", "conv"),
    "GroupNorm (models/kernels.py)": ("_chunk_stats", "_group_stats", "_normalize_kernel"),
    "residual epilogue (models/kernels.py)": ("_residual_kernel",),
    "render (gsplat: projection, tile binning, rasterize)": ("gsplat", "radix_sort", "cub::", "_bin_kernel",
                                                            "_tile_ranges_kernel"),
    "matmul (linear layers)": ("nvjet", "gemm", "cutlass"),
    "nearest upsampling": ("upsample",),
    "GroupNorm (PyTorch)": ("group_norm", "GroupNorm"),
    "layer norm": ("layer_norm",),
    "elementwise (GEGLU, sub-pixel interleave, conv biases outside blocks, adds, copies)": (
        "elementwise", "Cat", "copy", "_geglu_kernel", "_interleave_kernel"),
}


class ReferenceSampler(JointSampler):
    """The authors' structure: x0~ and x_t decoded by two separate VAE calls, the prompt's keys and values of every
    cross-attention projected at every step, the 3D U-Net run in full for the context view at every step."""

    project_context = False
    cache_context_view = False

    def decode_views(self, x0_2d: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(x0_2d), self.decode(x_t)


class TimedSampler(JointSampler):
    """The fast sampler with each part of a step in its own CUDA graph, timed by CUDA events around the replays."""

    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    def _timed(self, name: str, fn, *args):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.events[name].append((start, end))
        return out

    def _run(self, name, fn, *args):
        if name == "predict":  # runs its parts, each graphed and timed on its own (below)
            return fn(*args)
        return self._timed(name, super()._run, name, fn, *args)

    def predict_gaussians(self, x_t, t, alpha_bar_t, cond, rays):
        V, B = self.num_views, x_t.shape[0]
        (eps,) = self._run("MV UNet with CFG", lambda *a: (self.mvd_eps(*a),), x_t, t, cond)
        x0_2d = predict_x0(x_t[:, :V], eps[:, :V], alpha_bar_t)
        x0_images, xt_images = self._run("VAE decode x0~ and x_t", self.decode_views, x0_2d, x_t[:, :V])
        (raw,) = self._run("3D model", lambda *a: (self.model_3d.forward_raw(*a),), x0_images.to(self.dtype),
                           xt_images.to(self.dtype), rays.expand(B, -1, -1, -1, -1).to(self.dtype),
                           t.reshape(1).expand(B), self.context_3d(cond))
        return eps, x0_2d, raw, xt_images

    def render(self, raw, cameras):
        return self._timed("render (gsplat)", super().render, raw, cameras)

    def step(self, x_t, t, cond, generators):
        return self._timed("whole step", super().step, x_t, t, cond, generators)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["reference", "fast"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--render-size", type=int, default=SamplerConfig.render_size,
                   help="refinement render size (the authors' 512; 256 is the speed option measured in "
                        "docs/benchmarks.md)")
    p.add_argument("--gaussian-size", choices=["random", "trained"], default="random",
                   help="random: the random 3D model's own Gaussians (large, so the render is slow); trained: its "
                        "scale logits shifted to the size of trained Gaussians (TRAINED_SCALE_LOGIT_SHIFT)")
    p.add_argument("--tile-size", type=int, default=RenderConfig.tile_size,
                   help="gsplat's tile side in every mode but the reference, which keeps the authors' 16 (the image "
                        "does not depend on it)")
    p.add_argument("--tile-binning", choices=["sort", "dense"], default=RenderConfig.tile_binning,
                   help="how every mode but the reference (gsplat's sort) lists splats per tile "
                        "(RenderConfig.tile_binning; the image does not depend on it)")
    p.add_argument("--iters", type=int, default=2, help="timed runs per mode and batch size (the reference: 1)")
    p.add_argument("--analyse", choices=[*MODES, "none"], default="fast",
                   help="the mode whose step is broken down into parts and profiled (none: skip FLOPs, parity of a "
                        "step's parts, breakdown and profile)")
    p.add_argument("--profile", type=Path, help="write a torch.profiler table of 10 eager steps at batch 1 here")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def build_pipeline(dtype: torch.dtype, device: torch.device, scale_logit_shift: float = 0.0) -> Gen3DiffusionPipeline:
    """Official-size models with random weights, created directly on ``device`` in ``dtype`` (seeded);
    ``scale_logit_shift`` is added to the 3D model's scale logits (see ``TRAINED_SCALE_LOGIT_SHIFT``)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from gen3diffusion.models.conditioning import SD21_VAE_CONFIG
    from gen3diffusion.models.gaussian_unet import GaussianDiffusionModel
    from gen3diffusion.models.mv_unet import MultiViewUNet

    torch.manual_seed(0)
    with device:
        mv_unet = MultiViewUNet().to(dtype).eval().requires_grad_(False)
        model_3d = GaussianDiffusionModel().to(dtype).eval().requires_grad_(False)
        vae = AutoencoderKL(**SD21_VAE_CONFIG).to(dtype).eval().requires_grad_(False)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).to(dtype).eval().requires_grad_(False)
        prompts = torch.randn(2, 77, 1024, dtype=dtype)
    for model in (mv_unet, model_3d):  # zero-initialised output layers would make eps exactly 0: fill them too
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                torch.nn.init.normal_(param, std=0.02)
    with torch.no_grad():
        model_3d.conv.bias[4:7] += scale_logit_shift
    pipe = Gen3DiffusionPipeline(mv_unet, vae, image_encoder, model_3d, prompts)
    pipe.progress = False
    return pipe


def time_sampling(pipe: Gen3DiffusionPipeline, images: Tensor, cfg: SamplerConfig, iters: int) -> dict:
    """Warm up with a two-step run (kernel choice, graph capture, compilation), then time ``iters`` full runs.

    Returns the timings, the last output and the warm-up's (two steps: a short trajectory for parity checks)."""
    start = time.perf_counter()
    short = pipe(images, seed=0, sampler_cfg=replace(cfg, num_steps=2))
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out = pipe(images, seed=0, sampler_cfg=cfg)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(s_per_object=statistics.median(times) / images.shape[0], warmup_s=warmup_s,
                peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30, output=out, short_output=short)


def parity(fast: tuple, ref: tuple, device: torch.device) -> dict:
    """How far the fast Gaussians (and views) are from the reference ones: parameter errors, PSNR of the renders."""
    (g16, views16), (g32, views32) = fast, ref
    g16, g32 = g16.to(device=device), g32.to(device=device)
    s, cam = 256, CameraConfig()
    cams = Cameras.from_fovy(target_cameras(cam.radius).to(g32.means.device), cam.fovy, s, s)
    r16 = rasterize(g16, cams, background=(1.0, 1.0, 1.0)).rgb.clamp(0, 1)
    r32 = rasterize(g32, cams, background=(1.0, 1.0, 1.0)).rgb.clamp(0, 1)
    mse = (r16 - r32).pow(2).mean()
    views_mse = (views16 - views32).pow(2).mean()
    return dict(
        means_max_abs=float((g16.means - g32.means).abs().max()),
        means_mean_abs=float((g16.means - g32.means).abs().mean()),
        rgb_mean_abs=float((g16.colors - g32.colors).abs().mean()),
        opacity_mean_abs=float((g16.opacities - g32.opacities).abs().mean()),
        render_psnr_db=float(-10 * torch.log10(mse)),
        views_psnr_db=float(-10 * torch.log10(views_mse)),
    )


def part_parity(pipe32: Gen3DiffusionPipeline, pipe16: Gen3DiffusionPipeline, images: Tensor, t: int = 501
                ) -> dict[str, float]:
    """One joint step's parts (MVD eps, x0~, the 3D model's raw Gaussians, the decoded x_t) computed from identical
    inputs by a float32 and a bfloat16 pipeline: the relative L2 error of each, i.e. what bf16 rounding alone does
    (a whole trajectory of random, untrained networks amplifies any difference, so it cannot show this)."""
    h = pipe32.mv_unet.config.image_size
    x_t = torch.randn(images.shape[0], 5, 4, h, h, device=images.device,
                      generator=torch.Generator(images.device).manual_seed(0))  # [B, F, 4, h, w]
    outs = []
    for pipe in (pipe32, pipe16):
        sampler, cond, _ = pipe.prepare(images, sampler_cfg=SamplerConfig(cuda_graphs=False))
        cond = sampler.prepare(cond)
        with torch.no_grad():
            outs.append(sampler.predict_gaussians(x_t, sampler.timestep_tensors[t], sampler.alphas_cumprod[t], cond,
                                                  sampler.rays))
    names = ("eps", "x0_2d", "raw_gaussians", "decoded_x_t")
    return {n: float((b.float() - a.float()).norm() / a.float().norm()) for n, a, b in zip(names, *outs)}


def step_flops(pipe: Gen3DiffusionPipeline, images: Tensor) -> dict[str, int]:
    """FLOPs of one joint step by operator (convolutions, matmuls, attention; counted by torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe.sampler_cls = JointSampler
    for module in (pipe.mv_unet, pipe.vae, pipe.image_encoder, pipe.model_3d):
        module.requires_grad_(False)  # FlopCounterMode's module tracker trips over parameters that require grad
    counts = []
    for steps in (1, 2):  # the second run has exactly one more step (both have the final pass)
        with FlopCounterMode(display=False) as counter:
            pipe(images, seed=0, sampler_cfg=SamplerConfig(num_steps=steps, cuda_graphs=False))
        counts.append({str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()})
    return {op: n - counts[0].get(op, 0) for op, n in counts[1].items()}


def breakdown(pipe: Gen3DiffusionPipeline, images: Tensor, cfg: SamplerConfig) -> dict[str, float]:
    """Median milliseconds per step of each part of a step ("refine": resize + VAE encode + Eq. 10)."""
    pipe.sampler_cls = TimedSampler
    TimedSampler.events.clear()
    pipe(images, seed=0, sampler_cfg=replace(cfg, num_steps=2))  # capture the parts' graphs
    TimedSampler.events.clear()
    pipe(images, seed=0, sampler_cfg=cfg)
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in TimedSampler.events.items()}


def gaps_between(intervals: list[tuple[float, float, str]]) -> tuple[float, list[tuple[float, str, str]]]:
    """The time covered by the union of ``(start, end, name)`` intervals, and every gap between them as ``(length,
    name of the last interval before it, name of the first after it)``, longest first."""
    intervals = sorted(intervals)
    if not intervals:
        return 0.0, []
    busy, gaps = 0.0, []
    start, end, last = intervals[0]
    for s, e, name in intervals[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            start, end, last = s, e, name
        elif e > end:
            end, last = e, name
    busy += end - start
    return busy, sorted(gaps, reverse=True)


def steady_state_idle(trace_events: list[dict], marker: str = "projection", top: int = 10,
                      long_gap_us: float = 20.0) -> dict:
    """GPU idle time per step from a Chrome trace's events (``torch.profiler``'s ``export_chrome_trace``): its kernels,
    copies and memsets between the first and the last kernel whose name contains ``marker`` (one per step: gsplat's
    projection), so the call's set-up and final pass are left out. Times in ms per step, the idle time also split
    into gaps of at least ``long_gap_us`` (the GPU waits for the CPU) and shorter ones (the few microseconds between
    consecutive kernels, also inside a CUDA graph); the ``top`` longest gaps in microseconds with the GPU work on
    either side."""
    gpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace_events
           if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    marks = sorted(start for start, _, name in gpu if marker in name)
    if len(marks) < 2:
        raise ValueError(f"need two or more GPU events named like {marker!r} to mark steps, found {len(marks)}")
    first, last = marks[0], marks[-1]
    steps = len(marks) - 1
    busy, gaps = gaps_between([(s, min(e, last), n) for s, e, n in gpu if first <= s < last])
    long_gaps = [g for g, _, _ in gaps if g >= long_gap_us]
    return {"steps": steps, "ms_per_step": (last - first) / 1e3 / steps, "busy_ms_per_step": busy / 1e3 / steps,
            "idle_ms_per_step": (last - first - busy) / 1e3 / steps,
            "long_gap_us": long_gap_us, "long_gaps_per_step": len(long_gaps) / steps,
            "long_gap_ms_per_step": sum(long_gaps) / 1e3 / steps,
            "short_gaps_per_step": (len(gaps) - len(long_gaps)) / steps,
            "largest_gaps_us": [(round(g, 1), before, after) for g, before, after in gaps[:top]]}


def gpu_idle(pipe: Gen3DiffusionPipeline, images: Tensor, cfg: SamplerConfig, steps: int = 6) -> dict:
    """How long the GPU idles in a step with CUDA graphs, and in which gaps (:func:`steady_state_idle` of a
    ``steps``-step call under ``torch.profiler``, after a call of the same length that captures the graphs)."""
    from torch.profiler import ProfilerActivity, profile

    pipe.sampler_cls = JointSampler
    run_cfg = replace(cfg, num_steps=steps, cuda_graphs=True)
    pipe(images, seed=0, sampler_cfg=run_cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(images, seed=0, sampler_cfg=run_cfg)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return steady_state_idle(events)


def profile_summary(prof) -> dict[str, float]:
    """GPU kernel time by kind (:data:`KERNEL_KINDS`), in ms, from a ``torch.profiler`` run."""
    from torch.autograd import DeviceType

    kinds: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        kind = next((k for k, patterns in KERNEL_KINDS.items() if any(p in event.key for p in patterns)), "other")
        kinds[kind] += event.self_device_time_total / 1e3
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def setup(mode: str, device: torch.device, scale_logit_shift: float = 0.0, tile_size: int = RenderConfig.tile_size,
          tile_binning: str = RenderConfig.tile_binning) -> tuple[Gen3DiffusionPipeline, bool]:
    """A fresh pipeline for ``mode`` and whether it samples with CUDA graphs."""
    dtype, authors, graphs, channels_last, compiled = MODES[mode]
    pipe = build_pipeline(dtype, device, scale_logit_shift)
    pipe.sampler_cls = ReferenceSampler if authors else JointSampler
    pipe.model_3d.trim_context_view = not authors
    pipe.cfg.render.tile_size = 16 if authors else tile_size
    pipe.cfg.render.tile_binning = "sort" if authors else tile_binning
    if channels_last:
        pipe.use_channels_last()
    if compiled:
        pipe.compile(networks=compiled)
    return pipe, graphs


def to_cpu(out) -> tuple:
    return out.gaussians.to(device="cpu", dtype=torch.float32), out.views.float().cpu()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_sample.py needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    card = torch.cuda.get_device_name()
    cfg = SamplerConfig(num_steps=args.steps, render_size=args.render_size)
    shift = TRAINED_SCALE_LOGIT_SHIFT if args.gaussian_size == "trained" else 0.0
    report: dict = {"card": card, "gaussian_size": args.gaussian_size, "tile_size": args.tile_size,
                    "tile_binning": args.tile_binning, "rows": [], "parity": {}}
    outputs = {}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))

    print(f"{card}; {args.steps} steps, CFG {cfg.guidance_scale:g}, refinement on, renders at {cfg.render_size}, "
          f"{args.gaussian_size}-size Gaussians, gsplat tiles of {args.tile_size}, {args.tile_binning} tile binning\n")
    print("| mode | batch | s / object | vs reference | peak allocated | peak reserved | warm-up |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes:  # one pipeline on the card at a time, so each peak counts only its own weights
        pipe, graphs = setup(mode, device, shift, args.tile_size, args.tile_binning)
        run_cfg = replace(cfg, cuda_graphs=graphs)
        for b in args.batch_sizes:
            images = torch.rand(b, 3, pipe.image_size, pipe.image_size, device=device,
                                generator=torch.Generator(device).manual_seed(b))
            result = time_sampling(pipe, images, run_cfg, 1 if mode == "reference" else args.iters)
            outputs[(mode, b)] = to_cpu(result.pop("output")), to_cpu(result.pop("short_output"))
            ref = next((r for r in report["rows"] if r["mode"] == "reference" and r["batch"] == b), None)
            result.update(mode=mode, batch=b, steps=args.steps,
                          speedup=ref["s_per_object"] / result["s_per_object"] if ref else None)
            report["rows"].append(result)
            speedup = f"{result['speedup']:.1f}x" if result["speedup"] else "-"
            print(f"| {mode} | {b} | {result['s_per_object']:.2f} | {speedup} | {result['peak_alloc_gib']:.2f} GiB | "
                  f"{result['peak_reserved_gib']:.2f} GiB | {result['warmup_s']:.0f} s |", flush=True)
            if mode != "reference" and ("reference", b) in outputs:
                (ref_long, ref_short), (long, short) = outputs[("reference", b)], outputs[(mode, b)]
                report["parity"][f"{mode} b{b}"] = {f"{args.steps} steps": parity(long, ref_long, device),
                                                    "2 steps": parity(short, ref_short, device)}
                print(f"  parity vs reference: {json.dumps(report['parity'][f'{mode} b{b}'])}", flush=True)
            save()
        del pipe
        torch.cuda.empty_cache()
    if args.analyse == "none":
        return
    pipe, _ = setup("fast", device, shift, args.tile_size, args.tile_binning)
    images = torch.rand(1, 3, pipe.image_size, pipe.image_size, device=device,
                        generator=torch.Generator(device).manual_seed(1))
    flops_by_op = step_flops(pipe, images)
    flops = sum(flops_by_op.values())
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in card), None)
    report["flops_per_step"], report["flops_per_step_by_op"] = flops, flops_by_op
    print(f"\nFLOPs per joint step (batch 1): {flops / 1e12:.2f} TFLOP; {args.steps} steps: "
          f"{flops * args.steps / 1e15:.3f} PFLOP; by operator: "
          + ", ".join(f"{op} {n / 1e12:.2f}" for op, n in sorted(flops_by_op.items(), key=lambda kv: -kv[1])))
    for row in report["rows"]:
        if row["batch"] == 1 and peak:
            row["tflops"] = flops * args.steps / row["s_per_object"] / 1e12
            print(f"  {row['mode']}: {row['tflops']:.0f} TFLOP/s = {100 * row['tflops'] / peak:.1f}% of the "
                  f"{peak:g} TFLOP/s bf16 peak")
    pipe32, _ = setup("fast-fp32", device, shift)
    report["part_parity"] = part_parity(pipe32, pipe, images)
    print(f"\none step's parts, bf16 vs fp32 from the same inputs, relative L2 error: {report['part_parity']}")
    del pipe32
    torch.cuda.empty_cache()
    if args.analyse != "fast":
        del pipe
        torch.cuda.empty_cache()
        pipe, _ = setup(args.analyse, device, shift, args.tile_size, args.tile_binning)
    report["breakdown_ms"] = breakdown(pipe, images, replace(cfg, cuda_graphs=True))
    print(f"\n{args.analyse}: one step with each part in its own CUDA graph, batch 1, median ms per step:")
    for name, ms in report["breakdown_ms"].items():
        print(f"  {name}: {ms:.2f}")
    report["gpu_idle"] = idle = gpu_idle(pipe, images, cfg)
    print(f"\n{args.analyse} with CUDA graphs, batch 1: {idle['ms_per_step']:.2f} ms per step, of which the GPU idles "
          f"{idle['idle_ms_per_step']:.2f} ms (profiler trace of {idle['steps']} steps): "
          f"{idle['long_gap_ms_per_step']:.2f} ms in {idle['long_gaps_per_step']:.1f} gaps of "
          f"{idle['long_gap_us']:g} us or more (waiting for the CPU), the rest in {idle['short_gaps_per_step']:.0f} "
          "shorter gaps between kernels; longest gaps:")
    for gap, before, after in idle["largest_gaps_us"][:5]:
        print(f"  {gap:.0f} us after {before[:60]} / before {after[:60]}")
    save()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        pipe.sampler_cls = JointSampler
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            pipe(images, seed=0, sampler_cfg=replace(cfg, num_steps=10, cuda_graphs=False))
            torch.cuda.synchronize()
        args.profile.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=60))
        report["profile_ms"] = summary = profile_summary(prof)
        total = sum(summary.values())
        print(f"\n{args.analyse}: GPU kernel time of 10 eager steps + the final pass by kind ({total:.0f} ms):")
        for kind, ms in summary.items():
            print(f"  {kind}: {ms:.1f} ms ({100 * ms / total:.0f}%)")
        save()


if __name__ == "__main__":
    main()
