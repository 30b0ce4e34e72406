"""Training data: the sample contract shared by every dataset, its config, and the view choice of the authors.

Three sources produce the same sample dict (keys and shapes in ``docs/data.md`` and :func:`assemble_sample`):

- ``synthetic``: procedural objects rendered on the fly by analytic ray casting (:mod:`.synthetic`), no files;
- ``folder``: our own on-disk format, one folder per object with ``cameras.json`` and RGBA PNGs (:mod:`.multiview`);
- ``official``: the authors' render layout, ``rgb_132_{j}.png`` + ``132_{j}_RT.txt`` + ``132_{j}_K.txt``
  (:mod:`.official`).

The view choice follows the authors' datasets (``shared/reference/official_code.md`` 3.2). World angles below use
the OpenGL world of :mod:`gen3diffusion.cameras` (azimuth 0 at +z, 90 at +x), where the official elevation-0 ring
view ``100 + k`` sits at azimuth ``11.25 k`` and the front view 108 at +x.

- ``relative`` cameras (objects): the input view is a random view of the elevation-0 ring; the 4 targets are the
  views at +0/90/180/270 deg from it (target 0 = the input view); every camera is re-expressed so the input camera
  sits at (0, 0, radius); the 3D model's target cameras are therefore always :func:`cameras.target_cameras` and the
  MVD camera vectors always :func:`cameras.mvd_camera_vectors` (the authors hard-code views 108/116/124/100).
- ``absolute`` cameras (avatars): the 4 targets start at a random ring index ``k0`` (views k0, k0+8, k0+16, k0+24
  of the 32-view ring); the input is an independent ring view with index in ``input_ring_range`` (authors: views
  101..113, i.e. indices 1..13 around the front index 8); the MVD gets the targets' own absolute (Blender-world,
  unit-translation) poses; supervision and target cameras are re-expressed relative to target 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gen3diffusion.cameras import Cameras, mvd_camera_vectors, opengl_to_blender, plucker_rays, relative_to, target_cameras

__all__ = ["DataConfig", "make_dataset", "assemble_sample", "camera_mode", "max_extent", "sample_rng", "SAMPLE_KEYS"]

RING_VIEWS = 32  # views of the elevation-0 ring; MVD targets are 8 ring steps (90 deg) apart
RING_STEP_DEG = 360.0 / RING_VIEWS
TARGET_RING_OFFSETS = (0, 8, 16, 24)
SAMPLE_KEYS = (
    "input_image", "target_images", "target_c2w", "mvd_cameras", "target_rays",
    "sup_images", "sup_masks", "sup_c2w", "sup_K", "object_id",
)  # fmt: skip


@dataclass
class DataConfig:
    """Where training samples come from and how they are cut; one instance configures every dataset kind."""

    # "synthetic" (procedural, rendered on the fly), "folder" (cameras.json + PNGs), "official" (authors' renders)
    kind: str = "synthetic"
    # dataset root: one sub-folder per object (folder / official kinds)
    root: str = ""
    # number of procedural objects (synthetic kind; an epoch visits each once)
    num_objects: int = 1000
    # "objects" (max extent 0.8, relative cameras) or "avatars" (max extent 1.0, absolute cameras)
    task: str = "objects"
    # "relative" or "absolute"; None = the task's default (objects relative, avatars absolute)
    cameras: str | None = None
    # synthetic objects' max bounding-box extent; None = the task's default (0.8 objects, 1.0 avatars)
    max_extent: float | None = None
    # input and MVD target views (pixels, square)
    image_size: int = 256
    # supervision views of the 3D loss (pixels, square); 512 in the authors' scripts
    sup_size: int = 512
    # supervision views per sample (authors: 12 random views of the 132-view rig)
    num_sup_views: int = 12
    # elevation range (deg, positive = above) of the synthetic supervision cameras; the authors' object rig spirals
    # from -60 to +58.8
    elevation_range: list[float] = field(default_factory=lambda: [-60.0, 60.0])
    # orbit radius and vertical field of view of every camera (the authors' rig)
    radius: float = 1.5
    fovy: float = 49.1
    # absolute cameras: inclusive ring-index range of the input view (azimuth 11.25 k; authors: views 101..113)
    input_ring_range: list[int] = field(default_factory=lambda: [1, 13])
    # folder kind: a view belongs to the elevation-0 ring within this elevation, and a ring view stands in for a
    # required azimuth within this azimuth difference (deg)
    ring_tolerance_deg: float = 1.0
    # synthetic kind: supersampling factor per axis (1 = no antialiasing), and the device that ray casts
    supersample: int = 1
    device: str = "cpu"
    # seeds objects (synthetic) and the per-sample view choice; a sample depends on (seed, index, epoch) only
    seed: int = 0


def camera_mode(cfg: DataConfig) -> str:
    """``cfg.cameras`` or the task's default; ValueError on an unknown task or mode."""
    if cfg.task not in ("objects", "avatars"):
        raise ValueError(f"data.task must be 'objects' or 'avatars', got {cfg.task!r}")
    mode = cfg.cameras or ("relative" if cfg.task == "objects" else "absolute")
    if mode not in ("relative", "absolute"):
        raise ValueError(f"data.cameras must be 'relative' or 'absolute', got {mode!r}")
    return mode


def max_extent(cfg: DataConfig) -> float:
    """``cfg.max_extent`` or the task's default (0.8 objects, 1.0 avatars: the authors' normalisation)."""
    if cfg.max_extent is not None:
        return float(cfg.max_extent)
    camera_mode(cfg)  # validates the task
    return 0.8 if cfg.task == "objects" else 1.0


