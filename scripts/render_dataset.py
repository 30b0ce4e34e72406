"""Render mesh files (.glb / .gltf / .obj / .ply) into the project's multi-view folder format with Blender.

    python scripts/render_dataset.py --input MESHES --output DIR [--task objects|avatars] [--views ring|rig132]
        [--size 256] [--engine CYCLES|EEVEE|WORKBENCH] [--samples 16] [--overwrite]

``--input`` is a mesh file, a folder (searched recursively for the suffixes above) or a glob. Each mesh becomes
``DIR/<file stem>/`` (cameras.json + RGBA PNGs), readable by ``MultiViewFolderDataset``. Objects whose folder is
already complete are skipped, so an interrupted run resumes. Files that fail to import are reported by name and
skipped; the exit status is 1 if any failed. Axes and camera conventions: ``gen3diffusion/data/blender.py``.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from gen3diffusion.data import DataConfig, max_extent
from gen3diffusion.data.blender import (
    ENGINES, MESH_SUFFIXES, MeshImportError, RenderSettings, render_mesh, view_cameras,
)  # fmt: skip
from gen3diffusion.data.multiview import CAMERAS_FILE

logger = logging.getLogger("render_dataset")


def find_meshes(pattern: str) -> list[Path]:
    """Mesh files named by ``pattern``: one file, every mesh under a folder, or the matches of a glob (sorted)."""
    path = Path(pattern)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = [p for p in path.rglob("*") if p.is_file()]
    else:
        candidates = [Path(p) for p in glob.glob(pattern, recursive=True)]
    meshes = sorted(p for p in candidates if p.suffix.lower() in MESH_SUFFIXES)
    if not meshes:
        raise FileNotFoundError(f"{pattern}: no mesh files ({', '.join(MESH_SUFFIXES)}) found")
    stems: dict[str, Path] = {}
    for mesh in meshes:
        if mesh.stem in stems:
            raise ValueError(f"{stems[mesh.stem]} and {mesh} would both write object {mesh.stem!r}; rename one")
        stems[mesh.stem] = mesh
    return meshes


def is_complete(folder: Path, num_views: int) -> bool:
    """Whether ``folder`` holds a cameras.json with ``num_views`` views whose images all exist."""
    try:
        views = json.loads((folder / CAMERAS_FILE).read_text())["views"]
    except (OSError, ValueError, KeyError):
        return False
    return len(views) == num_views and all((folder / view["file"]).is_file() for view in views)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render meshes into multi-view folders (cameras.json + RGBA PNGs).")
    parser.add_argument("--input", required=True, help="a mesh file, a folder of meshes, or a glob")
    parser.add_argument("--output", required=True, help="dataset root; one sub-folder per mesh (its file stem)")
    parser.add_argument("--task", choices=("objects", "avatars"), default="objects",
                        help="max extent 0.8 (objects) or 1.0 (avatars); also picks the rig132 spiral")
    parser.add_argument("--views", choices=("ring", "rig132"), default="ring",
                        help="ring: 32 views at elevation 0; rig132: the authors' 100-view spiral, then the ring")
    parser.add_argument("--size", type=int, default=256, help="pixels per side")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="CYCLES",
                        help="CYCLES (CPU, headless; default), WORKBENCH (fastest, studio light), EEVEE")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (denoised)")
    parser.add_argument("--overwrite", action="store_true", help="re-render objects whose folder is complete")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    meshes = find_meshes(args.input)
    settings = RenderSettings(
        size=args.size, engine=args.engine, samples=args.samples, max_extent=max_extent(DataConfig(task=args.task))
    )
    c2w = view_cameras(args.views, args.task, settings.radius)  # [V, 4, 4] OpenGL world
    output = Path(args.output)
    failed: list[str] = []
    skipped = 0
    for mesh in tqdm(meshes, desc="objects", unit="obj", disable=args.quiet):
        folder = output / mesh.stem
        if not args.overwrite and is_complete(folder, len(c2w)):
            skipped += 1
            continue
        try:
            render_mesh(mesh, folder, c2w, settings, overwrite=True)
        except MeshImportError as err:
            logger.error("skipped %s: %s", mesh.name, err)
            failed.append(mesh.name)
    rendered = len(meshes) - skipped - len(failed)
    logger.info("%d rendered, %d already complete, %d failed -> %s", rendered, skipped, len(failed), output)
    if failed:
        logger.error("failed objects: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
