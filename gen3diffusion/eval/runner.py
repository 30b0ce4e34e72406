"""The GSO evaluation loop: ground truth on the evaluation ring, one sample per object, metrics, resumable outputs.

Per object (``Evaluator.evaluate_object``):

1. **Ground truth** on the evaluation ring (``ring_size`` views at ``ring_elevation``, azimuth k * 360 / ring_size,
   the weights' radius and fovy, white background). Meshes (.obj/.glb/.gltf/.ply; GSO's ``meshes/model.obj`` +
   ``materials/textures/texture.png``) are turned y-up, normalised to the task's extent (0.8 objects, 1.0 avatars) and
   rendered by :func:`render_mesh`, a z-buffer rasteriser. Objects in the folder format (``docs/data.md``) use their
   stored views whose cameras match the ring cameras; a mesh in the folder serves the geometry metrics.
2. **Sampling** from ring view 0 (the input view), preprocessed as ``scripts/sample.py`` does (the task's border ratio).
3. **Metrics**: the output Gaussians rendered at the ring cameras against the ground truth (PSNR, SSIM, LPIPS per
   view, then averaged per object; both image sets quantised to 8 bits, as saved PNGs); the TSDF mesh of
   :mod:`gen3diffusion.mesh` against the GT mesh (:func:`gen3diffusion.eval.geometry.evaluate_meshes`).
4. **Outputs**, each written atomically: ``renders/<name>/`` (input, GT and predicted ring views, predicted mesh),
   ``sheets/<name>.png`` (contact sheet), then ``objects/<name>.json``. The JSON marks the object done, so an
   interrupted run resumes where it stopped; objects that failed are retried.

After the loop, FID is computed over all saved views of all objects (set-level), and the summary (means over objects,
counts, conventions) is written as ``summary.csv``, ``summary.md`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from gen3diffusion.cameras import Cameras, blender_to_opengl, evaluation_ring, invert_rigid, target_cameras
from gen3diffusion.config import SamplerConfig, to_dict
from gen3diffusion.data import DataConfig, max_extent
from gen3diffusion.data.multiview import (
    CAMERAS_FILE, BadObjectError, ObjectViews, read_cameras, read_rgba, resize_on_white,
)  # fmt: skip
from gen3diffusion.eval.geometry import GeometryMetricConfig, evaluate_meshes
from gen3diffusion.eval.image_metrics import FrechetDistance, LPIPSMetric, MetricUnavailable, psnr, ssim
from gen3diffusion.gaussians import Gaussians
from gen3diffusion.mesh import MeshConfig, extract_mesh, save_mesh
from gen3diffusion.outputs import image_grid, save_json, save_png, to_uint8
from gen3diffusion.pipeline import BORDER_RATIO, Gen3DiffusionPipeline
from gen3diffusion.preprocess import preprocess_image
from gen3diffusion.render import rasterize

__all__ = [
    "EvalConfig", "EvalSummary", "Evaluator", "GroundTruth", "MeshRender", "ObjectSource", "RenderMesh",
    "discover_objects", "load_ground_truth", "load_mesh", "match_ring", "render_mesh", "summary_markdown",
    "write_summary",
]  # fmt: skip

logger = logging.getLogger(__name__)

MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply")
Y_UP_SUFFIXES = (".glb", ".gltf")  # glTF is y-up by specification; other files follow GSO (Gazebo models, z-up)
GSO_MESH = Path("meshes") / "model.obj"
GSO_TEXTURE = Path("materials") / "textures" / "texture.png"
IMAGE_METRICS = ("psnr", "ssim", "lpips", "mv_psnr")  # mv_psnr: the generated views against the Gaussians' renders
GEOMETRY_METRICS = ("chamfer", "p2s", "normal_consistency", "fscore", "precision", "recall")
UNAVAILABLE = "unavailable"
# settings that steer a run but not its numbers: changing them between resumed runs is expected
RUN_ONLY_FIELDS = ("num_objects", "overwrite", "object_list", "output")
# (x, y, z) -> (x, z, -y): a z-up (Blender, Gazebo) world into our y-up OpenGL world
Z_UP_TO_Y_UP = blender_to_opengl(torch.eye(4, dtype=torch.float64)).numpy()
NEAR = 1e-3  # triangles with a vertex closer to the camera plane than this are not drawn
EDGE_EPS = 1e-9  # barycentric slack, so pixel centres exactly on a shared edge are never dropped by rounding
# ring cameras and stored cameras must agree in fovy and principal point to this (deg, fraction of the image side)
FOVY_TOLERANCE_DEG = 0.5
CENTRE_TOLERANCE = 0.01


@dataclass
class EvalConfig:
    """Settings of an evaluation run (the lead moves this into config.py); saved as ``eval_config.json``."""

    # objects root: mesh files, GSO folders and / or folder-format objects, one entry per object
    data: str = ""
    # output root (objects/, renders/, sheets/, summary.*)
    output: str = "eval"
    # optional text file with one object name per line: evaluate only these, in this order
    object_list: str | None = None
    # evaluate only the first N objects (None: all)
    num_objects: int | None = None
    # re-evaluate objects whose JSON already exists
    overwrite: bool = False
    # recorded with the results (the script loads the pipeline from them)
    weights: str = ""
    base: str | None = None
    # "objects" or "avatars": input border ratio (0.45 / 0.227) and GT mesh extent (0.8 / 1.0)
    task: str = "objects"
    # override the task's border ratio / mesh extent
    border_ratio: float | None = None
    mesh_extent: float | None = None
    # recentre and rescale the input view with the border ratio (False: take ring view 0 as it is, as the
    # bundled demo model, trained on uncropped views, needs)
    recenter: bool = True
    # sampling seed (every object uses the same one)
    seed: int = 0
    # evaluation ring: views, elevation (deg); radius and fovy come from the weights' camera config
    ring_size: int = 32
    ring_elevation: float = 0.0
    # pixels per side of the GT and predicted ring views compared by the image metrics (EscherNet: 256)
    image_size: int = 256
    # folder objects: a stored view stands for a ring camera when its pose is within this angle (deg)
    ring_tolerance_deg: float = 1.0
    # mesh files: "auto" (y-up for .glb/.gltf, z-up otherwise), "y" or "z"
    mesh_up_axis: str = "auto"
    # GT mesh renders: samples per pixel per axis (box-filtered) and shading ("hemisphere" or "albedo")
    gt_supersample: int = 2
    gt_shading: str = "hemisphere"
    # hemisphere shading: brightness of a face pointing down (up: 1, sideways: halfway)
    gt_ambient: float = 0.5
    # ring views per row of the contact sheet
    sheet_views: int = 8
    # extract the predicted mesh and compute geometry metrics
    geometry: bool = True
    # SSIM window convention ("skimage" as EscherNet, or "gaussian")
    ssim_variant: str = "skimage"
    # LPIPS trunk ("alex" v0.1 as EscherNet) and its weights file (None: $LPIPS_BACKBONE, then the torch hub cache)
    lpips_net: str = "alex"
    lpips_version: str = "0.1"
    lpips_weights: str | None = None
    # FID features ("inception" or "clip") and weights (file / folder; None: the environment variable, the cache)
    fid_features: str = "inception"
    fid_weights: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first field with a bad value."""
        choices = {"task": tuple(BORDER_RATIO), "mesh_up_axis": ("auto", "y", "z"),
                   "gt_shading": ("hemisphere", "albedo"), "fid_features": ("inception", "clip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"eval.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("ring_size", "image_size", "gt_supersample", "sheet_views"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 1")
        if self.num_objects is not None and self.num_objects < 1:
            raise ValueError(f"eval.num_objects={self.num_objects} must be >= 1 (or None for all)")
        if not 0.0 <= self.gt_ambient <= 1.0:
            raise ValueError(f"eval.gt_ambient={self.gt_ambient} must lie in [0, 1]")

    @property
    def input_border_ratio(self) -> float:
        return self.border_ratio if self.border_ratio is not None else BORDER_RATIO[self.task]

    @property
    def gt_extent(self) -> float:
        return max_extent(DataConfig(task=self.task, max_extent=self.mesh_extent))


### ground-truth meshes: loading and z-buffer rendering


def load_mesh(path: str | Path, up_axis: str = "auto", extent: float | None = 0.8) -> trimesh.Trimesh:
    """A mesh file as one y-up ``Trimesh`` (parts merged, UVs and colours kept), centred with max extent ``extent``
    (None: units and position as stored, only turned y-up). ValueError naming the file when it holds no triangles."""
    path = Path(path)
    try:
        mesh = trimesh.load(path, force="mesh")
    except Exception as err:  # trimesh raises many exception types on malformed files
        raise ValueError(f"{path.name}: unreadable mesh ({type(err).__name__}: {err})") from err
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path.name}: no triangles in the file")
    up = up_axis if up_axis != "auto" else ("y" if path.suffix.lower() in Y_UP_SUFFIXES else "z")
    if up == "z":
        mesh.apply_transform(Z_UP_TO_Y_UP)
    if extent is not None:
        lo, hi = mesh.bounds
        size = float((hi - lo).max())
        if not size > 0:
            raise ValueError(f"{path.name}: degenerate mesh (bounding box {mesh.bounds.tolist()})")
        mesh.apply_translation(-(lo + hi) / 2)
        mesh.apply_scale(extent / size)
    return mesh


@dataclass
class RenderMesh:
    """A triangle mesh as the rasteriser reads it: geometry and per-corner colours or texture coordinates."""

    vertices: Tensor  # [Nv, 3] float64 world positions (y up)
    faces: Tensor  # [F, 3] int64
    face_normals: Tensor  # [F, 3] float64 unit normals
    corner_colors: Tensor | None  # [F, 3, 3] RGB in [0, 1] at each corner (vertex or face colours)
    corner_uv: Tensor | None = None  # [F, 3, 2] texture coordinates (v up), with ``texture``
    texture: Tensor | None = None  # [3, Ht, Wt] RGB in [0, 1], row 0 at v = 1

    @classmethod
    def from_trimesh(cls, mesh: trimesh.Trimesh, source: Path | None = None) -> RenderMesh:
        """Colours from the mesh's texture (its material image, else GSO's ``texture.png`` beside ``source`` or in
        ``../materials/textures/``), else its vertex or face colours, else trimesh's default grey."""
        faces = torch.tensor(np.asarray(mesh.faces), dtype=torch.int64)
        geometry = dict(vertices=torch.tensor(np.asarray(mesh.vertices), dtype=torch.float64), faces=faces,
                        face_normals=torch.tensor(np.asarray(mesh.face_normals), dtype=torch.float64))
        visual = mesh.visual
        uv = getattr(visual, "uv", None) if visual.kind == "texture" else None
        image = _texture_image(visual.material, source) if uv is not None and len(uv) == len(mesh.vertices) else None
        if image is not None:
            texture = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            corner_uv = torch.tensor(np.asarray(uv), dtype=torch.float64)[faces]
            return cls(**geometry, corner_colors=None, corner_uv=corner_uv, texture=texture)
        if visual.kind == "texture":
            visual = visual.to_color()  # no image: the material's main colour
        if visual.kind == "face":
            colors = torch.tensor(np.asarray(visual.face_colors)[:, :3], dtype=torch.float64)[:, None].expand(-1, 3, 3)
        else:
            colors = torch.tensor(np.asarray(visual.vertex_colors)[:, :3], dtype=torch.float64)[faces]
        return cls(**geometry, corner_colors=colors / 255.0)


def _texture_image(material: Any, source: Path | None) -> Image.Image | None:
    image = getattr(material, "image", None)  # SimpleMaterial (OBJ)
    if image is None:
        image = getattr(material, "baseColorTexture", None)  # PBRMaterial (glTF)
    if image is not None or source is None:
        return image
    # GSO's model.mtl names texture.png next to the OBJ, but the file lies in ../materials/textures/
    for candidate in (source.parent / GSO_TEXTURE.name, source.parent.parent / GSO_TEXTURE):
        if candidate.is_file():
            with Image.open(candidate) as im:
                return im.convert("RGB")
    return None


@dataclass
class MeshRender:
    """Rasterised views of a mesh; V = the cameras' flattened batch."""

    rgb: Tensor  # [V, 3, H, W] colour composited on white, in [0, 1]
    alpha: Tensor  # [V, 1, H, W] coverage (fractional at supersampled edges)
    depth: Tensor  # [V, 1, H, W] camera depth along the optical axis, averaged over covered samples; 0 = empty


@torch.no_grad()
def render_mesh(
    mesh: RenderMesh,
    cameras: Cameras,
    supersample: int = 1,
    shading: str = "hemisphere",
    ambient: float = 0.5,
    max_pairs: int = 1 << 20,
) -> MeshRender:
    """Render ``mesh`` from every camera with a z-buffer: the nearest triangle whose interior holds a pixel centre
    colours that pixel, with perspective-correct interpolation of depth, colours and texture coordinates.

    Shading is view-independent, so every view of an object agrees: "albedo" is the surface colour itself;
    "hemisphere" multiplies it by ``ambient + (1 - ambient) (n_y + 1) / 2`` (light from the sky, none from the
    ground; the face normal ``n`` turned towards the camera), which lights all views of an elevation-0 ring alike.
    ``supersample`` s renders s x s samples per pixel and box-filters them. Runs on the cameras' device in float64;
    ``max_pairs`` bounds the (triangle, pixel) candidates held in memory at once.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if shading not in ("hemisphere", "albedo"):
        raise ValueError(f"shading must be 'hemisphere' or 'albedo', got {shading!r}")
    s, device = supersample, cameras.c2w.device
    W, H = cameras.width * s, cameras.height * s
    c2w = cameras.c2w.reshape(-1, 4, 4).double()  # [V, 4, 4]
    K = cameras.K.reshape(-1, 3, 3).double() * torch.tensor([s, s, 1.0], dtype=torch.float64, device=device)[:, None]
    mesh = RenderMesh(**{k: None if v is None else v.to(device) for k, v in vars(mesh).items()})
    maps = []
    for view in range(len(c2w)):
        face, bary, depth = _rasterize_view(mesh, c2w[view], K[view], W, H, max_pairs)  # [H*W], [H*W, 3], [H*W]
        hit = face >= 0
        rgb = torch.ones(H * W, 3, dtype=torch.float64, device=device)
        rgb[hit] = _shade(mesh, face[hit], bary[hit], c2w[view, :3, 3], shading, ambient)
        maps.append(torch.cat([rgb, hit[:, None].double(), (depth * hit)[:, None]], dim=1).T.reshape(5, H, W))
    maps = torch.stack(maps)  # [V, 5, H, W]
    if s > 1:
        maps = F.avg_pool2d(maps, s)
    alpha = maps[:, 3:4]
    depth = maps[:, 4:5] / alpha.clamp(min=1e-12)
    return MeshRender(maps[:, :3].float(), alpha.float(), depth.float())


def _cross2(a: Tensor, b: Tensor) -> Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _rasterize_view(
    mesh: RenderMesh, c2w: Tensor, K: Tensor, W: int, H: int, max_pairs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pixel of one view: the visible face (-1: none), its perspective-correct barycentrics and the depth."""
    w2c = invert_rigid(c2w)
    cam = mesh.vertices @ w2c[:3, :3].T + w2c[:3, 3]  # [Nv, 3] OpenGL camera axes
    z = -cam[:, 2]  # depth along the optical axis
    xy = torch.stack([K[0, 0] * cam[:, 0] / z + K[0, 2], K[1, 2] - K[1, 1] * cam[:, 1] / z], dim=-1)  # OpenCV pixels
    tri, tri_z = xy[mesh.faces], z[mesh.faces]  # [F, 3, 2], [F, 3]
    area = _cross2(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # [F] twice the signed screen area
    lo, hi = tri.min(dim=1).values, tri.max(dim=1).values  # [F, 2]
    # pixel (i, j) has its centre at (j + 0.5, i + 0.5): the pixels whose centres lie in each triangle's box
    first = torch.ceil(lo - 0.5).clamp(min=0).long()  # [F, 2] (j0, i0)
    last = torch.minimum(torch.floor(hi - 0.5).long(), torch.tensor([W - 1, H - 1], device=xy.device))
    span = (last - first + 1).clamp(min=0)  # [F, 2] box width, height in pixels
    drawn = ((tri_z > NEAR).all(dim=1) & (area.abs() > 1e-12) & (span.prod(dim=1) > 0)).nonzero().squeeze(1)
    counts = span[drawn].prod(dim=1)  # [Fd] candidate pixels per drawn face
    best_z = torch.full((H * W,), math.inf, dtype=torch.float64, device=xy.device)
    best_face = torch.full((H * W,), -1, dtype=torch.int64, device=xy.device)
    best_bary = torch.zeros(H * W, 3, dtype=torch.float64, device=xy.device)
    # groups of consecutive faces with about max_pairs candidates each (a group exceeds it by one face at most)
    group = torch.div(torch.cumsum(counts, 0) - counts, max_pairs, rounding_mode="floor")
    group_sizes = torch.unique_consecutive(group, return_counts=True)[1].tolist()
    for faces, n in zip(drawn.split(group_sizes), counts.split(group_sizes)):
        face = torch.repeat_interleave(faces, n)  # [P] one entry per (face, pixel) candidate
        local = torch.arange(len(face), device=xy.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        width = span[face, 0]
        px, py = first[face, 0] + local % width, first[face, 1] + torch.div(local, width, rounding_mode="floor")
        p = torch.stack([px + 0.5, py + 0.5], dim=-1).double()  # [P, 2]
        a, b, c = tri[face].unbind(dim=1)
        l0 = _cross2(b - p, c - p) / area[face]
        l1 = _cross2(c - p, a - p) / area[face]
        bary = torch.stack([l0, l1, 1 - l0 - l1], dim=-1)  # [P, 3] screen-space barycentrics
        inside = (bary >= -EDGE_EPS).all(dim=-1)
        face, bary, pix = face[inside], bary[inside], (py * W + px)[inside]
        weights = bary / tri_z[face]  # perspective correction: 1 / z is linear in screen space
        inv_z = weights.sum(dim=-1)
        depth, bary = 1.0 / inv_z, weights / inv_z[:, None]
        chunk_z = torch.full_like(best_z, math.inf).scatter_reduce(0, pix, depth, "amin")
        nearest = depth == chunk_z[pix]
        order = torch.arange(len(pix), device=xy.device)
        winner = torch.full_like(best_face, -1).scatter_reduce(0, pix[nearest], order[nearest], "amax")
        update = ((winner >= 0) & (chunk_z < best_z)).nonzero().squeeze(1)
        k = winner[update]
        best_z[update], best_face[update], best_bary[update] = chunk_z[update], face[k], bary[k]
    return best_face, best_bary, best_z


def _shade(mesh: RenderMesh, face: Tensor, bary: Tensor, eye: Tensor, shading: str, ambient: float) -> Tensor:
    """Colours [P, 3] of the visible points given by faces [P] and perspective-correct barycentrics [P, 3]."""
    if mesh.texture is not None:
        uv = (mesh.corner_uv[face] * bary[..., None]).sum(dim=1)  # [P, 2]
        uv = torch.where((uv < 0) | (uv > 1), uv - torch.floor(uv), uv)  # repeat outside [0, 1], keep its edges
        grid = torch.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1]], dim=-1).view(1, 1, -1, 2)  # row 0 = top = v 1
        albedo = F.grid_sample(mesh.texture[None], grid.to(mesh.texture.dtype), mode="bilinear",
                               padding_mode="border", align_corners=False)[0, :, 0].T.double()  # [P, 3]
    else:
        albedo = (mesh.corner_colors[face] * bary[..., None]).sum(dim=1)
    if shading == "albedo":
        return albedo
    normal = mesh.face_normals[face]  # [P, 3]
    towards_eye = eye - mesh.vertices[mesh.faces[face, 0]]
    normal = normal * torch.where((normal * towards_eye).sum(dim=-1, keepdim=True) < 0, -1.0, 1.0)
    return albedo * (ambient + (1 - ambient) * (normal[:, 1:2] + 1) / 2)


### objects and their ground truth


@dataclass
class ObjectSource:
    """One object to evaluate: a mesh file, or a folder-format object (``kind`` "views") with an optional mesh."""

    name: str
    kind: str  # "mesh", "views", or "invalid" (reported as a failed object with ``problem``)
    path: Path  # the mesh file, or the object folder
    mesh: Path | None  # GT mesh for the geometry metrics
    problem: str = ""


def _folder_mesh(folder: Path) -> Path | None:
    """GSO's ``meshes/model.obj``, else the first mesh file directly in ``folder`` (by name)."""
    if (folder / GSO_MESH).is_file():
        return folder / GSO_MESH
    meshes = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    return meshes[0] if meshes else None


def discover_objects(root: str | Path, object_list: str | Path | None = None) -> list[ObjectSource]:
    """The objects under ``root``, sorted by name (or in ``object_list`` order, one name per line).

    A mesh file is an object named by its stem; a folder with ``cameras.json`` is a folder-format object (its mesh,
    if any, for geometry); a folder with ``meshes/model.obj`` (GSO) or a mesh file is a mesh object. Other folders
    come back as "invalid", so the run reports them. Hidden entries and other files are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: objects folder not found; pass --data DIR")
    sources: dict[str, ObjectSource] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in MESH_SUFFIXES:
            source = ObjectSource(entry.stem, "mesh", entry, entry)
        elif entry.is_dir() and (entry / CAMERAS_FILE).is_file():
            source = ObjectSource(entry.name, "views", entry, _folder_mesh(entry))
        elif entry.is_dir():
            mesh = _folder_mesh(entry)
            source = (ObjectSource(entry.name, "mesh", mesh, mesh) if mesh else ObjectSource(
                entry.name, "invalid", entry, None, f"no {CAMERAS_FILE}, {GSO_MESH} or mesh file in the folder"))
        else:
            continue
        if source.name in sources:
            other = sources[source.name].path.name
            raise ValueError(f"{root}: two objects named {source.name!r} ({other}, {entry.name}); rename one")
        sources[source.name] = source
    if object_list is None:
        return list(sources.values())
    names = [line.strip() for line in Path(object_list).read_text().splitlines() if line.strip()]
    missing = [n for n in names if n not in sources]
    if missing:
        raise ValueError(f"{object_list}: {len(missing)} listed objects not in {root}: {', '.join(missing[:5])}")
    return [sources[n] for n in names]


def match_ring(obj: ObjectViews, ring_c2w: Tensor, fovy: float, tolerance_deg: float = 1.0) -> list[int]:
    """The stored view that matches each ring camera ``ring_c2w [R, 4, 4]``: rotation within ``tolerance_deg``,
    position within that angle seen from the origin, same fovy (0.5 deg), square and centred. BadObjectError when a
    ring camera has no match."""
    stored = obj.c2w.double()
    ring = ring_c2w.to(stored.device, torch.float64)
    relative = ring[:, None, :3, :3].transpose(-1, -2) @ stored[None, :, :3, :3]  # [R, V, 3, 3]
    cos_angle = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos_angle))  # [R, V] rotation between the two cameras
    radius = ring[:, :3, 3].norm(dim=-1)[:, None]  # [R, 1]
    offset = torch.rad2deg((stored[None, :, :3, 3] - ring[:, None, :3, 3]).norm(dim=-1) / radius)  # [R, V]
    sizes = torch.tensor(obj.sizes or [(0, 0)] * len(stored), dtype=torch.float64)  # [V, 2] (width, height)
    view_fovy = torch.rad2deg(2 * torch.atan(obj.K[:, 1, 2] / obj.K[:, 1, 1]))  # [V] valid where cy = H / 2:
    centred = ((obj.K[:, :2, 2] - sizes / 2).abs() <= CENTRE_TOLERANCE * sizes).all(dim=-1)
    usable = centred & (sizes[:, 0] == sizes[:, 1]) & ((view_fovy - fovy).abs() <= FOVY_TOLERANCE_DEG)  # [V]
    cost = torch.where(usable & (angle <= tolerance_deg) & (offset <= tolerance_deg), angle + offset, math.inf)
    best = cost.min(dim=1)
    missing = (~torch.isfinite(best.values)).nonzero().squeeze(1).tolist()
    if missing:
        raise BadObjectError(
            f"{obj.name}: no stored view matches ring camera(s) {missing[:8]} of {len(ring)} (radius "
            f"{float(radius[0]):g}, fovy {fovy:g}, within {tolerance_deg:g} deg, square and centred)"
        )
    return best.indices.tolist()


@dataclass
class GroundTruth:
    """What one object is measured against."""

    views: Tensor  # [R, 3, S, S] ring views on white in [0, 1]
    input_image: Image.Image  # ring view 0 as RGBA (straight alpha): what the pipeline's preprocessing takes
    mesh: trimesh.Trimesh | None  # GT surface in the ring's frame (y up), None without a mesh
    ring_files: list[str] | None = None  # folder objects: the stored view used for each ring camera


def _rgba_image(rgba: Tensor) -> Image.Image:
    """[4, H, W] straight-alpha RGBA in [0, 1] -> an 8-bit RGBA image."""
    return Image.fromarray((rgba.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy())


def _uncomposite(rgb: Tensor, alpha: Tensor) -> Tensor:
    """rgb [3, H, W] composited on white and alpha [1, H, W] -> straight RGBA [4, H, W]."""
    return torch.cat([((rgb - (1 - alpha)) / alpha.clamp(min=1e-6)).clamp(0, 1), alpha])


def load_ground_truth(source: ObjectSource, cfg: EvalConfig, ring_c2w: Tensor, fovy: float) -> GroundTruth:
    """Ring views, input image and GT mesh of one object (see the module docstring)."""
    size = cfg.image_size
    mesh = load_mesh(source.mesh, cfg.mesh_up_axis, cfg.gt_extent) if source.mesh is not None else None
    if source.kind == "mesh":
        render = render_mesh(RenderMesh.from_trimesh(mesh, source.mesh), Cameras.from_fovy(ring_c2w, fovy, size),
                             cfg.gt_supersample, cfg.gt_shading, cfg.gt_ambient)
        return GroundTruth(render.rgb, _rgba_image(_uncomposite(render.rgb[0], render.alpha[0])), mesh)
    if source.kind == "views":
        obj = read_cameras(source.path)
        ids = match_ring(obj, ring_c2w, fovy, cfg.ring_tolerance_deg)
        rgba = [read_rgba(obj.paths[i]) for i in ids]  # each [4, h, w]
        views = torch.cat([resize_on_white(x[None], size)[0] for x in rgba])  # [R, 3, S, S]
        return GroundTruth(views, _rgba_image(rgba[0]), mesh, [obj.paths[i].name for i in ids])
    raise BadObjectError(f"{source.name}: {source.problem}")


### the evaluation loop


@dataclass
class EvalSummary:
    """Results over the listed objects: per-object records, means over objects, set-level FID, conventions."""

    records: list[dict]  # per-object records (the JSON files), in evaluation order
    means: dict[str, float | str]  # metric -> mean over the objects that have it, or "unavailable"
    counts: dict[str, int]  # listed, ok, failed, evaluated (this run), resumed (done earlier), n_<metric>
    fid: float | str  # set-level over all views of all objects, or "unavailable"
    conventions: list[str] = field(default_factory=list)

    @property
    def failed(self) -> dict[str, str]:
        return {r["name"]: r.get("error", "") for r in self.records if r.get("status") != "ok"}


class Evaluator:
    """Evaluates a pipeline on a folder of objects (module docstring); ``run()`` resumes where a run stopped.

    LPIPS and FID are built here from local weights only: without them they are reported "unavailable", and a
    weights path that does not exist raises at once rather than after the loop.
    """

    def __init__(
        self,
        pipe: Gen3DiffusionPipeline,
        cfg: EvalConfig,
        sampler_cfg: SamplerConfig | None = None,
        mesh_cfg: MeshConfig | None = None,
        geometry_cfg: GeometryMetricConfig | None = None,
    ) -> None:
        cfg.validate()
        self.geometry_cfg = geometry_cfg or GeometryMetricConfig()
        self.geometry_cfg.validate()
        self.pipe, self.cfg = pipe, cfg
        self.sampler_cfg = sampler_cfg or SamplerConfig()
        self.mesh_cfg = mesh_cfg or MeshConfig()
        self.radius, self.fovy = float(pipe.cfg.cameras.radius), float(pipe.cfg.cameras.fovy)
        self.ring_c2w = evaluation_ring(cfg.ring_size, self.radius, cfg.ring_elevation, dtype=torch.float64)
        self.output = Path(cfg.output)
        self.lpips = LPIPSMetric.load(cfg.lpips_net, cfg.lpips_version, cfg.lpips_weights)
        if isinstance(self.lpips, LPIPSMetric):
            self.lpips.to(pipe.device)
        if cfg.fid_features == "inception":
            self.fid = FrechetDistance.inception(cfg.fid_weights)
        else:
            self.fid = FrechetDistance.clip(cfg.fid_weights)

    def run(self, progress: bool = True) -> EvalSummary:
        """Evaluate every listed object not done yet, then write and return the summary."""
        sources = discover_objects(self.cfg.data, self.cfg.object_list)[: self.cfg.num_objects]
        if not sources:
            raise ValueError(f"{self.cfg.data}: no objects (mesh files, GSO folders or {CAMERAS_FILE} folders)")
        for sub in ("objects", "renders", "sheets"):
            (self.output / sub).mkdir(parents=True, exist_ok=True)
        self._record_config()
        records, evaluated, resumed = [], 0, 0
        for source in tqdm(sources, desc="objects", unit="obj", disable=not progress):
            path = self.output / "objects" / f"{source.name}.json"
            previous = _read_json(path)
            if previous is not None and previous.get("status") == "ok" and not self.cfg.overwrite:
                logger.info("%s: skipped, already evaluated (%s)", source.name, path)
                records.append(previous)
                resumed += 1
                continue
            if previous is not None and previous.get("status") != "ok":
                logger.info("%s: retrying (failed before: %s)", source.name, previous.get("error"))
            record = self.evaluate_object(source)
            save_json(record, path)
            records.append(record)
            evaluated += 1
        summary = self.summarize(records, evaluated, resumed)
        write_summary(summary, self.output)
        return summary

    def evaluate_object(self, source: ObjectSource) -> dict:
        """One object's record: status "ok" with metrics, or "failed" with the error (the run goes on)."""
        start = time.perf_counter()
        record = {"name": source.name, "source": source.kind, "path": str(source.path),
                  "gt_mesh": None if source.mesh is None else str(source.mesh)}
        try:
            record.update(self._evaluate(source))
        except Exception as err:  # one bad object must not end the run: record it, with the traceback, and go on
            logger.error("%s: failed: %s: %s", source.name, type(err).__name__, err)
            return {**record, "status": "failed", "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(), "seconds": {"total": time.perf_counter() - start}}
        record["seconds"]["total"] = time.perf_counter() - start
        logger.info("%s: %s", source.name, ", ".join(
            f"{k} {v:.4g}" for k, v in record["metrics"].items() if isinstance(v, float)))
        return record

    def _evaluate(self, source: ObjectSource) -> dict:
        cfg, pipe, seconds = self.cfg, self.pipe, {}
        folder = self.output / "renders" / source.name
        folder.mkdir(parents=True, exist_ok=True)
        # 1. ground truth on the ring (meshes are rasterised on the pipeline's device)
        tick = time.perf_counter()
        gt = load_ground_truth(source, cfg, self.ring_c2w.to(pipe.device), self.fovy)
        seconds["ground_truth"] = time.perf_counter() - tick
        # 2. sample from ring view 0
        tick = time.perf_counter()
        image = preprocess_image(gt.input_image, cfg.input_border_ratio, pipe.image_size, cfg.recenter,
                                 name=source.name)
        result = pipe(image[None], seed=cfg.seed, sampler_cfg=self.sampler_cfg)
        gaussians = result.gaussians[0].to(torch.float32)
        seconds["sample"] = time.perf_counter() - tick
        # 3. the prediction on the ring; both sides quantised to 8 bits as saved PNGs
        tick = time.perf_counter()
        pred_u8, gt_u8 = to_uint8(self._render_ring(gaussians)), to_uint8(gt.views)  # [R, S, S, 3] each
        metrics, per_view, unavailable = self._image_metrics(_from_uint8(pred_u8), _from_uint8(gt_u8))
        metrics["mv_psnr"] = self._consistency(gaussians, result.views[0])
        seconds["image_metrics"] = time.perf_counter() - tick
        # 4. the predicted mesh against the GT mesh
        extra: dict[str, Any] = {}
        if cfg.geometry:
            tick = time.perf_counter()
            geometry, missing, extra = self._geometry(gaussians, gt.mesh, folder)
            metrics.update(geometry)
            unavailable.update(missing)
            seconds["geometry"] = time.perf_counter() - tick
        # 5. images and the contact sheet
        self._write_images(source.name, folder, result.images[0], result.views[0], gt_u8, pred_u8)
        return {
            "status": "ok", "metrics": metrics, "per_view": per_view, "unavailable": unavailable,
            "ring": {"size": cfg.ring_size, "image_size": cfg.image_size, "files": gt.ring_files},
            "num_gaussians": gaussians.num_gaussians, **extra, "seconds": seconds,
        }

    @torch.no_grad()
    def _render_ring(self, gaussians: Gaussians, chunk: int = 8) -> Tensor:
        """[R, 3, S, S] renders of one sample's Gaussians at the ring cameras, on white."""
        size = self.cfg.image_size
        cams = Cameras.from_fovy(self.ring_c2w.float().to(gaussians.device), self.fovy, size)
        views = [rasterize(gaussians, Cameras(cams.c2w[i:i + chunk], cams.K[i:i + chunk], size, size),
                           background=(1.0, 1.0, 1.0), cfg=self.pipe.cfg.render, depth=False).rgb[0]
                 for i in range(0, len(cams.c2w), chunk)]
        return torch.cat(views)

    @torch.no_grad()
    def _consistency(self, gaussians: Gaussians, views: Tensor) -> float:
        """Multi-view consistency: PSNR of the final generated views [V, 3, H, W] against renders of the output
        Gaussians from the same V target cameras (mean over views)."""
        V, _, H, W = views.shape
        cams = Cameras.from_fovy(target_cameras(self.radius).to(gaussians.device), self.fovy, W, H)
        render = rasterize(gaussians, cams, background=(1.0, 1.0, 1.0), cfg=self.pipe.cfg.render,
                           depth=False).rgb[0]
        return float(psnr(render.clamp(0, 1).cpu(), views.float().cpu()).double().mean())

    def _image_metrics(self, pred: Tensor, gt: Tensor) -> tuple[dict, dict, dict]:
        """Means over the ring, per-view values and unavailable metrics of pred, gt [R, 3, S, S] in [0, 1]."""
        values = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt, self.cfg.ssim_variant)}
        unavailable = {}
        if isinstance(self.lpips, LPIPSMetric):
            device = self.pipe.device
            values["lpips"] = torch.cat([self.lpips(p.to(device), g.to(device)).cpu()
                                         for p, g in zip(pred.split(8), gt.split(8))])
        else:
            unavailable["lpips"] = self.lpips.reason
        per_view = {key: v.double().tolist() for key, v in values.items()}
        means = {key: float(v.double().mean()) for key, v in values.items()}
        means.update({key: UNAVAILABLE for key in unavailable})
        return means, per_view, unavailable

    def _geometry(self, gaussians: Gaussians, gt_mesh: trimesh.Trimesh | None,
                  folder: Path) -> tuple[dict, dict, dict]:
        """Extract and save the predicted mesh; return the geometry metrics ("unavailable" without a GT mesh), the
        reasons for unavailable ones, and extra fields to record (mesh size, ICP result)."""
        mesh = extract_mesh(gaussians, self.mesh_cfg, self.radius, self.fovy)
        save_mesh(mesh, folder / "mesh")
        extra: dict[str, Any] = {"mesh_faces": len(mesh.triangles)}
        if gt_mesh is None:
            return {key: UNAVAILABLE for key in GEOMETRY_METRICS}, {"geometry": "no GT mesh"}, extra
        pred = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.triangles), process=False)
        result = evaluate_meshes(pred, gt_mesh, self.geometry_cfg)
        if result.alignment is not None:
            extra["icp"] = {"scale": result.alignment.transform.scale, "iterations": result.alignment.iterations,
                            "mean_distance": result.alignment.mean_distance}
        return result.as_dict(), {}, extra

    def _write_images(self, name: str, folder: Path, image: Tensor, views: Tensor, gt_u8: np.ndarray,
                      pred_u8: np.ndarray) -> None:
        """input.png, gt_XXX.png / pred_XXX.png per ring view, and the contact sheet: the input and the generated
        views, then ``sheet_views`` GT ring views over the predicted ones."""
        save_png(to_uint8(image), folder / "input.png")
        for k, (gt_view, pred_view) in enumerate(zip(gt_u8, pred_u8)):
            save_png(gt_view, folder / f"gt_{k:03d}.png")
            save_png(pred_view, folder / f"pred_{k:03d}.png")
        ring, size = len(gt_u8), self.cfg.image_size
        count = min(self.cfg.sheet_views, ring)
        picks = [k * ring // count for k in range(count)]  # evenly spaced, starting at the input view
        first = np.asarray(Image.fromarray(to_uint8(image)).resize((size, size), Image.Resampling.BICUBIC))
        rows = [[first, *to_uint8(views)], [gt_u8[k] for k in picks], [pred_u8[k] for k in picks]]  # cells: S px
        save_png(image_grid(rows), self.output / "sheets" / f"{name}.png")

    def summarize(self, records: list[dict], evaluated: int = 0, resumed: int = 0) -> EvalSummary:
        """Means over the objects that have each metric, set-level FID from the saved views, counts, conventions."""
        ok = [r for r in records if r.get("status") == "ok"]
        keys = IMAGE_METRICS + (GEOMETRY_METRICS if self.cfg.geometry else ())
        means: dict[str, float | str] = {}
        counts = {"listed": len(records), "ok": len(ok), "failed": len(records) - len(ok),
                  "evaluated": evaluated, "resumed": resumed}
        for key in keys:
            values = [r["metrics"][key] for r in ok if isinstance(r["metrics"].get(key), (int, float))]
            means[key] = float(np.mean(values)) if values else UNAVAILABLE
            counts[f"n_{key}"] = len(values)
        fid, fid_note = self._set_level_fid(ok)
        return EvalSummary(records, means, counts, fid, self.conventions(fid_note))

    def _set_level_fid(self, ok: list[dict]) -> tuple[float | str, str]:
        if isinstance(self.fid, MetricUnavailable):
            return UNAVAILABLE, f"unavailable ({self.fid.reason})"
        self.fid.reset()
        self.fid.to(self.pipe.device)
        for record in ok:
            folder, ring = self.output / "renders" / record["name"], record["ring"]["size"]
            self.fid.update(pred=_read_views(folder, "pred", ring), target=_read_views(folder, "gt", ring))
        views = sum(r["ring"]["size"] for r in ok)
        if views < 2:
            return UNAVAILABLE, f"{self.fid.name}: needs at least 2 views per set, got {views}"
        return self.fid.compute(), f"{self.fid.describe()}; {views} predicted vs {views} GT views"

    def conventions(self, fid_note: str) -> list[str]:
        """One line per convention behind the numbers, printed and saved with them."""
        cfg, sampler, mesh = self.cfg, self.sampler_cfg, self.mesh_cfg
        size, step = cfg.image_size, 360.0 / cfg.ring_size
        lpips = self.lpips.describe() if isinstance(self.lpips, LPIPSMetric) else f"unavailable ({self.lpips.reason})"
        return [
            f"ring: {cfg.ring_size} views at elevation {cfg.ring_elevation:g} deg, azimuth k x {step:g} deg from the "
            f"input view (k = 0), radius {self.radius:g}, fovy {self.fovy:g} deg, {size}x{size} px, white background",
            "input: ring view 0, " + (f"recentred with border ratio {cfg.input_border_ratio:g}" if cfg.recenter
                                        else "not recentred") + f", to {self.pipe.image_size} px;"
            f" seed {cfg.seed}; {sampler.num_steps} DDIM steps, guidance {sampler.guidance_scale:g}, "
            f"refinement {'on' if sampler.refine else 'off'}; weights {cfg.weights or '-'}",
            f"GT meshes: up axis {cfg.mesh_up_axis} (auto: y for glTF, z otherwise), centred, max extent "
            f"{cfg.gt_extent:g}, z-buffer rasteriser, {cfg.gt_shading} shading (ambient {cfg.gt_ambient:g}), "
            f"{cfg.gt_supersample}x{cfg.gt_supersample} samples per pixel; folder objects: stored views matching the "
            f"ring cameras within {cfg.ring_tolerance_deg:g} deg, resized (antialiased) to {size} px",
            "images quantised to 8 bits before every metric; per view, mean over the ring, then mean over objects",
            "PSNR: 10 log10(1 / MSE), MSE over all pixels and channels, white background included",
            f"SSIM: variant {cfg.ssim_variant!r} (see docs/evaluation.md), data range 1, mean over channels",
            f"LPIPS: {lpips}",
            f"FID: {fid_note}",
            f"predicted mesh: TSDF fusion of {mesh.num_views} depth renders at {mesh.resolution} px, {mesh.voxels}^3 "
            f"voxels in [-{mesh.bound:g}, {mesh.bound:g}]^3" if cfg.geometry else "geometry: not evaluated",
            *(f"geometry {line}" for line in (self.geometry_cfg.describe().splitlines() if cfg.geometry else [])),
        ]

    def _record_config(self) -> None:
        """Save the resolved settings; when resuming, warn about every setting that changed since."""
        current = json.loads(json.dumps({
            "eval": to_dict(self.cfg), "sampler": to_dict(self.sampler_cfg), "mesh": to_dict(self.mesh_cfg),
            "geometry": to_dict(self.geometry_cfg), "camera": {"radius": self.radius, "fovy": self.fovy},
        }, default=str))
        path = self.output / "eval_config.json"
        previous = _read_json(path)
        if previous is not None:
            changed = [f"{section}.{key}: {previous.get(section, {}).get(key)!r} -> {value!r}"
                       for section, values in current.items() for key, value in values.items()
                       if key not in RUN_ONLY_FIELDS and previous.get(section, {}).get(key) != value]
            if changed:
                logger.warning("%s: settings differ from the run that wrote it (objects evaluated then keep the old "
                               "ones; pass --overwrite to redo them): %s", path, "; ".join(changed))
        save_json(current, path)



def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _from_uint8(images: np.ndarray) -> Tensor:
    """[..., H, W, 3] uint8 -> [..., 3, H, W] float in [0, 1]."""
    return torch.from_numpy(images).movedim(-1, -3).float() / 255.0


def _read_views(folder: Path, prefix: str, count: int) -> Tensor:
    """The saved ring views ``<prefix>_000.png ...`` of one object as [count, 3, S, S] in [0, 1]."""
    views = []
    for k in range(count):
        with Image.open(folder / f"{prefix}_{k:03d}.png") as im:
            views.append(np.asarray(im.convert("RGB")))
    return _from_uint8(np.stack(views))


### the summary files


SUMMARY_COLUMNS = ("name", "status", "source", *IMAGE_METRICS, *GEOMETRY_METRICS, "seconds", "error")
METRIC_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "mv_psnr": "MV consistency PSNR",
                 "chamfer": "Chamfer", "p2s": "P2S",
                 "normal_consistency": "NC", "fscore": "F-score", "precision": "precision", "recall": "recall"}


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))


