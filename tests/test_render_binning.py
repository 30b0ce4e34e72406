"""The dense tile binning (``render/_binning.py``) on the CPU: its kernels in Triton's interpreter against a plain
reference of gsplat's lists (each tile's splats, front to back, ties in index order), and the choice of binning.
The GPU tests (tests/test_render_gpu.py) compare it with gsplat's own binning and images."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gen3diffusion.render import _gsplat
from gen3diffusion.render._binning import dense_binning_applies

# image batch dims, Gaussians, width, height, tile: several images, a partial last tile, a single tile, odd counts
CASES = [((2, 3), 300, 100, 70, 16), ((1,), 700, 64, 64, 32), ((3,), 50, 40, 24, 8), ((1,), 1, 5, 5, 16),
         ((2,), 0, 16, 16, 16)]


def test_dense_binning_in_triton_interpreter():
    """Offsets and flatten ids equal a brute-force construction of gsplat's lists: splats culled by one radius or
    both, off-image centres, depth ties, chunk boundaries (700 > the 512 splats a program tests) and no splats."""
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import math, torch
        from gen3diffusion.render._binning import dense_tile_bins

        def reference(means2d, radii, depths, tile, tiles_x, tiles_y):
            # gsplat's intersect_tile_kernel ranges and its stable sort by (image, tile, depth), written plainly
            I, N = math.prod(means2d.shape[:-2]), means2d.shape[-2]
            m, r, d = means2d.reshape(I, N, 2), radii.reshape(I, N, 2), depths.reshape(I, N)
            lo = torch.floor(m / tile - r / tile).clamp_min(0)
            hi = torch.ceil(m / tile + r / tile).clamp_min(0)
            lo = torch.minimum(lo, torch.tensor([tiles_x, tiles_y])).long()
            hi = torch.minimum(hi, torch.tensor([tiles_x, tiles_y])).long()
            offsets, ids = [], []
            for i in range(I):
                for ty in range(tiles_y):
                    for tx in range(tiles_x):
                        offsets.append(len(ids))
                        hits = [g for g in range(N) if (r[i, g] > 0).all() and lo[i, g, 0] <= tx < hi[i, g, 0]
                                and lo[i, g, 1] <= ty < hi[i, g, 1]]
                        ids += [i * N + g for g in sorted(hits, key=lambda g: (d[i, g].item(), g))]
            return (torch.tensor(offsets, dtype=torch.int32).reshape(*means2d.shape[:-2], tiles_y, tiles_x),
                    torch.tensor(ids, dtype=torch.int32))

        torch.manual_seed(0)
        for dims, N, W, H, T in {CASES!r}:
            span = torch.tensor([W * 1.4, H * 1.4])
            means2d = torch.rand(*dims, N, 2) * span - span * 0.15
            radii = (torch.rand(*dims, N, 2) * 30).int()
            radii[torch.rand(*dims, N) < 0.1] = 0
            radii[..., 0][torch.rand(*dims, N) < 0.05] = 0  # culled by one radius only
            depths = torch.rand(*dims, N) * 3 + 0.5
            depths[..., 10:20] = depths[..., 5:6]  # ties
            tiles_x, tiles_y = math.ceil(W / T), math.ceil(H / T)
            offsets, ids = dense_tile_bins(means2d, radii, depths, T, tiles_x, tiles_y)
            ref_offsets, ref_ids = reference(means2d, radii, depths, T, tiles_x, tiles_y)
            assert offsets.dtype == ids.dtype == torch.int32
            assert torch.equal(offsets, ref_offsets), (dims, N, W, H, T)
            assert torch.equal(ids, ref_ids), (dims, N, W, H, T, ids.numel(), ref_ids.numel())
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_binning_choice():
    """"sort" is gsplat's binning, "dense" the one here, which says why it cannot run (a tile whose divisions are not
    exact); unknown names are refused."""
    if not dense_binning_applies(32):
        pytest.skip("needs Triton")
    assert _gsplat._use_dense_binning("dense", 16) and not _gsplat._use_dense_binning("sort", 24)
    assert not dense_binning_applies(24) and not dense_binning_applies(0)
    with pytest.raises(ValueError, match="power-of-two"):
        _gsplat._use_dense_binning("dense", 24)
    with pytest.raises(ValueError, match="tile_binning"):
        _gsplat._use_dense_binning("auto", 32)
