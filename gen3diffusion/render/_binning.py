"""Tile binning for gsplat's rasteriser without its radix sort: the lists of Gaussians per tile, front to back.

gsplat's ``rasterize_to_pixels`` composites, for every tile of every image, the Gaussians listed in
``flatten_ids[offsets[tile]:offsets[tile + 1]]`` in that order. gsplat builds those lists by writing one 64-bit key
(image | tile | depth bits) per tile a Gaussian's bounding box touches, then radix-sorting all of them. The render of
the sampler (65,536 Gaussians into 4 views at 512) makes 12 million such keys with the random model's large splats;
writing and sorting them took 2.0 of the render's 3.4 ms on an H100 (docs/benchmarks.md).

:func:`dense_tile_bins` builds the same lists another way. Each image's Gaussians are sorted by depth once (N keys,
not N x tiles), and then, for each (image, tile, chunk of depth-sorted Gaussians), two Triton passes test every
Gaussian's tile range against the tile: the first counts the hits per chunk, whose prefix sum gives every list's
start, and the second writes the hits at their start plus their rank within the chunk. The work is one cheap test
per (image, tile, Gaussian), a dense O(I x tiles x N) that does not grow with the splats' size, instead of the sort's
O(intersections).

The lists are exactly gsplat's: the tile ranges are computed with gsplat's float operations (exact for power-of-two
tiles, whose divisions are exact), depths are ordered as gsplat's sort orders their bits (the same for the positive
depths of visible Gaussians), and ties keep the Gaussians' order, as gsplat's stable sort does. So the rendered images
are bit-identical (GPU test), and gradients flow through ``rasterize_to_pixels`` as before.

It is opt-in (``RenderConfig.tile_binning = "dense"``): it paid with large splats (that render 1.2 ms faster) and
cost 0.3 ms with trained-size ones, whose 1.2 million keys gsplat sorts quickly, on an H100.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never reach gsplat
    triton = None

__all__ = ["dense_tile_bins", "dense_binning_applies"]

_BOUNDS_BLOCK = 1024  # Gaussians per program of the tile-range kernel
_TILES_PER_PROGRAM, _GAUSSIANS_PER_PROGRAM = 16, 512  # the (tile x Gaussian) block each counting program tests
_BIN_WARPS = 4  # warps per counting program


def dense_binning_applies(tile_size: int) -> bool:
    """Whether :func:`dense_tile_bins` reproduces gsplat's lists exactly: Triton present and a power-of-two tile."""
    return triton is not None and tile_size > 0 and tile_size & (tile_size - 1) == 0


def dense_tile_bins(
    means2d: Tensor,  # [..., N, 2] projected centres (pixels), float32
    radii: Tensor,  # [..., N, 2] int32 bounding-box half-sizes; 0: culled
    depths: Tensor,  # [..., N] camera z, float32
    tile_size: int,
    tile_width: int,
    tile_height: int,
) -> tuple[Tensor, Tensor]:
    """gsplat's ``isect_offset_encode(isect_tiles(...))`` and sorted ``flatten_ids``, without the radix sort.

    Returns ``offsets`` [..., tile_height, tile_width] (int32, where each tile's list starts) and ``flatten_ids``
    [n_isects] (int32 indices into the flattened [..., N] Gaussians, each tile's front to back), the two inputs of
    ``gsplat.rasterize_to_pixels``. Waits once for the GPU, to size ``flatten_ids`` (as gsplat's own binning does).
    """
    if not dense_binning_applies(tile_size):
        raise ValueError(f"dense tile binning needs Triton and a power-of-two tile size, got tile_size={tile_size}")
    image_dims, N = means2d.shape[:-2], means2d.shape[-2]
    if means2d.shape[-1] != 2 or radii.shape != means2d.shape or depths.shape != means2d.shape[:-1]:
        raise ValueError(f"means2d {list(means2d.shape)} and radii {list(radii.shape)} must be [..., N, 2] and depths "
                         f"{list(depths.shape)} [..., N]")
    I, n_tiles = int(torch.Size(image_dims).numel()), tile_width * tile_height
    n_chunks = triton.cdiv(N, _GAUSSIANS_PER_PROGRAM)
    if I * max(N, n_tiles * n_chunks) >= 2**31 or tile_width >= 2**15 or tile_height >= 2**15:
        raise ValueError(f"{I} images of {tile_width} x {tile_height} tiles and {N} Gaussians exceed int32 indexing")
    device = means2d.device
    if I * N == 0:  # nothing to list: every tile's list is empty
        return (torch.zeros(*image_dims, tile_height, tile_width, dtype=torch.int32, device=device),
                torch.empty(0, dtype=torch.int32, device=device))
    order = torch.sort(depths.reshape(I, N), dim=-1, stable=True).indices  # [I, N] front to back, ties in index order
    ranges_x = torch.empty(I, N, dtype=torch.int32, device=device)  # packed x0 | x1 << 16, in depth order
    ranges_y = torch.empty_like(ranges_x)  # y0 | y1 << 16
    ids = torch.empty_like(ranges_x)  # flatten index of each depth-sorted Gaussian
    _tile_ranges_kernel[(triton.cdiv(I * N, _BOUNDS_BLOCK),)](
        order, means2d.contiguous(), radii.contiguous(), ranges_x, ranges_y, ids, I * N, N, 1.0 / tile_size,
        tile_width, tile_height, BLOCK=_BOUNDS_BLOCK,
    )

    grid = (I, triton.cdiv(n_tiles, _TILES_PER_PROGRAM), n_chunks)
    counts = torch.empty(I * n_tiles * n_chunks, dtype=torch.int32, device=device)  # hits per (image, tile, chunk)
    _bin_kernel[grid](ranges_x, ranges_y, ids, counts, counts, N, n_tiles, tile_width, n_chunks, WRITE=False,
                      TILES=_TILES_PER_PROGRAM, GAUSSIANS=_GAUSSIANS_PER_PROGRAM, num_warps=_BIN_WARPS)
    ends = torch.cumsum(counts, 0)  # int64
    starts = ends - counts  # where each (image, tile, chunk)'s hits go
    offsets = starts.view(I, n_tiles, n_chunks)[:, :, 0].to(torch.int32)  # each tile's first chunk
    n_isects = int(ends[-1]) if ends.numel() else 0  # the one wait for the GPU
    if n_isects >= 2**31:
        raise ValueError(f"{n_isects} tile intersections exceed gsplat's int32 indices")
    flatten_ids = torch.empty(n_isects, dtype=torch.int32, device=device)
    if n_isects:
        _bin_kernel[grid](ranges_x, ranges_y, ids, starts, flatten_ids, N, n_tiles, tile_width, n_chunks, WRITE=True,
                          TILES=_TILES_PER_PROGRAM, GAUSSIANS=_GAUSSIANS_PER_PROGRAM, num_warps=_BIN_WARPS)
    return offsets.reshape(*image_dims, tile_height, tile_width), flatten_ids


