"""The renderer on CPU: closed forms for lone Gaussians, compositing order, depth and distortion, gradients, and the
tiled torch rasterizer against a slow dense float64 reference written here (every Gaussian at every pixel)."""

from __future__ import annotations

import pytest
import torch

from gen3diffusion.cameras import Cameras, orbit_camera
from gen3diffusion.config import RenderConfig, load_config
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.render import RenderOutput, rasterize

FOVY = 49.1
T_MIN = 1e-4  # gsplat's early-termination threshold on the transmittance
# the torch backend under gsplat's fixed kernel constants
GSPLAT_LIKE = RenderConfig(alpha_max=0.999, alpha_min=1 / 255, sigma_cutoff=3.33)


def _cameras(azimuths=(0.0,), size: int = 32, dtype=torch.float64, elevation: float = 0.0) -> Cameras:
    az = torch.tensor(azimuths, dtype=dtype)
    return Cameras.from_fovy(orbit_camera(torch.full_like(az, elevation), az, 1.5), FOVY, size)


def _gaussians(means, scales, opacities, colors, rotations=None, dtype=torch.float64) -> Gaussians:
    means = torch.as_tensor(means, dtype=dtype).reshape(1, -1, 3)
    n = means.shape[1]
    scales = torch.as_tensor(scales, dtype=dtype).reshape(1, -1, 1).expand(1, n, 3).clone()
    if rotations is None:
        rotations = torch.tensor([1.0, 0, 0, 0], dtype=dtype).expand(1, n, 4).clone()
    return Gaussians(
        means=means,
        scales=scales,
        rotations=rotations,
        opacities=torch.as_tensor(opacities, dtype=dtype).reshape(1, n),
        colors=torch.as_tensor(colors, dtype=dtype).reshape(1, n, 3),
    )


def _random_gaussians(n: int, batch: int = 1, seed: int = 0, dtype=torch.float64, scale=(0.02, 0.12)) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=dtype)  # noqa: E731
    return Gaussians(
        means=rand(batch, n, 3) - 0.5,
        scales=scale[0] + (scale[1] - scale[0]) * rand(batch, n, 3),
        rotations=torch.nn.functional.normalize(torch.randn(batch, n, 4, generator=gen, dtype=dtype), dim=-1),
        opacities=0.2 + 0.8 * rand(batch, n),
        colors=rand(batch, n, 3),
    )


def _focal(cameras: Cameras) -> float:
    return float(cameras.K.reshape(-1, 9)[0, 4])


# ---------------------------------------------------------------------------------------------------------------
# closed forms


@pytest.mark.parametrize("size", [32, 33])
def test_lone_isotropic_gaussian_matches_closed_form(size):
    """A Gaussian on the optical axis renders alpha = o exp(-r^2 / (2 sigma_px^2)), sigma_px = f sigma / z, cut at
    3 sigma and below alpha_min, and its colour over the background."""
    cams = _cameras(size=size)
    sigma, opacity, color = 0.08, 0.8, (0.9, 0.2, 0.1)
    g = _gaussians([[0.0, 0.0, 0.0]], [sigma], [opacity], [color])
    cfg = RenderConfig(sigma_cutoff=3.0)  # tighter than the default 3.33, so the cut-off shows above alpha_min
    out = rasterize(g, cams, background=(0.0, 0.5, 1.0), backend="torch", cfg=cfg)

    sigma_px = _focal(cams) * sigma / 1.5
    centre = size / 2  # principal point; pixel centres at +0.5
    grid = torch.arange(size, dtype=torch.float64) + 0.5 - centre
    r2 = grid[:, None] ** 2 + grid[None, :] ** 2  # [H, W]
    alpha = opacity * torch.exp(-r2 / (2 * sigma_px**2))
    cut = r2 > (cfg.sigma_cutoff * sigma_px) ** 2
    assert (cut & (alpha >= cfg.alpha_min)).any()  # the cut-off, not only alpha_min, shapes the footprint
    alpha = alpha * (alpha >= cfg.alpha_min) * ~cut
    color, bg = torch.tensor(color, dtype=torch.float64), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    rgb = alpha * color[:, None, None] + (1 - alpha) * bg[:, None, None]
    torch.testing.assert_close(out.alpha[0, 0, 0], alpha, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.rgb[0, 0], rgb, atol=1e-9, rtol=0)
    assert out.alpha.max() > 0.7


