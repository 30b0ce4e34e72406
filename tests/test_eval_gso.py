"""scripts/eval_gso.py and gen3diffusion.eval.runner on tiny random weights: every output is written, a rerun resumes
(finished objects are skipped, not rewritten), a broken object is recorded while the others finish, and the GT mesh
rasteriser matches closed forms (silhouette areas, depths, texture orientation, shading)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from gen3diffusion.cameras import Cameras, evaluation_ring, intrinsics_from_fovy, orbit_camera, target_cameras
from gen3diffusion.data import DataConfig
from gen3diffusion.data.multiview import BadObjectError, ObjectViews
from gen3diffusion.data.synthetic import write_synthetic_dataset
from gen3diffusion.eval.backbones import LoadedBackbone
from gen3diffusion.eval.image_metrics import FrechetDistance, LPIPSMetric, frechet_distance_of_features, psnr
from gen3diffusion.eval.runner import RenderMesh, discover_objects, load_mesh, match_ring, render_mesh
from tiny_weights import TINY_IMAGE_SIZE, load_script

RING = 8
FOVY = 49.1
TEXTURE = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)  # 2 x 2 texels


eval_gso = load_script("eval_gso")
pytestmark = pytest.mark.usefixtures("tiny_3d_config")  # conftest.py


@pytest.fixture(autouse=True)
def no_metric_weights(monkeypatch, tmp_path):
    """No LPIPS / FID backbone anywhere: the metrics must come out 'unavailable', never computed on random weights."""
    for var in ("LPIPS_BACKBONE", "FID_INCEPTION_WEIGHTS", "CLIP_FEATURES_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def write_gso_box(folder: Path, extents=(0.6, 0.4, 0.8)) -> Path:
    """A box in GSO's layout: z-up meshes/model.obj whose mtl names texture.png, which lies in materials/textures/."""
    box = trimesh.creation.box(extents=extents)
    (folder / "meshes").mkdir(parents=True)
    (folder / "materials" / "textures").mkdir(parents=True)
    Image.fromarray(TEXTURE).save(folder / "materials" / "textures" / "texture.png")
    (folder / "meshes" / "model.mtl").write_text("newmtl material_0\nKd 1 1 1\nmap_Kd texture.png\n")
    uv = (box.vertices[:, :2] / np.asarray(extents[:2]) + 0.5) * 0.8 + 0.1  # each vertex's (x, y), inside [0.1, 0.9]
    lines = ["mtllib model.mtl", *(f"v {x} {y} {z}" for x, y, z in box.vertices), *(f"vt {u} {v}" for u, v in uv),
             "usemtl material_0", *(f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in box.faces)]
    (folder / "meshes" / "model.obj").write_text("\n".join(lines) + "\n")
    return folder / "meshes" / "model.obj"


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """A textured GSO-style mesh object and two synthetic objects in the folder format (spiral-free rig: 32 ring
    views at 32 px, so ring view k of an 8-view ring is stored view 4k)."""
    root = tmp_path_factory.mktemp("objects")
    write_gso_box(root / "box_gso")
    write_synthetic_dataset(DataConfig(num_objects=2, supersample=1), root, resolution=32, num_spiral=0)
    return root


FAST = ["--steps", "2", "--render-size", "32", "--ring-size", str(RING), "--image-size", "32", "--gt-supersample", "1",
        "--mesh-views", "8", "--mesh-resolution", "32", "--mesh-voxels", "64", "--geometry-samples", "2000", "--quiet"]


