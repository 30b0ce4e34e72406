"""Gaussians -> textured mesh: render depth and colour from many views, fuse them in a TSDF, extract, clean.

The authors fuse GOF depth refined by a normal network (PIFuHD + BiNI); we fuse the renderer's expected depth
directly, which needs no extra network. open3d is imported here only, so the rest of the package runs without it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cameras import Cameras, opengl_to_opencv, orbit_camera
from .gaussians import Gaussians
from .render import rasterize_chunks

logger = logging.getLogger(__name__)


@dataclass
class MeshConfig:
    # views on a spiral around the object (authors: 72 "high", 24 "low")
    num_views: int = 36
    # render size of each depth/colour view
    resolution: int = 256
    # the spiral's elevation range (degrees) and number of turns
    elevation_range: tuple[float, float] = (-45.0, 45.0)
    turns: int = 3
    # the fused cube [-bound, bound]^3 (authors: 0.6), its voxels per side, and the TSDF truncation (world units)
    bound: float = 0.6
    voxels: int = 256
    sdf_trunc: float = 0.02
    # pixels whose accumulated alpha is below this carry no depth
    alpha_threshold: float = 0.5
    # keep only the largest connected component
    keep_largest_component: bool = True


def spiral_cameras(cfg: MeshConfig, radius: float = 1.5) -> torch.Tensor:
    """[N, 4, 4] c2w on a spiral: elevation sweeps the range while the azimuth makes ``turns`` full turns."""
    n = cfg.num_views
    elevation = torch.linspace(cfg.elevation_range[0], cfg.elevation_range[1], n)
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 * cfg.turns / n)
    return orbit_camera(elevation, azimuth, radius)


@torch.no_grad()
def render_depth_views(
    gaussians: Gaussians, cameras: Cameras, alpha_threshold: float = 0.5, chunk: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Colour [N, H, W, 3] uint8 and depth [N, H, W] float32 (0 = no surface) of one sample (B = 1)."""
    colors, depths = [], []
    for out in rasterize_chunks(gaussians, cameras, chunk, background=(1.0, 1.0, 1.0)):
        colors.append((out.rgb[0].clamp(0, 1) * 255 + 0.5).byte().permute(0, 2, 3, 1).cpu())
        depths.append(torch.where(out.alpha[0, :, 0] > alpha_threshold, out.depth[0, :, 0], 0.0).cpu())
    return torch.cat(colors).numpy(), torch.cat(depths).float().numpy()


def extract_mesh(gaussians: Gaussians, cfg: MeshConfig | None = None, radius: float = 1.5, fovy: float = 49.1):
    """Fuse depth renders of ``gaussians`` (B = 1) into an ``open3d.geometry.TriangleMesh`` with vertex colours."""
    import open3d as o3d

    cfg = cfg or MeshConfig()
    if gaussians.batch_size != 1:
        raise ValueError(f"extract_mesh takes one object, got a batch of {gaussians.batch_size}")
    device = gaussians.means.device
    c2w = spiral_cameras(cfg, radius).to(device)
    cams = Cameras.from_fovy(c2w, fovy, cfg.resolution, cfg.resolution)
    colors, depths = render_depth_views(gaussians.to(torch.float32), cams, cfg.alpha_threshold)
    w2c = torch.linalg.inv(opengl_to_opencv(c2w.double())).cpu().numpy()  # OpenCV extrinsics for open3d
    K = cams.K.double().cpu().numpy()
    # a dense volume: open3d's ScalableTSDFVolume returned empty meshes for valid input in open3d 0.20
    volume = o3d.pipelines.integration.UniformTSDFVolume(
        length=2 * cfg.bound, resolution=cfg.voxels, sdf_trunc=cfg.sdf_trunc,
        color_type=o3d.pipelines.integration.TSDFVolumeColorType.RGB8, origin=np.full((3, 1), -cfg.bound),
    )
    for color, depth, k, extrinsic in zip(colors, depths, K, w2c):
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(color)), o3d.geometry.Image(np.ascontiguousarray(depth)),
            depth_scale=1.0, depth_trunc=radius * 3, convert_rgb_to_intensity=False,
        )
        intrinsic = o3d.camera.PinholeCameraIntrinsic(cfg.resolution, cfg.resolution, k[0, 0], k[1, 1], k[0, 2], k[1, 2])
        volume.integrate(rgbd, intrinsic, extrinsic)
    mesh = volume.extract_triangle_mesh()
    if len(mesh.triangles) == 0:
        raise RuntimeError("TSDF fusion produced an empty mesh: the Gaussians render no surface (all transparent?)")
    if cfg.keep_largest_component:
        mesh = _largest_component(mesh)
    mesh.compute_vertex_normals()
    return mesh


def _largest_component(mesh):
    clusters, counts, _ = mesh.cluster_connected_triangles()
    clusters, counts = np.asarray(clusters), np.asarray(counts)
    mesh.remove_triangles_by_mask(clusters != counts.argmax())
    mesh.remove_unreferenced_vertices()
    return mesh


def save_mesh(mesh, path_stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.ply`` (vertex colours) and ``<stem>.glb``; each written to a temporary name, then renamed."""
    import open3d as o3d
    import trimesh

    stem = Path(path_stem)
    ply, glb = stem.with_suffix(".ply"), stem.with_suffix(".glb")
    tmp_ply = ply.with_name(f".{ply.name}.tmp.ply")
    if not o3d.io.write_triangle_mesh(str(tmp_ply), mesh, write_vertex_colors=True):
        raise OSError(f"{ply}: open3d could not write the mesh")
    os.replace(tmp_ply, ply)
    colors = (np.asarray(mesh.vertex_colors) * 255 + 0.5).clip(0, 255).astype(np.uint8)
    tm = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.triangles), vertex_colors=colors, process=False)
    tmp_glb = glb.with_name(f".{glb.name}.tmp.glb")
    tm.export(tmp_glb, file_type="glb")
    os.replace(tmp_glb, glb)
    return ply, glb