def test_alpha_is_clamped_at_alpha_max():
    cams = _cameras(size=33)
    g = _gaussians([[0.0, 0.0, 0.0]], [0.05], [1.0], [(1.0, 1.0, 1.0)])
    for alpha_max in (0.99, 0.999):
        out = rasterize(g, cams, backend="torch", cfg=RenderConfig(alpha_max=alpha_max))
        assert out.alpha.max().item() == pytest.approx(alpha_max, abs=1e-12)


def test_image_orientation_and_pixel_centres():
    """World +x appears to the right and world +y up in the front view; the peak sits where K puts it."""
    cams = _cameras(size=64)
    x, y = 0.2, 0.1
    g = _gaussians([[x, y, 0.0]], [0.01], [0.9], [(1.0, 0.0, 0.0)])
    alpha = rasterize(g, cams, backend="torch").alpha[0, 0, 0]
    row, col = divmod(int(alpha.argmax()), 64)
    f = _focal(cams)
    assert col + 0.5 == pytest.approx(32 + f * x / 1.5, abs=0.5)
    assert row + 0.5 == pytest.approx(32 - f * y / 1.5, abs=0.5)


@pytest.mark.parametrize("reverse", [False, True])
def test_near_gaussian_occludes_far_one_in_any_input_order(reverse):
    cams = _cameras(size=33)  # odd size: the optical axis goes through the centre of pixel (16, 16)
    means = [[0.0, 0.0, 0.3], [0.0, 0.0, -0.3]]  # camera depths 1.2 (red) and 1.8 (blue)
    colors = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    opacities = [0.7, 0.9]
    order = [1, 0] if reverse else [0, 1]
    g = _gaussians([means[i] for i in order], [0.08, 0.08], [opacities[i] for i in order], [colors[i] for i in order])
    out = rasterize(g, cams, background=(0.0, 1.0, 0.0), backend="torch")
    a1, a2 = opacities
    expected = torch.tensor([a1, (1 - a1) * (1 - a2), a2 * (1 - a1)], dtype=torch.float64)
    torch.testing.assert_close(out.rgb[0, 0, :, 16, 16], expected, atol=1e-12, rtol=0)
    w1, w2 = a1, a2 * (1 - a1)
    assert out.depth[0, 0, 0, 16, 16].item() == pytest.approx((w1 * 1.2 + w2 * 1.8) / (w1 + w2), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lone_gaussian_depth_is_its_z_and_distortion_zero(dtype):
    cams = _cameras(size=32, dtype=dtype)
    g = _gaussians([[0.05, -0.03, 0.2]], [0.06], [0.95], [(0.5, 0.5, 0.5)], dtype=dtype)
    out = rasterize(g, cams, backend="torch")
    covered = out.alpha > 0
    assert covered.sum() > 50
    z = 1.5 - 0.2
    torch.testing.assert_close(out.depth[covered], torch.full_like(out.depth[covered], z), atol=1e-5, rtol=0)
    assert (out.depth[~covered] == 0).all()
    assert out.distortion.abs().max() < (1e-12 if dtype == torch.float64 else 1e-6)


def test_distortion_of_two_gaussians_matches_closed_form():
    cams = _cameras(size=33)
    z_near, z_far = 1.5 - 0.25, 1.5 + 0.25
    g = _gaussians([[0.0, 0.0, 0.25], [0.0, 0.0, -0.25]], [0.08, 0.08], [0.6, 0.8], [(1.0, 1.0, 1.0)] * 2)
    out = rasterize(g, cams, backend="torch")
    w1, w2 = 0.6, 0.8 * (1 - 0.6)  # weights at the centre pixel, where both alphas equal the opacities
    alpha = w1 + w2
    expected = w1 * z_near**2 + w2 * z_far**2 - (w1 * z_near + w2 * z_far) ** 2 / alpha
    assert expected > 0.01
    assert out.alpha[0, 0, 0, 16, 16].item() == pytest.approx(alpha, abs=1e-12)
    assert out.distortion[0, 0, 0, 16, 16].item() == pytest.approx(expected, abs=1e-12)
    assert (out.distortion >= 0).all()


def test_gradients_reach_every_parameter():
    g = _random_gaussians(60, dtype=torch.float32, seed=1)
    params = [g.means, g.scales, g.rotations, g.opacities, g.colors]
    for p in params:
        p.requires_grad_(True)
    out = rasterize(g, _cameras((0.0, 90.0), size=32, dtype=torch.float32), backend="torch")
    loss = out.rgb.square().mean() + out.alpha.mean() + out.depth.mean() + out.distortion.mean()
    grads = torch.autograd.grad(loss, params)
    for name, grad in zip(["means", "scales", "rotations", "opacities", "colors"], grads):
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# dense float64 reference


def _dense_reference(g: Gaussians, cams: Cameras, background, cfg: RenderConfig) -> RenderOutput:
    """Every Gaussian at every pixel, one Gaussian at a time in depth order; gsplat's rules, written plainly."""
    c2w = cams.c2w.reshape(-1, 4, 4)
    V, H, W = c2w.shape[0], cams.height, cams.width
    K = cams.K.reshape(-1, 3, 3)
    bg = torch.as_tensor(background, dtype=g.means.dtype)
    quat = torch.nn.functional.normalize(g.rotations[0], dim=-1)
    qw, qx, qy, qz = quat.unbind(-1)
    rot = torch.stack(
        [
            torch.stack([1 - 2 * (qy**2 + qz**2), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)], -1),
            torch.stack([2 * (qx * qy + qw * qz), 1 - 2 * (qx**2 + qz**2), 2 * (qy * qz - qw * qx)], -1),
            torch.stack([2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx**2 + qy**2)], -1),
        ],
        -2,
    )  # [N, 3, 3]
    cov3 = rot @ torch.diag_embed(g.scales[0] ** 2) @ rot.transpose(-1, -2)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=g.means.dtype) + 0.5, torch.arange(W, dtype=g.means.dtype) + 0.5,
                            indexing="ij")
    outs = {k: [] for k in ("rgb", "alpha", "depth", "distortion")}
    for v in range(V):
        R_cv = c2w[v, :3, :3] @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=g.means.dtype))  # OpenCV axes
        p = (g.means[0] - c2w[v, :3, 3]) @ R_cv  # [N, 3] camera coordinates
        fx, fy, cx, cy = K[v, 0, 0], K[v, 1, 1], K[v, 0, 2], K[v, 1, 2]
        rgb = torch.zeros(3, H, W, dtype=g.means.dtype)
        s0 = torch.zeros(H, W, dtype=g.means.dtype)
        s1, s2 = torch.zeros_like(s0), torch.zeros_like(s0)
        T = torch.ones(H, W, dtype=g.means.dtype)
        done = torch.zeros(H, W, dtype=torch.bool)
        for n in torch.argsort(p[:, 2]).tolist():
            x, y, z = p[n]
            if z < cfg.near_plane:
                continue
            u, w = x / z, y / z
            lx, ly = 0.15 * W / fx, 0.15 * H / fy
            u_c = torch.clamp(u, -(cx / fx + lx), (W - cx) / fx + lx)
            w_c = torch.clamp(w, -(cy / fy + ly), (H - cy) / fy + ly)
            J = torch.stack([torch.stack([fx / z, 0 * z, -fx * u_c / z]), torch.stack([0 * z, fy / z, -fy * w_c / z])])
            cov2 = J @ R_cv.T @ cov3[n] @ R_cv @ J.T + cfg.eps2d * torch.eye(2, dtype=g.means.dtype)
            if torch.det(cov2) <= 0:
                continue
            Q = torch.linalg.inv(cov2)
            dx, dy = xs - (fx * u + cx), ys - (fy * w + cy)
            sig = 0.5 * (Q[0, 0] * dx**2 + Q[1, 1] * dy**2) + Q[0, 1] * dx * dy
            alpha = torch.clamp_max(g.opacities[0, n] * torch.exp(-sig), cfg.alpha_max)
            alpha = alpha * ((alpha >= cfg.alpha_min) & (sig <= 0.5 * cfg.sigma_cutoff**2) & (sig >= 0))
            nxt = T * (1 - alpha)
            stop = (nxt <= T_MIN) & ~done
            use = ~done & ~stop
            wgt = alpha * T * use
            rgb = rgb + wgt * g.colors[0, n][:, None, None]
            s0, s1, s2 = s0 + wgt, s1 + wgt * z, s2 + wgt * z * z
            T = torch.where(use, nxt, T)
            done = done | stop
        safe = s0.clamp_min(1e-6)
        outs["rgb"].append(rgb + (1 - s0) * bg[:, None, None])
        outs["alpha"].append(s0[None])
        outs["depth"].append((s1 / safe)[None])
        outs["distortion"].append((s2 - s1**2 / safe).clamp_min(0)[None])
        outs.setdefault("terminated", []).append(int(done.sum()))
    _dense_reference.terminated = sum(outs.pop("terminated"))
    return RenderOutput(**{k: torch.stack(v)[None] for k, v in outs.items()})


