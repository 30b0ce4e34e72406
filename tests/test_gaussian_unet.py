"""3D-GS diffusion model: official key layout, input layout, output layout and ranges, time conditioning, LGM
initialisation (parity with the 9-channel model), save/load, checkpointing, and a tiny overfitting run."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import reference_dir
from diffusers.models.embeddings import get_timestep_embedding
from gen3diffusion.cameras import Cameras, plucker_rays, target_cameras
from gen3diffusion.config import GaussianUNetConfig, resolve_preset, to_dict
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.models.gaussian_unet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GaussianDiffusionModel,
    init_from_lgm,
    load_gaussian_model,
    load_official_weights,
    timestep_features,
)

FOVY = 49.1
LGM_CHANNELS = [0, 1, 2, 6, 7, 8, 9, 10, 11]  # the 12-channel input without the x_t slot = LGM's 9 channels


def tiny_kwargs(**overrides) -> dict:
    section = OmegaConf.load(resolve_preset("tiny")).gaussian_unet
    return to_dict(OmegaConf.merge(OmegaConf.structured(GaussianUNetConfig), section, overrides))


def tiny_model(seed: int = 0, **overrides) -> GaussianDiffusionModel:
    torch.manual_seed(seed)
    return GaussianDiffusionModel(**tiny_kwargs(**overrides))


def make_inputs(b: int = 2, v: int = 4, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    cams = Cameras.from_fovy(target_cameras(num_views=v), FOVY, size)
    return {
        "x0_hat": torch.rand(b, v, 3, size, size, generator=g),
        "x_t": torch.rand(b, v, 3, size, size, generator=g),
        "rays": plucker_rays(cams).expand(b, -1, -1, -1, -1),  # [B, V, 6, H, W]
        "t": torch.randint(1, 1000, (b,), generator=g),
        "context": torch.rand(b, 3, size, size, generator=g),
    }


def manifest(name: str) -> dict:
    ref = reference_dir()
    path = ref / name if ref else None
    if path is None or not path.is_file():
        pytest.skip(f"{name} not found: set GEN3D_REFERENCE_DIR to the shared reference folder")
    return json.loads(path.read_text())


def meta_state_dict(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


### configuration and official layout


def test_config_dataclass_is_the_constructor():
    params = set(inspect.signature(GaussianDiffusionModel.__init__).parameters) - {"self"}
    assert params == {f.name for f in dataclasses.fields(GaussianUNetConfig)}
    with torch.device("meta"):
        model = GaussianDiffusionModel(**to_dict(GaussianUNetConfig()))
    assert model.config.down_channels == [64, 128, 256, 512, 1024, 1024] and model.config.input_size == 256


def test_timestep_features_match_diffusers():
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_features(t, 64), ref)


def test_official_size_matches_manifest():
    ref = manifest("gen3d_gaussian_unet_keys.json")
    with torch.device("meta"):
        model = GaussianDiffusionModel()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref["keys"]
    assert sum(math.prod(s) for s in ours.values()) == ref["num_params"]
    assert model.splat_size == 128


def test_manifest_state_dict_loads_strictly_without_lpips(caplog):
    ref = manifest("gen3d_gaussian_unet_keys.json")
    with torch.device("meta"):
        model = GaussianDiffusionModel()
    lpips_keys = {k: [1] for k in ref["lpips_keys_if_present"]}  # shapes not in the manifest; dropped anyway
    state = meta_state_dict(ref["keys"]) | meta_state_dict(lpips_keys)
    with caplog.at_level("INFO"):
        load_official_weights(model, state)
    assert f"dropped {len(ref['lpips_keys_if_present'])} lpips_loss." in caplog.text
    # strict: a missing or mis-shaped tensor fails
    broken = dict(state)
    broken.pop("unet.mid_block.attns.0.attn.proj.bias")
    with pytest.raises((RuntimeError, ValueError), match="mid_block.attns.0.attn.proj.bias"):
        load_official_weights(model, broken)
    broken = dict(state, **{"unet.conv_in.weight": torch.empty(64, 9, 3, 3, device="meta")})
    with pytest.raises((RuntimeError, ValueError), match="conv_in"):
        load_official_weights(model, broken)


def test_official_file_round_trip(tmp_path):
    """A model_1.safetensors-like file (model tensors plus LPIPS extras) loads strictly and gives the same output."""
    model = tiny_model().eval()
    state = model.state_dict() | {"lpips_loss.lin0.model.1.weight": torch.ones(1, 64, 1, 1)}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model_1.safetensors")
    loaded = load_gaussian_model(tmp_path, tiny_kwargs())
    inp = make_inputs(b=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_raw(**inp), model.forward_raw(**inp), rtol=0, atol=0)


def test_lgm_big_manifest_maps_onto_the_model():
    lgm = manifest("lgm_big_keys.json")["keys"]
    with torch.device("meta"):
        model = GaussianDiffusionModel()
    report = init_from_lgm(model, meta_state_dict(lgm) | {"lpips_loss.net.slice1.0.weight": torch.empty(1)})
    assert len(report.loaded) == len(lgm) - 1
    assert list(report.adapted) == ["unet.conv_in.weight"]
    assert report.mismatched == {} and report.ignored == ["lpips_loss.net.slice1.0.weight"]
    new = set(report.initialised)
    assert len(new) == 62 and all(".time_emb_proj." in k or k.startswith("unet.time_embedding.") for k in new)


### input and output layout


def test_build_input_puts_context_view_last():
    model = tiny_model()
    inp = make_inputs(b=2, v=3)
    x, timesteps = model.build_input(**inp)
    x = x.view(2, 4, 12, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[:, :3, 0:3], (inp["x0_hat"] - mean) / std)
    torch.testing.assert_close(x[:, :3, 3:6], (inp["x_t"] - mean) / std)
    torch.testing.assert_close(x[:, :3, 6:], inp["rays"])
    ctx = (inp["context"] - mean) / std
    torch.testing.assert_close(x[:, 3, 0:3], ctx)
    torch.testing.assert_close(x[:, 3, 3:6], ctx)
    assert (x[:, 3, 6:] == 0).all()
    t = inp["t"].float()
    assert timesteps.tolist() == [t[0]] * 3 + [0.0] + [t[1]] * 3 + [0.0]


def test_rgb_is_clamped_before_normalisation():
    model = tiny_model()
    inp = make_inputs(b=1, v=2)
    over = dict(inp, x0_hat=inp["x0_hat"] * 3 - 1)
    clamped = dict(inp, x0_hat=over["x0_hat"].clamp(0, 1))
    torch.testing.assert_close(model.build_input(**over)[0], model.build_input(**clamped)[0])


@pytest.mark.parametrize("views", [4, 2])
def test_output_count_order_and_ranges(views):
    model = tiny_model()
    inp = make_inputs(b=2, v=views)
    s = model.splat_size
    assert s == 16
    with torch.no_grad():
        raw = model.forward_raw(**inp)
        x, timesteps = model.build_input(**inp)
        grid = model.conv(model.unet(x, timesteps, num_views=views + 1)).view(2, views + 1, 14, s, s)
        gs = model(**inp)
    assert raw.shape == (2, views * s * s, 14)
    # view-major, then row, then column; the context view (index V) is not among them
    v, i, j = views - 1, 3, 11
    torch.testing.assert_close(raw[:, v * s * s + i * s + j], grid[:, v, :, i, j])
    torch.testing.assert_close(raw.view(2, views, s, s, 14).permute(0, 1, 4, 2, 3), grid[:, :views])
    assert isinstance(gs, Gaussians) and gs.num_gaussians == views * s * s and gs.batch_size == 2
    assert gs.means.shape == (2, views * s * s, 3) and gs.means.abs().max() <= 1
    assert gs.scales.shape == (2, views * s * s, 3) and (gs.scales > 0).all()
    assert gs.rotations.shape == (2, views * s * s, 4)
    torch.testing.assert_close(gs.rotations.norm(dim=-1), torch.ones(2, views * s * s))
    assert gs.opacities.shape == (2, views * s * s) and ((gs.opacities > 0) & (gs.opacities < 1)).all()
    assert gs.colors.shape == (2, views * s * s, 3) and ((gs.colors >= 0) & (gs.colors <= 1)).all()
    assert all(t.dtype == torch.float32 for t in (gs.means, gs.scales, gs.rotations, gs.opacities, gs.colors))


@pytest.mark.parametrize("up_attention", [(True, True, False), (False, False, False)])
@pytest.mark.parametrize("batch, channels_last", [(1, False), (2, False), (2, True)])
def test_trimming_the_context_view_after_the_last_attention_is_exact(up_attention, batch, channels_last):
    # the layers after the last attention are per view: running them on the target views alone changes nothing
    model = tiny_model(up_attention=list(up_attention)).double()
    inp = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs(b=batch).items()}
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, timesteps = model.build_input(**inp)
    with torch.no_grad():
        full = model.unet(x, timesteps, num_views=5)  # [B*5, 14, S, S]
        kept = model.unet(x, timesteps, num_views=5, keep_views=4)  # [B*4, 14, S, S]
        model.trim_context_view = False
        untrimmed = model.forward_raw(**inp)
        model.trim_context_view = True
        trimmed = model.forward_raw(**inp)
    assert kept.shape == (batch * 4, *full.shape[1:])
    assert kept.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(kept, full.unflatten(0, (batch, 5))[:, :4].flatten(0, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(trimmed, untrimmed, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="keep_views"):
        model.unet(x, timesteps, num_views=5, keep_views=6)


@pytest.mark.parametrize("down_attention, up_attention", [
    ((False, False, True, True), (True, True, False)),  # tiny: one of the prefix's skips is read with attention
    ((True, True, True, True), (True, True, False)),  # the prefix is conv_in and one residual block
    ((False, False, False, True), (False, False, False)),  # no up block attends
])
@pytest.mark.parametrize("batch, channels_last", [(1, False), (2, False), (2, True)])
def test_cached_context_view_is_exact(down_attention, up_attention, batch, channels_last):
    # the layers before the first attention are per view, and the context view's input does not change between
    # steps: its cached activations give the same output as running it with the target views
    model = tiny_model(down_attention=list(down_attention), up_attention=list(up_attention)).double()
    inp = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs(b=batch).items()}
    if channels_last:
        model.to(memory_format=torch.channels_last)
    assert model.can_cache_context_view
    with torch.no_grad():
        cache = model.encode_context_view(inp["context"])
        full = model.forward_raw(**inp)
        cached = model.forward_raw(**dict(inp, context=cache))
        other = model.forward_raw(**dict(inp, context=model.encode_context_view(inp["context"].flip(-1))))
    assert cache.hidden.shape[0] == batch
    assert cache.hidden.is_contiguous(memory_format=torch.channels_last) == channels_last
    if down_attention == (False, False, True, True):  # the skip of block 1's downsampler, read by up block 1
        assert list(cache.skips) == [6]
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-12)
    assert (other - full).abs().max() > 1e-6  # the cache is what the context view contributes


def test_official_architecture_caches_the_prefix_to_block_3():
    # LGM big: attention from the 32x32 level (down block 3) on; the 256-channel 32x32 output of block 2's
    # downsampler (skip 9 of conv_in + 3 per down block) is read by the up block that attends last (512 at 32x32)
    with torch.device("meta"):
        model = GaussianDiffusionModel()
    assert model.unet.first_down_attention == 3
    assert model.unet.context_skip_indices == [9]


def test_cached_context_view_rejects_what_it_cannot_serve():
    model = tiny_model()
    inp = make_inputs(b=2)
    cache = model.encode_context_view(inp["context"])
    with pytest.raises(ValueError, match="cached context view is for 2 samples, x_t for 1"):
        model.forward_raw(**{k: v[:1] for k, v in inp.items() if k != "context"}, context=cache)
    model.trim_context_view = False
    assert not model.can_cache_context_view
    with pytest.raises(ValueError, match="trim_context_view"):
        model.encode_context_view(inp["context"])
    with pytest.raises(ValueError, match="trim_context_view"):
        model.forward_raw(**dict(inp, context=cache))
    no_down_attention = tiny_model(down_attention=[False] * 4)
    assert not no_down_attention.can_cache_context_view
    with pytest.raises(ValueError, match="down path"):
        no_down_attention.encode_context_view(inp["context"])


def test_forward_traces_into_one_graph_for_torch_compile():
    # a graph break splits the compiled U-Net into a graph per block, recompiled per block up to dynamo's limit
    model = tiny_model().eval()
    inp = make_inputs(b=1)
    x, timesteps = model.build_input(**inp)
    with torch.no_grad():
        explained = torch._dynamo.explain(model.unet)(x, timesteps, num_views=5, keep_views=4)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        cache = model.encode_context_view(inp["context"])
        x, timesteps = model.build_input(**dict(inp, context=None))  # the target views only
        explained = torch._dynamo.explain(model.unet)(x, timesteps, num_views=5, keep_views=4, context=cache)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_trimmed_views_keep_their_gradients():
    model = tiny_model().double()
    model.unet.gradient_checkpointing = True
    inp = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs(b=2).items()}
    grads = []
    for trim in (False, True):
        model.zero_grad()
        model.trim_context_view = trim
        model.forward_raw(**inp).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)


def test_context_view_is_attended_to():
    model = tiny_model()
    inp = make_inputs(b=1)
    with torch.no_grad():
        a = model.forward_raw(**inp)
        b = model.forward_raw(**dict(inp, context=inp["context"].flip(-1)))
    assert (a - b).abs().max() > 1e-4


def test_timestep_changes_the_output():
    model = tiny_model()
    inp = make_inputs(b=1)
    with torch.no_grad():
        early = model.forward_raw(**dict(inp, t=torch.tensor([10])))
        late = model.forward_raw(**dict(inp, t=torch.tensor([900])))
        again = model.forward_raw(**dict(inp, t=torch.tensor([900])))
    assert (early - late).abs().max() > 1e-3
    torch.testing.assert_close(late, again, rtol=0, atol=0)


def test_batch_equals_singles():
    model = tiny_model()
    inp = make_inputs(b=2)
    with torch.no_grad():
        both = model.forward_raw(**inp)
        singles = [model.forward_raw(**{k: v[i:i + 1] for k, v in inp.items()}) for i in range(2)]
    # float32 reassociation across batch sizes only
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, change",
    [("x_t", lambda t: t[:, :, :, :16]), ("rays", lambda t: t[:, :3]), ("context", lambda t: t[:, None]),
     ("t", lambda t: t[:, None]), ("x0_hat", lambda t: t[:, :, :, :16, :16])],
)
def test_bad_shapes_raise(name, change):
    model = tiny_model()
    inp = make_inputs(b=2)
    with pytest.raises(ValueError, match="must be"):
        model(**dict(inp, **{name: change(inp[name])}))


def test_bad_shapes_without_the_prior_name_the_tensor():
    # every input's shape follows x_t's (without the prior there is no x0_hat to cite)
    model = tiny_model(in_channels=9, use_prior=False)
    inp = dict(make_inputs(b=2), x0_hat=None)
    with pytest.raises(ValueError, match=r"rays must be \[2, 4, 6, 32, 32\] to match x_t \(2, 4, 3, 32, 32\)"):
        model(**dict(inp, rays=inp["rays"][:, :3]))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="up_attention"):
        GaussianDiffusionModel(**tiny_kwargs(up_attention=[True]))
    with pytest.raises(ValueError, match="attention_heads=3"):
        GaussianDiffusionModel(**tiny_kwargs(attention_heads=3))
    with pytest.raises(ValueError, match="input_size 36"):
        GaussianDiffusionModel(**tiny_kwargs(input_size=36))


### persistence and memory


def test_save_and_load_pretrained(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    loaded = GaussianDiffusionModel.from_pretrained(tmp_path).eval()
    assert loaded.config.down_channels == model.config.down_channels
    inp = make_inputs(b=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_raw(**inp), model.forward_raw(**inp), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    inp = make_inputs(b=1)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.forward_raw(**inp).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


### LGM initialisation


def tiny_lgm_state(seed: int = 1) -> tuple[GaussianDiffusionModel, dict[str, torch.Tensor]]:
    """A 9-channel model standing in for LGM: its time layers are zeroed (LGM has none) and left out of its
    state dict, whose keys are then exactly LGM's."""
    lgm = tiny_model(seed, in_channels=9, use_prior=False)
    with torch.no_grad():
        for name, p in lgm.named_parameters():
            if ".time_emb_proj." in name:
                p.zero_()
    state = {k: v.clone() for k, v in lgm.state_dict().items()
             if ".time_emb_proj." not in k and not k.startswith("unet.time_embedding.")}
    return lgm, state


