"""gsplat backend: one batched ``gsplat.rasterization`` call for all B x V images (CUDA only).

gsplat's classic kernel has fixed constants: alpha is clamped to 0.999, fragments below 1/255 are skipped and no
cut-off in standard deviations applies (its 3.33-sigma bounding box never binds, since alpha >= 1/255 already
implies d <= sqrt(2 ln 255) = 3.33). ``eps2d`` and ``near_plane`` come from the config; ``alpha_max``,
``alpha_min`` and ``sigma_cutoff`` only steer the torch backend, and a one-time warning says so when they differ
from gsplat's constants (``GSPLAT_CONSTANTS``: pass them to the torch backend to reproduce gsplat exactly).
"""

from __future__ import annotations

import logging

from torch import Tensor

logger = logging.getLogger(__name__)

# RenderConfig values under which the torch backend reproduces gsplat's classic kernel
GSPLAT_CONSTANTS = {"alpha_max": 0.999, "alpha_min": 1.0 / 255.0, "sigma_cutoff": 3.33}
_warned: set[tuple[float, float, float]] = set()


def render_features(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4] (w, x, y, z)
    scales: Tensor,  # [B, N, 3]
    opacities: Tensor,  # [B, N]
    features: Tensor,  # [B, V, N, D] per-camera features to composite
    viewmats: Tensor,  # [B, V, 4, 4] world -> OpenCV camera
    Ks: Tensor,  # [B, V, 3, 3]
    width: int,
    height: int,
    *,
    eps2d: float,
    near_plane: float,
    sigma_cutoff: float,
    alpha_max: float,
    alpha_min: float,
    tile_size: int,
) -> tuple[Tensor, Tensor]:
    """Composite per-camera features with gsplat; returns (sum_i w_i f_i [B, V, H, W, D], alpha [B, V, H, W, 1])."""
    if not means.is_cuda:
        raise ValueError(f"the gsplat backend needs CUDA tensors, got device {means.device}; use backend='torch'")
    rasterization = _import_rasterization()
    _warn_unmatched(sigma_cutoff, alpha_max, alpha_min)
    feats, alphas, _ = rasterization(
        means.float().contiguous(),
        quats.float().contiguous(),
        scales.float().contiguous(),
        opacities.float().contiguous(),
        features.float().contiguous(),
        viewmats.float().contiguous(),
        Ks.float().contiguous(),
        width,
        height,
        near_plane=near_plane,
        eps2d=eps2d,
        packed=False,
        tile_size=tile_size,
        rasterize_mode="classic",
        render_mode="RGB",
    )
    return feats, alphas  # [B, V, H, W, D], [B, V, H, W, 1]


def _import_rasterization():
    try:
        import gsplat
    except ImportError as err:
        raise ImportError(
            "the gsplat backend needs gsplat >= 1.5 (`pip install gsplat`; its CUDA extension builds on first use and "
            "needs nvcc and a CUDA build of torch); on CPU use backend='torch'"
        ) from err
    version = tuple(int(part) for part in gsplat.__version__.split(".")[:2])
    if version < (1, 5):
        raise ImportError(f"the gsplat backend needs gsplat >= 1.5 (batched scenes), found {gsplat.__version__}")
    return gsplat.rasterization


def _warn_unmatched(sigma_cutoff: float, alpha_max: float, alpha_min: float) -> None:
    key = (sigma_cutoff, alpha_max, alpha_min)
    matched = (
        alpha_max == GSPLAT_CONSTANTS["alpha_max"]
        and alpha_min == GSPLAT_CONSTANTS["alpha_min"]
        and sigma_cutoff >= GSPLAT_CONSTANTS["sigma_cutoff"]
    )
    if matched or key in _warned:
        return
    _warned.add(key)
    logger.warning(
        "gsplat uses alpha_max=0.999, alpha_min=1/255 and no sigma cut-off; render.alpha_max=%g, "
        "render.alpha_min=%g and render.sigma_cutoff=%g apply to the torch backend only",
        alpha_max, alpha_min, sigma_cutoff,
    )
