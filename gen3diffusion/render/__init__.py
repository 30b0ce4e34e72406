"""Render 3D Gaussians into images: ``rasterize(gaussians, cameras) -> RenderOutput(rgb, alpha, depth, distortion)``.

Two backends behind one entry point: gsplat on CUDA (``_gsplat.py``) and a pure-PyTorch tiled rasterizer that runs
anywhere (``_torch.py``) with gsplat's conventions, so the two agree on the same inputs. Both composite the same
per-camera features - colour, camera depth z and a centred z^2 - from which this module derives the expected depth
and the depth distortion (the weighted depth variance times alpha, the regulariser of the 3D loss). Callers that only
need colour (sampling, turntables, evaluation) pass ``depth=False`` and composite the colour alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gen3diffusion.cameras import opengl_to_opencv
from gen3diffusion.config import RenderConfig

if TYPE_CHECKING:
    from gen3diffusion.cameras import Cameras
    from gen3diffusion.gaussians import Gaussians

__all__ = ["RenderOutput", "rasterize", "rasterize_chunks", "BACKENDS"]

BACKENDS = ("auto", "gsplat", "torch")
# depth and distortion divide by max(alpha, ALPHA_EPS); any covered pixel has alpha >= alpha_min anyway
ALPHA_EPS = 1e-6


@dataclass
class RenderOutput:
    """Rendered views of a batch of Gaussians."""

    rgb: Tensor  # [B, V, 3, H, W] composited over the background
    alpha: Tensor  # [B, V, 1, H, W] accumulated opacity
    depth: Tensor | None  # [B, V, 1, H, W] expected camera depth sum(w z) / max(alpha, eps); None if not asked for
    distortion: Tensor | None  # [B, V, 1, H, W] sum(w z^2) - sum(w z)^2 / max(alpha, eps) >= 0; None likewise


def rasterize(
    gaussians: Gaussians,
    cameras: Cameras,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    backend: str | None = None,
    cfg: RenderConfig | None = None,
    depth: bool = True,
) -> RenderOutput:
    """Render B sets of Gaussians from V cameras each, differentiably w.r.t. every Gaussian parameter.

    Args:
        gaussians: batch of B sets of N Gaussians (means, scales, rotations, opacities, colours).
        cameras: ``c2w`` [B, V, 4, 4] or [V, 4, 4] (shared by the batch; OpenGL camera axes), ``K`` broadcastable
            to [B, V, 3, 3], and the image size.
        background: RGB [3] or [B, V, 3] composited where alpha < 1, as rgb + (1 - alpha) * background.
        backend: "auto" (gsplat for CUDA tensors, torch otherwise), "gsplat" or "torch"; None takes
            ``cfg.backend``.
        cfg: rasterizer settings (2D dilation, near plane, cut-off, alpha clamps); defaults to ``RenderConfig()``.
        depth: also composite depth and its distortion (False: colour and alpha only, fewer features per pixel).

    Returns:
        ``RenderOutput`` with rgb [B, V, 3, H, W] and alpha, depth, distortion [B, V, 1, H, W] (without ``depth``
        these two are None). Depth is the camera z along the optical axis.
    """
    cfg = cfg if cfg is not None else RenderConfig()
    backend = _resolve_backend(backend if backend is not None else cfg.backend, gaussians.means)
    means, quats, scales, opacities, colors = _check_gaussians(gaussians)
    B, N = opacities.shape
    viewmats, Ks = _camera_matrices(cameras, B, means)  # [B, V, 4, 4], [B, V, 3, 3]
    V, H, W = viewmats.shape[1], int(cameras.height), int(cameras.width)
    bg = _background(background, B, V, means)  # [B, V, 3]

    feats = colors[:, None].expand(B, V, N, 3)  # [B, V, N, 3]
    if depth:
        # and camera z and (z - z0)^2, with z0 a per-view reference depth that keeps the variance free of
        # cancellation in float32 (the variance does not depend on z0)
        z = torch.einsum("bvj,bnj->bvn", viewmats[:, :, 2, :3], means) + viewmats[:, :, None, 2, 3]  # [B, V, N]
        z0 = z.detach().mean(-1, keepdim=True)  # [B, V, 1]
        feats = torch.cat([feats, z[..., None], ((z - z0) ** 2)[..., None]], dim=-1)  # [B, V, N, 5]
    common = dict(
        eps2d=cfg.eps2d, near_plane=cfg.near_plane, sigma_cutoff=cfg.sigma_cutoff,
        alpha_max=cfg.alpha_max, alpha_min=cfg.alpha_min,
    )
    if backend == "gsplat":
        from gen3diffusion.render import _gsplat

        sums, alpha = _gsplat.render_features(means, quats, scales, opacities, feats, viewmats, Ks, W, H, **common,
                                              tile_size=cfg.tile_size, binning=cfg.tile_binning)
    else:
        from gen3diffusion.render import _torch

        sums, alpha = _torch.render_features(
            means, quats, scales, opacities, feats, viewmats, Ks, W, H, **common,
            gaussians_per_step=cfg.torch_gaussians_per_step, chunk_elements=cfg.torch_chunk_elements,
        )
    sums, alpha = sums.to(means.dtype), alpha.to(means.dtype)  # [B, V, H, W, 5 (3 without depth)], [B, V, H, W, 1]

    to_chw = lambda x: x.permute(0, 1, 4, 2, 3)  # noqa: E731  [B, V, H, W, C] -> [B, V, C, H, W]
    rgb = sums[..., :3] + (1 - alpha) * bg[:, :, None, None, :]
    if not depth:
        return RenderOutput(rgb=to_chw(rgb), alpha=to_chw(alpha), depth=None, distortion=None)
    safe_alpha = alpha.clamp_min(ALPHA_EPS)
    expected_z = sums[..., 3:4] / safe_alpha
    centred = sums[..., 3:4] - z0[..., None, None] * alpha  # sum(w (z - z0))
    distortion = (sums[..., 4:5] - centred**2 / safe_alpha).clamp_min(0.0)
    return RenderOutput(rgb=to_chw(rgb), alpha=to_chw(alpha), depth=to_chw(expected_z),
                        distortion=to_chw(distortion))


def rasterize_chunks(
    gaussians: Gaussians, cameras: Cameras, chunk: int = 8, **kwargs
) -> Iterator[RenderOutput]:
    """``rasterize`` over many views ``cameras.c2w [V, 4, 4]`` in groups of ``chunk``, to bound memory (turntables,
    mesh fusion). ``kwargs`` go to :func:`rasterize`."""
    from gen3diffusion.cameras import Cameras

    for i in range(0, cameras.c2w.shape[0], chunk):
        sub = Cameras(cameras.c2w[i:i + chunk], cameras.K[i:i + chunk], cameras.width, cameras.height)
        yield rasterize(gaussians, sub, **kwargs)


def _resolve_backend(backend: str, like: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"render backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "gsplat" if like.is_cuda else "torch"
    return backend


def _check_gaussians(g: Gaussians) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(means, quats, scales, opacities, colours) after checking they describe one [B, N] batch."""
    if g.means.dim() != 3 or g.means.shape[-1] != 3:
        raise ValueError(f"gaussians.means must be [B, N, 3], got {tuple(g.means.shape)}")
    B, N = g.means.shape[:2]
    expected = {"scales": (B, N, 3), "rotations": (B, N, 4), "opacities": (B, N), "colors": (B, N, 3)}
    for name, shape in expected.items():
        got = tuple(getattr(g, name).shape)
        if got != shape:
            raise ValueError(f"gaussians.{name} must be {list(shape)} to match means {[B, N, 3]}, got {list(got)}")
    return g.means, g.rotations, g.scales, g.opacities, g.colors


