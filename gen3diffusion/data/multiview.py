"""Our on-disk multi-view format, its atomic writer, and the datasets that read posed RGBA views from folders.

Format (one folder per object; the folder name is the object id)::

    <root>/<object_id>/cameras.json
    <root>/<object_id>/000.png, 001.png, ...      RGBA, straight (not premultiplied) alpha

``cameras.json``::

    {"format": "gen3diffusion-multiview", "version": 1,
     "views": [{"file": "000.png", "width": 512, "height": 512,
                "c2w": [[...], [...], [...], [0, 0, 0, 1]],     # 4x4 row-major, OpenGL camera axes, world y-up
                "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]},    # pixels, pixel centres at +0.5; or "fovy": degrees
               ...]}

The datasets need an elevation-0 ring at the configured radius and fovy for the input and target views: a view is
on the ring when its camera sits within ``cfg.ring_tolerance_deg`` of elevation 0, at ``cfg.radius`` (1 %),
looks at the origin with up = +y, and has ``cfg.fovy`` (0.5 deg). Relative cameras need a ring view with partners
at +90/180/270 deg (each within the tolerance; the nearest is used); absolute cameras need ring views at every
azimuth 11.25 k. Supervision views are drawn from all views. Folders that do not qualify are skipped when the
dataset is built; a view that fails to read later skips its object for good and the next object is used instead.
Every skip is logged once with the object name and counted in ``dataset.skipped``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from gen3diffusion.cameras import intrinsics_from_fovy
from gen3diffusion.data import (
    RING_STEP_DEG,
    RING_VIEWS,
    TARGET_RING_OFFSETS,
    DataConfig,
    assemble_sample,
    camera_mode,
    choose_ring_views,
    sample_rng,
)

__all__ = [
    "BadObjectError", "MultiViewFolderDataset", "ObjectViews", "RingViewDataset", "find_ring", "read_cameras",
    "read_rgba", "resize_on_white", "write_object",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT_NAME, FORMAT_VERSION = "gen3diffusion-multiview", 1
CAMERAS_FILE = "cameras.json"


class BadObjectError(ValueError):
    """An object folder that cannot be used; the message says why."""


### writing


def write_object(folder: str | Path, rgba: Tensor, c2w: Tensor, K: Tensor, *, overwrite: bool = False,
                 extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write one object atomically: views to a hidden temporary folder, then a rename onto ``folder``.

    ``rgba [V, 4, H, W]`` float in [0, 1] (straight alpha) or uint8; ``c2w [V, 4, 4]`` OpenGL camera-to-world,
    world y-up; ``K [V, 3, 3]`` or ``[3, 3]`` pixel intrinsics. Cameras are stored as float64 so they read back
    exactly. An existing ``folder`` raises FileExistsError unless ``overwrite``. ``extra_files`` (name -> bytes, e.g.
    a GT mesh) are written into the folder with the views, so they appear together.
    """
    folder = Path(folder)
    if rgba.ndim != 4 or rgba.shape[1] != 4:
        raise ValueError(f"rgba must be [V, 4, H, W], got {tuple(rgba.shape)}")
    num, _, height, width = rgba.shape
    if c2w.shape != (num, 4, 4):
        raise ValueError(f"c2w must be [{num}, 4, 4] to match rgba, got {tuple(c2w.shape)}")
    K = K.expand(num, 3, 3) if K.shape == (3, 3) else K
    if K.shape != (num, 3, 3):
        raise ValueError(f"K must be [3, 3] or [{num}, 3, 3], got {tuple(K.shape)}")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: exists; pass overwrite=True to replace it")
    if rgba.dtype != torch.uint8:
        rgba = (rgba.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = rgba.permute(0, 2, 3, 1).cpu().numpy()  # [V, H, W, 4]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        views = []
        for v in range(num):
            name = f"{v:03d}.png"
            Image.fromarray(pixels[v]).save(tmp / name)  # [H, W, 4] uint8 -> RGBA
            views.append(
                {"file": name, "width": width, "height": height,
                 "c2w": c2w[v].double().tolist(), "K": K[v].double().tolist()}
            )  # fmt: skip
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "views": views}
        (tmp / CAMERAS_FILE).write_text(json.dumps(meta, indent=1))
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_bytes(payload)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


