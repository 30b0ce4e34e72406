"""Render mesh files into the project's multi-view folder format with Blender's Python module ``bpy``.

One object per call of :func:`render_mesh`: reset the scene, import the mesh, centre it and scale it to the task's
max extent, light it, render RGBA views from orbit cameras and write them with
:func:`gen3diffusion.data.multiview.write_object`.

Axes. Every supported format is read as **y-up** (glTF's convention, and Blender's default for OBJ; PLY is read
with the same axes), and Blender's importers turn y-up into its z-up world by ``y_gl = z_blender``,
``z_gl = -y_blender``, which is exactly :func:`cameras.blender_to_opengl`. So the project's OpenGL world *is* the
mesh file's own frame (after normalisation): the azimuth-0 camera sits on the file's +z axis looking toward -z,
with +x on the image's right and +y up; azimuth 90 sits on +x (:func:`cameras.orbit_camera`).

``bpy`` is imported lazily: only rendering needs it (``pip install bpy``; wheels exist for Python 3.11 only).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gen3diffusion.cameras import blender_to_opengl, intrinsics_from_fovy, opengl_to_blender, orbit_camera
from gen3diffusion.data import RING_STEP_DEG, RING_VIEWS

__all__ = [
    "MESH_SUFFIXES", "ENGINES", "MeshImportError", "RenderSettings", "view_cameras", "render_mesh", "import_bpy",
]  # fmt: skip

logger = logging.getLogger(__name__)

MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")
ENGINES = {"EEVEE": "BLENDER_EEVEE", "CYCLES": "CYCLES", "WORKBENCH": "BLENDER_WORKBENCH"}
SPIRAL_VIEWS = 100  # views 0..99 of the authors' 132-view rig


class MeshImportError(ValueError):
    """A mesh file that Blender could not import (or that holds no geometry); the message names the file."""


@dataclass
class RenderSettings:
    """How one object is rendered; defaults are the project's rig (radius 1.5, fovy 49.1) at 256 px."""

    # pixels per side of every (square) view
    size: int = 256
    # "CYCLES" (CPU path tracer; works headless), "EEVEE" or "WORKBENCH" (need an OpenGL/EGL context)
    engine: str = "CYCLES"
    # Cycles samples per pixel (denoised afterwards); ignored by the other engines
    samples: int = 16
    # the object's bounding box is centred and scaled to this max extent (0.8 objects, 1.0 avatars)
    max_extent: float = 0.8
    # orbit radius and vertical field of view (deg) of every camera
    radius: float = 1.5
    fovy: float = 49.1
    # power (W) of each of the 8 area lights at (+-7, +-7, +-7), and the strength of the white world light
    light_power: float = 300.0
    ambient: float = 0.3

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {self.engine!r}")
        if self.size <= 0 or self.samples <= 0 or self.max_extent <= 0:
            raise ValueError(f"size, samples and max_extent must be positive, got {self.size}, {self.samples}, "
                             f"{self.max_extent}")  # fmt: skip


def import_bpy():
    """Import ``bpy`` or raise an ImportError that says how to install it."""
    try:
        import bpy
    except ImportError as err:
        raise ImportError(
            "rendering meshes needs bpy: pip install bpy (Blender's Python module; wheels exist for Python 3.11)"
        ) from err
    return bpy


def view_cameras(views: str = "ring", task: str = "objects", radius: float = 1.5) -> Tensor:
    """Camera-to-world poses ``[V, 4, 4]`` (float64, OpenGL world y-up) of a render rig.

    ``ring``: the 32-view elevation-0 ring at azimuth 11.25 k, what both camera modes of the folder datasets need.
    ``rig132``: the authors' rig, a 100-view spiral then the same ring (views 100..131). Spiral view i has azimuth
    i * 3600/132 deg (10 turns) and elevation -60 + 1.2 i for objects; i * 1800/132 (5 turns) and -45 + i * 105/132
    for avatars. These equal the official ``cam_poses`` files under :func:`cameras.blender_to_opengl`.
    """
    if views not in ("ring", "rig132"):
        raise ValueError(f"views must be 'ring' or 'rig132', got {views!r}")
    if task not in ("objects", "avatars"):
        raise ValueError(f"task must be 'objects' or 'avatars', got {task!r}")
    ring = orbit_camera(0.0, torch.arange(RING_VIEWS, dtype=torch.float64) * RING_STEP_DEG, radius)  # [32, 4, 4]
    if views == "ring":
        return ring
    i = torch.arange(SPIRAL_VIEWS, dtype=torch.float64)
    if task == "objects":
        elevation, azimuth = -60.0 + 1.2 * i, i * (3600.0 / 132)
    else:
        elevation, azimuth = -45.0 + i * (105.0 / 132), i * (1800.0 / 132)
    return torch.cat([orbit_camera(elevation, azimuth, radius), ring])  # [132, 4, 4]


