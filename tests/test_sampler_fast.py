"""The fast sampling path against the straightforward one.

CPU: the benchmark's reference mode (the authors' structure: x0~ and x_t decoded by separate VAE calls) computes the
same Gaussians as the default batched decode. GPU: CUDA-graph replay equals eager execution, also for a second input
(so no graph reads a stale buffer) and a batch of two; with the trained demo weights the fast default (bf16, CUDA
graphs) gives the Gaussians of the float32 eager reference on the same seed; and at full size each part of a step
agrees in bf16 and float32 from the same inputs. (Whole trajectories of random full-size networks are no test: they
amplify any rounding difference, float32 TF32 convolutions included; bench_sample.py reports them anyway.)
"""

from __future__ import annotations

import pytest
import torch

from gen3diffusion.config import SamplerConfig
from gen3diffusion.diffusion.graphs import CUDAGraphs
from gen3diffusion.pipeline import Gen3DiffusionPipeline
from tiny_weights import TINY_IMAGE_SIZE, load_script, official_pipeline_kwargs, tiny_model_3d, write_official_folder

bench_sample = load_script("bench_sample", folder="bench")
DEMO_PARITY_PSNR_DB = 30.0  # renders of the fast vs the reference Gaussians, and their final views
# relative L2 error of a step's outputs, bf16 vs float32; the raw Gaussians pass through the whole random 3D U-Net
# (measured on the H100: 0.047), the rest through the MV UNet and the VAE
BF16_RELATIVE_ERROR = {"eps": 0.05, "x0_2d": 0.05, "decoded_x_t": 0.05, "raw_gaussians": 0.1}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    return write_official_folder(tmp_path_factory.mktemp("official"))


def tiny_pipe(folder, device: str) -> Gen3DiffusionPipeline:
    pipe = Gen3DiffusionPipeline.from_pretrained(folder, device=device, dtype=torch.float32,
                                                 **official_pipeline_kwargs())
    pipe.progress = False
    return pipe


def images(b: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g).to(device)


def cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"num_steps": 3, "render_size": TINY_IMAGE_SIZE, **kw})


def assert_same_output(a, b, atol: float) -> None:
    for name in ("means", "scales", "rotations", "opacities", "colors"):
        torch.testing.assert_close(getattr(a.gaussians, name), getattr(b.gaussians, name), atol=atol, rtol=0)
    torch.testing.assert_close(a.views, b.views, atol=atol, rtol=0)


def test_channels_last_pipeline_matches_default_on_cpu(official_dir):
    """``use_channels_last`` (CUDA's default: NHWC weights, the VAE's blocks switched to the fused forward) samples
    what the NCHW pipeline samples; on the CPU the fused blocks take their PyTorch path."""
    pipe = tiny_pipe(official_dir, "cpu")
    x = images(1, 3)
    default = pipe(x, seed=2, sampler_cfg=cfg())
    pipe.use_channels_last()
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_output(pipe(x, seed=2, sampler_cfg=cfg()), default, atol=2e-4)


def test_reference_mode_separate_decodes_equal_batched_decode(official_dir):
    pipe = tiny_pipe(official_dir, "cpu")
    x = images(2, 0)
    batched = pipe(x, seed=5, sampler_cfg=cfg())
    pipe.sampler_cls = bench_sample.ReferenceSampler
    separate = pipe(x, seed=5, sampler_cfg=cfg())
    assert_same_output(batched, separate, atol=2e-4)  # VAE convolutions round differently per batch size
    assert not torch.equal(batched.gaussians.means, pipe(images(2, 1), seed=5, sampler_cfg=cfg()).gaussians.means)


