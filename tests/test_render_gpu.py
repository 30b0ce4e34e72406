"""gsplat against the pure-PyTorch rasterizer on CUDA: same images and same gradients on scenes like the real ones
(65,536 Gaussians in the unit box seen from 4 orbit views at radius 1.5). Run on the GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gen3diffusion.cameras import Cameras, orbit_camera
from gen3diffusion.config import RenderConfig
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.render import rasterize
from gen3diffusion.render._gsplat import GSPLAT_CONSTANTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with gsplat"),
]

# the torch backend under gsplat's fixed kernel constants (alpha clamp 0.999, skip below 1/255, no sigma cut-off)
CFG = RenderConfig(eps2d=0.0, **GSPLAT_CONSTANTS)
PARAMS = ["means", "scales", "rotations", "opacities", "colors"]


def _scene(n: int, batch: int = 1, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    g = Gaussians(
        means=torch.rand(batch, n, 3, generator=gen) - 0.5,
        scales=0.005 + 0.025 * torch.rand(batch, n, 3, generator=gen),
        rotations=torch.nn.functional.normalize(torch.randn(batch, n, 4, generator=gen), dim=-1),
        opacities=torch.rand(batch, n, generator=gen),
        colors=torch.rand(batch, n, 3, generator=gen),
    )
    g = g.to("cuda")
    for name in PARAMS:
        getattr(g, name).requires_grad_(True)
    return g


def _cameras(size: int = 256, elevation: float = 0.0) -> Cameras:
    az = torch.tensor([0.0, 90.0, 180.0, 270.0])
    return Cameras.from_fovy(orbit_camera(torch.full_like(az, elevation), az, 1.5), 49.1, size).to("cuda")


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(float((a - b).square().mean()))


@pytest.mark.parametrize("n", [1000, 65536])
def test_torch_backend_matches_gsplat(n):
    g = _scene(n, seed=n)
    cams = _cameras()
    out_g = rasterize(g, cams, background=(1.0, 1.0, 1.0), backend="gsplat", cfg=CFG)
    out_t = rasterize(g, cams, background=(1.0, 1.0, 1.0), backend="torch", cfg=CFG)
    assert out_g.rgb.shape == out_t.rgb.shape == (1, 4, 3, 256, 256)
    assert out_g.alpha.shape == out_t.alpha.shape == out_g.depth.shape == out_t.distortion.shape == (1, 4, 1, 256, 256)

    psnr = _psnr(out_t.rgb, out_g.rgb)
    alpha_err = float((out_t.alpha - out_g.alpha).abs().max())
    assert psnr >= 40.0, f"colour PSNR {psnr:.1f} dB"
    assert alpha_err <= 1e-2, f"alpha max error {alpha_err:.3g}"
    covered = (out_g.alpha > 0.5) & (out_t.alpha > 0.5)
    assert covered.float().mean() > 0.1
    depth_err = float((out_t.depth - out_g.depth)[covered].abs().mean())
    assert depth_err <= 1e-3, f"depth mean error {depth_err:.3g}"
    dist_err = float((out_t.distortion - out_g.distortion)[covered].abs().mean())
    assert dist_err <= 1e-2 * float(out_g.distortion[covered].abs().mean()) + 1e-7, f"distortion error {dist_err:.3g}"

    # the same random cotangent through both renders
    gen = torch.Generator(device="cuda").manual_seed(1)
    cot_rgb = torch.randn(out_g.rgb.shape, generator=gen, device="cuda")
    cot_alpha = torch.randn(out_g.alpha.shape, generator=gen, device="cuda")
    params = [getattr(g, name) for name in PARAMS]
    grads_g = torch.autograd.grad((out_g.rgb * cot_rgb).sum() + (out_g.alpha * cot_alpha).sum(), params)
    grads_t = torch.autograd.grad((out_t.rgb * cot_rgb).sum() + (out_t.alpha * cot_alpha).sum(), params)
    for name, a, b in zip(PARAMS, grads_t, grads_g):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        if name == "rotations":
            continue  # compared through the covariance (scales); quaternion gradients are not part of the bar
        cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        assert cos >= 0.99, f"{name}: gradient cosine similarity {cos:.4f}"


def test_gsplat_batch_of_two_equals_two_singles():
    g = _scene(2000, batch=2, seed=3)
    c2w = torch.stack([orbit_camera(torch.zeros(4), torch.tensor([0.0, 90.0, 180.0, 270.0]) + 20.0 * b, 1.5)
                       for b in range(2)])
    both = rasterize(g, Cameras.from_fovy(c2w, 49.1, 128).to("cuda"), backend="gsplat", cfg=CFG)
    for b in range(2):
        single = rasterize(g[b], Cameras.from_fovy(c2w[b : b + 1], 49.1, 128).to("cuda"), backend="gsplat", cfg=CFG)
        torch.testing.assert_close(both.rgb[b : b + 1], single.rgb, atol=1e-5, rtol=0)
        torch.testing.assert_close(both.alpha[b : b + 1], single.alpha, atol=1e-5, rtol=0)


def test_gsplat_lone_gaussian_depth_and_orientation():
    """A lone Gaussian right of and above the origin lands right of and above the image centre, at its depth."""
    means = torch.tensor([[[0.2, 0.1, 0.3]]], device="cuda")
    g = Gaussians(
        means=means,
        scales=torch.full((1, 1, 3), 0.02, device="cuda"),
        rotations=torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], device="cuda"),
        opacities=torch.tensor([[0.9]], device="cuda"),
        colors=torch.tensor([[[1.0, 0.0, 0.0]]], device="cuda"),
    )
    cams = Cameras.from_fovy(orbit_camera(0.0, 0.0, 1.5)[None], 49.1, 64).to("cuda")
    out = rasterize(g, cams, backend="gsplat", cfg=CFG)
    row, col = divmod(int(out.alpha[0, 0, 0].argmax()), 64)
    f = float(cams.K[0, 1, 1])
    z = 1.5 - 0.3
    assert abs(col + 0.5 - (32 + f * 0.2 / z)) <= 0.5 and abs(row + 0.5 - (32 - f * 0.1 / z)) <= 0.5
    covered = out.alpha > 0
    torch.testing.assert_close(out.depth[covered], torch.full_like(out.depth[covered], z), atol=1e-4, rtol=0)
    assert float(out.distortion.abs().max()) < 1e-5


def test_gsplat_colour_only_render_equals_the_full_one():
    """``depth=False`` (what sampling uses) composites 3 instead of 5 features: the same rgb and alpha."""
    g = _scene(65536, seed=3)
    cams = _cameras(512)
    with torch.no_grad():
        full = rasterize(g, cams, backend="gsplat", cfg=CFG)
        rgb_only = rasterize(g, cams, backend="gsplat", cfg=CFG, depth=False)
    assert rgb_only.depth is None
    torch.testing.assert_close(rgb_only.rgb, full.rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb_only.alpha, full.alpha, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.02, 0.08])  # trained-size splats, and the random 3D model's large ones
def test_gsplat_tile_size_does_not_change_the_image(scale):
    """Opacity-aware bounding boxes hold every pixel a splat reaches, so tiles of 32 give the image of tiles of 16."""
    g = _scene(65536, seed=4)
    g = Gaussians(means=g.means, scales=g.scales.detach() * (scale / 0.0175), rotations=g.rotations,
                  opacities=g.opacities, colors=g.colors)
    cams = _cameras(512)
    with torch.no_grad():
        tiles16 = rasterize(g, cams, backend="gsplat", cfg=CFG, depth=False)
        tiles32 = rasterize(g, cams, backend="gsplat", cfg=dataclasses.replace(CFG, tile_size=32), depth=False)
    torch.testing.assert_close(tiles32.rgb, tiles16.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiles32.alpha, tiles16.alpha, atol=1e-6, rtol=0)


def test_render_set_up_does_not_wait_for_the_gpu():
    """The view matrices and the background are made on the device: a host-to-device copy there would make the CPU
    wait for every queued kernel (in sampling, the whole MVD + VAE + 3D model graph) before the render could start."""
    from gen3diffusion.render import _background, _camera_matrices

    means = torch.zeros(1, 8, 3, device="cuda")
    cams = _cameras()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        viewmats, Ks = _camera_matrices(cams, 1, means)
        bg = _background((1.0, 0.5, 0.0), 1, 4, means)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0], device="cuda")
    torch.testing.assert_close(viewmats[0], torch.linalg.inv(cams.c2w * flip))
    assert Ks.shape == (1, 4, 3, 3)
    torch.testing.assert_close(bg, torch.tensor([1.0, 0.5, 0.0], device="cuda").expand(1, 4, 3))


def _gsplat_lists(means2d, radii, depths, tile_size, tiles_x, tiles_y):
    """gsplat's own binning: per-tile offsets and front-to-back flatten ids from its radix sort."""
    import gsplat

    images = means2d.shape[:-2]
    _, isect_ids, flatten_ids = gsplat.isect_tiles(means2d, radii, depths, tile_size, tiles_x, tiles_y)
    offsets = gsplat.isect_offset_encode(isect_ids, math.prod(images), tiles_x, tiles_y)
    return offsets.reshape(*images, tiles_y, tiles_x), flatten_ids


