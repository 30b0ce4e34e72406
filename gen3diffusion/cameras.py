"""Cameras of Gen-3Diffusion: orbit poses, axis conventions, intrinsics and Plücker ray maps.

Conventions (the authors' code, see ``shared/reference/README.md``):

- **World**: OpenGL axes, +y up. **Camera**: OpenGL axes (x right, y up, looks down -z). Poses are 4x4
  camera-to-world matrices ``c2w`` whose columns are (right, up, back, position).
- **Orbit angles**: position = target + r (cos(el) sin(az), sin(el), cos(el) cos(az)). Positive elevation puts the
  camera *above* the target (y > 0); azimuth 0 is +z, azimuth 90 is +x. (kiui's ``orbit_camera`` negates the
  elevation; ImageDream's ``get_camera`` does not. We follow ImageDream.)
- **Pixels**: pixel (row i, col j) has its centre at (x = j + 0.5, y = i + 0.5) in OpenCV image coordinates
  (y down); ``K = [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``.
- **Rig**: the 3D model sees 4 target views at elevation 0 and azimuth 0/90/180/270 in a frame where the input
  view sits at (0, 0, r) looking at the origin. The multi-view diffusion model gets the same views as Blender-world
  (z-up) poses, translation scaled to unit length, with the input (front) view at Blender +X.

Everything is batched over leading dimensions. Angles and trigonometry are evaluated in float64 and cast once,
so float32 outputs are correctly rounded and float64 outputs agree with the official rig to ~1e-16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Cameras",
    "intrinsics_from_fovy",
    "orbit_camera",
    "look_at",
    "invert_rigid",
    "opengl_to_opencv",
    "opencv_to_opengl",
    "blender_to_opengl",
    "opengl_to_blender",
    "projection_matrix",
    "get_rays",
    "plucker_rays",
    "target_cameras",
    "mvd_camera_vectors",
    "evaluation_ring",
    "official_ring_view_id",
    "relative_to",
]

# Official 132-view rig (assets/cam_poses_objnew): views 100..131 form the elevation-0 ring, 11.25 deg apart,
# starting at Blender azimuth -90; view 108 (Blender +X) is the front / input view.
OFFICIAL_RING_FIRST_VIEW = 100
OFFICIAL_FRONT_VIEW = 108

ScalarOrTensor = float | Sequence[float] | Tensor


def _infer_dtype(*values: object, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` if given, else the dtype of the first floating tensor among ``values``, else float32."""
    if dtype is not None:
        return dtype
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.dtype
    return torch.float32


def _infer_device(*values: object, device: torch.device | str | None) -> torch.device | str | None:
    if device is not None:
        return device
    for value in values:
        if isinstance(value, Tensor):
            return value.device
    return None


def _float64(value: ScalarOrTensor, device: torch.device | str | None) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def _check_matrix(name: str, value: Tensor, size: int) -> None:
    if not isinstance(value, Tensor) or value.ndim < 2 or value.shape[-2:] != (size, size):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape [..., {size}, {size}], got {shape}")


