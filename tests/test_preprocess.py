"""Input images: every kind of bad file gets a one-line error naming it; odd modes load; recentring is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gen3diffusion.preprocess import ImageError, list_images, load_image, preprocess_image, recenter


def _square_rgba(size: int = 64, box: tuple[int, int, int, int] = (10, 20, 30, 50)) -> Image.Image:
    arr = np.zeros((size, size, 4), dtype=np.uint8)
    y0, x0, y1, x1 = box
    arr[y0:y1, x0:x1] = (200, 30, 40, 255)
    return Image.fromarray(arr, mode="RGBA")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png: no such file"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am text")
    with pytest.raises(ImageError, match="notes.png: not a readable image"):
        load_image(p)


def test_truncated_png(tmp_path):
    p = tmp_path / "cut.png"
    _square_rgba().save(p)
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(p)


def test_one_pixel_image(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (0, 0, 0)).save(p)
    with pytest.raises(ImageError, match=r"dot.png: image is 1x1"):
        load_image(p)


def test_fully_transparent(tmp_path):
    p = tmp_path / "ghost.png"
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(p)
    with pytest.raises(ImageError, match="ghost.png: image is fully transparent"):
        load_image(p)


def test_huge_image_refused_before_decoding(tmp_path, monkeypatch):
    import gen3diffusion.preprocess as pre

    p = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(p)
    monkeypatch.setattr(pre, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageError, match=r"big.png: image is 200x100, larger than 10,000 pixels"):
        load_image(p)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA", "RGBA", "RGB"])
def test_modes_load_as_8bit_rgb_or_rgba(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    if mode == "I;16":
        arr = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        im = Image.fromarray(arr)  # uint16 -> mode "I;16"
    elif mode == "LA":
        im = rgb.convert("LA")
    else:
        im = rgb.convert(mode)
    p = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    im.save(p)
    out = load_image(p)
    assert out.mode in ("RGB", "RGBA")
    assert out.size == (48, 40)
    if mode == "I;16":  # 16-bit values scale to the full 8-bit range, not clipped to white
        np.testing.assert_allclose(np.asarray(out)[..., 0], np.asarray(rgb.convert("L")), atol=1)


def test_recenter_fills_one_minus_border():
    mask = np.zeros((100, 80), np.float32)
    mask[10:30, 20:60] = 1.0  # 20 x 40 box, longer side horizontal
    rgb = np.ones((100, 80, 3), np.float32)
    _, m = recenter(rgb, mask, border_ratio=0.5, size=64)
    ys, xs = np.nonzero(m > 0.5)
    assert xs.max() - xs.min() + 1 == 32  # (1 - 0.5) * 64
    assert ys.max() - ys.min() + 1 == 16
    assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 0.5 and abs((ys.min() + ys.max()) / 2 - 31.5) <= 0.5


def test_preprocess_rgba_on_white():
    x = preprocess_image(_square_rgba(), border_ratio=0.45, size=32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[:, 0, 0], torch.ones(3))  # corner is white background
    centre = x[:, 16, 16]
    assert torch.allclose(centre, torch.tensor([200, 30, 40]) / 255.0, atol=2 / 255)


def test_rgb_without_rembg_warns_and_uses_non_white(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_rembg(name, *args, **kwargs):
        if name == "rembg":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rembg)
    im = _square_rgba().convert("RGBA")
    white = Image.new("RGB", im.size, (255, 255, 255))
    white.paste(im, mask=im.getchannel("A"))
    with pytest.warns(UserWarning, match="rembg is not installed"):
        x = preprocess_image(white, border_ratio=0.45, size=32, name="photo.jpg")
    assert torch.allclose(x[:, 16, 16], torch.tensor([200, 30, 40]) / 255.0, atol=2 / 255)


def test_blank_rgb_has_no_object():
    with pytest.warns(UserWarning):
        with pytest.raises(ImageError, match="blank.png: no object found"):
            preprocess_image(Image.new("RGB", (32, 32), (255, 255, 255)), remove_background=False, name="blank.png")


def test_list_images(tmp_path):
    for name in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images(tmp_path / "*.png")] == ["b.png"]
    assert list_images(tmp_path / "missing.png") == [tmp_path / "missing.png"]
