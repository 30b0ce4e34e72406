"""scripts/sample.py end to end on tiny random weights in the authors' layout: every output file is written and
readable, and each kind of bad input gets a one-line error while the other images still finish."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen3diffusion.gaussians import load_ply
from tiny_weights import load_script

FRAMES = 6


sample = load_script("sample")
pytestmark = pytest.mark.usefixtures("tiny_3d_config")  # conftest.py


def write_object_png(path: Path, color=(200, 40, 30)) -> Path:
    arr = np.zeros((48, 48, 4), np.uint8)
    arr[12:36, 16:32] = (*color, 255)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def run(args: list[str]) -> int:
    return sample.main(args + ["--steps", "2", "--render-size", "32", "--quiet"])


def test_end_to_end_outputs(weights, tmp_path):
    image = write_object_png(tmp_path / "cup.png")
    code = run(["--image", str(image), "--weights", str(weights), "--output", str(tmp_path / "out"),
                "--video-frames", str(FRAMES), "--mesh"])
    assert code == 0
    folder = tmp_path / "out" / "cup"
    g = load_ply(folder / "gaussians.ply")
    assert 0 < g.num_gaussians <= 4 * 16 * 16  # pruned at opacity 0.005
    sheet = Image.open(folder / "multiview.png")
    assert sheet.size == (5 * 32, 2 * 32)
    import imageio.v3 as iio

    frames = iio.imread(folder / "turntable.mp4")
    assert frames.shape[0] == FRAMES and frames.shape[1:3] == (32, 32)
    import trimesh

    mesh = trimesh.load(folder / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0
    assert trimesh.load(folder / "mesh.ply").vertices.shape[1] == 3


def test_seeded_runs_write_identical_gaussians(weights, tmp_path):
    image = write_object_png(tmp_path / "a.png")
    for name in ("one", "two"):
        assert run(["--image", str(image), "--weights", str(weights), "--output", str(tmp_path / name),
                    "--no-video", "--no-mesh", "--seed", "7"]) == 0
    assert (tmp_path / "one/a/gaussians.ply").read_bytes() == (tmp_path / "two/a/gaussians.ply").read_bytes()


def test_bad_inputs_are_reported_and_the_rest_finish(weights, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    write_object_png(folder / "good.png")
    (folder / "text.png").write_text("not an image")
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(folder / "clear.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(folder / "print.jpg")
    with caplog.at_level(logging.ERROR):
        code = run(["--image", str(folder), "--weights", str(weights), "--output", str(tmp_path / "out"),
                    "--no-video", "--no-mesh", "--batch-size", "2"])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("text.png: not a readable image" in e for e in errors)
    assert any("dot.png: image is 1x1" in e for e in errors)
    assert any("clear.png: image is fully transparent" in e for e in errors)
    assert any("3 of 5 images failed" in e for e in errors)
    assert (tmp_path / "out/good/gaussians.ply").is_file()
    assert (tmp_path / "out/print/gaussians.ply").is_file()  # CMYK converts and runs


def test_missing_path_and_incomplete_weights(weights, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert run(["--image", str(tmp_path / "nope.png"), "--weights", str(weights),
                    "--output", str(tmp_path / "o")]) == 1
    assert any("nope.png: no such file" in r.getMessage() for r in caplog.records)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    image = write_object_png(tmp_path / "x.png")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert run(["--image", str(image), "--weights", str(partial), "--output", str(tmp_path / "o")]) == 2
    assert any("missing model_1.safetensors" in r.getMessage() for r in caplog.records)


def test_missing_video_writer_fails_before_sampling(weights, tmp_path, caplog, monkeypatch):
    """Without imageio's ffmpeg plugin, --video (the default) stops at once with what to install, instead of an
    unrelated error from another imageio plugin after the sampling; save_video leaves no temporary file."""
    import sys

    from gen3diffusion.outputs import save_video

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` raise ImportError
    image = write_object_png(tmp_path / "cup.png")
    with caplog.at_level(logging.ERROR):
        code = run(["--image", str(image), "--weights", str(weights), "--output", str(tmp_path / "out")])
    assert code == 2
    assert any("imageio[ffmpeg]" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="--no-video"):
        save_video(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "t.mp4")
    assert list(tmp_path.glob("*.mp4")) == [] and list(tmp_path.glob(".*")) == []
