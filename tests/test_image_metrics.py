"""Image metrics: closed forms (PSNR, Fréchet distance), skimage parity (SSIM), plumbing of the learned metrics.

Tests named ``*plumbing*`` run LPIPS / FID networks with RANDOM weights (``allow_random=True``) or tiny random CLIP
models: they check shapes, loading and invariants, never metric values.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from gen3diffusion.eval import backbones
from gen3diffusion.eval.image_metrics import (
    FrechetDistance,
    LPIPSMetric,
    MetricUnavailable,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    psnr,
    ssim,
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, no weight variables, and any socket connection fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in (backbones.LPIPS_BACKBONE_ENV, backbones.FID_WEIGHTS_ENV, backbones.CLIP_FOLDER_ENV):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("metric code tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return backbones.torch_hub_checkpoint_dir()


def _images(seed: int, shape=(2, 3, 32, 40)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


### PSNR and SSIM


def test_psnr_of_known_mse():
    target = torch.full((2, 3, 8, 8), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1, :, :4] += 0.2  # half the pixels off by 0.2: MSE 0.02
    expected = torch.tensor([20.0, 10 * math.log10(1 / 0.02)])
    torch.testing.assert_close(psnr(pred, target), expected, rtol=0, atol=1e-4)  # float32 rounding of 0.5 + 0.1
    assert torch.isinf(psnr(target, target)).all()


def test_ssim_identical_is_one_and_falls_with_noise():
    x = _images(0)
    for variant in ("skimage", "gaussian"):
        torch.testing.assert_close(ssim(x, x, variant), torch.ones(2))
        values = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x, variant).mean() for s in (0.02, 0.1, 0.3)]
        assert 1 > values[0] > values[1] > values[2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssim_matches_skimage_uniform_window(dtype):
    pred, target = _images(1).to(dtype), _images(2).to(dtype)
    ours = ssim(pred, target, "skimage")
    for b in range(2):
        ref = structural_similarity(pred[b].double().numpy(), target[b].double().numpy(), channel_axis=0,
                                    data_range=1.0)
        assert abs(float(ours[b]) - ref) < 1e-6  # both accumulate in float64; 1e-6 covers float32 output rounding


def test_ssim_matches_skimage_gaussian_window():
    pred, target = _images(3).double(), (_images(3).double() * 0.8 + 0.1 * _images(4).double())
    ours = ssim(pred, target, "gaussian")
    for b in range(2):
        ref = structural_similarity(pred[b].numpy(), target[b].numpy(), channel_axis=0, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(float(ours[b]) - ref) < 1e-6


def test_metrics_reject_bad_inputs():
    x = _images(0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        psnr(x, x[:, :2])
    with pytest.raises(ValueError, match="outside"):
        ssim(x * 2 - 1, x)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :6, :6], x[..., :6, :6], "skimage")


### LPIPS


def test_lpips_without_weights_is_unavailable(offline):
    result = LPIPSMetric.load("alex")
    assert isinstance(result, MetricUnavailable)
    assert "alexnet-owt-7be5be79.pth" in result.reason
    assert isinstance(LPIPSMetric.load("vgg"), MetricUnavailable)


def test_lpips_plumbing_random_trunk(offline):
    torch.manual_seed(0)
    metric = LPIPSMetric.load("alex", allow_random=True)
    assert isinstance(metric, LPIPSMetric) and not metric.backbone.pretrained
    assert "RANDOM" in metric.describe()
    x = _images(5, (2, 3, 64, 64))
    torch.testing.assert_close(metric(x, x), torch.zeros(2))
    dists = [metric((x + s * torch.randn_like(x)).clamp(0, 1), x).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 0 < dists[0] < dists[1] < dists[2]
    torch.testing.assert_close(metric(x[:1], x[1:]), metric(x[1:], x[:1]))  # symmetric


def test_lpips_plumbing_loads_torchvision_trunk_from_hub_cache(offline):
    import torchvision

    offline.mkdir(parents=True)
    state = torchvision.models.alexnet(weights=None).state_dict()  # random, in torchvision's key layout
    torch.save(state, offline / backbones.LPIPS_BACKBONE_FILES["alex"])
    metric = LPIPSMetric.load("alex")
    assert isinstance(metric, LPIPSMetric) and metric.backbone.pretrained
    trunk = metric.backbone.module.net
    torch.testing.assert_close(trunk.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(trunk.slice5, "10").bias, state["features.10.bias"])


### Fréchet distance


def _exact_gaussian_features(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Features whose sample mean and (unbiased) covariance are exactly mu and cov."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))
    z -= z.mean(axis=0)
    whiten = np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)))
    return mu + z @ whiten.T @ np.linalg.cholesky(cov).T


def test_frechet_distance_exact_statistics():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, -1.0, 0.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    f1 = _exact_gaussian_features(mu1, np.diag(var1), 40, 0)
    f2 = _exact_gaussian_features(mu2, np.diag(var2), 60, 1)
    mean, cov = feature_statistics(f1)
    np.testing.assert_allclose(mean, mu1, atol=1e-12)
    np.testing.assert_allclose(cov, np.diag(var1), atol=1e-12)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance_of_features(f1, f2) == pytest.approx(closed_form, rel=1e-9)
    assert frechet_distance_of_features(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_large_samples_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 2.0, -1.0]), np.array([1.0, 0.0, -1.0])
    var1, var2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    f1 = mu1 + rng.normal(size=(200_000, 3)) * np.sqrt(var1)
    f2 = mu2 + rng.normal(size=(200_000, 3)) * np.sqrt(var2)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    # sampling error of means and variances at N = 2e5 is ~0.3%; 2% leaves room for any seed
    assert frechet_distance_of_features(f1, f2) == pytest.approx(closed_form, rel=0.02)


def test_frechet_distance_full_covariance_invariances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 0.3
    value = frechet_distance_of_features(a, b)
    assert value > 0
    assert frechet_distance_of_features(a[::-1], b + 0.0) == pytest.approx(value, rel=1e-9)  # sample order
    assert frechet_distance_of_features(a + 7.0, b + 7.0) == pytest.approx(value, rel=1e-9)  # common shift
    with pytest.raises(ValueError, match="disagree"):
        frechet_distance(np.zeros(5), np.eye(5), np.zeros(4), np.eye(4))


def test_fid_without_weights_is_unavailable(offline):
    result = FrechetDistance.inception()
    assert isinstance(result, MetricUnavailable) and "pt_inception-2015-12-05" in result.reason
    assert isinstance(FrechetDistance.clip(), MetricUnavailable)


def test_fid_inception_plumbing_random_weights_and_strict_reload(offline):
    torch.manual_seed(0)
    random = backbones.build_fid_inception(allow_random=True)
    assert random.source == "random"
    images = _images(6, (1, 3, 64, 48))
    features = random.module(images)
    assert features.shape == (1, backbones.FID_FEATURE_DIM)
    offline.mkdir(parents=True)
    torch.save(random.module.net.state_dict(), offline / backbones.FID_INCEPTION_FILES[0])
    reloaded = backbones.build_fid_inception()
    assert reloaded.pretrained
    torch.testing.assert_close(reloaded.module(images), features)
    torch.save({"fc.weight": torch.zeros(3, 3)}, offline / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        backbones.build_fid_inception(offline / "bad.pth")


def test_fid_inception_matches_pytorch_fid_when_installed(monkeypatch):
    """Same random weights in pytorch-fid's own model (its download replaced by our state dict): same features."""
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(0)
    ours = backbones.build_fid_inception(allow_random=True).module
    for layer in ours.modules():  # non-trivial BatchNorm statistics, so normalisation differences would show
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: ours.net.state_dict())
    reference = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    images = _images(9, (2, 3, 64, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images)[0].flatten(1))


def _tiny_clip_folder(path, with_projection: bool = True):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    model_class = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    model_class(config).save_pretrained(path)
    return path


def test_clip_fid_plumbing_tiny_random_folder(offline, tmp_path):
    metric = FrechetDistance.clip(_tiny_clip_folder(tmp_path / "clip"), batch_size=3)
    assert isinstance(metric, FrechetDistance)
    x, y = _images(7, (8, 3, 40, 48)), _images(8, (8, 3, 40, 48)) * 0.5
    assert metric.features(x).shape == (8, 16)
    metric.update(pred=x[:5], target=x[:5])
    metric.update(pred=x[5:], target=x[5:])
    assert metric.compute() == pytest.approx(0.0, abs=1e-6)
    metric.reset()
    metric.update(pred=x, target=y)
    assert metric.compute() > 0.0


def test_clip_folder_without_projection_is_unavailable(offline, tmp_path):
    result = FrechetDistance.clip(_tiny_clip_folder(tmp_path / "clip", with_projection=False))
    assert isinstance(result, MetricUnavailable) and "visual_projection" in result.reason