### reading


@dataclass
class ObjectViews:
    """An object's posed views; ``index_object`` fills the first fields, the dataset finds the ring."""

    name: str
    paths: list[Path]  # image file per view
    c2w: Tensor  # [V, 4, 4] float64, OpenGL camera-to-world, world y-up
    K: Tensor  # [V, 3, 3] float64 pixel intrinsics at the size the view is stored
    sizes: list[tuple[int, int]] | None = None  # declared (width, height) per view, checked on read
    ring_candidates: list[int] | None = None  # views allowed on the ring (None: any view)
    target_rows: Tensor | None = None  # [R, 4] int64 views (input, +90, +180, +270) usable as relative targets
    ring: list[int] | None = None  # view at ring azimuth 11.25 k for k = 0..31, None if incomplete


def _wrap_deg(x: Tensor) -> Tensor:
    """Angle differences wrapped to [-180, 180)."""
    return (x + 180.0) % 360.0 - 180.0


def find_ring(obj: ObjectViews, cfg: DataConfig) -> None:
    """Fill ``obj.target_rows`` (relative targets) and ``obj.ring`` (the absolute 32-ring); see the module docstring.

    Raises BadObjectError when the views do not support ``camera_mode(cfg)``.
    """
    name, c2w, K = obj.name, obj.c2w, obj.K
    pos = c2w[:, :3, 3]
    radius = pos.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((pos[:, 1] / radius).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(pos[:, 0], pos[:, 2])) % 360.0
    fovy = torch.rad2deg(2 * torch.atan(K[:, 1, 2] / K[:, 1, 1]))
    cos_tol = math.cos(math.radians(cfg.ring_tolerance_deg))
    looks_at_origin = (F.normalize(pos, dim=-1) * c2w[:, :3, 2]).sum(-1) >= cos_tol  # camera +z = back = outward
    upright = c2w[:, 1, 1] >= cos_tol
    on_ring = (
        (elevation.abs() <= cfg.ring_tolerance_deg)
        & ((radius - cfg.radius).abs() <= 0.01 * cfg.radius)
        & ((fovy - cfg.fovy).abs() <= 0.5)
        & looks_at_origin
        & upright
    )
    if obj.ring_candidates is not None:
        allowed = torch.zeros_like(on_ring)
        allowed[obj.ring_candidates] = True
        on_ring &= allowed
    ring_ids = on_ring.nonzero().squeeze(1)
    if len(ring_ids) == 0:
        raise BadObjectError(
            f"{name}: no view on the elevation-0 ring at radius {cfg.radius} with fovy {cfg.fovy} "
            f"(tolerance {cfg.ring_tolerance_deg} deg)"
        )

    def nearest(wanted: Tensor) -> tuple[Tensor, Tensor]:  # wanted [..., ] azimuths -> view ids, |error|
        err = _wrap_deg(azimuth[ring_ids] - wanted[..., None]).abs()  # [..., R]
        best = err.min(-1)
        return ring_ids[best.indices], best.values

    offsets = torch.tensor(TARGET_RING_OFFSETS, dtype=torch.float64) * RING_STEP_DEG
    ids, err = nearest(azimuth[ring_ids][:, None] + offsets)  # [R, 4]
    target_rows = ids[(err <= cfg.ring_tolerance_deg).all(-1)]
    ids, err = nearest(torch.arange(RING_VIEWS, dtype=torch.float64) * RING_STEP_DEG)
    ring = ids.tolist() if bool((err <= cfg.ring_tolerance_deg).all()) else None
    if camera_mode(cfg) == "relative" and len(target_rows) == 0:
        raise BadObjectError(f"{name}: no ring view has partners at +90/180/270 deg; relative cameras need them")
    if camera_mode(cfg) == "absolute" and ring is None:
        raise BadObjectError(f"{name}: ring views do not cover azimuths 11.25 k (k < 32); absolute cameras need them")
    obj.target_rows, obj.ring = target_rows, ring