def _summary_rows(summary: EvalSummary) -> list[dict[str, Any]]:
    rows = []
    for r in summary.records:
        metrics = r.get("metrics", {})
        rows.append({"name": r["name"], "status": r.get("status"), "source": r.get("source"),
                     **{key: metrics.get(key) for key in (*IMAGE_METRICS, *GEOMETRY_METRICS)},
                     "seconds": r.get("seconds", {}).get("total"), "error": r.get("error")})
    rows.append({"name": "mean", "status": f"{summary.counts['ok']} ok", **summary.means})
    return rows


def write_summary(summary: EvalSummary, output: str | Path) -> list[Path]:
    """Write ``summary.csv`` (one row per object, then the means), ``summary.md`` (means, FID, counts,
    conventions, per-object table, failures) and ``summary.json``; each atomically."""
    output = Path(output)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in _summary_rows(summary):
        writer.writerow({key: _cell(row.get(key)) for key in SUMMARY_COLUMNS})
    paths = [_write_text(buffer.getvalue(), output / "summary.csv"),
             _write_text(summary_markdown(summary), output / "summary.md")]
    paths.append(save_json({"means": summary.means, "fid": summary.fid, "counts": summary.counts,
                            "failed": summary.failed, "conventions": summary.conventions}, output / "summary.json"))
    return paths