if triton is not None:

    @triton.jit
    def _tile_ranges_kernel(order_ptr, means2d_ptr, radii_ptr, ranges_x_ptr, ranges_y_ptr, ids_ptr, total, N,
                            inv_tile, tile_width, tile_height, BLOCK: tl.constexpr):
        """Tile range [x0, x1) x [y0, y1) of the k-th nearest Gaussian of each image, as gsplat's
        ``intersect_tile_kernel`` computes it (empty for culled Gaussians), and its flatten index."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = k < total
        image = k // N
        src = image * N + tl.load(order_ptr + k, mask=mask, other=0).to(tl.int32)
        cx = tl.load(means2d_ptr + 2 * src, mask=mask, other=0.0) * inv_tile
        cy = tl.load(means2d_ptr + 2 * src + 1, mask=mask, other=0.0) * inv_tile
        rx = tl.load(radii_ptr + 2 * src, mask=mask, other=0)
        ry = tl.load(radii_ptr + 2 * src + 1, mask=mask, other=0)
        visible = (rx > 0) & (ry > 0)
        trx, try_ = rx.to(tl.float32) * inv_tile, ry.to(tl.float32) * inv_tile
        x0 = tl.minimum(tl.maximum(tl.floor(cx - trx), 0.0), tile_width).to(tl.int32)
        x1 = tl.minimum(tl.maximum(tl.ceil(cx + trx), 0.0), tile_width).to(tl.int32)
        y0 = tl.minimum(tl.maximum(tl.floor(cy - try_), 0.0), tile_height).to(tl.int32)
        y1 = tl.minimum(tl.maximum(tl.ceil(cy + try_), 0.0), tile_height).to(tl.int32)
        tl.store(ranges_x_ptr + k, tl.where(visible, x0 | (x1 << 16), 0), mask=mask)
        tl.store(ranges_y_ptr + k, tl.where(visible, y0 | (y1 << 16), 0), mask=mask)
        tl.store(ids_ptr + k, src, mask=mask)

    @triton.jit
    def _bin_kernel(ranges_x_ptr, ranges_y_ptr, ids_ptr, starts_ptr, out_ptr, N, n_tiles, tile_width, n_chunks,
                    WRITE: tl.constexpr, TILES: tl.constexpr, GAUSSIANS: tl.constexpr):
        """For one image, TILES tiles and one chunk of GAUSSIANS depth-sorted Gaussians: count the (tile, Gaussian)
        hits per tile (``WRITE=False``: into ``out``), or write the hits' flatten ids from ``starts`` on, in order."""
        image, chunk = tl.program_id(0), tl.program_id(2)
        tile = tl.program_id(1) * TILES + tl.arange(0, TILES)  # [TILES]
        tx, ty = tile % tile_width, tile // tile_width
        k = chunk * GAUSSIANS + tl.arange(0, GAUSSIANS)  # [GAUSSIANS]
        kmask = k < N
        rx = tl.load(ranges_x_ptr + image * N + k, mask=kmask, other=0)  # masked: the empty range [0, 0)
        ry = tl.load(ranges_y_ptr + image * N + k, mask=kmask, other=0)
        x0, x1, y0, y1 = rx & 0xFFFF, rx >> 16, ry & 0xFFFF, ry >> 16
        hit = ((tx[:, None] >= x0[None, :]) & (tx[:, None] < x1[None, :])
               & (ty[:, None] >= y0[None, :]) & (ty[:, None] < y1[None, :]))  # [TILES, GAUSSIANS]
        tmask = tile < n_tiles
        slot = (image * n_tiles + tile) * n_chunks + chunk  # [TILES]
        if WRITE:
            start = tl.load(starts_ptr + slot, mask=tmask, other=0)  # int64
            rank = tl.cumsum(hit.to(tl.int32), axis=1) - 1
            ids = tl.load(ids_ptr + image * N + k, mask=kmask, other=0)
            tl.store(out_ptr + start[:, None] + rank, ids[None, :] + tl.zeros_like(rank), mask=hit & tmask[:, None])
        else:
            tl.store(out_ptr + slot, tl.sum(hit.to(tl.int32), axis=1), mask=tmask)
