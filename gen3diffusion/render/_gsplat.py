"""gsplat backend: gsplat's projection, tile binning and rasterisation for all B x V images in one batch (CUDA only).

The steps are those of ``gsplat.rasterization`` for these arguments, called one by one so that the binning can be
swapped: gsplat's own (``isect_tiles``: one key per tile a splat touches, radix-sorted) or the dense binning of
``_binning.py``, which gives the same lists, so the same image, without the sort (``RenderConfig.tile_binning``).

gsplat's classic kernel has fixed constants: alpha is clamped to 0.999, fragments below 1/255 are skipped and no
cut-off in standard deviations applies (its 3.33-sigma bounding box never binds, since alpha >= 1/255 already
implies d <= sqrt(2 ln 255) = 3.33). ``eps2d`` and ``near_plane`` come from the config; ``alpha_max``,
``alpha_min`` and ``sigma_cutoff`` only steer the torch backend, and a one-time warning says so when they differ
from gsplat's constants (``GSPLAT_CONSTANTS``: pass them to the torch backend to reproduce gsplat exactly).
"""

from __future__ import annotations

import logging
import math

from torch import Tensor

from gen3diffusion.render._binning import dense_binning_applies, dense_tile_bins

logger = logging.getLogger(__name__)

# RenderConfig values under which the torch backend reproduces gsplat's classic kernel
GSPLAT_CONSTANTS = {"alpha_max": 0.999, "alpha_min": 1.0 / 255.0, "sigma_cutoff": 3.33}
_warned: set[tuple[float, float, float]] = set()
# RenderConfig.tile_binning: how splats are listed per tile (see render/_binning.py)
BINNINGS = ("sort", "dense")


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
    binning: str = "sort",
) -> tuple[Tensor, Tensor]:
    """Composite per-camera features with gsplat; returns (sum_i w_i f_i [B, V, H, W, D], alpha [B, V, H, W, 1])."""
    if not means.is_cuda:
        raise ValueError(f"the gsplat backend needs CUDA tensors, got device {means.device}; use backend='torch'")
    gsplat = _import_gsplat()
    _warn_unmatched(sigma_cutoff, alpha_max, alpha_min)
    B, V, N = features.shape[:3]
    # gsplat.rasterization's steps for these arguments (pinhole, classic, no packing), with the tile binning swappable
    radii, means2d, depths, conics, _ = gsplat.fully_fused_projection(
        means.float().contiguous(), None, quats.float().contiguous(), scales.float().contiguous(),
        viewmats.float().contiguous(), Ks.float().contiguous(), width, height, eps2d=eps2d, near_plane=near_plane,
        packed=False, opacities=opacities.float().contiguous(),
    )  # [B, V, N, 2], [B, V, N, 2], [B, V, N], [B, V, N, 3]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    if _use_dense_binning(binning, tile_size):
        offsets, flatten_ids = dense_tile_bins(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    else:
        _, isect_ids, flatten_ids = gsplat.isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)
        offsets = gsplat.isect_offset_encode(isect_ids, B * V, tiles_x, tiles_y).reshape(B, V, tiles_y, tiles_x)
    feats, alphas = gsplat.rasterize_to_pixels(
        means2d, conics, features.float().contiguous(), opacities.float()[:, None, :].expand(B, V, N), width, height,
        tile_size, offsets, flatten_ids,
    )
    return feats, alphas  # [B, V, H, W, D], [B, V, H, W, 1]


def _use_dense_binning(binning: str, tile_size: int) -> bool:
    """Whether ``binning`` ("sort" or "dense") asks for :func:`dense_tile_bins`, which must then apply."""
    if binning not in BINNINGS:
        raise ValueError(f"render.tile_binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    if binning == "dense" and not dense_binning_applies(tile_size):
        raise ValueError(f"render.tile_binning='dense' needs Triton and a power-of-two tile_size, got {tile_size}")
    return binning == "dense"


def _import_gsplat():
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
    return gsplat


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
