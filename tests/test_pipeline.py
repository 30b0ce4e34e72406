"""The pipeline end to end on tiny random models in the authors' layout and in ours: shapes, determinism, batch
independence, and that Algorithm 2 really moves each DDIM update toward the re-encoded render (or, without
refinement, toward the MVD's own estimate)."""

from __future__ import annotations

import pytest
import torch

from gen3diffusion.config import SamplerConfig
from gen3diffusion.diffusion.sampler import JointSampler
from gen3diffusion.models.gaussian_unet import ContextViewCache
from gen3diffusion.pipeline import Gen3DiffusionPipeline
from tiny_weights import TINY_IMAGE_SIZE, official_pipeline_kwargs, write_official_folder

V = 4
STEPS = 2
GAUSSIANS = V * 16 * 16  # tiny 3D model: 32 px views -> 16 x 16 splats per view


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    return write_official_folder(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def pipe(official_dir):
    p = Gen3DiffusionPipeline.from_pretrained(official_dir, device="cpu", **official_pipeline_kwargs())
    p.progress = False
    return p


def images(b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=g)


def sampler_cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"num_steps": STEPS, "render_size": TINY_IMAGE_SIZE, **kw})


def test_output_shapes_and_ranges(pipe):
    out = pipe(images(), seed=0, sampler_cfg=sampler_cfg())
    g = out.gaussians
    assert pipe.image_size == TINY_IMAGE_SIZE
    assert g.means.shape == (1, GAUSSIANS, 3) and g.opacities.shape == (1, GAUSSIANS)
    assert out.views.shape == (1, V, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert 0 <= out.views.min() and out.views.max() <= 1
    assert g.means.abs().max() <= 1 and (g.scales > 0).all()
    assert torch.isfinite(g.colors).all()


def test_seeded_runs_are_identical_and_seeds_differ(pipe):
    x = images()
    a = pipe(x, seed=3, sampler_cfg=sampler_cfg())
    b = pipe(x, seed=3, sampler_cfg=sampler_cfg())
    c = pipe(x, seed=4, sampler_cfg=sampler_cfg())
    assert torch.equal(a.gaussians.means, b.gaussians.means) and torch.equal(a.views, b.views)
    assert not torch.allclose(a.gaussians.means, c.gaussians.means)


def test_batch_of_two_equals_two_single_runs(pipe):
    x = images(2)
    both = pipe(x, seed=1, sampler_cfg=sampler_cfg())
    for i in range(2):
        single = pipe(x[i:i + 1], seed=1, sampler_cfg=sampler_cfg())
        # float32 on CPU; batched convolutions may sum in another order
        torch.testing.assert_close(both.gaussians.means[i], single.gaussians.means[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(both.views[i], single.views[0], rtol=1e-4, atol=1e-5)


def test_refinement_moves_each_update_to_the_encoded_render(pipe):
    seen = []
    pipe(images(), seed=0, sampler_cfg=sampler_cfg(refine=True), callback=lambda i, t, out: seen.append(out))
    assert len(seen) == STEPS
    for out in seen:
        assert out.x0_3d is not None and out.gaussians is not None
        torch.testing.assert_close(out.x0_used[:, :V], out.x0_3d, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out.x0_used[:, :V], out.x0_2d, atol=1e-3)  # the MVD's own x0 was replaced


def test_without_refinement_each_update_uses_the_mvd_estimate(pipe):
    seen = []
    pipe(images(), seed=0, sampler_cfg=sampler_cfg(refine=False), callback=lambda i, t, out: seen.append(out))
    for out in seen:
        assert out.x0_3d is None and out.gaussians is None
        torch.testing.assert_close(out.x0_used[:, :V], out.x0_2d, rtol=1e-4, atol=1e-4)


def test_the_prompt_projected_once_per_call_samples_what_projecting_at_every_step_does(pipe):
    contexts = []
    hook = pipe.mv_unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(type(kwargs["context"])), with_kwargs=True
    )
    try:
        once = pipe(images(), seed=5, sampler_cfg=sampler_cfg())
        assert contexts and set(contexts) == {dict}  # every MVD call got the keys and values, not the tokens
        contexts.clear()
        pipe.sampler_cls = type("PerStepSampler", (JointSampler,), {"project_context": False})
        every_step = pipe(images(), seed=5, sampler_cfg=sampler_cfg())
        assert contexts and set(contexts) == {torch.Tensor}
    finally:
        hook.remove()
        pipe.sampler_cls = JointSampler
    assert torch.equal(once.gaussians.means, every_step.gaussians.means) and torch.equal(once.views, every_step.views)


def test_the_3d_context_view_cached_once_per_call_samples_what_running_it_at_every_step_does(pipe):
    contexts = []
    hook = pipe.model_3d.unet.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs.get("context")), with_kwargs=True
    )
    try:
        once = pipe(images(), seed=5, sampler_cfg=sampler_cfg())
        assert contexts and all(isinstance(c, ContextViewCache) for c in contexts)
        assert len({id(c.hidden) for c in contexts}) == 1  # computed once per call
        contexts.clear()
        pipe.sampler_cls = type("PerStepSampler", (JointSampler,), {"cache_context_view": False})
        every_step = pipe(images(), seed=5, sampler_cfg=sampler_cfg())
        assert contexts and all(c is None for c in contexts)
    finally:
        hook.remove()
        pipe.sampler_cls = JointSampler
    # float32 convolutions of 4 views and of 5 round differently; through the steps that grows to 3e-8 in the
    # Gaussians and 3e-6 in the views (measured)
    torch.testing.assert_close(once.gaussians.means, every_step.gaussians.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(once.views, every_step.views, rtol=0, atol=1e-5)


def test_project_layout_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ours")
    again = Gen3DiffusionPipeline.from_pretrained(tmp_path / "ours", device="cpu")
    again.progress = False
    a = pipe(images(), seed=2, sampler_cfg=sampler_cfg())
    b = again(images(), seed=2, sampler_cfg=sampler_cfg())
    torch.testing.assert_close(a.gaussians.means, b.gaussians.means, rtol=0, atol=0)


def test_incomplete_folders_list_what_is_missing(official_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gen3diffusion weights folder"):
        Gen3DiffusionPipeline.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").write_bytes((official_dir / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing model_1.safetensors"):
        Gen3DiffusionPipeline.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "mv_unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing mv_unet/config.json, model_3d/config.json, vae/config.json"):
        Gen3DiffusionPipeline.from_pretrained(tmp_path, device="cpu")


