"""Procedural synthetic data: exact ray casting, multi-view consistency, normalisation, relative cameras, determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gen3diffusion.cameras import Cameras, invert_rigid, look_at, mvd_camera_vectors, orbit_camera, target_cameras
from gen3diffusion.data import SAMPLE_KEYS, DataConfig, make_dataset
from gen3diffusion.data.synthetic import (
    PRIMITIVES,
    SyntheticObject,
    _torus,
    cast_rays,
    make_object,
    render_object,
)

FOVY = 49.1


def tiny_cfg(**overrides) -> DataConfig:
    cfg = dict(num_objects=4, image_size=24, sup_size=32, num_sup_views=3, seed=0)
    cfg.update(overrides)
    return DataConfig(**cfg)


def single_primitive(kind: str, linear: torch.Tensor, center=(0.0, 0.0, 0.0), minor: float = 0.3) -> SyntheticObject:
    return SyntheticObject(
        kinds=torch.tensor([PRIMITIVES.index(kind)]),
        centers=torch.tensor([center], dtype=torch.float32),
        linear=linear[None].float(),
        minor=torch.tensor([minor]),
        textures=torch.tensor([0]),
        color_a=torch.tensor([[0.8, 0.2, 0.1]]),
        color_b=torch.tensor([[0.1, 0.2, 0.8]]),
        frequency=torch.tensor([2.0]),
        tex_axis=torch.tensor([[1.0, 0.0, 0.0]]),
    )


def inside_local(kind: str, p: torch.Tensor, minor: float) -> torch.Tensor:
    """Point-in-unit-primitive test [..., 3] -> bool, written from the shape definitions (independent of the caster)."""
    x, y, z = p.unbind(-1)
    rxz = (x * x + z * z).sqrt()
    if kind == "box":
        return p.abs().amax(-1) <= 1
    if kind == "sphere":
        return p.norm(dim=-1) <= 1
    if kind == "cylinder":
        return (rxz <= 1) & (y.abs() <= 1)
    if kind == "cone":
        return (y.abs() <= 1) & (rxz <= (1 - y) / 2)
    return (rxz - 1) ** 2 + y * y <= minor**2


@pytest.mark.parametrize(
    "kind, expected_t",
    [("box", 1.5 - 0.3), ("sphere", 1.5 - 0.3), ("cylinder", 1.5 - 0.3), ("cone", 1.5 - 0.15), ("torus", 1.5 - 0.39)],
)
def test_axis_ray_hits_closed_form(kind, expected_t):
    # A ray from (0, 0, 1.5) down -z meets each primitive (scale 0.3, axis y) at its closest point on +z: box face,
    # sphere pole, cylinder side at radius 0.3, cone side at half radius (y = 0), torus outer equator 0.3 (1 + 0.3).
    obj = single_primitive(kind, torch.eye(3) * 0.3, minor=0.3)
    t, normal, _ = cast_rays(obj, torch.tensor([[0.0, 0.0, 1.5]]), torch.tensor([[0.0, 0.0, -1.0]]))
    assert t.item() == pytest.approx(expected_t, abs=1e-5)
    # the cone's side normal is the gradient (x, (1 - y) / 4, z) of x^2 + z^2 - (1 - y)^2 / 4 at local (0, 0, 0.5)
    expected_n = [0.0, 0.0, 1.0] if kind != "cone" else [0.0, 1 / math.sqrt(5), 2 / math.sqrt(5)]
    torch.testing.assert_close(normal[0], torch.tensor(expected_n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", PRIMITIVES)
def test_rays_that_miss_everything(kind):
    obj = single_primitive(kind, torch.eye(3) * 0.3)
    away = Cameras.from_fovy(look_at((0.0, 0.0, 1.5), (0.0, 0.0, 3.0)), FOVY, 8)  # the object is behind it
    out = render_object(obj, away, with_normals=True)
    assert (out.mask == 0).all() and (out.rgb == 1).all() and (out.depth == 0).all() and (out.normals == 0).all()
    t, _ = _torus(torch.zeros(0, 3), torch.zeros(0, 3), 0.3)
    assert t.shape == (0,)


def test_torus_hole_is_empty():
    obj = single_primitive("torus", torch.eye(3) * 0.3, minor=0.3)
    t, _, _ = cast_rays(obj, torch.tensor([[0.0, 1.5, 0.0]]), torch.tensor([[0.0, -1.0, 0.0]]))
    assert math.isinf(t.item())


@pytest.mark.parametrize("kind", PRIMITIVES)
def test_hits_match_brute_force_march(kind):
    # Oracle: march 4000 samples along each ray with an independent inside test; the first inside sample must lie
    # within one sample spacing after the caster's t, and rays the march never finds inside must be misses.
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4), dim=0)
    w, x, y, z = q
    R = torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )
    A = R @ torch.diag(torch.tensor([0.25, 0.35, 0.2]))
    center = torch.tensor([0.05, -0.03, 0.02])
    obj = single_primitive(kind, A, center.tolist(), minor=0.35)
    origins = F.normalize(torch.randn(400, 3), dim=-1) * 1.5
    dirs = F.normalize(torch.randn(400, 3) * 0.2 - origins, dim=-1)
    t, normals, _ = cast_rays(obj, origins, dirs)
    ts = torch.linspace(0.0, 3.0, 4000)
    points = origins[:, None] + ts[None, :, None] * dirs[:, None]  # [N, T, 3]
    local = (points - center) @ torch.linalg.inv(A).T
    inside = inside_local(kind, local, 0.35)
    first = torch.where(inside.any(-1), ts[inside.int().argmax(-1)], torch.tensor(math.inf))
    spacing = 3.0 / 3999
    hit = torch.isfinite(first)
    assert hit.float().mean() > 0.2, "the rays should hit the primitive often"
    assert (torch.isfinite(t) == hit).float().mean() >= 0.99  # disagreement only on sub-spacing grazing chords
    both = hit & torch.isfinite(t)
    assert ((first[both] - t[both]) >= -1e-4).all() and ((first[both] - t[both]) <= spacing + 1e-4).all()
    # unit world normals that face the incoming ray
    assert torch.allclose(normals[both].norm(dim=-1), torch.ones(int(both.sum())), atol=1e-5)
    assert ((normals[both] * dirs[both]).sum(-1) < 1e-4).all()


@pytest.mark.parametrize("task, extent", [("objects", 0.8), ("avatars", 1.0)])
def test_objects_are_normalised_and_centred(task, extent):
    cfg = tiny_cfg(task=task)
    ds = make_dataset(cfg)
    for index in (1, 2):
        obj = ds.object(index)
        lo, hi = obj.bounds()
        assert (hi - lo).max().item() == pytest.approx(extent, abs=1e-5)
        torch.testing.assert_close((lo + hi) / 2, torch.zeros(3), atol=1e-6, rtol=0)
        # independent check: surface points unprojected from 14 wide-angle views lie in the box and span it
        el = torch.tensor([0.0] * 8 + [60.0] * 3 + [-60.0] * 3)
        az = torch.cat([torch.arange(8) * 45.0, torch.arange(3) * 120.0, torch.arange(3) * 120.0 + 60])
        cams = Cameras.from_fovy(orbit_camera(el, az, 3.0), 60.0, 64)
        points = surface_points(render_object(obj, cams), cams)
        tol = 0.03  # a few pixels at 64 px and radius 3 (pixel footprint ~0.03)
        assert (points.amin(0) >= lo - 1e-3).all() and (points.amax(0) <= hi + 1e-3).all()
        assert (points.amax(0) - points.amin(0)).max() >= extent - tol


def surface_points(out, cams: Cameras) -> torch.Tensor:
    """World points [M, 3] of the covered pixels of a render (depth unprojection)."""
    V, _, H, W = out.depth.shape
    j, i = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    K = cams.K[0]
    dirs = torch.stack([(j - K[0, 2]) / K[0, 0], -(i - K[1, 2]) / K[1, 1], -torch.ones_like(j)], dim=-1)  # [H, W, 3]
    cam_points = dirs * out.depth[:, 0, :, :, None]  # [V, H, W, 3]
    world = torch.einsum("vij,vhwj->vhwi", cams.c2w[:, :3, :3], cam_points) + cams.c2w[:, None, None, :3, 3]
    return world[out.mask[:, 0] > 0.5]


def test_depth_reprojection_between_views():
    # Unproject view A's depth, project into view B 30 deg away: where the point is visible in B, B's depth and
    # colour agree (Lambertian shading with world-fixed lights is view-independent).
    obj = make_object(5)
    c2w = orbit_camera(torch.tensor([10.0, 25.0]), torch.tensor([20.0, 50.0]))
    cam_a, cam_b = (Cameras.from_fovy(c2w[v : v + 1], FOVY, 96) for v in (0, 1))
    out_a, out_b = render_object(obj, cam_a), render_object(obj, cam_b)
    points = surface_points(out_a, cam_a)  # [M, 3]
    colors_a = out_a.rgb[0].permute(1, 2, 0)[out_a.mask[0, 0] > 0.5]  # [M, 3]
    in_b = (invert_rigid(c2w[1]) @ torch.cat([points, torch.ones(len(points), 1)], dim=-1).T).T[:, :3]
    z_b = -in_b[:, 2]
    K = cam_b.K[0]
    u = K[0, 0] * in_b[:, 0] / z_b + K[0, 2]
    v = -K[1, 1] * in_b[:, 1] / z_b + K[1, 2]
    col, row = u.floor().long().clamp(0, 95), v.floor().long().clamp(0, 95)
    depth_b = out_b.depth[0, 0, row, col]
    visible = (depth_b > 0) & ((depth_b - z_b).abs() < 0.02)  # 0.02: a pixel's depth change on slanted faces
    assert len(points) > 500 and visible.float().mean() > 0.6, f"only {visible.float().mean():.2f} agree in depth"
    colors_b = out_b.rgb[0].permute(1, 2, 0)[row, col]
    assert (colors_a[visible] - colors_b[visible]).abs().amax(-1).median() < 0.02


def test_mask_is_alpha_and_supersampling_is_a_box_filter():
    obj = make_object(2)
    c2w = orbit_camera(torch.tensor([15.0]), torch.tensor([30.0]))
    low = render_object(obj, Cameras.from_fovy(c2w, FOVY, 32), supersample=2, with_normals=True)
    high = render_object(obj, Cameras.from_fovy(c2w, FOVY, 64))
    torch.testing.assert_close(low.mask, F.avg_pool2d(high.mask[0], 2)[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(low.rgb, F.avg_pool2d(high.rgb[0], 2)[None], atol=1e-5, rtol=0)
    assert set(high.mask.unique().tolist()) == {0.0, 1.0}
    off = low.mask[0, 0] == 0
    assert (low.rgb[0][:, off] == 1).all() and (low.depth[0, 0][off] == 0).all()
    on = low.mask[0, 0] == 1
    assert (low.rgb[0][:, on].amin(0) < 0.95).all()  # object colours are never white
    assert (low.depth[0, 0][on] > 0.5).all() and on.sum() > 50
    torch.testing.assert_close(low.normals[0][:, on].norm(dim=0), torch.ones(int(on.sum())), atol=1e-4, rtol=0)


def test_sample_keys_shapes_and_determinism():
    cfg = tiny_cfg()
    a, b = make_dataset(cfg)[2], make_dataset(cfg)[2]
    assert set(a) == set(SAMPLE_KEYS)
    shapes = {
        "input_image": (3, 24, 24), "target_images": (4, 3, 24, 24), "target_c2w": (4, 4, 4),
        "mvd_cameras": (5, 16), "target_rays": (4, 6, 24, 24), "sup_images": (3, 3, 32, 32),
        "sup_masks": (3, 1, 32, 32), "sup_c2w": (3, 4, 4), "sup_K": (3, 3, 3),
    }  # fmt: skip
    for key, shape in shapes.items():
        assert a[key].shape == shape, key
        assert a[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), key
    assert a["object_id"] == "synthetic_000002"
    other = make_dataset(tiny_cfg(seed=1))[2]
    assert not torch.equal(a["target_images"], other["target_images"])
    ds = make_dataset(cfg)
    ds.set_epoch(1)
    moved = ds[2]
    assert not torch.equal(a["sup_c2w"], moved["sup_c2w"])
    assert torch.equal(ds.object(2).linear, make_dataset(cfg).object(2).linear)  # epochs change cameras only


def test_relative_cameras_reproduce_the_images():
    # The sample's relative cameras must see the object moved by the same transform: render the transformed
    # object from the sample's target and supervision cameras and compare with the sample's images.
    cfg = tiny_cfg(image_size=32, sup_size=32, num_sup_views=4)
    ds = make_dataset(cfg)
    sample, poses = ds[1], ds.world_cameras(1)
    assert poses["input"][:3, 3].sub(torch.tensor([0.0, 0, 1.5], dtype=torch.float64)).norm() > 0.1  # not trivial
    torch.testing.assert_close(sample["target_c2w"], target_cameras(1.5))
    torch.testing.assert_close(sample["mvd_cameras"], mvd_camera_vectors())
    torch.testing.assert_close(sample["sup_c2w"][:, :3, 3].norm(dim=-1), torch.full((4,), 1.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(poses["input"], poses["targets"][0])
    assert torch.equal(sample["input_image"], sample["target_images"][0])
    transform = invert_rigid(poses["targets"][0])
    transform[2, 3] += 1.5
    torch.testing.assert_close(transform @ poses["targets"][0][:, 3], torch.tensor([0.0, 0, 1.5, 1], dtype=torch.float64))
    obj = ds.object(1)
    R, t = transform[:3, :3].float(), transform[:3, 3].float()
    moved = SyntheticObject(**{**vars(obj), "linear": R @ obj.linear, "centers": obj.centers @ R.T + t})
    targets = render_object(moved, Cameras.from_fovy(sample["target_c2w"], FOVY, 32))
    sup = render_object(moved, Cameras(sample["sup_c2w"], sample["sup_K"], 32, 32))
    # Silhouettes must agree (shading differs: the lights stay fixed in the world while the object moves).
    target_masks = (sample["target_images"] < 1).any(1, keepdim=True).float()
    for got, want in ((targets.mask, target_masks), (sup.mask, sample["sup_masks"])):
        assert want.mean() > 0.05
        assert (got != want).float().mean() < 0.003  # float32 rounding flips only rare edge pixels


def test_absolute_cameras_follow_the_ring():
    cfg = tiny_cfg(task="avatars")
    ds = make_dataset(cfg)
    sample, poses = ds[3], ds.world_cameras(3)
    az = torch.rad2deg(torch.atan2(poses["targets"][:, 0, 3], poses["targets"][:, 2, 3])) % 360
    k0 = round(az[0].item() / 11.25) % 32
    torch.testing.assert_close(az, (torch.arange(4) * 90.0 + 11.25 * k0).double() % 360, atol=1e-6, rtol=0)
    torch.testing.assert_close(sample["mvd_cameras"], mvd_camera_vectors(azimuth_start_deg=11.25 * k0), atol=1e-6, rtol=0)
    input_az = torch.rad2deg(torch.atan2(poses["input"][0, 3], poses["input"][2, 3])).item() % 360
    assert 11.25 - 1e-6 <= input_az <= 13 * 11.25 + 1e-6
    torch.testing.assert_close(sample["target_c2w"], target_cameras(1.5))
    assert ds.object(0).bounds()[1].sub(ds.object(0).bounds()[0]).max().item() == pytest.approx(1.0, abs=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="data.cameras"):
        make_dataset(tiny_cfg(cameras="sideways"))
    with pytest.raises(ValueError, match="elevation_range"):
        make_dataset(tiny_cfg(elevation_range=[10.0, -10.0]))
    with pytest.raises(ValueError, match="data.kind"):
        make_dataset(tiny_cfg(kind="tarball"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_render_matches_cpu():
    c2w = orbit_camera(torch.tensor([0.0, 30.0, -40.0]), torch.tensor([10.0, 120.0, 250.0]))
    for index in range(4):
        obj = make_object(index)
        cpu = render_object(obj, Cameras.from_fovy(c2w, FOVY, 64), supersample=2)
        gpu = render_object(obj, Cameras.from_fovy(c2w.cuda(), FOVY, 64), supersample=2)
        assert gpu.rgb.is_cuda
        for a, b in ((cpu.rgb, gpu.rgb), (cpu.mask, gpu.mask), (cpu.depth, gpu.depth)):
            assert ((a - b.cpu()).abs() > 1e-3).float().mean() < 0.002  # float rounding flips rare edge samples