def _camera_matrices(cameras: Cameras, B: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """World -> OpenCV-camera view matrices [B, V, 4, 4] and intrinsics [B, V, 3, 3] in the Gaussians' dtype."""
    c2w = cameras.c2w.to(device=like.device, dtype=like.dtype)
    if c2w.dim() == 3 and c2w.shape[-2:] == (4, 4):
        c2w = c2w[None].expand(B, -1, -1, -1)
    if c2w.dim() != 4 or c2w.shape[-2:] != (4, 4) or c2w.shape[0] != B:
        raise ValueError(f"cameras.c2w must be [V, 4, 4] or [B={B}, V, 4, 4], got {list(cameras.c2w.shape)}")
    V = c2w.shape[1]
    K = cameras.K.to(device=like.device, dtype=like.dtype)
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"cameras.K must be [..., 3, 3], got {list(K.shape)}")
    try:
        K = torch.broadcast_to(K, (B, V, 3, 3))
    except RuntimeError as err:
        raise ValueError(f"cameras.K {list(K.shape)} does not broadcast to [B={B}, V={V}, 3, 3]") from err
    # OpenGL camera axes -> OpenCV, by device ops only (a flip vector copied from the host would make the CPU wait for
    # the GPU's queue); inv_ex: no host sync for an error check
    viewmats = torch.linalg.inv_ex(opengl_to_opencv(c2w)).inverse  # [B, V, 4, 4]
    return viewmats, K


def _background(background: Sequence[float] | Tensor, B: int, V: int, like: Tensor) -> Tensor:
    if isinstance(background, Tensor):
        bg = background.to(device=like.device, dtype=like.dtype)
    elif len(background) and all(isinstance(v, (int, float)) for v in background):
        # RGB numbers: filled on the device; a host-to-device copy of them would wait for the GPU's queue to drain
        bg = torch.stack([like.new_full((), float(v)) for v in background])
    else:
        bg = torch.as_tensor(background, device=like.device, dtype=like.dtype)
    try:
        return torch.broadcast_to(bg, (B, V, 3))
    except RuntimeError as err:
        raise ValueError(f"background must be RGB [3] or [B={B}, V={V}, 3], got {list(bg.shape)}") from err