def test_graphs_read_the_conditioning_from_persistent_buffers_in_its_layout(official_dir):
    """With graphs, ``prepare`` copies every tensor of the conditioning (the cached 3D context view and the projected
    MVD keys and values included) into buffers that the next call overwrites in place, channels_last kept."""
    pipe = tiny_pipe(official_dir, "cpu")
    pipe.use_channels_last()
    graphs = CUDAGraphs()  # pinning needs no CUDA (replaying does)
    calls = []
    for seed in (0, 1):
        sampler, cond, _ = pipe.prepare(images(1, seed), sampler_cfg=cfg())
        eager = sampler.prepare(cond)
        sampler.graphs = graphs
        calls.append((eager, sampler.prepare(cond)))
    (_, first), (eager, pinned) = calls
    assert eager.context_3d.hidden.is_contiguous(memory_format=torch.channels_last)

    def tensors(c):
        return [c.image, c.mv.camera, c.mv.ip_img, c.context_3d.temb, c.context_3d.hidden,
                *c.context_3d.skips.values(), *(x for keys_values in c.mv.context.values() for x in keys_values)]

    for a, b, before in zip(tensors(eager), tensors(pinned), tensors(first), strict=True):
        assert a is not b and torch.equal(a, b) and a.stride() == b.stride()
        assert b.data_ptr() == before.data_ptr()  # the second call wrote into the first call's buffers
    assert not torch.equal(tensors(eager)[4], tensors(calls[0][0])[4])  # the two images' caches differ


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(official_dir):
    pipe = tiny_pipe(official_dir, "cuda")
    alone = Gen3DiffusionPipeline(pipe.mv_unet, pipe.vae, pipe.image_encoder, tiny_model_3d(use_prior=False).eval().cuda(),
                                  pipe.prompt_embeds, pipe.scheduler_cfg, pipe.cfg)  # the "w/o 2D prior" ablation
    alone.progress = False
    for b, seed in ((1, 0), (1, 1)):
        x = images(b, seed, "cuda")
        graphed, eager = (alone(x, seed=seed, sampler_cfg=cfg(cuda_graphs=on)) for on in (True, False))
        assert_same_output(graphed, eager, atol=1e-4)
    assert len(alone.graphs) == 2  # predict_3d_only + refine
    for refine in (True, False):
        for b, seed in ((1, 0), (1, 1), (2, 2)):  # the second input replays graphs captured for the first
            x = images(b, seed, "cuda")
            graphed = pipe(x, seed=seed, sampler_cfg=cfg(refine=refine, cuda_graphs=True))
            eager = pipe(x, seed=seed, sampler_cfg=cfg(refine=refine, cuda_graphs=False))
            assert_same_output(graphed, eager, atol=1e-4)
    assert len(pipe.graphs) == 6  # predict + refine and mvd + predict, per batch size


@pytest.mark.gpu
def test_demo_weights_fast_mode_matches_float32_reference():
    """Trained (bundled demo) weights, 50 steps: bf16 + CUDA graphs against float32 eager with separate decodes."""
    from gen3diffusion.pipeline import DEFAULT_WEIGHTS

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).cuda()
    ref_pipe = Gen3DiffusionPipeline.from_pretrained(DEFAULT_WEIGHTS, device="cuda", dtype=torch.float32)
    ref_pipe.sampler_cls, ref_pipe.progress = bench_sample.ReferenceSampler, False
    ref = bench_sample.to_cpu(ref_pipe(x, seed=0, sampler_cfg=SamplerConfig(cuda_graphs=False)))
    fast_pipe = Gen3DiffusionPipeline.from_pretrained(DEFAULT_WEIGHTS, device="cuda")
    fast_pipe.progress = False
    assert fast_pipe.dtype == torch.bfloat16
    fast = bench_sample.to_cpu(fast_pipe(x, seed=0))
    report = bench_sample.parity(fast, ref, torch.device("cuda"))
    print(report)
    assert report["render_psnr_db"] >= DEMO_PARITY_PSNR_DB, report
    assert report["views_psnr_db"] >= DEMO_PARITY_PSNR_DB, report


@pytest.mark.gpu
@pytest.mark.slow
def test_full_size_step_parts_bf16_match_float32():
    """Official sizes, random weights: one joint step's parts from the same inputs in bf16 vs float32."""
    device = torch.device("cuda")
    x = torch.rand(1, 3, 256, 256, device=device, generator=torch.Generator(device).manual_seed(0))
    pipe32 = bench_sample.build_pipeline(torch.float32, device)
    pipe16 = bench_sample.build_pipeline(torch.bfloat16, device)
    errors = bench_sample.part_parity(pipe32, pipe16, x)
    print(errors)
    assert all(errors[name] <= bound for name, bound in BF16_RELATIVE_ERROR.items()), errors
