"""Input images: load any common image file safely, cut out the object, recentre it and composite it on white.

The models were trained on objects normalised to a fixed size and seen from radius 1.5 (fovy 49.1 deg), which is what
the border ratio reproduces: the object's longer side fills ``1 - border_ratio`` of the frame (0.45 objects,
0.227 avatars). Every failure raises :class:`ImageError` with one line naming the file and the problem.
"""

from __future__ import annotations

import glob
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MIN_SIDE = 16  # px; smaller inputs carry no usable object
MAX_PIXELS = 100_000_000  # larger files are refused rather than decoded (decompression-bomb guard)
WHITE_THRESHOLD = 0.96  # without alpha or rembg, pixels brighter than this in every channel count as background
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class ImageError(ValueError):
    """A bad input image; the message names the file and the problem."""


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as 8-bit RGB or RGBA whatever its mode (grayscale, palette, 16-bit, CMYK, EXIF-rotated)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path}: image is {im.width}x{im.height}, larger than {MAX_PIXELS:,} pixels")
            im.load()
            image = _to_8bit(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err})".splitlines()[0]) from err
    if min(image.size) < MIN_SIDE:
        raise ImageError(f"{path}: image is {image.width}x{image.height}; need at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if image.mode == "RGBA" and image.getchannel("A").getextrema()[1] == 0:
        raise ImageError(f"{path}: image is fully transparent (alpha is 0 everywhere)")
    return image


def _to_8bit(im: Image.Image) -> Image.Image:
    """Any PIL mode -> "RGB" or "RGBA" with 8 bits per channel."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info)
    return im.convert("RGBA" if has_alpha else "RGB")


def object_mask(image: Image.Image, remove_background: bool | None = None, name: str = "image") -> np.ndarray:
    """[H, W] float mask in [0, 1] of the object in ``image``.

    RGBA: its alpha. RGB: rembg's matte when ``remove_background`` is True, or None and rembg is installed;
    otherwise the image is taken to be on white already (with a warning) and non-white pixels form the mask.
    """
    if image.mode == "RGBA":
        return np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    if remove_background is not False:
        try:
            import rembg
        except ImportError:
            if remove_background:
                raise ImportError("background removal needs rembg: pip install rembg") from None
        else:
            matte = rembg.remove(image)
            return np.asarray(matte.getchannel("A"), dtype=np.float32) / 255.0
    warnings.warn(f"{name}: RGB input and rembg is not installed; treating the image as already on a white "
                  "background (pip install rembg, or pass an RGBA image)", stacklevel=2)
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    return (rgb.min(axis=-1) < WHITE_THRESHOLD).astype(np.float32)


def recenter(rgb: np.ndarray, mask: np.ndarray, border_ratio: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop the mask's bounding box and paste it centred into a ``size`` square so its longer side fills
    ``(1 - border_ratio) * size``. rgb [H, W, 3], mask [H, W] in [0, 1] -> same at ``size``."""
    if not 0.0 <= border_ratio < 1.0:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")
    ys, xs = np.nonzero(mask > 0.5)
    if ys.size == 0:
        ys, xs = np.nonzero(mask > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    target = max(1, int(round(size * (1.0 - border_ratio))))
    scale = target / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    crop = np.concatenate([rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1, None]], axis=-1)
    crop_im = Image.fromarray((crop * 255.0 + 0.5).clip(0, 255).astype(np.uint8), mode="RGBA")
    crop = np.asarray(crop_im.resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    out = np.zeros((size, size, 4), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = crop
    return out[..., :3], out[..., 3]


def preprocess_image(
    image: Image.Image,
    border_ratio: float = 0.45,
    size: int = 256,
    recenter_object: bool = True,
    remove_background: bool | None = None,
    name: str = "image",
) -> torch.Tensor:
    """A loaded image -> [3, size, size] float tensor in [0, 1]: object cut out, recentred, composited on white."""
    mask = object_mask(image, remove_background, name)
    if mask.max() <= 0:
        raise ImageError(f"{name}: no object found (the mask is empty)")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if recenter_object:
        rgb, mask = recenter(rgb, mask, border_ratio, size)
    else:
        rgba = np.concatenate([rgb, mask[..., None]], axis=-1)
        rgba_im = Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), mode="RGBA").resize((size, size), Image.Resampling.LANCZOS)
        rgba = np.asarray(rgba_im, dtype=np.float32) / 255.0
        rgb, mask = rgba[..., :3], rgba[..., 3]
    on_white = rgb * mask[..., None] + (1.0 - mask[..., None])
    return torch.from_numpy(np.ascontiguousarray(on_white)).permute(2, 0, 1).contiguous()


def list_images(spec: str | Path) -> list[Path]:
    """Expand ``spec`` (a file, a folder, or a glob pattern) into image paths; a missing file is kept so that
    loading reports it by name."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if any(ch in str(spec) for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
    return [path]