def run(weights: Path, data: Path, output: Path, *extra: str) -> int:
    return eval_gso.main(["--data", str(data), "--output", str(output), "--weights", str(weights), *FAST, *extra])


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_end_to_end_outputs_and_resume(weights, objects, tmp_path, caplog):
    out = tmp_path / "out"
    # an interrupted run: only the first object (by name) finished
    assert run(weights, objects, out, "--num-objects", "1") == 0
    first = out / "objects" / "box_gso.json"
    before = (first.stat().st_mtime_ns, first.read_bytes())
    with caplog.at_level(logging.INFO, logger="gen3diffusion.eval.runner"):
        assert run(weights, objects, out) == 0
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before
    assert any("box_gso: skipped, already evaluated" in r.getMessage() for r in caplog.records)

    names = ["box_gso", "synthetic_000000", "synthetic_000001"]
    records = {n: json.loads((out / "objects" / f"{n}.json").read_text()) for n in names}
    for name, record in records.items():
        assert record["status"] == "ok", record.get("error")
        m = record["metrics"]
        assert all(math.isfinite(m[k]) for k in ("psnr", "ssim", "mv_psnr")), m
        assert m["lpips"] == "unavailable" and "lpips" in record["unavailable"]
        # the reported per-view PSNR is that of the saved 8-bit views
        folder = out / "renders" / name
        pred = torch.stack([read_png(folder / f"pred_{k:03d}.png") for k in range(RING)])
        gt = torch.stack([read_png(folder / f"gt_{k:03d}.png") for k in range(RING)])
        assert np.allclose(record["per_view"]["psnr"], psnr(pred, gt).double().numpy(), atol=1e-4)
        assert (folder / "mesh.ply").is_file() and (folder / "mesh.glb").is_file()
        sheet = Image.open(out / "sheets" / f"{name}.png")
        assert sheet.size == (RING * TINY_IMAGE_SIZE, 3 * TINY_IMAGE_SIZE)  # input + 4 views | GT ring | predicted
    geometry = ("chamfer", "p2s", "normal_consistency", "fscore", "precision", "recall")
    assert all(math.isfinite(records["box_gso"]["metrics"][k]) for k in geometry)  # a GT mesh: geometry metrics
    assert records["synthetic_000000"]["metrics"]["chamfer"] == "unavailable"  # no mesh in that folder
    # folder objects use the stored views that match the ring: view 4k of the 32-view rig, unchanged at 32 px
    assert records["synthetic_000001"]["ring"]["files"] == [f"{4 * k:03d}.png" for k in range(RING)]
    stored = np.asarray(Image.open(objects / "synthetic_000001" / "008.png")).astype(np.float64) / 255
    on_white = stored[..., :3] * stored[..., 3:] + 1 - stored[..., 3:]
    saved = np.asarray(Image.open(out / "renders" / "synthetic_000001" / "gt_002.png")).astype(np.float64) / 255
    assert np.abs(saved - on_white).max() <= 1 / 255 + 1e-9

    summary = json.loads((out / "summary.json").read_text())
    assert summary["fid"] == "unavailable" and summary["means"]["lpips"] == "unavailable"
    assert summary["counts"] == {**summary["counts"], "listed": 3, "ok": 3, "failed": 0, "evaluated": 2,
                                 "resumed": 1, "n_psnr": 3, "n_chamfer": 1}
    assert summary["means"]["psnr"] == pytest.approx(np.mean([r["metrics"]["psnr"] for r in records.values()]))
    assert any(line.startswith("geometry F-score: threshold 0.01") for line in summary["conventions"])
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["name"] for r in rows] == [*names, "mean"] and float(rows[-1]["psnr"]) == pytest.approx(
        summary["means"]["psnr"], rel=1e-5)
    md = (out / "summary.md").read_text()
    assert "| FID (set-level) | unavailable |" in md and "## Conventions" in md and "3 ok" in md


def test_multiview_consistency_is_the_psnr_of_the_views_against_the_gaussians_renders(weights, tmp_path):
    from gen3diffusion.config import SamplerConfig
    from gen3diffusion.eval.geometry import GeometryMetricConfig
    from gen3diffusion.eval.runner import EvalConfig, Evaluator
    from gen3diffusion.gaussians import activate
    from gen3diffusion.mesh import MeshConfig
    from gen3diffusion.pipeline import Gen3DiffusionPipeline
    from gen3diffusion.render import rasterize

    pipe = Gen3DiffusionPipeline.from_pretrained(weights, device="cpu")
    evaluator = Evaluator(pipe, EvalConfig(data=str(tmp_path), output=str(tmp_path / "out")), SamplerConfig(),
                          MeshConfig(), GeometryMetricConfig())
    gaussians = activate(torch.randn(1, 300, 14, generator=torch.Generator().manual_seed(0)))
    cams = Cameras.from_fovy(target_cameras(evaluator.radius), evaluator.fovy, TINY_IMAGE_SIZE)
    views = rasterize(gaussians, cams, background=(1.0, 1.0, 1.0), depth=False).rgb[0].clamp(0, 1)  # [4, 3, S, S]
    assert evaluator._consistency(gaussians, views) == math.inf
    # views darkened by 10%: MSE = 0.01 mean(v^2) per view, so PSNR = -10 log10(0.01 mean(v^2)), averaged
    expected = float((-10 * torch.log10(0.01 * views.double().square().flatten(1).mean(1))).mean())
    assert evaluator._consistency(gaussians, 0.9 * views) == pytest.approx(expected, rel=1e-4)
    # the other views' cameras do not match: much lower
    assert evaluator._consistency(gaussians, views.roll(1, dims=0)) < expected