def test_init_from_lgm_report_and_conv_in():
    lgm, state = tiny_lgm_state()
    model = tiny_model(seed=2)
    report = init_from_lgm(model, state | {"lpips_loss.lin0.model.1.weight": torch.zeros(1)})
    w, w_lgm = model.unet.conv_in.weight, state["unet.conv_in.weight"]
    torch.testing.assert_close(w[:, 0:3], w_lgm[:, 0:3], rtol=0, atol=0)
    assert (w[:, 3:6] == 0).all()
    torch.testing.assert_close(w[:, 6:12], w_lgm[:, 3:9], rtol=0, atol=0)
    assert list(report.adapted) == ["unet.conv_in.weight"]
    assert sorted(report.loaded) == sorted(k for k in state if k != "unet.conv_in.weight")
    assert report.ignored == ["lpips_loss.lin0.model.1.weight"] and report.mismatched == {}
    own = model.state_dict()
    for k in report.initialised:
        assert ".time_emb_proj." in k or k.startswith("unet.time_embedding."), k
        if ".time_emb_proj." in k:
            assert (own[k] == 0).all()
    assert "1 adapted" in report.summary()


def test_lgm_initialised_model_computes_lgm():
    """At init the 12-channel model equals the 9-channel LGM on [x0 RGB | rays] (incl. the context view), for any
    x_t and t; and the zeroed time projections still receive gradients."""
    lgm, state = tiny_lgm_state()
    model = tiny_model(seed=2)
    init_from_lgm(model, state)
    inp = make_inputs(b=2)
    x, _ = model.build_input(**inp)
    with torch.no_grad():
        expected = lgm.conv(lgm.unet(x[:, LGM_CHANNELS], torch.zeros(x.shape[0]), num_views=5))  # [B*5, 14, S, S]
        expected = expected.view(2, 5, 14, 16, 16)[:, :4].permute(0, 1, 3, 4, 2).reshape(2, -1, 14)
        other = dict(inp, x_t=torch.rand_like(inp["x_t"]), t=torch.tensor([3, 999]))
        got = model.forward_raw(**inp)
        got_other = model.forward_raw(**other)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_other, expected, rtol=1e-5, atol=1e-5)
    model.forward_raw(**inp).square().mean().backward()
    proj = model.unet.down_blocks[0].nets[0].time_emb_proj
    assert proj.weight.grad.abs().max() > 0 and proj.bias.grad.abs().max() > 0
    assert model.unet.conv_in.weight.grad[:, 3:6].abs().max() > 0  # the x_t slot learns from the first step


