"""Writing results: the multi-view PNG, the turntable video and the per-image output folder.

Every file is written to a temporary name in its folder and renamed, so an interrupted run never leaves a half file.
imageio's ffmpeg plugin is imported only when a video is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from .cameras import Cameras, orbit_camera, target_cameras
from .config import CameraConfig
from .gaussians import Gaussians, save_ply
from .render import rasterize, rasterize_chunks

if TYPE_CHECKING:
    from .mesh import MeshConfig


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [0, 1] -> [..., H, W, 3] uint8."""
    return (images.detach().float().clamp(0, 1) * 255 + 0.5).byte().movedim(-3, -1).cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Atomically write an [H, W, 3] uint8 array as PNG."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
    return path


def image_grid(rows: list[list[np.ndarray | None]]) -> np.ndarray:
    """Tile [H, W, 3] uint8 images into one grid; None cells stay white. All cells share the first image's size."""
    first = next(c for row in rows for c in row if c is not None)
    h, w = first.shape[:2]
    cols = max(len(r) for r in rows)
    grid = np.full((h * len(rows), w * cols, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                if cell.shape[:2] != (h, w):
                    cell = np.asarray(Image.fromarray(cell).resize((w, h), Image.Resampling.BILINEAR))
                grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = cell
    return grid


def multiview_sheet(input_image: torch.Tensor, views: torch.Tensor, renders: torch.Tensor) -> np.ndarray:
    """Row 1: the input and the V generated views; row 2: the renders of the output Gaussians at those views.

    input_image [3, H, W], views [V, 3, H, W], renders [V, 3, H, W], all in [0, 1].
    """
    top = [to_uint8(input_image)] + list(to_uint8(views))
    bottom = [None] + list(to_uint8(renders))
    return image_grid([top, bottom])


@torch.no_grad()
def render_turntable(
    gaussians: Gaussians,
    num_frames: int = 48,
    size: int = 256,
    radius: float = 1.5,
    fovy: float = 49.1,
    elevation: float = 0.0,
    chunk: int = 8,
) -> np.ndarray:
    """[T, size, size, 3] uint8 frames of one object (B = 1) on a full turn at ``elevation``, starting at the input
    view (azimuth 0)."""
    azimuth = torch.arange(num_frames, dtype=torch.float32) * (360.0 / num_frames)
    c2w = orbit_camera(torch.full_like(azimuth, elevation), azimuth, radius).to(gaussians.means.device)
    cams = Cameras.from_fovy(c2w, fovy, size, size)
    return np.concatenate([to_uint8(out.rgb[0]) for out in rasterize_chunks(gaussians, cams, chunk, depth=False)])


def require_video_writer() -> None:
    """Raise a RuntimeError that says what to install when imageio cannot write .mp4 (its ffmpeg plugin is missing;
    imageio would otherwise pick another plugin and fail with an unrelated error)."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError as err:
        raise RuntimeError("writing turntable.mp4 needs imageio's ffmpeg plugin: pip install 'imageio[ffmpeg]' "
                           "(or pass --no-video)") from err


def save_video(frames: np.ndarray, path: str | Path, fps: int = 24) -> Path:
    """Atomically write [T, H, W, 3] uint8 frames as an H.264 .mp4 (imageio-ffmpeg)."""
    require_video_writer()
    import imageio.v2 as imageio

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                                macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def save_json(data: dict, path: str | Path) -> Path:
    """Atomically write ``data`` as indented JSON."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def save_result(
    folder: str | Path,
    input_image: torch.Tensor,  # [3, H, W] in [0, 1]
    views: torch.Tensor,  # [V, 3, H, W] generated views in [0, 1]
    gaussians: Gaussians,  # one object (B = 1)
    camera_cfg: CameraConfig,
    video_frames: int = 48,
    mesh_cfg: "MeshConfig | None" = None,
    meta: dict | None = None,
) -> list[Path]:
    """Write one object's outputs into ``folder``: input.png, gaussians.ply, multiview.png (input, generated views,
    renders of the Gaussians at those views), turntable.mp4 (if ``video_frames``), mesh.ply + mesh.glb (if
    ``mesh_cfg``) and result.json (``meta`` plus the Gaussian count). Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = input_image.shape[-1]
    written = [save_png(to_uint8(input_image), folder / "input.png")]
    count = save_ply(gaussians, folder / "gaussians.ply")
    written.append(folder / "gaussians.ply")
    cams = Cameras.from_fovy(target_cameras(camera_cfg.radius).to(gaussians.means.device), camera_cfg.fovy, size, size)
    renders = rasterize(gaussians, cams, background=(1.0, 1.0, 1.0), depth=False).rgb[0]
    written.append(save_png(multiview_sheet(input_image, views, renders), folder / "multiview.png"))
    if video_frames:
        frames = render_turntable(gaussians, video_frames, size, camera_cfg.radius, camera_cfg.fovy)
        written.append(save_video(frames, folder / "turntable.mp4"))
    if mesh_cfg is not None:
        from .mesh import extract_mesh, save_mesh

        written.extend(save_mesh(extract_mesh(gaussians, mesh_cfg, camera_cfg.radius, camera_cfg.fovy), folder / "mesh"))
    written.append(save_json({**(meta or {}), "num_gaussians_saved": count}, folder / "result.json"))
    return written
