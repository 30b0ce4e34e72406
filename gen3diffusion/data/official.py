"""Reader for the authors' render layout (Objaverse / THuman renders of the Gen-3Diffusion training scripts).

One folder per object with ``num_views`` views (132 in the authors' rig), for each view ``j``:

- ``rgb_132_{j}.png`` (or ``.webp``): RGBA render, straight alpha;
- ``132_{j}_RT.txt``: Blender camera-to-world (world z-up, OpenGL camera axes), 16 numbers row-major (12 numbers,
  a 3x4 matrix, are accepted too), any whitespace;
- ``132_{j}_K.txt``: 3x3 pixel intrinsics, 9 numbers row-major.

Views 0..99 are a spiral, views 100..131 the elevation-0 ring (view ``100 + k`` at OpenGL-world azimuth 11.25 k,
front view 108 at +x). Poses are converted with :func:`cameras.blender_to_opengl`; the ring is found among the
last 32 views by the same geometric test as the folder format (so a wrong rig is reported, not silently used).
Objects use relative cameras (any ring view may be the input; the authors draw 100..130) and avatars absolute
ones (targets from a random ring start, the input from ``cfg.input_ring_range``), as in
``shared/reference/official_code.md`` 3.2. An object with a missing or malformed file is skipped and logged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gen3diffusion.cameras import blender_to_opengl
from gen3diffusion.data import RING_VIEWS, DataConfig
from gen3diffusion.data.multiview import BadObjectError, ObjectViews, RingViewDataset

__all__ = ["OfficialRenderDataset", "read_official_object", "official_file_names"]

OFFICIAL_NUM_VIEWS = 132
IMAGE_SUFFIXES = (".png", ".webp")


def official_file_names(view: int, prefix: int = OFFICIAL_NUM_VIEWS) -> tuple[str, str, str]:
    """(image stem, RT file, K file) of view ``view``; the image is ``stem + .png`` or ``stem + .webp``."""
    return f"rgb_{prefix}_{view}", f"{prefix}_{view}_RT.txt", f"{prefix}_{view}_K.txt"


def _read_numbers(path: Path, counts: tuple[int, ...]) -> torch.Tensor:
    try:
        values = [float(x) for x in path.read_text().split()]
    except (OSError, ValueError) as err:
        raise BadObjectError(f"{path.name}: unreadable ({type(err).__name__}: {err})") from err
    if len(values) not in counts:
        raise BadObjectError(f"{path.name}: {len(values)} numbers, expected {' or '.join(map(str, counts))}")
    return torch.tensor(values, dtype=torch.float64)


def read_official_object(folder: Path, num_views: int = OFFICIAL_NUM_VIEWS) -> ObjectViews:
    """Paths and OpenGL-world cameras of one object folder in the authors' layout; BadObjectError if incomplete."""
    try:
        present = set(os.listdir(folder))
    except OSError as err:
        raise BadObjectError(f"{folder.name}: cannot list ({err})") from err
    paths, c2w, K, missing = [], [], [], []
    for j in range(num_views):
        stem, rt_name, k_name = official_file_names(j)
        image = next((stem + s for s in IMAGE_SUFFIXES if stem + s in present), None)
        if image is None or rt_name not in present or k_name not in present:
            missing.append(j)
            continue
        pose = _read_numbers(folder / rt_name, (12, 16))
        pose = torch.cat([pose, pose.new_tensor([0.0, 0.0, 0.0, 1.0])]) if len(pose) == 12 else pose
        paths.append(folder / image)
        c2w.append(blender_to_opengl(pose.reshape(4, 4)))
        K.append(_read_numbers(folder / k_name, (9,)).reshape(3, 3))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise BadObjectError(f"{folder.name}: {len(missing)} of {num_views} views incomplete (image, RT or K): {shown}")
    ring = list(range(num_views - RING_VIEWS, num_views))
    return ObjectViews(folder.name, paths, torch.stack(c2w), torch.stack(K), ring_candidates=ring)


class OfficialRenderDataset(RingViewDataset):
    """Objects in the authors' render layout under ``cfg.root``, as training samples (module docstring)."""

    def __init__(self, cfg: DataConfig, num_views: int = OFFICIAL_NUM_VIEWS) -> None:
        if num_views < RING_VIEWS:
            raise ValueError(f"num_views must be >= {RING_VIEWS} (the ring is the last {RING_VIEWS}), got {num_views}")
        self.num_views = num_views
        super().__init__(cfg)

    def index_object(self, folder: Path) -> ObjectViews:
        return read_official_object(folder, self.num_views)
