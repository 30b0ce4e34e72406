"""On-disk data: folder format round trip, folder and official-layout datasets, and skipping of bad objects."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import reference_dir
from gen3diffusion.cameras import (
    Cameras,
    blender_to_opengl,
    intrinsics_from_fovy,
    mvd_camera_vectors,
    opengl_to_blender,
    orbit_camera,
    relative_to,
    target_cameras,
)
from gen3diffusion.data import SAMPLE_KEYS, DataConfig, make_dataset
from gen3diffusion.data.multiview import read_cameras, read_rgba, write_object
from gen3diffusion.data.official import official_file_names, read_official_object
from gen3diffusion.data.synthetic import main as synthetic_main
from gen3diffusion.data.synthetic import make_object, render_object, rig_cameras

SIZE = 16  # pixels of every stored view
NUM_SPIRAL = 8


def folder_cfg(root: Path, **overrides) -> DataConfig:
    cfg = dict(kind="folder", root=str(root), image_size=SIZE, sup_size=SIZE, num_sup_views=4, seed=3)
    cfg.update(overrides)
    return DataConfig(**cfg)


def on_white(rgba: torch.Tensor) -> torch.Tensor:
    return rgba[..., :3, :, :] * rgba[..., 3:, :, :] + (1 - rgba[..., 3:, :, :])


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic_main(
        ["--output", str(root), "--num-objects", "3", "--resolution", str(SIZE), "--num-spiral", str(NUM_SPIRAL),
         "--supersample", "1"]
    )  # fmt: skip
    return root


@pytest.fixture
def root_copy(synthetic_root, tmp_path) -> Path:
    shutil.copytree(synthetic_root, tmp_path / "data")
    return tmp_path / "data"


def test_cli_writes_the_rig_and_renders(synthetic_root):
    assert sorted(p.name for p in synthetic_root.iterdir()) == [f"synthetic_{i:06d}" for i in range(3)]
    obj = read_cameras(synthetic_root / "synthetic_000001")
    c2w = rig_cameras(NUM_SPIRAL)
    assert torch.equal(obj.c2w, c2w)  # float64 JSON round trip is exact
    assert torch.equal(obj.K, intrinsics_from_fovy(49.1, SIZE, SIZE).double().expand(len(c2w), 3, 3))
    render = render_object(make_object(1), Cameras.from_fovy(c2w.float(), 49.1, SIZE))
    stored = torch.stack([read_rgba(p) for p in obj.paths])  # [V, 4, H, W]
    torch.testing.assert_close(stored[:, 3:], render.mask, atol=0, rtol=0)  # binary mask without supersampling
    torch.testing.assert_close(on_white(stored), render.rgb, atol=1 / 255, rtol=0)  # PNG quantisation


def test_write_object_round_trip_and_atomicity(tmp_path):
    torch.manual_seed(0)
    rgba = torch.randint(0, 256, (3, 4, 5, 7), dtype=torch.uint8)
    c2w = orbit_camera(torch.tensor([10.0, -20.0, 0.0]), torch.tensor([0.0, 45.0, 200.0]), dtype=torch.float64)
    K = torch.tensor([[9.5, 0, 3.5], [0, 9.5, 2.5], [0, 0, 1]], dtype=torch.float64)
    write_object(tmp_path / "obj", rgba, c2w, K)
    obj = read_cameras(tmp_path / "obj")
    assert torch.equal(obj.c2w, c2w) and torch.equal(obj.K, K.expand(3, 3, 3))
    assert obj.sizes == [(7, 5)] * 3
    assert torch.equal(torch.stack([read_rgba(p) for p in obj.paths]), rgba.float() / 255)
    with pytest.raises(FileExistsError, match="obj"):
        write_object(tmp_path / "obj", rgba, c2w, K)
    write_object(tmp_path / "obj", rgba.flip(0), c2w, K, overwrite=True)
    assert torch.equal(read_rgba(read_cameras(tmp_path / "obj").paths[0]), rgba[2].float() / 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj"]  # no temporary folders left
    with pytest.raises(ValueError, match=r"c2w must be \[3, 4, 4\]"):
        write_object(tmp_path / "bad", rgba, c2w[:2], K)


def match_views(images: torch.Tensor, views: torch.Tensor) -> list[int]:
    """Index of the stored view [V, 3, H, W] equal to each image [N, 3, H, W]."""
    err = (images[:, None] - views[None]).abs().flatten(2).amax(-1)  # [N, V]
    best = err.min(-1)
    assert (best.values < 1e-5).all(), "every sample image must be one of the stored views"
    return best.indices.tolist()


def check_sample_against_views(sample: dict, views: torch.Tensor, c2w_world: torch.Tensor, ring: list[int]) -> None:
    """Relative sample: targets are ring views 90 deg apart from the input; cameras are relative to the input."""
    assert set(sample) == set(SAMPLE_KEYS)
    k0 = match_views(sample["target_images"][:1], views[ring])[0]  # ring index of the input view
    expected_targets = [ring[(k0 + 8 * m) % 32] for m in range(4)]
    torch.testing.assert_close(sample["target_images"], views[expected_targets], atol=1e-6, rtol=0)
    assert torch.equal(sample["input_image"], sample["target_images"][0])
    torch.testing.assert_close(sample["target_c2w"], target_cameras(1.5))
    torch.testing.assert_close(sample["mvd_cameras"], mvd_camera_vectors())
    sup_views = match_views(sample["sup_images"], views)
    expected = relative_to(c2w_world[sup_views], c2w_world[ring[k0]]).float()
    torch.testing.assert_close(sample["sup_c2w"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample["sup_K"], intrinsics_from_fovy(49.1, SIZE, SIZE).expand(4, 3, 3))


def test_folder_dataset_relative_sample(synthetic_root):
    ds = make_dataset(folder_cfg(synthetic_root))
    assert len(ds) == 3 and ds.skipped == {}
    sample = ds[1]
    assert sample["object_id"] == "synthetic_000001"
    obj = read_cameras(synthetic_root / "synthetic_000001")
    views = on_white(torch.stack([read_rgba(p) for p in obj.paths]))
    ring = list(range(NUM_SPIRAL, NUM_SPIRAL + 32))
    assert ds.objects[1].ring == ring
    check_sample_against_views(sample, views, obj.c2w, ring)
    again = make_dataset(folder_cfg(synthetic_root))[1]
    assert all(torch.equal(sample[k], again[k]) for k in SAMPLE_KEYS if k != "object_id")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["sup_images"].shape == (2, 4, 3, SIZE, SIZE) and batch["object_id"] == [
        "synthetic_000000", "synthetic_000001"
    ]  # fmt: skip


def test_folder_dataset_absolute_sample_and_resizing(synthetic_root):
    ds = make_dataset(folder_cfg(synthetic_root, task="avatars", image_size=8, sup_size=12))
    sample = ds[0]
    assert sample["target_images"].shape == (4, 3, 8, 8) and sample["sup_images"].shape == (4, 3, 12, 12)
    torch.testing.assert_close(sample["sup_K"], intrinsics_from_fovy(49.1, 12, 12).expand(4, 3, 3))
    vectors = sample["mvd_cameras"]
    starts = [k for k in range(32) if torch.allclose(vectors, mvd_camera_vectors(azimuth_start_deg=11.25 * k), atol=1e-6)]
    assert len(starts) == 1
    assert (sample["sup_masks"] >= 0).all() and (sample["sup_masks"] <= 1).all()
    # where the mask is empty the image is white; where full, it is the object's colour
    background = (sample["sup_masks"] == 0).expand_as(sample["sup_images"])
    assert background.any() and (sample["sup_images"][background] == 1).all()


def test_missing_view_is_skipped_at_index_time(root_copy, caplog):
    (root_copy / "synthetic_000001" / "003.png").unlink()
    (root_copy / "broken_json").mkdir()
    (root_copy / "broken_json" / "cameras.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(folder_cfg(root_copy))
    assert [o.name for o in ds.objects] == ["synthetic_000000", "synthetic_000002"]
    assert set(ds.skipped) == {"synthetic_000001", "broken_json"}
    assert "003.png" in ds.skipped["synthetic_000001"]
    assert "synthetic_000001" in caplog.text and "broken_json" in caplog.text


def test_corrupt_png_falls_back_to_next_object_and_logs_once(root_copy, caplog):
    for png in (root_copy / "synthetic_000000").glob("*.png"):
        png.write_bytes(png.read_bytes()[:40])  # truncated: valid signature, broken data
    ds = make_dataset(folder_cfg(root_copy))
    assert len(ds) == 3  # corrupt pixels are found on read, not at index time
    with caplog.at_level(logging.WARNING):
        first = ds[0]
        second = ds[0]
    assert first["object_id"] == second["object_id"] == "synthetic_000001"
    assert list(ds.skipped) == ["synthetic_000000"] and "unreadable" in ds.skipped["synthetic_000000"]
    assert len([r for r in caplog.records if "synthetic_000000" in r.getMessage()]) == 1


def test_object_without_ring_is_skipped(tmp_path, caplog):
    c2w = orbit_camera(torch.tensor([30.0] * 4), torch.tensor([0.0, 90, 180, 270]), dtype=torch.float64)
    write_object(tmp_path / "no_ring", torch.ones(4, 4, SIZE, SIZE), c2w, intrinsics_from_fovy(49.1, SIZE, SIZE))
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="no usable object"):
        make_dataset(folder_cfg(tmp_path))
    assert "no_ring" in caplog.text and "elevation-0 ring" in caplog.text


### the authors' layout


def write_official(folder: Path, index: int, c2w_blender: torch.Tensor, K: torch.Tensor, webp_every: int = 0) -> None:
    """A fake render folder in the authors' layout: RGBA images, RT (16 numbers, one line) and K (3 lines)."""
    folder.mkdir(parents=True)
    cams = Cameras(blender_to_opengl(c2w_blender).float(), K.float(), SIZE, SIZE)
    out = render_object(make_object(index), cams)
    rgba = torch.cat([(out.rgb - (1 - out.mask)) / out.mask.clamp(min=1e-6), out.mask], 1).clamp(0, 1)
    pixels = (rgba * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for j in range(len(c2w_blender)):
        stem, rt_name, k_name = official_file_names(j)
        if webp_every and j % webp_every == 0:
            Image.fromarray(pixels[j]).save(folder / f"{stem}.webp", lossless=True)
        else:
            Image.fromarray(pixels[j]).save(folder / f"{stem}.png")
        (folder / rt_name).write_text(" ".join(f"{x:.17g}" for x in c2w_blender[j].reshape(16).tolist()) + "\n")
        (folder / k_name).write_text("\n".join(" ".join(f"{x:.17g}" for x in row) for row in K[j].tolist()) + "\n")


def official_rig() -> torch.Tensor:
    """132 OpenGL-world poses in the authors' order: a spiral (views 0..99), then the ring (100 + k at 11.25 k)."""
    j = torch.arange(100, dtype=torch.float64)
    spiral = orbit_camera(-60 + 1.2 * j, 36.0 * j, 1.5, dtype=torch.float64)
    ring = orbit_camera(0.0, torch.arange(32, dtype=torch.float64) * 11.25, 1.5, dtype=torch.float64)
    return torch.cat([spiral, ring])


@pytest.fixture(scope="module")
def official_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("official")
    K = intrinsics_from_fovy(49.1, SIZE, SIZE, dtype=torch.float64).expand(132, 3, 3)
    for index in range(2):
        write_official(root / f"obj{index}", index, opengl_to_blender(official_rig()), K, webp_every=7)
    return root


def test_official_reader_relative_sample(official_root):
    ds = make_dataset(folder_cfg(official_root, kind="official"))
    assert len(ds) == 2 and ds.skipped == {}
    obj = read_official_object(official_root / "obj1")
    assert obj.paths[7].suffix == ".webp" and obj.paths[8].suffix == ".png"
    torch.testing.assert_close(obj.c2w, official_rig(), atol=1e-12, rtol=0)  # Blender text -> OpenGL world
    ring = list(range(100, 132))
    assert ds.objects[1].ring == ring  # view 100 + k at azimuth 11.25 k
    views = on_white(torch.stack([read_rgba(p) for p in obj.paths]))
    for epoch in range(2):
        ds.set_epoch(epoch)
        check_sample_against_views(ds[1], views, obj.c2w, ring)


def test_official_reader_absolute_cameras(official_root):
    ds = make_dataset(folder_cfg(official_root, kind="official", task="avatars"))
    sample = ds[0]
    obj = read_official_object(official_root / "obj0")
    views = on_white(torch.stack([read_rgba(p) for p in obj.paths]))
    targets = [100 + k for k in match_views(sample["target_images"], views[100:])]
    assert all(100 <= t < 132 for t in targets) and [(t - targets[0]) % 32 for t in targets] == [0, 8, 16, 24]
    torch.testing.assert_close(
        sample["mvd_cameras"], mvd_camera_vectors(azimuth_start_deg=11.25 * (targets[0] - 100)), atol=1e-6, rtol=0
    )
    sup_views = match_views(sample["sup_images"], views)
    expected = relative_to(obj.c2w[sup_views], obj.c2w[targets[0]]).float()
    torch.testing.assert_close(sample["sup_c2w"], expected, atol=1e-5, rtol=0)


def test_official_missing_file_is_skipped(official_root, tmp_path, caplog):
    shutil.copytree(official_root, tmp_path / "data")
    (tmp_path / "data" / "obj0" / "132_5_K.txt").unlink()
    with caplog.at_level(logging.WARNING):
        ds = make_dataset(folder_cfg(tmp_path / "data", kind="official"))
    assert [o.name for o in ds.objects] == ["obj1"] and "obj0" in caplog.text
    assert "5" in ds.skipped["obj0"]


def test_official_rig_from_reference(tmp_path):
    ref = reference_dir()
    if ref is None:
        pytest.skip("no shared/reference folder in this checkout")
    views = json.loads((ref / "official_cameras.json").read_text())["views"]
    folder = tmp_path / "rig" / "obj"
    folder.mkdir(parents=True)
    pixel = Image.new("RGBA", (1, 1))
    for j in range(132):
        stem, rt_name, k_name = official_file_names(j)
        pixel.save(folder / f"{stem}.png")
        (folder / rt_name).write_text(" ".join(map(repr, sum(views[str(j)]["c2w"], []))))
        (folder / k_name).write_text(" ".join(map(repr, sum(views[str(j)]["K"], []))))
    ds = make_dataset(folder_cfg(tmp_path / "rig", kind="official", task="avatars"))
    obj = ds.objects[0]
    assert obj.ring == list(range(100, 132)) and len(obj.target_rows) == 32
    torch.testing.assert_close(obj.c2w[108, :3, 3], torch.tensor([1.5, 0.0, 0.0], dtype=torch.float64))  # front: +x