def read_rgba(path: Path) -> Tensor:
    """An image file with an alpha channel as float RGBA ``[4, H, W]`` in [0, 1]; BadObjectError if unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            pixels = np.asarray(im.convert("RGBA"))
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports broken files with all three
        reason = str(err).replace(str(path), path.name).splitlines()[0] if str(err) else ""
        raise BadObjectError(f"{path.name}: unreadable image ({type(err).__name__}: {reason})") from err
    if not has_alpha:
        raise BadObjectError(f"{path.name}: image has no alpha channel (mode {im.mode})")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


def resize_on_white(rgba: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """RGBA ``[V, 4, h, w]`` (straight alpha) -> rgb on white ``[V, 3, size, size]`` and alpha ``[V, 1, size, size]``.

    Resizes premultiplied colour with an antialiased bilinear filter, so edges blend correctly with white.
    """
    alpha = rgba[:, 3:]
    premult = torch.cat([rgba[:, :3] * alpha, alpha], dim=1)
    if premult.shape[-2:] != (size, size):
        premult = F.interpolate(premult, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    premult = premult.clamp(0, 1)
    alpha = premult[:, 3:]
    return premult[:, :3] + (1 - alpha), alpha


class RingViewDataset(Dataset):
    """Base of the folder datasets: index and validate object folders, draw views, fall back past bad objects.

    Subclasses implement :meth:`index_object` (folder -> paths and cameras). ``skipped`` maps each skipped object
    name to the reason; with DataLoader workers each worker keeps its own copy of the read-time skips.
    """

    def __init__(self, cfg: DataConfig) -> None:
        root = Path(cfg.root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: dataset root not found; set data.root")
        if cfg.num_sup_views < 1 or cfg.image_size < 1 or cfg.sup_size < 1:
            raise ValueError(
                f"data.num_sup_views, image_size and sup_size must be >= 1, got "
                f"{cfg.num_sup_views}, {cfg.image_size}, {cfg.sup_size}"
            )
        self.cfg, self.mode, self.epoch = cfg, camera_mode(cfg), 0
        self.objects: list[ObjectViews] = []
        self.skipped: dict[str, str] = {}
        self._bad: set[int] = set()
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                obj = self.index_object(folder)
                find_ring(obj, cfg)
                self.objects.append(obj)
            except BadObjectError as err:
                self._skip(folder.name, str(err))
        if not self.objects:
            raise ValueError(f"{root}: no usable object folder ({len(self.skipped)} skipped, see the log)")
        logger.info("%s: %d objects, %d skipped", root, len(self.objects), len(self.skipped))

    def index_object(self, folder: Path) -> ObjectViews:
        """The views of one object folder (paths, OpenGL-world cameras); BadObjectError if it is unusable."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.objects)

    def set_epoch(self, epoch: int) -> None:
        """Draw new views for every object from now on."""
        self.epoch = epoch

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        logger.warning("skipping object %s: %s", name, reason)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} objects")
        rng = sample_rng(self.cfg, index, self.epoch)
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._bad:
                continue
            try:
                return self.load_sample(self.objects[j], rng)
            except BadObjectError as err:
                self._bad.add(j)
                self._skip(self.objects[j].name, str(err))
        raise RuntimeError(f"{self.cfg.root}: every object failed to read ({len(self.skipped)} skipped, see the log)")

    def _read(self, obj: ObjectViews, view: int) -> Tensor:
        rgba = read_rgba(obj.paths[view])  # [4, h, w]
        if obj.sizes is not None and (rgba.shape[2], rgba.shape[1]) != obj.sizes[view]:
            raise BadObjectError(
                f"{obj.paths[view].name}: image is {rgba.shape[2]}x{rgba.shape[1]}, cameras say "
                f"{obj.sizes[view][0]}x{obj.sizes[view][1]}"
            )
        return rgba

    def load_sample(self, obj: ObjectViews, rng: np.random.Generator) -> dict:
        """Draw the input, target and supervision views of ``obj`` and read them into the sample dict."""
        cfg = self.cfg
        if self.mode == "relative":
            targets = obj.target_rows[int(rng.integers(len(obj.target_rows)))].tolist()
            input_view = targets[0]
        else:
            input_k, target_ks = choose_ring_views(cfg, rng)
            input_view, targets = obj.ring[input_k], [obj.ring[k] for k in target_ks]
        num = len(obj.paths)
        sup = rng.choice(num, size=cfg.num_sup_views, replace=num < cfg.num_sup_views).tolist()
        ring_rgb = {}  # view -> [3, H, W]; relative cameras reuse target 0 as the input
        for v in dict.fromkeys([*targets, input_view]):
            rgba = self._read(obj, v)
            if rgba.shape[1] != rgba.shape[2]:
                raise BadObjectError(f"{obj.paths[v].name}: input and target views must be square, got {rgba.shape}")
            ring_rgb[v] = resize_on_white(rgba[None], cfg.image_size)[0][0]
        sup_rgb, sup_alpha, sup_K = [], [], []
        for v in sup:
            rgba = self._read(obj, v)
            rgb, alpha = resize_on_white(rgba[None], cfg.sup_size)
            scale = torch.tensor([cfg.sup_size / rgba.shape[2], cfg.sup_size / rgba.shape[1], 1.0], dtype=torch.float64)
            sup_rgb.append(rgb[0])
            sup_alpha.append(alpha[0])
            sup_K.append(obj.K[v] * scale[:, None])
        return assemble_sample(
            cfg,
            object_id=obj.name,
            input_image=ring_rgb[input_view],
            target_images=torch.stack([ring_rgb[v] for v in targets]),
            target_c2w_world=obj.c2w[targets],
            sup_images=torch.stack(sup_rgb),
            sup_masks=torch.stack(sup_alpha),
            sup_c2w_world=obj.c2w[sup],
            sup_K=torch.stack(sup_K),
        )


