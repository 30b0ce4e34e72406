"""Image metrics of the GSO protocol: PSNR, SSIM and LPIPS per image pair, FID (Inception or CLIP) per image set.

Conventions follow EscherNet's ``eval_2D_NVS.py``, which the paper's protocol names: PSNR over all pixels and channels
(white background included), scikit-image SSIM (7x7 uniform window, sample covariance, mean over channels) and LPIPS
AlexNet v0.1. Images are float tensors in [0, 1]; with ``data_range=1`` PSNR and SSIM equal the uint8 values of that
code for the same (quantised) pixels, since both only depend on values relative to the data range.

Learned metrics never run on random weights by accident: their builders return :class:`MetricUnavailable` when the
pretrained backbone is not on this machine, and a random backbone needs ``allow_random=True`` (plumbing tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

from gen3diffusion.eval.backbones import (
    BackboneUnavailable,
    LoadedBackbone,
    build_clip_features,
    build_fid_inception,
    build_lpips,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSIMWindow:
    """One SSIM convention: the local window and whether local covariances use N-1 (sample) or N."""

    kind: str  # "uniform" or "gaussian"
    size: int  # taps per side
    sigma: float  # Gaussian standard deviation in pixels (unused by "uniform")
    sample_covariance: bool


SSIM_VARIANTS = {
    # skimage.metrics.structural_similarity defaults, as EscherNet and MVGBench call it
    "skimage": SSIMWindow(kind="uniform", size=7, sigma=0.0, sample_covariance=True),
    # Wang et al. 2004: 11x11 Gaussian, sigma 1.5 (skimage gaussian_weights=True, use_sample_covariance=False)
    "gaussian": SSIMWindow(kind="gaussian", size=11, sigma=1.5, sample_covariance=False),
}
SSIM_K1, SSIM_K2 = 0.01, 0.03


@dataclass(frozen=True)
class MetricUnavailable:
    """Stands in for a metric value that could not be computed honestly (e.g. its pretrained weights are absent)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: unavailable ({self.reason})"