def test_broken_object_is_recorded_and_the_rest_finish(weights, tmp_path, caplog):
    data = tmp_path / "data"
    write_synthetic_dataset(DataConfig(num_objects=1, supersample=1), data, resolution=32, num_spiral=0)
    (data / "broken" / "meshes").mkdir(parents=True)
    (data / "broken" / "meshes" / "model.obj").write_text("this is not a mesh\n")
    (data / "nothing").mkdir()
    with caplog.at_level(logging.ERROR):
        assert run(weights, data, tmp_path / "out", "--no-geometry") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(e.startswith("broken: failed:") for e in errors)
    assert any("2 of 3 objects failed" in e for e in errors)
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "objects").glob("*.json")}
    assert records["synthetic_000000"]["status"] == "ok"
    assert records["broken"]["status"] == "failed" and "model.obj" in records["broken"]["error"]
    assert records["nothing"]["status"] == "failed" and "no cameras.json" in records["nothing"]["error"]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Failed" in md and "`broken`" in md and "1 ok" in md


def test_learned_metrics_plumbing_with_random_backbones(weights, objects, tmp_path, monkeypatch):
    """With backbones present (random ones here: plumbing only) LPIPS is a number per view and FID a set-level
    number from the saved views, and the conventions say the weights were random. A 3-d random feature net stands in
    for Inception (its own plumbing is tested in test_image_metrics.py), which keeps the covariances full-rank."""
    load_lpips = LPIPSMetric.load.__func__
    monkeypatch.setattr(LPIPSMetric, "load", classmethod(lambda cls, *a, **kw: load_lpips(cls, *a, allow_random=True)))
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 3))
    monkeypatch.setattr(FrechetDistance, "inception",
                        classmethod(lambda cls, *a, **kw: cls(LoadedBackbone(features, "random"), "FID")))
    names = tmp_path / "list.txt"
    names.write_text("synthetic_000001\n")
    out = tmp_path / "out"
    assert run(weights, objects, out, "--object-list", str(names), "--ring-size", "4", "--no-geometry") == 0
    record = json.loads((out / "objects" / "synthetic_000001.json").read_text())
    assert len(record["per_view"]["lpips"]) == 4 and all(v >= 0 for v in record["per_view"]["lpips"])
    assert record["metrics"]["lpips"] == pytest.approx(np.mean(record["per_view"]["lpips"]))
    # FID from the saved PNGs equals the Fréchet distance of the features of those views
    folder = out / "renders" / "synthetic_000001"
    with torch.no_grad():
        pred, gt = (features(torch.stack([read_png(folder / f"{kind}_{k:03d}.png") for k in range(4)])).double().numpy()
                    for kind in ("pred", "gt"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fid"] == pytest.approx(frechet_distance_of_features(pred, gt), rel=1e-6)
    assert any(line.startswith("FID: ") and "RANDOM" in line for line in summary["conventions"])
    assert any(line.startswith("LPIPS: ") and "RANDOM" in line for line in summary["conventions"])


def quad(side: float, colors=None, uv=None) -> trimesh.Trimesh:
    """A square of side ``side`` in the plane z = 0, facing +z."""
    h = side / 2
    mesh = trimesh.Trimesh([[-h, -h, 0], [h, -h, 0], [h, h, 0], [-h, h, 0]], [[0, 1, 2], [0, 2, 3]], process=False)
    if uv is not None:
        mesh.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(TEXTURE))
    else:
        mesh.visual.vertex_colors = colors or [[200, 100, 50, 255]] * 4
    return mesh


def test_square_covers_its_projected_pixels_at_its_depth():
    # a square n pixels wide seen head-on, centred on the principal point: its edges fall on pixel boundaries, so
    # exactly n^2 pixel centres lie inside, all at depth d
    size, n, d = 64, 20, 1.5
    f = float(intrinsics_from_fovy(FOVY, size, size)[1, 1])
    cams = Cameras.from_fovy(orbit_camera(0.0, 0.0, d)[None], FOVY, size)
    out = render_mesh(RenderMesh.from_trimesh(quad(d * n / f)), cams, shading="albedo")
    assert out.alpha.sum().item() == n * n
    assert torch.allclose(out.depth[out.alpha > 0], torch.tensor(d), atol=1e-6)
    assert out.rgb[0, :, size // 2, size // 2].mul(255).round().tolist() == [200, 100, 50]
    assert (out.rgb[out.alpha.expand_as(out.rgb) == 0] == 1).all()  # white elsewhere


def test_floor_depth_and_colour_are_perspective_correct():
    # a floor y = -h seen from (0, 0, d) along -z: the ray through row i meets it at depth h f / (i + 0.5 - cy);
    # its red channel grows linearly with world z, so the pixel must show (z + 1) / 2 at the hit point z = d - depth
    # (screen-space interpolation, without the 1 / z correction, is off by up to ~10% here)
    size, d, h = 64, 1.5, 0.2
    floor = trimesh.Trimesh([[-1, -h, -1], [1, -h, -1], [1, -h, 1], [-1, -h, 1]], [[0, 1, 2], [0, 2, 3]],
                            process=False)
    floor.visual.vertex_colors = [[0, 0, 0, 255], [0, 0, 0, 255], [255, 0, 0, 255], [255, 0, 0, 255]]
    cams = Cameras.from_fovy(orbit_camera(0.0, 0.0, d)[None], FOVY, size)
    out = render_mesh(RenderMesh.from_trimesh(floor), cams, shading="albedo")
    f = float(intrinsics_from_fovy(FOVY, size, size)[1, 1])
    rows = torch.arange(size, dtype=torch.float64)
    depth = h * f / (rows + 0.5 - size / 2)  # [H]; negative above the horizon
    covered = (depth > d - 1) & (depth < d + 1)  # the floor spans z in [-1, 1]
    column = out.depth[0, 0, :, size // 2].double()
    assert torch.equal(out.alpha[0, 0, :, size // 2] > 0, covered)
    assert torch.allclose(column[covered], depth[covered], rtol=1e-5)
    red = out.rgb[0, 0, :, size // 2].double()
    assert torch.allclose(red[covered], (d - depth[covered] + 1) / 2, atol=1e-5)


def test_texture_orientation_and_box_silhouette_and_shading():
    size, d = 64, 1.5
    cams = Cameras.from_fovy(orbit_camera(0.0, 0.0, d)[None], FOVY, size)
    # texture row 0 is the top of the image (v = 1): each quadrant of the square shows one texel
    textured = quad(0.6, uv=np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float64))
    rgb = render_mesh(RenderMesh.from_trimesh(textured), cams, shading="albedo").rgb[0]
    f = float(intrinsics_from_fovy(FOVY, size, size)[1, 1])
    # pixels 0.2-0.23 from the centre (the square's half side is 0.3): beyond the texel centres at +-0.15, where
    # bilinear lookup with clamped borders returns the texel itself
    offset = int(0.22 * f / d)
    c = size // 2
    for (row, col), texel in {(c - offset, c - offset): TEXTURE[0, 0], (c - offset, c + offset): TEXTURE[0, 1],
                              (c + offset, c - offset): TEXTURE[1, 0], (c + offset, c + offset): TEXTURE[1, 1]}.items():
        assert rgb[:, row, col].mul(255).round().tolist() == texel.tolist()
    # a cube seen face-on: a square of side e f / (d - e / 2); its front face is vertical, so hemisphere shading
    # scales the colour by ambient + (1 - ambient) / 2
    e = 0.5
    cube = trimesh.creation.box(extents=[e, e, e])
    cube.visual.vertex_colors = [200, 100, 40, 255]
    out = render_mesh(RenderMesh.from_trimesh(cube), cams, supersample=4, shading="hemisphere", ambient=0.5)
    side = e * f / (d - e / 2)
    assert abs(out.alpha.sum().item() - side**2) < side  # 4 edges of `side` pixels, each resolved to 1/4 pixel
    assert torch.allclose(out.rgb[0, :, c, c] * 255, torch.tensor([150.0, 75.0, 30.0]), atol=1e-3)
    assert torch.allclose(out.depth[0, 0, c, c], torch.tensor(d - e / 2))


def test_gso_mesh_loads_y_up_normalised_with_its_texture(tmp_path):
    path = write_gso_box(tmp_path / "obj", extents=(0.6, 0.4, 0.8))
    mesh = load_mesh(path, "auto", extent=0.8)
    assert np.allclose(mesh.extents, [0.6, 0.8, 0.4])  # z-up 0.8 tall -> y-up; max extent already 0.8
    assert np.allclose(mesh.bounds.mean(axis=0), 0)
    rendered = RenderMesh.from_trimesh(mesh, path)
    assert rendered.texture is not None and rendered.texture.shape == (3, 2, 2)
    assert [s.name for s in discover_objects(tmp_path)] == ["obj"]


def test_ring_matching_finds_stored_views_in_any_order():
    ring = evaluation_ring(RING, 1.5, dtype=torch.float64)
    order = torch.randperm(RING, generator=torch.Generator().manual_seed(0))
    K = intrinsics_from_fovy(FOVY, 32, 32, dtype=torch.float64)
    paths = [Path(f"{i}.png") for i in range(RING)]
    obj = ObjectViews("o", paths, ring[order], K.expand(RING, 3, 3), [(32, 32)] * RING)
    ids = match_ring(obj, ring, FOVY)
    assert order[ids].tolist() == list(range(RING))
    obj.K = intrinsics_from_fovy(30.0, 32, 32, dtype=torch.float64).expand(RING, 3, 3)  # another lens: no match
    with pytest.raises(BadObjectError, match="no stored view matches ring camera"):
        match_ring(obj, ring, FOVY)
