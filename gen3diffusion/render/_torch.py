"""Pure-PyTorch EWA splatting rasterizer: the CPU (and any-device) twin of gsplat's classic 3DGS kernels.

It follows gsplat's conventions exactly, so the two backends agree on the same inputs:

- projection: world -> camera by the view matrix, a pinhole camera, the EWA Jacobian evaluated at the mean with
  its x/z and y/z clamped to 1.3x the half field of view (gsplat's ``persp_proj``), ``eps2d`` added to the diagonal
  of the 2D covariance, Gaussians culled when ``z < near_plane`` or the 2D determinant is not positive;
- pixel (row i, col j) is evaluated at its centre (j + 0.5, i + 0.5);
- alpha = min(alpha_max, opacity * exp(-sigma)) with sigma = 0.5 d^T conic d; a fragment is skipped when
  ``alpha < alpha_min`` (and, here, when d lies beyond ``sigma_cutoff`` standard deviations: gsplat never cuts,
  which for opacities <= 1 is the same as a cut-off >= sqrt(2 ln(1 / alpha_min)) = 3.33);
- front-to-back compositing in camera-depth order; a pixel stops at the first Gaussian that would bring its
  transmittance to ``T_MIN`` or below, and that Gaussian is left out.

How: Gaussians are binned into 16x16 pixel tiles by the bounding box of their cut-off ellipse; every tile walks
its depth-sorted list ``gaussians_per_step`` Gaussians at a time, evaluating a [tiles, 256, K] block of alphas and
compositing it with a cumulative product, and drops out once all its pixels are done. Each block runs under
activation checkpointing, so memory stays bounded by ``chunk_elements`` in the backward pass too; gradients come
from plain autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

TILE = 16
# gsplat ends a pixel once the next Gaussian would bring its transmittance to 1e-4 or below (that one excluded)
T_MIN = 1e-4


def render_features(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4] (w, x, y, z), any norm
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
    gaussians_per_step: int,
    chunk_elements: int,
) -> tuple[Tensor, Tensor]:
    """Composite per-camera features front to back; returns (sum_i w_i f_i [B, V, H, W, D], alpha [B, V, H, W, 1])."""
    B, V, N, D = features.shape
    means2d, conics, depths, cov_diag, valid = project(
        means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane
    )
    opac = opacities[:, None, :].expand(B, V, N)  # [B, V, N]
    ones = torch.ones_like(features[..., :1])
    feats = torch.cat([features, ones], dim=-1)  # [B, V, N, D + 1]; the last channel accumulates alpha

    I = B * V
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    with torch.no_grad():
        tile_start, tile_count, order = _bin_to_tiles(
            means2d.reshape(I, N, 2), cov_diag.reshape(I, N, 2), depths.reshape(I, N), opac.reshape(I, N),
            valid.reshape(I, N), width, height, sigma_cutoff, alpha_min,
        )
    flat = (
        means2d.reshape(I * N, 2),
        conics.reshape(I * N, 3),
        opac.reshape(I * N),
        feats.reshape(I * N, D + 1),
    )
    step = partial(_composite_step, alpha_max=alpha_max, alpha_min=alpha_min, half_cut2=0.5 * sigma_cutoff**2)
    out = _composite_tiles(
        flat, tile_start, tile_count, order, tiles_x, tiles_y, step, gaussians_per_step, chunk_elements
    )
    if not out.requires_grad and feats.requires_grad:  # nothing visible: keep the output on the graph
        out = out + 0.0 * feats.sum()

    img = out.reshape(I, tiles_y, tiles_x, TILE, TILE, D + 1).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(B, V, tiles_y * TILE, tiles_x * TILE, D + 1)[:, :, :height, :width]
    return img[..., :D], img[..., D:]


def project(
    means: Tensor,  # [B, N, 3]
    quats: Tensor,  # [B, N, 4]
    scales: Tensor,  # [B, N, 3]
    viewmats: Tensor,  # [B, V, 4, 4]
    Ks: Tensor,  # [B, V, 3, 3]
    width: int,
    height: int,
    eps2d: float,
    near_plane: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EWA projection as in gsplat: means2d [B, V, N, 2], conics (a, b, c) [B, V, N, 3], depths [B, V, N],
    diagonal of the (dilated) 2D covariance [B, V, N, 2] and the visibility mask [B, V, N]."""
    R = viewmats[..., :3, :3]  # [B, V, 3, 3]
    t = viewmats[..., :3, 3]  # [B, V, 3]
    means_c = torch.einsum("bvij,bnj->bvni", R, means) + t[:, :, None, :]  # [B, V, N, 3]
    x, y, z = means_c.unbind(-1)  # [B, V, N]
    valid = z >= near_plane
    z = torch.where(valid, z, torch.ones_like(z))  # keeps culled Gaussians finite (and their gradients zero)

    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]  # [B, V, 1]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    lim_x = 0.15 * width / fx  # 0.3 * tan(half fov x)
    lim_y = 0.15 * height / fy
    tx = z * torch.minimum(torch.maximum(x / z, -(cx / fx + lim_x)), (width - cx) / fx + lim_x)
    ty = z * torch.minimum(torch.maximum(y / z, -(cy / fy + lim_y)), (height - cy) / fy + lim_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / z, zero, -fx * tx / z**2, zero, fy / z, -fy * ty / z**2], dim=-1)
    J = J.reshape(z.shape + (2, 3))  # [B, V, N, 2, 3]

    M = quat_to_rotmat(quats) * scales[..., None, :]  # [B, N, 3, 3] = R S
    JW = J @ R[:, :, None]  # [B, V, N, 2, 3]
    JWM = JW @ M[:, None]  # [B, V, N, 2, 3]
    cov2d = JWM @ JWM.transpose(-1, -2)  # [B, V, N, 2, 2]
    a = cov2d[..., 0, 0] + eps2d
    b = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    c = cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [B, V, N, 3]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [B, V, N, 2]
    cov_diag = torch.stack([a, c], dim=-1).detach()  # [B, V, N, 2]
    return means2d, conics, means_c[..., 2], cov_diag, valid


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] of quaternions (w, x, y, z) [..., 4], normalised first."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return R.reshape(quats.shape[:-1] + (3, 3))