def test_wrong_image_size_is_rejected(pipe):
    with pytest.raises(ValueError, match=r"expected \[B, 3, 32, 32\]"):
        pipe(torch.rand(1, 3, 64, 64), sampler_cfg=sampler_cfg())


def test_3d_model_without_2d_prior_samples_on_its_own(pipe, tmp_path):
    """The "w/o 2D prior" ablation: the MVD never runs; x_t holds the V target views and each DDIM update moves
    toward the re-encoded render of the 3D model's Gaussians. The setting survives save / load."""
    from tiny_weights import tiny_model_3d

    model_3d = tiny_model_3d(use_prior=False).eval()
    alone = Gen3DiffusionPipeline(pipe.mv_unet, pipe.vae, pipe.image_encoder, model_3d, pipe.prompt_embeds,
                                  pipe.scheduler_cfg, pipe.cfg)
    alone.progress = False
    mvd_calls = []
    hook = pipe.mv_unet.register_forward_hook(lambda *args: mvd_calls.append(1))
    seen = []
    try:
        out = alone(images(), seed=0, sampler_cfg=sampler_cfg(), callback=lambda i, t, o: seen.append(o))
    finally:
        hook.remove()
    assert mvd_calls == [] and len(seen) == STEPS
    h = TINY_IMAGE_SIZE // 8
    for step in seen:
        assert step.x0_2d is None and step.x_prev.shape == (1, V, 4, h, h)
        torch.testing.assert_close(step.x0_used, step.x0_3d, rtol=1e-4, atol=1e-4)
    assert out.gaussians.means.shape == (1, GAUSSIANS, 3) and out.views.shape == (1, V, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    again = Gen3DiffusionPipeline.from_pretrained(alone.save_pretrained(tmp_path / "alone"), device="cpu")
    assert again.model_3d.config.use_prior is False
    torch.testing.assert_close(again(images(), seed=0, sampler_cfg=sampler_cfg()).gaussians.means, out.gaussians.means)


def test_compile_rejects_unknown_networks(pipe):
    with pytest.raises(ValueError, match=r"unknown networks \['unet'\]"):
        pipe.compile(networks=("mv_unet", "unet"))


def compiled_networks(p: Gen3DiffusionPipeline) -> dict[str, bool]:
    return {name: module._compiled_call_impl is not None for name, module in [
        ("mv_unet", p.mv_unet), ("vae encoder", p.vae.encoder), ("vae decoder", p.vae.decoder),
        ("3D U-Net", p.model_3d.unet)]}


def test_compile_by_default_wraps_all_three_networks(official_dir):
    p = Gen3DiffusionPipeline.from_pretrained(official_dir, device="cpu", **official_pipeline_kwargs())
    assert set(compiled_networks(p.compile()).values()) == {True}  # wrapping only: nothing compiles until a call


@pytest.mark.slow
def test_compiling_only_the_mv_unet_samples_what_eager_does(official_dir):
    """``compile(networks=("mv_unet",))`` compiles that network alone (the VAE and the 3D U-Net stay eager) and the
    compiled pipeline samples the eager one's Gaussians up to float32 rounding."""
    eager, compiled = (Gen3DiffusionPipeline.from_pretrained(official_dir, device="cpu", **official_pipeline_kwargs())
                       for _ in range(2))
    compiled.compile(networks=("mv_unet",))
    assert compiled_networks(compiled) == {"mv_unet": True, "vae encoder": False, "vae decoder": False,
                                           "3D U-Net": False}
    for p in (eager, compiled):
        p.progress = False
    expected = eager(images(), seed=3, sampler_cfg=sampler_cfg()).gaussians
    got = compiled(images(), seed=3, sampler_cfg=sampler_cfg()).gaussians
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
