"""Tests of gen3diffusion.cameras: the official rig, geometric identities and ray maps against direct formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import reference_dir
from gen3diffusion.cameras import (
    Cameras,
    blender_to_opengl,
    evaluation_ring,
    get_rays,
    intrinsics_from_fovy,
    invert_rigid,
    look_at,
    mvd_camera_vectors,
    official_ring_view_id,
    opencv_to_opengl,
    opengl_to_blender,
    opengl_to_opencv,
    orbit_camera,
    plucker_rays,
    projection_matrix,
    relative_to,
    target_cameras,
)

FOVY = 49.1
BLENDER_TO_GL = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)
BATCH_SHAPES = [(), (2,), (1, 2)]


@pytest.fixture(scope="module")
def official() -> dict:
    folder = reference_dir()
    if folder is None or not (folder / "official_cameras.json").is_file():
        pytest.skip(
            "official_cameras.json not found: set GEN3D_REFERENCE_DIR or place it in ../shared/reference "
            "or shared/reference beside the repo"
        )
    return json.loads((folder / "official_cameras.json").read_text())


def _f64(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _random_rigid(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random rigid transforms [n, 4, 4] (QR of Gaussian matrices, det fixed to +1)."""
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64, generator=generator))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    q[torch.linalg.det(q) < 0, :, 0] *= -1
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3] = q
    T[:, :3, 3] = torch.randn(n, 3, dtype=torch.float64, generator=generator)
    return T