def _fields(out: RenderOutput):
    return {"rgb": out.rgb, "alpha": out.alpha, "depth": out.depth, "distortion": out.distortion}


@pytest.mark.parametrize(
    "cfg",
    [
        RenderConfig(torch_gaussians_per_step=8, torch_chunk_elements=8 * 256 * 3),
        RenderConfig(torch_gaussians_per_step=16, torch_chunk_elements=1, alpha_max=0.999, sigma_cutoff=3.33),
        RenderConfig(eps2d=0.3, sigma_cutoff=2.5, alpha_min=0.02),
    ],
    ids=["default-small-steps", "gsplat-constants", "dilated-cut"],
)
def test_tiled_equals_dense_reference_float64(cfg):
    g = _random_gaussians(200, seed=3)
    params = [g.means, g.scales, g.rotations, g.opacities, g.colors]
    for p in params:
        p.requires_grad_(True)
    cams = _cameras((0.0, 120.0), size=32, elevation=20.0)
    bg = (0.2, 0.4, 0.6)
    tiled = _fields(rasterize(g, cams, background=bg, backend="torch", cfg=cfg))
    dense = _fields(_dense_reference(g, cams, bg, cfg))
    assert _dense_reference.terminated > 20  # early termination is exercised
    for name in tiled:
        torch.testing.assert_close(tiled[name], dense[name], atol=1e-10, rtol=1e-10, msg=name)
    gen = torch.Generator().manual_seed(7)
    cot = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in tiled.items()}
    loss = lambda out: sum((out[k] * cot[k]).sum() for k in out)  # noqa: E731
    g_tiled = torch.autograd.grad(loss(tiled), params)
    g_dense = torch.autograd.grad(loss(dense), params)
    for name, a, b in zip(["means", "scales", "rotations", "opacities", "colors"], g_tiled, g_dense):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=name)


