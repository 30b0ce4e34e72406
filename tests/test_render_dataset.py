"""scripts/render_dataset.py and gen3diffusion/data/blender.py: render a mesh written here with Blender and check the
folder against closed forms: cameras on the ring, silhouette size from the fov and the normalisation, handedness,
the same picture from every importer, resume, and a broken file reported and skipped.

The mesh is an "L": a bar x in [-0.4, 0.4], y in [-0.2, 0], z in [-0.1, 0.1] with a tower x in [0.2, 0.4],
y in [0, 0.2] on its +x end (max extent 0.8, bounding box centred), written scaled by 3 and shifted so that only the
renderer's normalisation brings it back. At azimuth 0 (camera on +z) the front face z = 0.1 lies at depth 1.4.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import reference_dir
from gen3diffusion.cameras import blender_to_opengl
from gen3diffusion.data import DataConfig
from gen3diffusion.data.blender import RenderSettings, render_mesh, view_cameras
from gen3diffusion.data.multiview import MultiViewFolderDataset
from tiny_weights import load_script

SIZE = 64
FOVY = 49.1
FOCAL = SIZE / 2 / math.tan(math.radians(FOVY) / 2)  # pixels
FRONT_DEPTH = 1.5 - 0.1  # camera at z = 1.5, front face at z = 0.1

needs_bpy = pytest.mark.skipif(
    importlib.util.find_spec("bpy") is None, reason="bpy not installed (pip install bpy; Python 3.11 wheels)"
)


def l_shape():
    trimesh = pytest.importorskip("trimesh")
    bar = trimesh.creation.box(extents=(0.8, 0.2, 0.2))
    bar.apply_translation((0.0, -0.1, 0.0))
    tower = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    tower.apply_translation((0.3, 0.1, 0.0))
    mesh = trimesh.util.concatenate([bar, tower])
    mesh.apply_scale(3.0)
    mesh.apply_translation((5.0, 2.0, -1.0))
    return mesh


def alpha(folder, view: int) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{view:03d}.png"))[..., 3].astype(np.float64) / 255  # [H, W]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Run the script once over the L (.obj) and two broken files; returns (output root, exit code, log text)."""
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("bpy not installed (pip install bpy; Python 3.11 wheels)")
    meshes = tmp_path_factory.mktemp("meshes")
    l_shape().export(meshes / "lshape.obj")
    (meshes / "broken.glb").write_bytes(b"this is not a glTF file")
    (meshes / "empty.ply").write_text("ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    out = tmp_path_factory.mktemp("out")
    script = load_script("render_dataset")
    argv = ["--input", str(meshes), "--output", str(out), "--size", str(SIZE), "--samples", "4", "--quiet"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        code = script.main(argv)
    finally:
        logging.getLogger().removeHandler(handler)
    return out, code, "\n".join(r.getMessage() for r in records), script, argv


@needs_bpy
def test_broken_files_reported_and_skipped(rendered):
    out, code, log, _, _ = rendered
    assert code == 1
    assert "broken.glb" in log and "empty.ply" in log
    assert sorted(p.name for p in out.iterdir()) == ["lshape"]


@needs_bpy
def test_cameras_are_the_ring(rendered):
    out = rendered[0]
    views = json.loads((out / "lshape" / "cameras.json").read_text())["views"]
    c2w = torch.tensor([v["c2w"] for v in views], dtype=torch.float64)  # [32, 4, 4]
    torch.testing.assert_close(c2w, view_cameras("ring"), rtol=0, atol=1e-12)
    position = c2w[:, :3, 3]
    torch.testing.assert_close(position.norm(dim=-1), torch.full((32,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(c2w[:, :3, 2], position / 1.5)  # camera looks down -z, at the origin
    azimuth = torch.rad2deg(torch.atan2(position[:, 0], position[:, 2])) % 360
    torch.testing.assert_close(azimuth, torch.arange(32, dtype=torch.float64) * 11.25, rtol=0, atol=1e-9)
    assert all(v["width"] == v["height"] == SIZE for v in views)
    assert views[0]["K"][1][1] == pytest.approx(FOCAL, rel=1e-12)


@needs_bpy
@pytest.mark.parametrize("task", ["objects", "avatars"])
def test_folder_loads_with_the_reader(rendered, task):
    cfg = DataConfig(kind="folder", root=str(rendered[0]), task=task, image_size=SIZE, sup_size=SIZE, num_sup_views=4)
    dataset = MultiViewFolderDataset(cfg)
    assert len(dataset) == 1 and not dataset.skipped
    sample = dataset[0]
    assert sample["target_images"].shape == (4, 3, SIZE, SIZE)
    assert 0.0 < sample["sup_masks"].mean() < 0.5


@needs_bpy
def test_silhouette_matches_normalisation(rendered):
    a = alpha(rendered[0] / "lshape", 0)
    bar_row = int(SIZE / 2 + FOCAL * 0.1 / FRONT_DEPTH)  # y = -0.1, the middle of the bar
    expected_width = 0.8 * FOCAL / FRONT_DEPTH  # 40.0 px
    assert a[bar_row].sum() == pytest.approx(expected_width, abs=1.0)  # antialiased edges: within a pixel
    columns = np.nonzero(a.max(0) > 0.5)[0]
    assert columns[0] == pytest.approx(SIZE / 2 - expected_width / 2, abs=1.0)
    rows = np.nonzero(a.max(1) > 0.5)[0]
    assert rows[-1] + 1 - rows[0] == pytest.approx(0.4 * FOCAL / FRONT_DEPTH, abs=1.5)  # full height 0.4


@needs_bpy
def test_front_view_handedness(rendered):
    """The tower on +x shows on the right at azimuth 0 (camera on +z) and on the left at azimuth 180; +y is up."""
    folder = rendered[0] / "lshape"
    tower_row = int(SIZE / 2 - FOCAL * 0.1 / FRONT_DEPTH)  # y = +0.1, only the tower reaches it
    left, right = slice(0, SIZE // 2), slice(SIZE // 2, SIZE)
    front, back = alpha(folder, 0)[tower_row], alpha(folder, 16)[tower_row]
    assert front[right].sum() > 5 and front[left].sum() == 0
    assert back[left].sum() > 5 and back[right].sum() == 0


@needs_bpy
def test_object_is_lit_and_not_white(rendered):
    rgba = np.asarray(Image.open(rendered[0] / "lshape" / "000.png")).astype(np.float64)
    inside = rgba[..., 3] == 255
    assert 60 < rgba[..., :3][inside].mean() < 250


@needs_bpy
def test_resume_skips_complete_objects(rendered):
    out, _, _, script, argv = rendered
    cameras = out / "lshape" / "cameras.json"
    before = cameras.stat().st_mtime_ns
    assert script.main(argv) == 1  # the broken files still fail
    assert cameras.stat().st_mtime_ns == before


@needs_bpy
@pytest.mark.parametrize("suffix", [".glb", ".ply"])
def test_importers_agree_on_axes(rendered, tmp_path, suffix):
    """glTF and PLY give the OBJ's picture: every importer reads the file's y-up frame as the OpenGL world."""
    l_shape().export(tmp_path / f"lshape{suffix}")
    c2w = view_cameras("ring")[[0, 8]]
    folder = render_mesh(tmp_path / f"lshape{suffix}", tmp_path / "out", c2w, RenderSettings(size=SIZE, samples=4))
    reference = rendered[0] / "lshape"
    for ours, theirs in ((0, 0), (1, 8)):
        assert np.abs(alpha(folder, ours) - alpha(reference, theirs)).max() < 0.1


@pytest.mark.parametrize("task", ["objects", "avatars"])
def test_rig132_matches_official_poses(task):
    """The 132-view rig equals the authors' cam_poses (Blender world) under blender_to_opengl; no bpy needed."""
    ref = reference_dir()
    if ref is None or not (ref / "official_cameras.json").is_file():
        pytest.skip("shared/reference/official_cameras.json not available")
    data = json.loads((ref / "official_cameras.json").read_text())
    views = dict(data["views"])
    if task == "avatars":
        views.update({k: {**views[k], **v} for k, v in data["human3diffusion_cam_poses"]["differing_views"].items()})
    official = torch.tensor([views[str(i)]["c2w"] for i in range(132)], dtype=torch.float64)
    torch.testing.assert_close(view_cameras("rig132", task), blender_to_opengl(official), rtol=0, atol=1e-9)