### scene


def _reset_scene(bpy) -> None:
    """Factory settings with an empty scene, so nothing of the previous object survives."""
    bpy.ops.wm.read_factory_settings(use_empty=True)


def _import_mesh(bpy, path: Path) -> list:
    """Import ``path`` with the importer of its suffix (all read y-up); returns the new objects."""
    suffix = path.suffix.lower()
    before = set(bpy.data.objects)
    try:
        if suffix in (".glb", ".gltf"):
            result = bpy.ops.import_scene.gltf(filepath=str(path))
        elif suffix == ".obj":
            result = bpy.ops.wm.obj_import(filepath=str(path), forward_axis="NEGATIVE_Z", up_axis="Y")
        elif suffix == ".ply":
            result = bpy.ops.wm.ply_import(filepath=str(path), forward_axis="NEGATIVE_Z", up_axis="Y")
        else:
            raise MeshImportError(f"{path}: unsupported suffix {suffix!r}; expected one of {MESH_SUFFIXES}")
    except RuntimeError as err:  # bpy operators report failures as RuntimeError
        raise MeshImportError(f"{path}: Blender could not import it ({str(err).strip()})") from err
    if "FINISHED" not in result:
        raise MeshImportError(f"{path}: Blender's importer returned {sorted(result)}")
    new = [obj for obj in bpy.data.objects if obj not in before]
    for obj in [o for o in new if o.type in ("CAMERA", "LIGHT")]:  # glTF files may carry their own rig
        bpy.data.objects.remove(obj, do_unlink=True)
    new = [obj for obj in bpy.data.objects if obj not in before]
    if not any(obj.type == "MESH" and len(obj.data.vertices) for obj in new):
        raise MeshImportError(f"{path}: no mesh geometry after import")
    return new