@pytest.mark.parametrize("scale, size, tile, batch", [(0.0175, 512, 32, 1), (0.08, 512, 32, 1), (0.0175, 300, 16, 2)])
def test_dense_tile_binning_gives_gsplats_lists_and_image(scale, size, tile, batch):
    """The dense binning lists the same splats per tile in the same order as gsplat's sort (depth ties included),
    so the images, depths and distortions are bit-identical and the gradients equal to atomics' rounding."""
    import gsplat

    from gen3diffusion.render._binning import dense_tile_bins

    g = _scene(65536, batch=batch, seed=5)
    g = Gaussians(means=g.means, scales=(g.scales.detach() * (scale / 0.0175)).requires_grad_(True),
                  rotations=g.rotations, opacities=g.opacities, colors=g.colors)
    cams = Cameras.from_fovy(_cameras().c2w, 49.1, size, size * 2 // 3)  # a non-square image
    with torch.no_grad():  # splats at equal depths: the sort keeps them in index order
        g.means[:, 100:200] = g.means[:, 50:51]
    viewmats, Ks = _camera_matrices_for(cams, batch)
    with torch.no_grad():
        radii, means2d, depths, _, _ = gsplat.fully_fused_projection(
            g.means, None, g.rotations, g.scales, viewmats, Ks, cams.width, cams.height, eps2d=0.0,
            opacities=g.opacities)
    tiles_x, tiles_y = math.ceil(cams.width / tile), math.ceil(cams.height / tile)
    offsets, ids = dense_tile_bins(means2d, radii, depths, tile, tiles_x, tiles_y)
    ref_offsets, ref_ids = _gsplat_lists(means2d, radii, depths, tile, tiles_x, tiles_y)
    assert ids.numel() > 0 and offsets.dtype == ref_offsets.dtype == torch.int32
    assert torch.equal(offsets, ref_offsets) and torch.equal(ids, ref_ids)

    outs, grads = {}, {}
    for binning in ("dense", "sort"):
        cfg = dataclasses.replace(CFG, tile_size=tile, tile_binning=binning)
        outs[binning] = out = rasterize(g, cams, backend="gsplat", cfg=cfg)
        loss = out.rgb.mean() + out.alpha.mean() + out.depth.mean() + out.distortion.mean()
        grads[binning] = torch.autograd.grad(loss, [getattr(g, name) for name in PARAMS])
    for field in ("rgb", "alpha", "depth", "distortion"):
        assert torch.equal(getattr(outs["dense"], field), getattr(outs["sort"], field)), field
    for name, a, b in zip(PARAMS, grads["dense"], grads["sort"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_gsplat_backend_equals_gsplat_rasterization():
    """The backend's step-by-step calls are ``gsplat.rasterization``'s for these arguments: bit-identical colours."""
    import gsplat

    from gen3diffusion.render import _gsplat

    g = _scene(65536, seed=6)
    cams = _cameras(512)
    viewmats, Ks = _camera_matrices_for(cams, 1)
    feats = g.colors[:, None].expand(1, 4, -1, 3).detach()
    with torch.no_grad():
        ref, ref_alpha, _ = gsplat.rasterization(g.means, g.rotations, g.scales, g.opacities, feats, viewmats, Ks, 512,
                                                 512, eps2d=0.0, packed=False, tile_size=32)
        for binning in ("sort", "dense"):
            out, alpha = _gsplat.render_features(g.means, g.rotations, g.scales, g.opacities, feats, viewmats, Ks, 512,
                                                 512, eps2d=0.0, near_plane=0.01, tile_size=32, binning=binning,
                                                 **GSPLAT_CONSTANTS)
            assert torch.equal(out, ref) and torch.equal(alpha, ref_alpha), binning


def _camera_matrices_for(cams: Cameras, batch: int):
    from gen3diffusion.render import _camera_matrices

    return _camera_matrices(cams, batch, torch.zeros(batch, 1, 3, device="cuda"))
