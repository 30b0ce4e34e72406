"""Training losses: closed forms of every term, LPIPS behaviour, and the network-free LPIPS factory."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from gen3diffusion.diffusion.losses import (
    VGG16_FILE,
    LossWeights,
    build_lpips,
    loss_3d,
    loss_joint,
    loss_mvd,
    lpips_distance,
)
from gen3diffusion.render import RenderOutput

B, V, H = 1, 2, 16


@pytest.fixture(scope="module")
def random_lpips(tmp_path_factory):
    """LPIPS with a random VGG (an empty hub dir guarantees no cached VGG is picked up); any download fails."""
    import torchvision.models._api as tv_api

    def no_download(*args, **kwargs):
        raise AssertionError(f"LPIPS tried to download {args[:1]}")

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
        mp.setattr(torch.hub, "load_state_dict_from_url", no_download)
        mp.setattr(tv_api, "load_state_dict_from_url", no_download)
        return build_lpips(allow_random=True)


def constant_render(rgb: float, alpha: float, distortion: float) -> RenderOutput:
    full = lambda c, v: torch.full((B, V, c, H, H), v)  # noqa: E731
    return RenderOutput(rgb=full(3, rgb), alpha=full(1, alpha), depth=full(1, 1.5), distortion=full(1, distortion))


def test_loss_3d_closed_form_without_lpips():
    render = constant_render(rgb=0.5, alpha=0.2, distortion=0.01)
    gt_rgb, gt_mask = torch.ones(B, V, 3, H, H), torch.ones(B, V, 1, H, H)
    out = loss_3d(render, gt_rgb, gt_mask, None, LossWeights(lambda_lpips=0.0, lambda_distortion=100.0))
    assert out["loss_rgb"].item() == pytest.approx(0.25)
    assert out["loss_alpha"].item() == pytest.approx(0.64)
    assert out["loss_distortion"].item() == pytest.approx(0.01)
    assert out["loss_lpips"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.25 + 0.64 + 100 * 0.01)
    assert out["psnr"].item() == pytest.approx(-10 * math.log10(0.25))


def test_loss_3d_adds_weighted_lpips(random_lpips):
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(B, V, 3, H, H, generator=g)
    render = RenderOutput(rgb=rgb, alpha=torch.ones(B, V, 1, H, H), depth=torch.ones(B, V, 1, H, H),
                          distortion=torch.zeros(B, V, 1, H, H))
    gt = (rgb + 0.2 * torch.randn(rgb.shape, generator=g)).clamp(0, 1)
    weights = LossWeights(lambda_lpips=2.0, lpips_resolution=32)
    out = loss_3d(render, gt, torch.ones(B, V, 1, H, H), random_lpips, weights)
    with torch.no_grad():
        expected = lpips_distance(random_lpips, rgb, gt, 32).mean()
    assert out["loss_lpips"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_rgb"].item() + 2.0 * expected.item(), rel=1e-5)


def test_loss_3d_needs_lpips_when_weighted():
    render = constant_render(0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="lambda_lpips=1.0 needs an LPIPS module"):
        loss_3d(render, torch.ones(B, V, 3, H, H), torch.ones(B, V, 1, H, H), None)


def test_loss_3d_rejects_mismatched_shapes():
    render = constant_render(0.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="gt_rgb must be"):
        loss_3d(render, torch.ones(B, V, 3, H, H + 1), torch.ones(B, V, 1, H, H), None, LossWeights(0.0))
    with pytest.raises(ValueError, match="gt_mask must be"):
        loss_3d(render, torch.ones(B, V, 3, H, H), torch.ones(B, V, 3, H, H), None, LossWeights(0.0))


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(random_lpips):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 24, 24, generator=g)
    noise = torch.randn(img.shape, generator=g)
    with torch.no_grad():
        same = lpips_distance(random_lpips, img, img, 32)
        small = lpips_distance(random_lpips, (img + 0.05 * noise).clamp(0, 1), img, 32)
        large = lpips_distance(random_lpips, (img + 0.3 * noise).clamp(0, 1), img, 32)
    assert same.shape == (2,) and same.abs().max() < 1e-6
    assert (small > 1e-4).all() and (large > 2 * small).all()


def test_lpips_is_frozen(random_lpips):
    assert not any(p.requires_grad for p in random_lpips.parameters()) and not random_lpips.training


def test_build_lpips_without_weights_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=VGG16_FILE):
        build_lpips()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_lpips(tmp_path / "nope.pth")
    assert build_lpips(lambda_lpips=0.0) is None


def _vgg_features_state(lpips) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG16 state dict (``features.{i}.*`` plus a classifier) with fresh random values."""
    state = {}
    for name, p in lpips.net.named_parameters():
        index, kind = name.split(".")[1:]
        state[f"features.{index}.{kind}"] = torch.randn(p.shape)
    state["classifier.0.weight"] = torch.randn(4, 4)
    return state


def test_build_lpips_loads_torchvision_vgg_from_hub_cache(tmp_path, monkeypatch, random_lpips):
    state = _vgg_features_state(random_lpips)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / VGG16_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    lpips = build_lpips()
    loaded = lpips.state_dict()
    for index, kind, slice_ in [(0, "weight", 1), (12, "weight", 3), (28, "bias", 5)]:
        torch.testing.assert_close(loaded[f"net.slice{slice_}.{index}.{kind}"], state[f"features.{index}.{kind}"],
                                   rtol=0, atol=0)


def test_build_lpips_loads_official_lpips_tensors(tmp_path, random_lpips):
    # the 33 names a saved model_1.safetensors can hold: VGG slices, scaling buffers, lin0..lin4 (no lins.* aliases)
    state = {f"lpips_loss.{k}": torch.randn(v.shape) for k, v in random_lpips.state_dict().items()
             if not k.startswith("lins.")}
    assert len(state) == 33
    save_file(state, tmp_path / "model_1_lpips.safetensors")
    lpips = build_lpips(tmp_path / "model_1_lpips.safetensors")
    loaded = lpips.state_dict()
    for key in ["net.slice3.12.weight", "lin2.model.1.weight", "lins.2.model.1.weight"]:
        torch.testing.assert_close(loaded[key], state["lpips_loss." + key.replace("lins.2", "lin2")], rtol=0, atol=0)


def test_build_lpips_rejects_a_foreign_file(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a VGG16 / LPIPS-VGG state dict"):
        build_lpips(tmp_path / "other.pth")


def test_loss_mvd_uses_only_the_target_frames():
    eps = torch.zeros(2, 4, 4, 8, 8)
    pred = torch.cat([torch.full((2, 4, 4, 8, 8), 0.5), torch.full((2, 1, 4, 8, 8), 100.0)], dim=1)
    assert loss_mvd(pred, eps).item() == pytest.approx(0.25)
    assert loss_mvd(pred[:, :4], eps).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="eps_pred must be"):
        loss_mvd(pred[:, :, :3], eps)
    with pytest.raises(ValueError, match="eps_pred must be"):
        loss_mvd(torch.zeros(2, 6, 4, 8, 8), eps)


def test_loss_joint_is_the_sum():
    terms = loss_3d(constant_render(0.5, 0.2, 0.01), torch.ones(B, V, 3, H, H), torch.ones(B, V, 1, H, H), None,
                    LossWeights(lambda_lpips=0.0))
    joint = loss_joint(torch.tensor(0.3), terms)
    assert joint["loss"].item() == pytest.approx(0.3 + terms["loss"].item())
    assert joint["loss_3d"] is terms["loss"] and joint["loss_rgb"] is terms["loss_rgb"]
    assert joint["loss_mvd"].item() == pytest.approx(0.3)