def sample_rng(cfg: DataConfig, index: int, epoch: int) -> np.random.Generator:
    """Generator of the view choice of sample ``index`` in ``epoch``: independent of worker order and of other samples."""
    return np.random.default_rng([cfg.seed, index, epoch, 1])


def choose_ring_views(cfg: DataConfig, rng: np.random.Generator) -> tuple[int, list[int]]:
    """Ring indices (of the 32-view ring, azimuth 11.25 k) of the input view and of the 4 MVD targets."""
    if camera_mode(cfg) == "relative":
        first = int(rng.integers(RING_VIEWS))
        return first, [(first + o) % RING_VIEWS for o in TARGET_RING_OFFSETS]
    lo, hi = cfg.input_ring_range
    if not 0 <= lo <= hi < RING_VIEWS:
        raise ValueError(f"data.input_ring_range must satisfy 0 <= lo <= hi < {RING_VIEWS}, got {[lo, hi]}")
    first = int(rng.integers(RING_VIEWS))
    return int(rng.integers(lo, hi + 1)), [(first + o) % RING_VIEWS for o in TARGET_RING_OFFSETS]


def absolute_mvd_vectors(target_c2w_world: Tensor) -> Tensor:
    """ImageDream camera input ``[5, 16]`` from the targets' own world poses ``[4, 4, 4]`` (absolute cameras).

    Each pose in Blender world axes with its translation scaled to unit length, flattened row-major; then a zero row
    for the input frame (the authors' human dataset). For poses on the orbit this equals
    ``mvd_camera_vectors(azimuth_start_deg=az0)``.
    """
    c2w = opengl_to_blender(target_c2w_world.double()).clone()
    c2w[:, :3, 3] = c2w[:, :3, 3] / c2w[:, :3, 3].norm(dim=-1, keepdim=True)
    return torch.cat([c2w.reshape(-1, 16), c2w.new_zeros(1, 16)]).float()


def assemble_sample(
    cfg: DataConfig,
    *,
    object_id: str,
    input_image: Tensor,  # [3, H, W] in [0, 1] on white
    target_images: Tensor,  # [4, 3, H, W] in [0, 1] on white
    target_c2w_world: Tensor,  # [4, 4, 4] the targets' poses in the dataset world (OpenGL axes)
    sup_images: Tensor,  # [S, 3, Hs, Ws] in [0, 1] on white
    sup_masks: Tensor,  # [S, 1, Hs, Ws] in [0, 1]
    sup_c2w_world: Tensor,  # [S, 4, 4]
    sup_K: Tensor,  # [S, 3, 3] pixel intrinsics at the supervision size
) -> dict[str, Any]:
    """The training sample every dataset returns (float32 tensors; ``object_id`` a str).

    - ``input_image [3, H, W]``: the conditioning image, on white.
    - ``target_images [4, 3, H, W]``: the MVD / 3D-model target views (relative cameras: view 0 = the input view).
    - ``target_c2w [4, 4, 4]``: the targets' poses relative to target 0, = ``cameras.target_cameras(radius)``.
    - ``mvd_cameras [5, 16]``: ImageDream camera vectors (4 targets + a zero row for the input frame).
    - ``target_rays [4, 6, H, W]``: Plücker maps (o x d, d) of ``target_c2w`` at the input size and ``cfg.fovy``.
    - ``sup_images [S, 3, Hs, Ws]``, ``sup_masks [S, 1, Hs, Ws]``: supervision views on white and their alpha.
    - ``sup_c2w [S, 4, 4]``: supervision poses relative to target 0; ``sup_K [S, 3, 3]``: their intrinsics.
    - ``object_id``: the object's name (folder name, or the synthetic index as ``synthetic_{index:06d}``).
    """
    reference = target_c2w_world[0].double()
    target_c2w = target_cameras(cfg.radius)  # [4, 4, 4]
    if camera_mode(cfg) == "relative":
        mvd_cameras = mvd_camera_vectors()
    else:
        mvd_cameras = absolute_mvd_vectors(target_c2w_world)
    rays = plucker_rays(Cameras.from_fovy(target_c2w, cfg.fovy, cfg.image_size))  # [4, 6, H, W]
    sup_c2w = relative_to(sup_c2w_world.double(), reference, cfg.radius).float()  # [S, 4, 4]
    device = input_image.device
    return {
        "input_image": input_image.float(),
        "target_images": target_images.float(),
        "target_c2w": target_c2w.to(device),
        "mvd_cameras": mvd_cameras.to(device),
        "target_rays": rays.to(device),
        "sup_images": sup_images.float(),
        "sup_masks": sup_masks.float(),
        "sup_c2w": sup_c2w.to(device),
        "sup_K": sup_K.float().to(device),
        "object_id": object_id,
    }


def make_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    """The dataset ``cfg.kind`` names, built from ``cfg``."""
    if cfg.kind == "synthetic":
        from gen3diffusion.data.synthetic import SyntheticMultiViewDataset

        return SyntheticMultiViewDataset(cfg)
    if cfg.kind == "folder":
        from gen3diffusion.data.multiview import MultiViewFolderDataset

        return MultiViewFolderDataset(cfg)
    if cfg.kind == "official":
        from gen3diffusion.data.official import OfficialRenderDataset

        return OfficialRenderDataset(cfg)
    raise ValueError(f"data.kind must be 'synthetic', 'folder' or 'official', got {cfg.kind!r}")