### training through the renderer


def synthetic_object(size: int = 32, n: int = 48) -> tuple[Cameras, object]:
    """A fixed random cloud of Gaussians in [-0.3, 0.3]^3 rendered at the 4 target views (white background)."""
    from gen3diffusion.render import rasterize

    g = torch.Generator().manual_seed(0)
    target = Gaussians(means=(torch.rand(1, n, 3, generator=g) - 0.5) * 0.6, scales=torch.full((1, n, 3), 0.06),
                       rotations=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, n, 4).clone(),
                       opacities=torch.full((1, n), 0.9), colors=torch.rand(1, n, 3, generator=g))
    cams = Cameras.from_fovy(target_cameras(), FOVY, size)
    with torch.no_grad():
        return cams, rasterize(target, cams)


def render_loss(model: GaussianDiffusionModel, cams: Cameras, gt, t: int = 100) -> torch.Tensor:
    rays = plucker_rays(cams)[None]  # [1, 4, 6, H, W]
    gs = model(gt.rgb, gt.rgb, rays, torch.tensor([t]), gt.rgb[:, 0])
    out = model.render(gs, cams)
    return torch.nn.functional.mse_loss(out.rgb, gt.rgb) + torch.nn.functional.mse_loss(out.alpha, gt.alpha)


def test_gradients_reach_every_parameter_through_the_renderer():
    cams, gt = synthetic_object()
    model = tiny_model()
    render_loss(model, cams, gt).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.slow