def test_float32_tiled_is_close_to_dense_float64():
    g = _random_gaussians(200, seed=4)
    cams = _cameras((30.0,), size=32)
    dense = _fields(_dense_reference(g, cams, (1.0, 1.0, 1.0), RenderConfig()))
    tiled = _fields(rasterize(g.to(torch.float32), cams.to(torch.float32), backend="torch"))
    for name in ("rgb", "alpha", "depth"):  # float32 rounding, accumulated over up to ~100 layers
        torch.testing.assert_close(tiled[name].double(), dense[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(tiled["distortion"].double(), dense["distortion"], atol=2e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# batching and camera layouts


def test_batch_of_two_equals_two_singles():
    g = _random_gaussians(80, batch=2, seed=5)
    az = torch.tensor([0.0, 90.0, 200.0])
    c2w = torch.stack([orbit_camera(torch.zeros(3), az + 15.0 * b, 1.5) for b in range(2)])
    cams = Cameras.from_fovy(c2w.double(), FOVY, 24)
    both = rasterize(g, cams, backend="torch")
    for b in range(2):
        single = rasterize(g[b], Cameras.from_fovy(c2w[b : b + 1].double(), FOVY, 24), backend="torch")
        for name, value in _fields(single).items():
            torch.testing.assert_close(_fields(both)[name][b : b + 1], value, atol=1e-12, rtol=0, msg=name)


def test_shared_cameras_broadcast_over_the_batch():
    g = _random_gaussians(50, batch=2, seed=6)
    c2w = orbit_camera(torch.zeros(2), torch.tensor([10.0, 100.0]), 1.5).double()  # [V, 4, 4]
    shared = rasterize(g, Cameras.from_fovy(c2w, FOVY, 16, 20), backend="torch")
    expanded = rasterize(g, Cameras.from_fovy(c2w.expand(2, 2, 4, 4), FOVY, 16, 20), backend="torch")
    assert shared.rgb.shape == (2, 2, 3, 20, 16)
    assert shared.alpha.shape == shared.depth.shape == shared.distortion.shape == (2, 2, 1, 20, 16)
    for name, value in _fields(shared).items():
        torch.testing.assert_close(value, _fields(expanded)[name], atol=0, rtol=0, msg=name)


def test_colour_only_render_equals_the_full_one():
    """``depth=False`` composites colour alone: the same rgb and alpha, no depth or distortion."""
    g = _random_gaussians(120, batch=2, seed=7)
    cams = _cameras((0.0, 90.0, 180.0), size=20)
    full = rasterize(g, cams, backend="torch")
    rgb_only = rasterize(g, cams, backend="torch", depth=False)
    assert rgb_only.depth is None and rgb_only.distortion is None
    torch.testing.assert_close(rgb_only.rgb, full.rgb, atol=1e-12, rtol=0)
    torch.testing.assert_close(rgb_only.alpha, full.alpha, atol=1e-12, rtol=0)


def test_auto_backend_on_cpu_is_torch_and_structured_configs_work():
    g = _random_gaussians(30, seed=8)
    cams = _cameras(size=16)
    auto = rasterize(g, cams, cfg=load_config(RenderConfig))  # an OmegaConf DictConfig, as the scripts pass
    torch.testing.assert_close(auto.rgb, rasterize(g, cams, backend="torch").rgb, atol=0, rtol=0)


def test_nothing_visible_renders_background_and_keeps_the_graph():
    g = _gaussians([[0.0, 0.0, 3.0]], [0.05], [0.9], [(1.0, 0.0, 0.0)])  # behind the camera at z = 1.5
    g.means.requires_grad_(True)
    out = rasterize(g, _cameras(size=16), background=(0.1, 0.2, 0.3), backend="torch")
    assert (out.alpha == 0).all()
    torch.testing.assert_close(out.rgb[0, 0, :, 3, 5], torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.rgb.sum(), [g.means])
    assert (grad == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# errors


def test_background_as_numbers_a_tensor_or_per_view_lists_renders_the_same():
    """The background reaches the image the same way whether given as RGB numbers, a tensor or nested per-view lists
    (numbers are filled on the device rather than copied from the host)."""
    g, cams = _random_gaussians(30, scale=(0.01, 0.03)), _cameras((0.0, 90.0), size=16)
    rgb = (0.1, 0.5, 0.9)
    ref = rasterize(g, cams, background=rgb, backend="torch").rgb  # [1, 2, 3, 16, 16]
    empty = ref.new_ones(1, 2, 3, 16, 16) * torch.tensor(rgb, dtype=ref.dtype)[:, None, None]
    visible = rasterize(g, cams, background=(0.0, 0.0, 0.0), backend="torch").rgb
    assert not torch.equal(ref, visible) and torch.allclose(ref[..., :1, :1], empty[..., :1, :1])  # a corner is empty
    for background in ([0.1, 0.5, 0.9], torch.tensor(rgb, dtype=torch.float64), [[list(rgb), list(rgb)]]):
        torch.testing.assert_close(rasterize(g, cams, background=background, backend="torch").rgb, ref,
                                   rtol=0, atol=1e-12)


def test_bad_camera_batch_names_the_shape():
    g = _random_gaussians(10, batch=2)
    c2w = orbit_camera(torch.zeros(6), torch.zeros(6), 1.5).reshape(3, 2, 4, 4).double()
    with pytest.raises(ValueError, match=r"\[3, 2, 4, 4\]"):
        rasterize(g, Cameras.from_fovy(c2w, FOVY, 16), backend="torch")


def test_bad_gaussian_field_names_the_shape():
    g = _random_gaussians(10)
    g.opacities = g.opacities[..., None]  # [1, 10, 1]
    with pytest.raises(ValueError, match=r"opacities.*\[1, 10, 1\]"):
        rasterize(g, _cameras(size=16), backend="torch")


def test_bad_background_names_the_shape():
    with pytest.raises(ValueError, match=r"background.*\[4\]"):
        rasterize(_random_gaussians(10), _cameras(size=16), background=(1.0, 1.0, 1.0, 1.0), backend="torch")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'cuda'"):
        rasterize(_random_gaussians(10), _cameras(size=16), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of the gsplat backend")
def test_gsplat_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        rasterize(_random_gaussians(10), _cameras(size=16), backend="gsplat")


# ---------------------------------------------------------------------------------------------------------------
# selfcheck


def test_selfcheck_passes_and_writes_a_png(tmp_path):
    from PIL import Image

    from gen3diffusion import selfcheck

    path = tmp_path / "check.png"
    assert selfcheck.main(["--output", str(path), "--backend", "torch", "--size", "64", "--device", "cpu"]) == 0
    assert Image.open(path).size == (4 * 64, 2 * 64)


def test_selfcheck_catches_an_empty_or_mirrored_render():
    from gen3diffusion import selfcheck

    out = rasterize(selfcheck.build_scene(), selfcheck.build_cameras(64), backend="torch")
    assert selfcheck.run_checks(out) == []
    mirrored = RenderOutput(*(x.flip(-1) for x in (out.rgb, out.alpha, out.depth, out.distortion)))
    assert any("red +x marker is not right of" in p for p in selfcheck.run_checks(mirrored))
    blank = (torch.zeros_like(x) for x in (out.alpha, out.depth, out.distortion))
    empty = RenderOutput(torch.ones_like(out.rgb), *blank)
    assert any("covered" in p for p in selfcheck.run_checks(empty))