class MultiViewFolderDataset(RingViewDataset):
    """Objects in our folder format (module docstring) under ``cfg.root``, as training samples."""

    def index_object(self, folder: Path) -> ObjectViews:
        return read_cameras(folder)


def read_cameras(folder: Path) -> ObjectViews:
    """Parse and check ``folder/cameras.json``: image paths, c2w ``[V, 4, 4]``, K ``[V, 3, 3]`` (float64), sizes.

    Raises BadObjectError naming the object on a missing or malformed file or a listed image that does not exist.
    """
    try:
        meta = json.loads((folder / CAMERAS_FILE).read_text())
        if meta.get("format") != FORMAT_NAME:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
        paths, c2w, K, sizes = [], [], [], []
        for view in meta["views"]:
            width, height = int(view["width"]), int(view["height"])
            pose = torch.tensor(view["c2w"], dtype=torch.float64)
            intr = (
                torch.tensor(view["K"], dtype=torch.float64)
                if "K" in view
                else intrinsics_from_fovy(float(view["fovy"]), width, height, dtype=torch.float64)
            )
            if pose.shape != (4, 4) or intr.shape != (3, 3):
                raise ValueError(f"view {view['file']}: c2w {tuple(pose.shape)} / K {tuple(intr.shape)}")
            paths.append(folder / view["file"])
            c2w.append(pose)
            K.append(intr)
            sizes.append((width, height))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadObjectError(f"{folder.name}: bad {CAMERAS_FILE} ({type(err).__name__}: {err})") from err
    if not paths:
        raise BadObjectError(f"{folder.name}: {CAMERAS_FILE} lists no views")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise BadObjectError(f"{folder.name}: missing views {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return ObjectViews(folder.name, paths, torch.stack(c2w), torch.stack(K), sizes)