def test_tiny_model_overfits_one_object():
    """Reproduce the 4 renders of a fixed Gaussian cloud from those renders: the render loss falls at least 20x."""
    cams, gt = synthetic_object()
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start, losses = time.time(), []
    for _ in range(150):
        loss = render_loss(model, cams, gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:  # about 30 steps, a few seconds on one core
            break
    assert losses[-1] < losses[0] / 20, f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps"
    assert time.time() - start < 120


### CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_official_size_bf16_autocast_matches_fp32():
    """The official-size model on CUDA: bf16 autocast (flash attention) agrees with fp32, and the tiny model on
    CUDA agrees with the CPU (float32 math attention)."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GaussianDiffusionModel().eval()
    inp = {k: v.cuda() for k, v in make_inputs(b=1, size=256).items()}
    with torch.no_grad():
        ref = model.forward_raw(**inp)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model.forward_raw(**inp)
    # bf16 keeps 8 mantissa bits; through ~60 layers the relative error was 1.8% on an H100 (random weights)
    assert ref.shape == (1, 4 * 128 * 128, 14) and low.dtype == torch.float32
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel
    tiny = tiny_model()
    inp = make_inputs(b=2)
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):  # cuDNN convs default to TF32
        cpu = tiny.forward_raw(**inp)
        gpu = tiny.cuda().forward_raw(**{k: v.cuda() for k, v in inp.items()}).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)  # float32 on both sides; summation order differs


def test_model_without_2d_prior_reads_x_t_only():
    """The "w/o 2D prior" ablation (Eq. 6): 9 input channels, x0_hat must be None, and x0_hat has no influence."""
    with pytest.raises(ValueError, match="in_channels must be 9"):
        tiny_model(use_prior=False)
    model = tiny_model(in_channels=9, use_prior=False).eval()
    inputs = make_inputs()
    with pytest.raises(ValueError, match="x0_hat"):
        model(**inputs)
    with torch.no_grad():
        raw = model.forward_raw(**{**inputs, "x0_hat": None})
        changed = model.forward_raw(**{**inputs, "x0_hat": None, "x_t": inputs["x_t"].flip(-1)})
    assert raw.shape == (2, 4 * model.splat_size**2, 14) and torch.isfinite(raw).all()
    assert not torch.allclose(raw, changed)  # x_t does reach the output
    with pytest.raises(ValueError, match="x0_hat"):
        tiny_model().forward_raw(**{**inputs, "x0_hat": None})