def _check_pair(pred: Tensor, target: Tensor, data_range: float) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
        raise ValueError(f"expected pred and target [B, 3, H, W] of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    for name, x in (("pred", pred), ("target", target)):
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > data_range:
            raise ValueError(f"{name} values span [{low:.3g}, {high:.3g}], outside [0, {data_range}]; "
                             f"pass images in [0, data_range]")


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) with MSE over C*H*W: [B] (inf if equal)."""
    _check_pair(pred, target, data_range)
    mse = (pred.double() - target.double()).square().flatten(1).mean(dim=1)  # [B]
    return (10.0 * torch.log10(data_range**2 / mse)).to(pred.dtype)


def _ssim_kernel(window: SSIMWindow, device: torch.device) -> Tensor:
    if window.kind == "uniform":
        return torch.full((window.size,), 1.0 / window.size, dtype=torch.float64, device=device)
    offsets = torch.arange(window.size, dtype=torch.float64, device=device) - (window.size - 1) / 2
    weights = torch.exp(-0.5 * (offsets / window.sigma) ** 2)
    return weights / weights.sum()


def ssim(pred: Tensor, target: Tensor, variant: str = "skimage", data_range: float = 1.0) -> Tensor:
    """Structural similarity per image, averaged over channels and over the valid window positions: [B].

    Equals ``skimage.metrics.structural_similarity(..., channel_axis=...)`` with the variant's window: the window is
    only evaluated where it fits inside the image, as skimage crops the borders its padded filter touches.
    """
    _check_pair(pred, target, data_range)
    if variant not in SSIM_VARIANTS:
        raise ValueError(f"SSIM variant {variant!r} unknown; use one of {sorted(SSIM_VARIANTS)}")
    window = SSIM_VARIANTS[variant]
    b, c, h, w = pred.shape
    if min(h, w) < window.size:
        raise ValueError(f"images {h}x{w} are smaller than the {window.size}x{window.size} SSIM window")
    x = pred.double().reshape(b * c, 1, h, w)
    y = target.double().reshape(b * c, 1, h, w)
    kernel = _ssim_kernel(window, pred.device)
    stack = torch.cat([x, y, x * x, y * y, x * y])  # [5*B*C, 1, H, W]
    stack = F.conv2d(stack, kernel.view(1, 1, -1, 1))  # separable filter, valid positions only
    ux, uy, uxx, uyy, uxy = F.conv2d(stack, kernel.view(1, 1, 1, -1)).chunk(5)  # each [B*C, 1, H-k+1, W-k+1]
    n = window.size**2
    cov_norm = n / (n - 1) if window.sample_covariance else 1.0
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).view(b, c).mean(dim=1).to(pred.dtype)


### LPIPS


class LPIPSMetric:
    """LPIPS distance per image pair ([B]) on [0, 1] images, with a pretrained (or explicitly random) trunk."""

    def __init__(self, backbone: LoadedBackbone, net: str, version: str) -> None:
        self.backbone = backbone
        self.net = net
        self.version = version

    @classmethod
    def load(cls, net: str = "alex", version: str = "0.1", backbone_path: str | Path | None = None,
             allow_random: bool = False) -> LPIPSMetric | MetricUnavailable:
        """Build from local weights (see :mod:`gen3diffusion.eval.backbones`), or report why it cannot be."""
        try:
            backbone = build_lpips(net, version, backbone_path=backbone_path, allow_random=allow_random)
        except (BackboneUnavailable, ImportError) as err:
            logger.warning("LPIPS-%s unavailable: %s", net, err)
            return MetricUnavailable(f"LPIPS-{net}", str(err))
        return cls(backbone, net, version)

    def to(self, device: torch.device | str) -> LPIPSMetric:
        self.backbone.module.to(device)
        return self

    def describe(self) -> str:
        weights = self.backbone.source if self.backbone.pretrained else "RANDOM trunk, plumbing only"
        return f"LPIPS {self.net} v{self.version} (inputs [0,1] -> [-1,1]; trunk: {weights})"

    @torch.no_grad()
    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_pair(pred, target, 1.0)
        return self.backbone.module(pred.float(), target.float(), normalize=True).view(pred.shape[0])  # [B]


### Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D] (float64), as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance of two Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The matrix square root can come out singular or slightly complex for rank-deficient covariances (fewer samples
    than dimensions); then ``eps`` is added to both diagonals, and a negligible imaginary part is dropped. A large
    one raises, since it means the statistics are broken rather than rounded.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics disagree: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"Fréchet distance: sqrt(S1 S2) has imaginary diagonal up to {imaginary:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


class FrechetDistance:
    """Set-level FID: features of all predicted and all target images are pooled, then compared once.

    Usage: ``metric.update(pred=views, target=gt_views)`` for every object (each [B, 3, H, W] in [0, 1]), then
    ``metric.compute()``. The feature network is Inception pool3 (``inception``) or CLIP image embeddings (``clip``).
    """

    def __init__(self, extractor: LoadedBackbone, name: str, batch_size: int = 32) -> None:
        self.extractor = extractor
        self.name = name
        self.batch_size = batch_size
        self._features: dict[str, list[np.ndarray]] = {"pred": [], "target": []}

    @classmethod
    def inception(cls, weights_path: str | Path | None = None, allow_random: bool = False,
                  batch_size: int = 32) -> FrechetDistance | MetricUnavailable:
        """FID on pytorch-fid Inception pool3 features (2048-d) from a local weights file."""
        try:
            return cls(build_fid_inception(weights_path, allow_random=allow_random), "FID", batch_size)
        except BackboneUnavailable as err:
            logger.warning("FID unavailable: %s", err)
            return MetricUnavailable("FID", str(err))

    @classmethod
    def clip(cls, folder: str | Path | None = None, l2_normalize: bool = False,
             batch_size: int = 32) -> FrechetDistance | MetricUnavailable:
        """Fréchet distance on CLIP image embeddings from a local transformers folder (MVGBench's "oFID" style)."""
        try:
            return cls(build_clip_features(folder, l2_normalize=l2_normalize), "FID-CLIP", batch_size)
        except (BackboneUnavailable, ImportError) as err:
            logger.warning("FID-CLIP unavailable: %s", err)
            return MetricUnavailable("FID-CLIP", str(err))

    def to(self, device: torch.device | str) -> FrechetDistance:
        self.extractor.module.to(device)
        return self

    def describe(self) -> str:
        weights = self.extractor.source if self.extractor.pretrained else "RANDOM weights, plumbing only"
        return f"{self.name} (set-level, {type(self.extractor.module).__name__}; weights: {weights})"

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        """Features [B, D] (float64) of images [B, 3, H, W] in [0, 1], computed in chunks of ``batch_size``."""
        _check_pair(images, images, 1.0)
        device = next(self.extractor.module.parameters()).device
        chunks = [self.extractor.module(chunk.to(device, torch.float32)).double().cpu().numpy()
                  for chunk in images.split(self.batch_size)]
        return np.concatenate(chunks)

    def update(self, pred: Tensor | None = None, target: Tensor | None = None) -> None:
        for key, images in (("pred", pred), ("target", target)):
            if images is not None:
                self._features[key].append(self.features(images))

    def reset(self) -> None:
        self._features = {"pred": [], "target": []}

    def compute(self) -> float:
        if not self._features["pred"] or not self._features["target"]:
            raise ValueError(f"{self.name}: both the predicted and the target set need images before compute()")
        pred, target = (np.concatenate(self._features[key]) for key in ("pred", "target"))
        if min(len(pred), len(target)) < pred.shape[1]:
            logger.warning("%s: %d / %d images for %d-d features; covariances are rank-deficient",
                           self.name, len(pred), len(target), pred.shape[1])
        return frechet_distance_of_features(pred, target)