def intrinsics_from_fovy(
    fovy_deg: float,
    width: int,
    height: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Pixel intrinsics ``[3, 3]`` of a pinhole camera with vertical field of view ``fovy_deg``.

    fy = H / 2 / tan(fovy / 2), fx = fy (square pixels), principal point at the image centre (W/2, H/2), which is
    the corner between the four central pixels for even sizes (pixel centres sit at +0.5).
    """
    if not 0.0 < fovy_deg < 180.0:
        raise ValueError(f"fovy_deg must lie in (0, 180), got {fovy_deg}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    focal = height / 2.0 / math.tan(math.radians(fovy_deg) / 2.0)
    K = [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]]
    return torch.tensor(K, dtype=torch.float64, device=device).to(dtype)


@dataclass
class Cameras:
    """A batch of pinhole cameras sharing one image size.

    ``K`` is broadcast to the batch shape of ``c2w`` on construction (a view, no copy), so
    ``K.shape[:-2] == c2w.shape[:-2]`` always holds.
    """

    c2w: Tensor  # [..., 4, 4] camera-to-world, OpenGL camera axes, world y-up
    K: Tensor  # [..., 3, 3] pixel intrinsics, pixel centres at +0.5 (OpenCV image coordinates, y down)
    width: int
    height: int

    def __post_init__(self) -> None:
        _check_matrix("Cameras.c2w", self.c2w, 4)
        _check_matrix("Cameras.K", self.K, 3)
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"Cameras image size must be positive, got width={self.width}, height={self.height}")
        self.width, self.height = int(self.width), int(self.height)
        try:
            self.K = self.K.expand(*self.batch_shape, 3, 3)
        except RuntimeError as err:
            raise ValueError(
                f"Cameras.K batch shape {tuple(self.K.shape[:-2])} does not broadcast to c2w batch shape "
                f"{tuple(self.batch_shape)}"
            ) from err

    @property
    def batch_shape(self) -> torch.Size:
        return self.c2w.shape[:-2]

    @property
    def w2c(self) -> Tensor:
        """World-to-camera matrices ``[..., 4, 4]`` (OpenGL camera axes)."""
        return invert_rigid(self.c2w)

    def to(self, *args, **kwargs) -> "Cameras":
        """Move / cast ``c2w`` and ``K`` like ``Tensor.to`` (device, dtype or both)."""
        return Cameras(self.c2w.to(*args, **kwargs), self.K.to(*args, **kwargs), self.width, self.height)

    @classmethod
    def from_fovy(cls, c2w: Tensor, fovy_deg: float, width: int, height: int | None = None) -> "Cameras":
        """Cameras with square pixels and a centred principal point; ``height`` defaults to ``width``."""
        _check_matrix("c2w", c2w, 4)
        height = width if height is None else height
        dtype = c2w.dtype if c2w.is_floating_point() else torch.float32
        K = intrinsics_from_fovy(fovy_deg, width, height, dtype=dtype, device=c2w.device)
        return cls(c2w=c2w.to(dtype), K=K, width=width, height=height)


def look_at(
    eye: ScalarOrTensor,
    target: ScalarOrTensor,
    up: ScalarOrTensor = (0.0, 1.0, 0.0),
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Camera-to-world ``[..., 4, 4]`` of an OpenGL camera at ``eye`` whose -z axis points at ``target``.

    Columns are right = normalize(up x back), up' = back x right, back = normalize(eye - target), eye.
    ``eye``, ``target`` and ``up`` are ``[..., 3]`` and broadcast. Raises ValueError when a viewing direction is
    parallel to ``up`` (the roll is then undefined).
    """
    dtype = _infer_dtype(eye, target, up, dtype=dtype)
    device = _infer_device(eye, target, up, device=None)
    eye64, target64, up64 = (_float64(v, device) for v in (eye, target, up))
    for name, value in (("eye", eye64), ("target", target64), ("up", up64)):
        if value.ndim < 1 or value.shape[-1] != 3:
            raise ValueError(f"look_at: {name} must have shape [..., 3], got {tuple(value.shape)}")
    eye64, target64, up64 = torch.broadcast_tensors(eye64, target64, up64)
    back = eye64 - target64
    right = torch.linalg.cross(up64, back, dim=-1)
    if (back.norm(dim=-1) == 0).any() or (right.norm(dim=-1) <= 1e-12 * back.norm(dim=-1)).any():
        raise ValueError("look_at: eye equals target or the viewing direction is parallel to up; pick another up")
    back = F.normalize(back, dim=-1)
    right = F.normalize(right, dim=-1)
    cam_up = torch.linalg.cross(back, right, dim=-1)
    return _compose(right, cam_up, back, eye64).to(dtype)


def _compose(right: Tensor, up: Tensor, back: Tensor, position: Tensor) -> Tensor:
    """Stack axis columns and a position ``[..., 3]`` into ``[..., 4, 4]`` c2w matrices."""
    top = torch.stack([right, up, back, position], dim=-1)  # [..., 3, 4]
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def orbit_camera(
    elevation_deg: ScalarOrTensor,
    azimuth_deg: ScalarOrTensor,
    radius: ScalarOrTensor = 1.5,
    target: ScalarOrTensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Camera-to-world ``[..., 4, 4]`` of cameras on a sphere around ``target``, looking at it with up = +y.

    position = target + radius * (cos(el) sin(az), sin(el), cos(el) cos(az)): **positive elevation = camera above
    the target (y > 0)**, azimuth 0 -> +z, azimuth 90 -> +x. Elevation, azimuth and radius broadcast; ``target``
    is ``[..., 3]`` (default the origin). Equals ``look_at(position, target)`` wherever that is defined, and stays
    defined at elevation +-90 (the right axis is (cos az, 0, -sin az) at every elevation).
    dtype defaults to the dtype of a floating tensor argument, else float32.
    """
    dtype = _infer_dtype(elevation_deg, azimuth_deg, radius, target, dtype=dtype)
    device = _infer_device(elevation_deg, azimuth_deg, radius, target, device=device)
    el = torch.deg2rad(_float64(elevation_deg, device))
    az = torch.deg2rad(_float64(azimuth_deg, device))
    el, az, r = torch.broadcast_tensors(el, az, _float64(radius, device))
    cos_el, sin_el, cos_az, sin_az = el.cos(), el.sin(), az.cos(), az.sin()
    back = torch.stack([cos_el * sin_az, sin_el, cos_el * cos_az], dim=-1)  # [..., 3]
    right = torch.stack([cos_az, torch.zeros_like(az), -sin_az], dim=-1)
    up = torch.stack([-sin_el * sin_az, cos_el, -sin_el * cos_az], dim=-1)  # back x right
    position = r[..., None] * back
    if target is not None:
        target64 = _float64(target, device)
        if target64.ndim < 1 or target64.shape[-1] != 3:
            raise ValueError(f"orbit_camera: target must have shape [..., 3], got {tuple(target64.shape)}")
        position = position + target64
        right, up, back, position = torch.broadcast_tensors(right, up, back, position)
    return _compose(right, up, back, position).to(dtype)


def invert_rigid(T: Tensor) -> Tensor:
    """Inverse ``[..., 4, 4]`` of rigid transforms [R t; 0 1] as [R^T, -R^T t; 0 1] (exact transpose, no solve)."""
    _check_matrix("invert_rigid: T", T, 4)
    R_t = T[..., :3, :3].transpose(-1, -2)
    t = -(R_t @ T[..., :3, 3:])  # [..., 3, 1]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R_t
    out[..., :3, 3:] = t
    out[..., 3, 3] = 1.0
    return out


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Flip the camera y and z axes (c2w columns 1, 2): OpenGL camera (y up, -z forward) -> OpenCV (y down, +z).

    The map is its own inverse; the world frame and camera centre are unchanged.
    """
    _check_matrix("opengl_to_opencv: c2w", c2w, 4)
    out = c2w.clone()
    out[..., :3, 1:3] = -out[..., :3, 1:3]
    return out


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Inverse of :func:`opengl_to_opencv` (the same axis flip)."""
    return opengl_to_opencv(c2w)


def blender_to_opengl(c2w: Tensor) -> Tensor:
    """Re-express poses from Blender world axes (z up) in OpenGL world axes (y up): ``c2w_gl = M @ c2w_blender``.

    M = [[1,0,0,0],[0,0,1,0],[0,-1,0,0],[0,0,0,1]], i.e. y_gl = z_blender, z_gl = -y_blender. Camera-local axes
    are untouched. Implemented as an exact row permutation with one sign flip.
    """
    _check_matrix("blender_to_opengl: c2w", c2w, 4)
    return torch.stack([c2w[..., 0, :], c2w[..., 2, :], -c2w[..., 1, :], c2w[..., 3, :]], dim=-2)


def opengl_to_blender(c2w: Tensor) -> Tensor:
    """Inverse of :func:`blender_to_opengl`: ``c2w_blender = M^T @ c2w_gl``."""
    _check_matrix("opengl_to_blender: c2w", c2w, 4)
    return torch.stack([c2w[..., 0, :], -c2w[..., 2, :], c2w[..., 1, :], c2w[..., 3, :]], dim=-2)


def projection_matrix(
    fovy_deg: float,
    aspect: float,
    znear: float,
    zfar: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """OpenGL clip matrix ``[4, 4]`` (column vectors, camera looks down -z), ``aspect = width / height``.

    Maps camera-space z = -znear to NDC z = -1 and z = -zfar to +1; NDC x, y agree with the pixel grid of
    ``intrinsics_from_fovy`` (x_ndc = 2 u / W - 1, y_ndc = 1 - 2 v / H). LGM stores a transposed, row-vector
    variant with a non-standard z row; only its x, y, w rows matter to the rasterizer and they agree with these.
    """
    if not 0.0 < fovy_deg < 180.0:
        raise ValueError(f"fovy_deg must lie in (0, 180), got {fovy_deg}")
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    if not 0.0 < znear < zfar:
        raise ValueError(f"need 0 < znear < zfar, got znear={znear}, zfar={zfar}")
    cot = 1.0 / math.tan(math.radians(fovy_deg) / 2.0)
    P = [
        [cot / aspect, 0.0, 0.0, 0.0],
        [0.0, cot, 0.0, 0.0],
        [0.0, 0.0, -(zfar + znear) / (zfar - znear), -2.0 * zfar * znear / (zfar - znear)],
        [0.0, 0.0, -1.0, 0.0],
    ]
    return torch.tensor(P, dtype=torch.float64, device=device).to(dtype)


def get_rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """World-space rays through every pixel centre.

    Returns ``(origins, directions)``, both ``[..., H, W, 3]``: origins are the camera centres (a broadcast view,
    do not write into it) and directions are unit vectors. The camera-space direction of pixel (i, j) is
    ((j + 0.5 - cx) / fx, -(i + 0.5 - cy) / fy, -1) (OpenGL camera). A zero c2w (the official placeholder for the
    context view) gives zero origins and zero directions.
    """
    c2w, K = cameras.c2w, cameras.K
    dtype, device = c2w.dtype, c2w.device
    rows = torch.arange(cameras.height, dtype=dtype, device=device) + 0.5  # [H]
    cols = torch.arange(cameras.width, dtype=dtype, device=device) + 0.5  # [W]
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]  # [..., 1, 1]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    x = (cols - cx) / fx  # [..., 1, W]
    y = -(rows[:, None] - cy) / fy  # [..., H, 1]
    x, y = torch.broadcast_tensors(x, y)  # [..., H, W]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [..., H, W, 3]
    dirs = torch.einsum("...km,...hwm->...hwk", c2w[..., :3, :3], dirs_cam)
    dirs = F.normalize(dirs, dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(cameras: Cameras) -> Tensor:
    """Plücker ray maps ``[..., 6, H, W]`` = cat(o x d, d): the moment first, then the unit direction."""
    origins, dirs = get_rays(cameras)  # [..., H, W, 3]
    moment = torch.linalg.cross(origins, dirs, dim=-1)
    return torch.cat([moment, dirs], dim=-1).movedim(-1, -3)


def target_cameras(
    radius: float = 1.5,
    *,
    num_views: int = 4,
    elevation_deg: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The 3D model's input cameras ``[V, 4, 4]``: orbit at ``elevation_deg`` and azimuth 0, 90, 180, 270.

    Expressed relative to the input view, so view 0 sits at (0, 0, radius) looking at the origin and is the input
    direction; views 1..3 turn +90 deg each (view 1 at +x). Equals the official ``lgm_input_cameras``.
    """
    azimuths = torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    return orbit_camera(elevation_deg, azimuths, radius, dtype=dtype, device=device)


def mvd_camera_vectors(
    num_views: int = 4,
    *,
    elevation_deg: float = 0.0,
    azimuth_start_deg: float = 90.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """ImageDream camera input ``[V + 1, 16]``: the target views in Blender world axes, then a zero row.

    Row k is the Blender-world (z-up) c2w of the orbit camera at ``elevation_deg`` and azimuth
    ``azimuth_start_deg + k * 360 / V`` (OpenGL-world angles) with its translation scaled to unit length,
    flattened row-major. The default start of 90 deg places view 0 (the input direction) at Blender +X, the front
    view of the official rig (view 108); the views are the same relative rig as :func:`target_cameras`. The last
    row (the input-image frame) is all zeros.
    """
    azimuths = azimuth_start_deg + torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    c2w = opengl_to_blender(orbit_camera(elevation_deg, azimuths, 1.0, dtype=torch.float64, device=device))
    vectors = torch.cat([c2w.reshape(num_views, 16), c2w.new_zeros(1, 16)], dim=0)
    return vectors.to(dtype)


def evaluation_ring(
    num_views: int = 32,
    radius: float = 1.5,
    elevation_deg: float = 0.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Turntable cameras ``[num_views, 4, 4]`` at ``elevation_deg``, azimuth k * 360 / num_views (11.25 deg for 32).

    View 0 is the input view (azimuth 0, at +z) in the frame of :func:`target_cameras`. The official renders
    (views 100..131) start elsewhere on the ring; see :func:`official_ring_view_id`.
    """
    azimuths = torch.arange(num_views, dtype=torch.float64) * (360.0 / num_views)
    return orbit_camera(elevation_deg, azimuths, radius, dtype=dtype, device=device)


def official_ring_view_id(ring_index: int, num_views: int = 32) -> int:
    """Official rig view id (100..131) showing the same pose as ``evaluation_ring()[ring_index]``.

    The official ring starts at Blender azimuth -90 (view 100) and its front view 108 is our ring index 0, so index
    k maps to view 100 + (k + 8) mod 32 (e.g. 0 -> 108, 8 -> 116, 24 -> 100).
    """
    if not 0 <= ring_index < num_views:
        raise ValueError(f"ring_index must lie in [0, {num_views}), got {ring_index}")
    offset = OFFICIAL_FRONT_VIEW - OFFICIAL_RING_FIRST_VIEW
    return OFFICIAL_RING_FIRST_VIEW + (ring_index + offset) % num_views


def relative_to(c2w: Tensor, c2w_ref: Tensor, radius: float = 1.5) -> Tensor:
    """Re-express poses ``[..., 4, 4]`` in the frame where ``c2w_ref`` sits at (0, 0, radius) looking at the origin.

    Applies ``transform = [[I, (0, 0, radius)], [0, 1]] @ inv(c2w_ref)`` to every pose (the authors' pose
    normalisation). ``c2w_ref`` must be rigid and broadcasts against ``c2w`` (use ``c2w_ref[:, None]`` for one
    reference per sample over a view axis). Assumes the reference camera looks at the origin from distance
    ``radius``, as every camera of the official rig does.
    """
    _check_matrix("relative_to: c2w", c2w, 4)
    _check_matrix("relative_to: c2w_ref", c2w_ref, 4)
    transform = invert_rigid(c2w_ref)
    transform[..., 2, 3] += radius
    return transform @ c2w