def summary_markdown(summary: EvalSummary, per_object: bool = True) -> str:
    """The summary as Markdown: means over objects, FID, counts, conventions, then (``per_object``) a row per
    object and the failures."""
    c = summary.counts
    lines = ["# Evaluation summary", "", "| metric | mean over objects | objects |", "|---|---|---|"]
    lines += [f"| {METRIC_LABELS[k]} | {_cell(v)} | {c[f'n_{k}']} |" for k, v in summary.means.items()]
    lines += [f"| FID (set-level) | {_cell(summary.fid)} | {c['ok']} |", "",
              f"Objects: {c['listed']} listed, {c['ok']} ok ({c['evaluated']} evaluated in this run, {c['resumed']} "
              f"done earlier), {c['failed']} failed.", "", "## Conventions", ""]
    lines += [f"- {line}" for line in summary.conventions]
    if not per_object:
        return "\n".join(lines) + "\n"
    keys = list(summary.means)
    lines += ["", "## Objects", "", "| object | status | " + " | ".join(METRIC_LABELS[k] for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for r in summary.records:
        metrics = r.get("metrics", {})
        lines.append(f"| {r['name']} | {r.get('status')} | " + " | ".join(_cell(metrics.get(k)) for k in keys) + " |")
    if summary.failed:
        lines += ["", "## Failed", ""] + [f"- `{name}`: {error}" for name, error in summary.failed.items()]
    return "\n".join(lines) + "\n"


def _write_text(text: str, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