def _assert_rotation(c2w: torch.Tensor, atol: float = 1e-12) -> None:
    R = c2w[..., :3, :3]
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=atol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=atol, rtol=0)
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=R.dtype).expand(*c2w.shape[:-2], 4)
    torch.testing.assert_close(c2w[..., 3, :], bottom, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- official rig
# The json holds float64 values parsed from the official text files; our float32 default must agree to 1e-5.


def test_mvd_camera_vectors_match_official(official):
    ours = mvd_camera_vectors()
    assert ours.shape == (5, 16) and ours.dtype == torch.float32
    expected = torch.tensor(official["imagedream_camera_vectors"]["vectors_16"], dtype=torch.float32)
    torch.testing.assert_close(ours[:4], expected, atol=1e-5, rtol=0)
    assert torch.equal(ours[4], torch.zeros(16))


def test_target_cameras_match_official(official):
    ours = target_cameras()
    expected = torch.tensor(official["lgm_input_cameras"]["c2w"], dtype=torch.float32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_official_pipeline_reproduces_target_cameras(official):
    """The authors' recipe (Blender -> OpenGL, then relative to view 108) applied to the raw rig."""
    views = official["lgm_input_cameras"]["view_ids"]
    c2w = blender_to_opengl(torch.stack([_f64(official["views"][str(i)]["c2w"]) for i in views]))
    torch.testing.assert_close(relative_to(c2w, c2w[0]), target_cameras(dtype=torch.float64), atol=1e-12, rtol=0)


def test_evaluation_ring_matches_official_ring(official):
    """Views 100..131 in the input-relative frame are our ring, index k <-> view 100 + (k + 8) mod 32."""
    blender = torch.stack([_f64(official["views"][str(i)]["c2w"]) for i in range(100, 132)])  # [32, 4, 4]
    gl = blender_to_opengl(blender)
    relative = relative_to(gl, gl[108 - 100])
    mapping = [official_ring_view_id(k) - 100 for k in range(32)]
    assert sorted(mapping) == list(range(32))
    assert mapping[0] == 8 and mapping[8] == 16 and mapping[24] == 0  # front, +90 (view 116), +270 (view 100)
    torch.testing.assert_close(evaluation_ring(), relative[mapping].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(evaluation_ring(dtype=torch.float64), relative[mapping], atol=1e-12, rtol=0)


def test_intrinsics_match_official_K(official):
    K = _f64(official["views"]["108"]["K"])
    # the json's focal length is the float32-rounded value of the text files (relative error <= 6e-8)
    torch.testing.assert_close(intrinsics_from_fovy(FOVY, 1024, 1024, dtype=torch.float64), K, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------- poses


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_orbit_camera_convention(batch_shape):
    gen = torch.Generator().manual_seed(0)
    el = torch.rand(batch_shape, dtype=torch.float64, generator=gen) * 160 - 80
    az = torch.rand(batch_shape, dtype=torch.float64, generator=gen) * 720 - 360
    target = torch.randn(*batch_shape, 3, dtype=torch.float64, generator=gen)
    c2w = orbit_camera(el, az, 2.0, target)
    assert c2w.shape == (*batch_shape, 4, 4) and c2w.dtype == torch.float64
    _assert_rotation(c2w)
    torch.testing.assert_close(c2w, look_at(c2w[..., :3, 3], target), atol=1e-12, rtol=0)
    offset = c2w[..., :3, 3] - target
    torch.testing.assert_close(offset.norm(dim=-1), torch.full(batch_shape, 2.0, dtype=torch.float64))
    torch.testing.assert_close(torch.rad2deg(torch.asin(offset[..., 1] / 2.0)), el)


def test_orbit_camera_axes_and_sign():
    above = orbit_camera(30.0, 0.0)
    assert above.dtype == torch.float32
    assert above[1, 3] > 0 and above[2, 3] > 0  # positive elevation = above (y > 0)
    assert above[:3, 2] @ above[:3, 3] > 0  # the back axis points away from the origin
    torch.testing.assert_close(orbit_camera(0.0, 0.0, 1.5)[:3, 3], torch.tensor([0.0, 0.0, 1.5]))
    torch.testing.assert_close(orbit_camera(0.0, 90.0, 1.5)[:3, 3], torch.tensor([1.5, 0.0, 0.0]))
    torch.testing.assert_close(orbit_camera(0.0, 0.0, 1.5)[:3, :3], torch.eye(3))


@pytest.mark.parametrize("elevation", [90.0, -90.0])
def test_orbit_camera_defined_at_poles(elevation):
    c2w = orbit_camera(elevation, torch.tensor([0.0, 45.0]), 1.5, dtype=torch.float64)
    _assert_rotation(c2w)
    forward = -c2w[..., :3, 2]
    expected = torch.tensor([0.0, -math.copysign(1.0, elevation), 0.0], dtype=torch.float64).expand_as(forward)
    torch.testing.assert_close(forward, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_look_at_minus_z_points_at_target(batch_shape):
    gen = torch.Generator().manual_seed(1)
    eye = torch.randn(*batch_shape, 3, dtype=torch.float64, generator=gen) * 3
    target = torch.randn(*batch_shape, 3, dtype=torch.float64, generator=gen)
    c2w = look_at(eye, target)
    _assert_rotation(c2w)
    expected = (target - eye) / (target - eye).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(-c2w[..., :3, 2], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(c2w[..., :3, 3], eye, atol=0, rtol=0)
    assert (c2w[..., 1, 1] >= 0).all()  # camera up keeps a non-negative world-y component (up = +y)


def test_look_at_rejects_degenerate_direction():
    with pytest.raises(ValueError, match="parallel to up"):
        look_at((0.0, 2.0, 0.0), (0.0, 0.0, 0.0))


def test_conversions_are_inverses_and_match_definitions():
    c2w = _random_rigid(5, torch.Generator().manual_seed(2))
    assert torch.equal(opencv_to_opengl(opengl_to_opencv(c2w)), c2w)
    assert torch.equal(opengl_to_blender(blender_to_opengl(c2w)), c2w)
    assert torch.equal(blender_to_opengl(opengl_to_blender(c2w)), c2w)
    torch.testing.assert_close(blender_to_opengl(c2w), BLENDER_TO_GL @ c2w, atol=0, rtol=0)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(opengl_to_opencv(c2w), c2w @ flip, atol=0, rtol=0)
    torch.testing.assert_close(invert_rigid(c2w), torch.linalg.inv(c2w), atol=1e-12, rtol=0)


def test_relative_to_places_reference_on_z_axis_and_ignores_world_frame():
    gen = torch.Generator().manual_seed(3)
    cams = evaluation_ring(8, dtype=torch.float64)
    world = _random_rigid(1, gen)[0]
    moved = world @ cams  # the same rig seen from another world frame
    relative = relative_to(moved, moved[0])
    torch.testing.assert_close(relative, cams, atol=1e-12, rtol=0)
    # per-sample references over a view axis: [B, V, 4, 4] against c2w_ref[:, None]
    batch = torch.stack([moved, world @ world @ cams])
    torch.testing.assert_close(relative_to(batch, batch[:, 0][:, None]), cams.expand(2, 8, 4, 4), atol=1e-12, rtol=0)


def test_mvd_vectors_are_the_target_rig_in_blender_axes():
    """Independent of the json: MVD poses relative to their view 0 equal target_cameras."""
    vectors = mvd_camera_vectors(dtype=torch.float64)
    assert torch.equal(vectors[4], torch.zeros(16, dtype=torch.float64))
    blender = vectors[:4].reshape(4, 4, 4)
    torch.testing.assert_close(blender[:, :3, 3].norm(dim=-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(blender[0, :3, 3], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # Blender +X
    gl = blender_to_opengl(blender)
    gl[:, :3, 3] *= 1.5
    torch.testing.assert_close(relative_to(gl, gl[0]), target_cameras(dtype=torch.float64), atol=1e-12, rtol=0)


def test_rigs_dtypes_and_shapes():
    assert target_cameras().shape == (4, 4, 4) and target_cameras().dtype == torch.float32
    assert evaluation_ring().shape == (32, 4, 4)
    assert mvd_camera_vectors(dtype=torch.float64).dtype == torch.float64
    ring = evaluation_ring(dtype=torch.float64)
    azimuths = torch.rad2deg(torch.atan2(ring[:, 0, 3], ring[:, 2, 3])) % 360
    torch.testing.assert_close(azimuths[1:], torch.arange(1, 32, dtype=torch.float64) * 11.25)
    torch.testing.assert_close(ring[0], target_cameras(dtype=torch.float64)[0], atol=0, rtol=0)
    torch.testing.assert_close(ring[::8], target_cameras(dtype=torch.float64), atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------- intrinsics, rays


def test_cameras_container():
    c2w = target_cameras().expand(2, 4, 4, 4)
    cams = Cameras.from_fovy(c2w, FOVY, 32, 24)
    assert cams.batch_shape == (2, 4) and cams.K.shape == (2, 4, 3, 3)
    assert (cams.width, cams.height) == (32, 24)
    torch.testing.assert_close(cams.K[1, 3], intrinsics_from_fovy(FOVY, 32, 24))
    cams64 = cams.to(torch.float64)
    assert cams64.c2w.dtype == torch.float64 and cams64.K.dtype == torch.float64 and cams64.width == 32
    torch.testing.assert_close(cams.w2c @ cams.c2w, torch.eye(4).expand(2, 4, 4, 4), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="c2w"):
        Cameras(torch.eye(3), torch.eye(3), 4, 4)
    with pytest.raises(ValueError, match="broadcast"):
        Cameras(torch.eye(4).expand(3, 4, 4), torch.eye(3).expand(2, 3, 3), 4, 4)


def test_intrinsics_closed_form():
    K = intrinsics_from_fovy(60.0, 640, 480, dtype=torch.float64)
    f = 240.0 / math.tan(math.radians(30.0))
    torch.testing.assert_close(K, _f64([[f, 0, 320.0], [0, f, 240.0], [0, 0, 1]]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="fovy"):
        intrinsics_from_fovy(180.0, 4, 4)


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
def test_plucker_matches_direct_float64(batch_shape):
    """Every pixel against a scalar per-pixel formula written from fovy (not from K)."""
    H, W = 5, 6
    gen = torch.Generator().manual_seed(4)
    c2w = _random_rigid(max(1, math.prod(batch_shape)), gen).reshape(*batch_shape, 4, 4)
    maps = plucker_rays(Cameras.from_fovy(c2w, FOVY, W, H))
    assert maps.shape == (*batch_shape, 6, H, W) and maps.dtype == torch.float64
    flat_c2w, flat_maps = c2w.reshape(-1, 4, 4), maps.reshape(-1, 6, H, W)
    tan_half = math.tan(math.radians(FOVY) / 2)
    for c2w_b, map_b in zip(flat_c2w, flat_maps):
        o = c2w_b[:3, 3]
        for i in range(H):
            for j in range(W):
                x = (j + 0.5 - W / 2) / (H / 2) * tan_half
                y = -(i + 0.5 - H / 2) / (H / 2) * tan_half
                d = c2w_b[:3, :3] @ _f64([x, y, -1.0])
                d = d / d.norm()
                expected = torch.cat([torch.linalg.cross(o, d), d])
                torch.testing.assert_close(map_b[:, i, j], expected, atol=1e-13, rtol=0)


def test_plucker_moment_orthogonal_and_unit_directions():
    cams = Cameras.from_fovy(evaluation_ring(4, dtype=torch.float64), FOVY, 8, 8)
    maps = plucker_rays(cams)  # [4, 6, 8, 8]
    moment, direction = maps[:, :3], maps[:, 3:]
    torch.testing.assert_close((moment * direction).sum(1), torch.zeros(4, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(direction.norm(dim=1), torch.ones(4, 8, 8, dtype=torch.float64))


def test_zero_pose_gives_zero_plucker_map():
    """The official context view uses an all-zero pose; its map must be exactly zero."""
    cams = Cameras.from_fovy(torch.zeros(4, 4), FOVY, 4, 4)
    assert torch.equal(plucker_rays(cams), torch.zeros(6, 4, 4))


def test_ray_through_image_centre_hits_look_at_point():
    gen = torch.Generator().manual_seed(5)
    eye = torch.randn(3, 3, dtype=torch.float64, generator=gen) * 2
    target = torch.randn(3, 3, dtype=torch.float64, generator=gen) * 0.3
    H, W = 7, 9  # odd: the central pixel's centre is the principal point
    origins, dirs = get_rays(Cameras.from_fovy(look_at(eye, target), FOVY, W, H))
    assert origins.shape == dirs.shape == (3, H, W, 3)
    o, d = origins[:, H // 2, W // 2], dirs[:, H // 2, W // 2]
    t = ((target - o) * d).sum(-1, keepdim=True)
    torch.testing.assert_close(o + t * d, target, atol=1e-12, rtol=0)
    assert (t > 0).all()


def test_projection_with_K_lands_on_the_pixel_of_the_ray():
    """A point on pixel (i, j)'s ray projects (OpenCV w2c, then K) to (j + 0.5, i + 0.5)."""
    H, W = 6, 10
    cams = Cameras.from_fovy(evaluation_ring(3, elevation_deg=20.0, dtype=torch.float64), FOVY, W, H)
    origins, dirs = get_rays(cams)
    w2c_cv = invert_rigid(opengl_to_opencv(cams.c2w))  # [3, 4, 4]
    for i, j, depth in [(0, 0, 1.0), (2, 7, 1.7), (5, 9, 0.4)]:
        point = origins[:, i, j] + depth * dirs[:, i, j]  # [3, 3]
        cam = (w2c_cv[:, :3, :3] @ point[..., None])[..., 0] + w2c_cv[:, :3, 3]
        assert (cam[:, 2] > 0).all()
        pix = (cams.K @ cam[..., None])[..., 0]
        pix = pix[:, :2] / pix[:, 2:]
        torch.testing.assert_close(pix, _f64([j + 0.5, i + 0.5]).expand(3, 2), atol=1e-10, rtol=0)


def test_projection_matrix_agrees_with_intrinsics():
    H, W, near, far = 48, 64, 0.5, 2.5
    P = projection_matrix(FOVY, W / H, near, far, dtype=torch.float64)
    K = intrinsics_from_fovy(FOVY, W, H, dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    points = torch.randn(20, 3, dtype=torch.float64, generator=gen) * 0.3
    points[:, 2] = -(near + (far - near) * torch.rand(20, dtype=torch.float64, generator=gen))  # OpenGL camera
    clip = (P @ torch.cat([points, torch.ones(20, 1, dtype=torch.float64)], dim=1).T).T
    ndc = clip[:, :3] / clip[:, 3:]
    cv = points * _f64([1.0, -1.0, -1.0])  # OpenCV camera axes
    pix = (K @ cv.T).T
    u, v = pix[:, 0] / pix[:, 2], pix[:, 1] / pix[:, 2]
    torch.testing.assert_close(ndc[:, 0], 2 * u / W - 1, atol=1e-12, rtol=0)
    torch.testing.assert_close(ndc[:, 1], 1 - 2 * v / H, atol=1e-12, rtol=0)
    ends = (P @ _f64([[0, 0, -near, 1], [0, 0, -far, 1]]).T).T
    torch.testing.assert_close(ends[:, 2] / ends[:, 3], _f64([-1.0, 1.0]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="znear"):
        projection_matrix(FOVY, 1.0, 2.0, 1.0)