def _world_bounds(bpy, objects: list) -> tuple[np.ndarray, np.ndarray]:
    """Min and max corners ``[3]`` (Blender world) of the evaluated vertices of the mesh objects."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for obj in objects:
        if obj.type != "MESH":
            continue
        evaluated = obj.evaluated_get(depsgraph)
        mesh = evaluated.to_mesh()
        coords = np.empty(len(mesh.vertices) * 3, dtype=np.float64)
        mesh.vertices.foreach_get("co", coords)
        evaluated.to_mesh_clear()
        if coords.size == 0:
            continue
        matrix = np.array(evaluated.matrix_world, dtype=np.float64)  # [4, 4]
        points = coords.reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]  # [N, 3]
        lo, hi = np.minimum(lo, points.min(0)), np.maximum(hi, points.max(0))
    return lo, hi


def _normalize(bpy, objects: list, max_extent: float) -> None:
    """Centre the bounding box of ``objects`` at the origin and scale its largest side to ``max_extent``."""
    from mathutils import Matrix

    lo, hi = _world_bounds(bpy, objects)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise MeshImportError(f"degenerate bounding box {lo.tolist()} .. {hi.tolist()}")
    scale = max_extent / extent
    centre = (lo + hi) / 2
    transform = Matrix.Diagonal((scale, scale, scale, 1.0)) @ Matrix.Translation(tuple(-centre))
    for obj in objects:
        if obj.parent is None:
            obj.matrix_world = transform @ obj.matrix_world
    bpy.context.view_layer.update()


def _setup_render(bpy, settings: RenderSettings) -> None:
    """Engine, size, transparent film (RGBA PNG, straight alpha), Standard colours, white world, 8 area lights."""
    from mathutils import Vector

    scene = bpy.context.scene
    render = scene.render
    render.engine = ENGINES[settings.engine]
    render.resolution_x = render.resolution_y = settings.size
    render.resolution_percentage = 100
    render.film_transparent = True
    render.image_settings.file_format = "PNG"
    render.image_settings.color_mode = "RGBA"
    render.image_settings.color_depth = "8"
    scene.view_settings.view_transform = "Standard"
    if settings.engine == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = settings.samples
        scene.cycles.use_denoising = True
    elif settings.engine == "WORKBENCH":
        shading = scene.display.shading
        shading.light, shading.color_type = "STUDIO", "TEXTURE"
        shading.use_world_space_lighting = True  # light fixed to the world, so views agree with each other

    world = bpy.data.worlds.new("white")
    if world.node_tree is None:  # Blender < 5 creates worlds without nodes
        world.use_nodes = True
    background = world.node_tree.nodes["Background"]
    background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
    background.inputs["Strength"].default_value = settings.ambient
    scene.world = world

    for index, corner in enumerate(np.array(np.meshgrid(*[(-7.0, 7.0)] * 3)).reshape(3, -1).T):
        light = bpy.data.lights.new(f"area_{index}", "AREA")
        light.energy, light.size = settings.light_power, 5.0
        obj = bpy.data.objects.new(f"area_{index}", light)
        obj.location = Vector(corner.tolist())
        obj.rotation_euler = (-obj.location).to_track_quat("-Z", "Y").to_euler()  # area lights shine along -z
        scene.collection.objects.link(obj)

    camera = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
    camera.data.sensor_fit = "VERTICAL"
    camera.data.lens = camera.data.sensor_height / 2 / math.tan(math.radians(settings.fovy) / 2)
    camera.data.clip_start, camera.data.clip_end = 0.01, 100.0
    scene.collection.objects.link(camera)
    scene.camera = camera


def _render_views(bpy, c2w_blender: Tensor, workdir: Path) -> Tensor:
    """Render the scene camera at each pose ``[V, 4, 4]`` (Blender world); returns RGBA uint8 ``[V, 4, H, W]``."""
    from mathutils import Matrix

    scene = bpy.context.scene
    images = []
    for v, pose in enumerate(c2w_blender.tolist()):
        scene.camera.matrix_world = Matrix(pose)
        scene.render.filepath = str(workdir / f"{v:03d}.png")
        bpy.ops.render.render(write_still=True)
        with Image.open(scene.render.filepath) as image:
            images.append(torch.from_numpy(np.asarray(image.convert("RGBA")).copy()).permute(2, 0, 1))
    return torch.stack(images)  # [V, 4, H, W]


def render_mesh(
    mesh: str | Path, folder: str | Path, c2w: Tensor, settings: RenderSettings, *, overwrite: bool = False
) -> Path:
    """Render ``mesh`` at the OpenGL poses ``c2w [V, 4, 4]`` and write the object to ``folder``.

    The stored poses are the Blender poses that were rendered, converted back with
    :func:`cameras.blender_to_opengl` (exact, float64); K follows from ``settings.fovy`` and ``size``. Raises
    MeshImportError when the file cannot be imported; the folder is written atomically, so a failure leaves none.
    """
    from gen3diffusion.data.multiview import write_object

    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"c2w must be [V, 4, 4], got {tuple(c2w.shape)}")
    mesh = Path(mesh)
    if not mesh.is_file():
        raise MeshImportError(f"{mesh}: no such file")
    bpy = import_bpy()
    _reset_scene(bpy)
    objects = _import_mesh(bpy, mesh)
    try:
        _normalize(bpy, objects, settings.max_extent)
    except MeshImportError as err:
        raise MeshImportError(f"{mesh}: {err}") from err
    _setup_render(bpy, settings)
    c2w_blender = opengl_to_blender(c2w.to(torch.float64))  # [V, 4, 4]
    with tempfile.TemporaryDirectory(prefix="g3d_render_") as workdir:
        rgba = _render_views(bpy, c2w_blender, Path(workdir))  # [V, 4, H, W] uint8
    K = intrinsics_from_fovy(settings.fovy, settings.size, settings.size, dtype=torch.float64)
    return write_object(folder, rgba, blender_to_opengl(c2w_blender), K, overwrite=overwrite)