def _bin_to_tiles(
    means2d: Tensor,  # [I, N, 2]
    cov_diag: Tensor,  # [I, N, 2]
    depths: Tensor,  # [I, N]
    opac: Tensor,  # [I, N]
    valid: Tensor,  # [I, N]
    width: int,
    height: int,
    sigma_cutoff: float,
    alpha_min: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tile lists: for every tile (image-major, then row-major) its start and count in ``order``, which holds
    flat Gaussian indices (image * N + n), grouped by tile and sorted front to back within a tile."""
    I, N = depths.shape
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    # a fragment needs alpha >= alpha_min, i.e. d^2 <= 2 ln(opacity / alpha_min), and d <= sigma_cutoff
    reach2 = torch.clamp(2.0 * torch.log(opac.clamp_min(1e-30) / alpha_min), max=sigma_cutoff**2)
    valid = valid & (reach2 >= 0)
    half = torch.sqrt(reach2.clamp_min(0)[..., None] * cov_diag) * (1 + 1e-4) + 1e-3  # [I, N, 2] bbox half-size
    # pixel j (centre j + 0.5) is inside when |j + 0.5 - mean| <= half
    lo = torch.ceil(means2d - half - 0.5)
    hi = torch.floor(means2d + half - 0.5)
    size = means2d.new_tensor([width, height])
    valid = valid & (hi >= 0).all(-1) & (lo <= size - 1).all(-1) & (hi >= lo).all(-1)
    lo = torch.minimum(torch.maximum(lo, torch.zeros_like(lo)), size - 1).long() // TILE  # [I, N, 2] tile range
    hi = torch.minimum(torch.maximum(hi, torch.zeros_like(hi)), size - 1).long() // TILE

    depth_order = torch.argsort(depths.masked_fill(~valid, math.inf), dim=1, stable=True)  # [I, N]
    span = (hi - lo + 1).gather(1, depth_order[..., None].expand(I, N, 2))  # [I, N, 2] tiles in x and y
    lo = lo.gather(1, depth_order[..., None].expand(I, N, 2))
    counts = (span[..., 0] * span[..., 1] * valid.gather(1, depth_order)).flatten()  # [I * N]
    image = torch.arange(I, device=depths.device)[:, None].expand(I, N).flatten()
    gauss = (depth_order + image.view(I, N) * N).flatten()  # flat Gaussian index, front to back per image

    sel = counts > 0
    counts, gauss, image = counts[sel], gauss[sel], image[sel]
    span_x, lo = span.reshape(-1, 2)[sel, 0], lo.reshape(-1, 2)[sel]
    total = int(counts.sum())

    def rep(values: Tensor) -> Tensor:  # one entry per (Gaussian, tile) intersection
        return torch.repeat_interleave(values, counts, output_size=total)

    local = torch.arange(total, device=depths.device) - rep(torch.cumsum(counts, 0) - counts)  # index in the bbox
    sx = rep(span_x)
    tile = rep(image) * (tiles_x * tiles_y) + (rep(lo[:, 1]) + local // sx) * tiles_x + rep(lo[:, 0]) + local % sx
    tile, perm = torch.sort(tile, stable=True)
    order = rep(gauss)[perm]
    tile_count = torch.bincount(tile, minlength=I * tiles_x * tiles_y)
    tile_start = torch.cumsum(tile_count, 0) - tile_count
    return tile_start, tile_count, order


def _composite_tiles(
    flat: tuple[Tensor, Tensor, Tensor, Tensor],  # means2d [M, 2], conics [M, 3], opacities [M], feats [M, C]
    tile_start: Tensor,  # [T]
    tile_count: Tensor,  # [T]
    order: Tensor,  # [n_isects]
    tiles_x: int,
    tiles_y: int,
    step: Callable[..., tuple[Tensor, Tensor]],
    gaussians_per_step: int,
    chunk_elements: int,
) -> Tensor:
    """Walk every non-empty tile's list front to back, K Gaussians a step; returns [T, 256, C] (zeros elsewhere)."""
    means2d, conics, opac, feats = flat
    C = feats.shape[-1]
    K = gaussians_per_step
    P = TILE * TILE
    device, dtype = feats.device, feats.dtype
    slots = torch.arange(K, device=device)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in flat)

    out = torch.zeros(tile_count.numel(), P, C, device=device, dtype=dtype)
    busy = torch.nonzero(tile_count > 0).squeeze(1)
    if busy.numel() == 0:
        return out
    busy = busy[torch.argsort(tile_count[busy], descending=True)]  # similar list lengths share a chunk
    results = []
    for chunk in busy.split(max(1, chunk_elements // (K * P))):
        start, count = tile_start[chunk], tile_count[chunk]  # [A]
        in_image = chunk % (tiles_x * tiles_y)
        origin = torch.stack([in_image % tiles_x, in_image // tiles_x], dim=-1).to(dtype) * TILE  # [A, 2]
        trans = torch.ones(chunk.numel(), P, device=device, dtype=dtype)  # [A, P]; 0 once a pixel is done
        acc = torch.zeros(chunk.numel(), P, C, device=device, dtype=dtype)  # [A, P, C]
        for offset in range(0, int(count.max()), K):
            with torch.no_grad():
                rows = torch.nonzero((count > offset) & (trans > 0).any(1)).squeeze(1)
            if rows.numel() == 0:
                break
            slot = offset + slots  # [K]
            present = slot < count[rows, None]  # [R, K]
            idx = order[torch.clamp(start[rows, None] + slot, max=order.numel() - 1)]  # [R, K]
            gauss = [_take(x, idx) for x in (means2d, conics, opac, feats)]
            args = (*gauss[:3], present, gauss[3], _take(trans, rows), origin[rows])
            if use_checkpoint:  # keep only the step's inputs; recompute the [R, P, K] blocks in the backward pass
                contrib, trans_out = checkpoint(step, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                contrib, trans_out = step(*args)
            acc = acc.index_copy(0, rows, _take(acc, rows) + contrib)  # rows are unique
            trans = trans.index_copy(0, rows, trans_out)
        results.append(acc)
    return out.index_copy(0, busy, torch.cat(results))


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 through ``index_select``, whose backward (index_add) is much faster on CPU."""
    return x.index_select(0, index.flatten()).unflatten(0, index.shape)


def _composite_step(
    means2d: Tensor,  # [R, K, 2]
    conics: Tensor,  # [R, K, 3]
    opac: Tensor,  # [R, K]
    present: Tensor,  # [R, K] False for padding slots
    feats: Tensor,  # [R, K, C]
    trans: Tensor,  # [R, P] transmittance before this step (0 where the pixel is done)
    origin: Tensor,  # [R, 2] pixel coordinates (x, y) of each tile's top-left corner
    *,
    alpha_max: float,
    alpha_min: float,
    half_cut2: float,
) -> tuple[Tensor, Tensor]:
    """Composite K depth-sorted Gaussians over the pixels of R tiles: (sum w f [R, P, C], transmittance [R, P]).

    The exponent log(o) - sigma separates over the tile's pixel rows i and columns j except for the cross term,
    so it is assembled from [R, 16, K] pieces: (log o - a dx_j^2 / 2) + (-c dy_i^2 / 2) + (-b dy_i) dx_j. Blocks
    are laid out [R, P, K] (Gaussians last), which keeps the cumulative product and the final matmul contiguous.
    """
    centres = torch.arange(TILE, device=means2d.device, dtype=means2d.dtype) + 0.5
    dx = origin[:, 0, None, None] + centres[:, None] - means2d[:, None, :, 0]  # [R, 16, K] per pixel column
    dy = origin[:, 1, None, None] + centres[:, None] - means2d[:, None, :, 1]  # [R, 16, K] per pixel row
    a, b, c = (conics[:, None, :, k] for k in range(3))  # [R, 1, K]
    log_o = torch.where(present, torch.log(opac), -math.inf)[:, None, :]  # [R, 1, K]
    ex = log_o - 0.5 * a * dx * dx
    ey = -0.5 * c * dy * dy
    cross = -b * dy
    power = (ey[:, :, None] + ex[:, None, :] + cross[:, :, None] * dx[:, None, :]).flatten(1, 2)  # [R, P, K]
    # keep alpha >= alpha_min and sigma <= sigma_cutoff^2 / 2, both as thresholds on log(o) - sigma
    threshold = torch.clamp_min(log_o - half_cut2, math.log(alpha_min))  # [R, 1, K]
    alpha = torch.exp(power).clamp_max(alpha_max) * (power >= threshold)  # [R, P, K]
    t_after = trans[..., None] * torch.cumprod(1 - alpha, dim=-1)  # transmittance after each Gaussian
    t_before = torch.cat([trans[..., None], t_after[..., :-1]], dim=-1)
    weight = alpha * t_before * (t_after > T_MIN)  # a Gaussian that would end the pixel is left out, as in gsplat
    contrib = weight @ feats  # [R, P, C]
    last = t_after[..., -1]
    return contrib, last * (last > T_MIN)
