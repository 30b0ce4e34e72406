"""3D Gaussians: the batched container, the activations of the 14-channel model output, and 3DGS .ply files.

The 3D-GS model predicts 14 raw channels per Gaussian (LGM layout): xyz (0:3), opacity (3), scale (4:7),
rotation quaternion w, x, y, z (7:11) and RGB (11:14). :func:`activate` maps them to the physical parameters that
the renderer consumes; :func:`save_ply` / :func:`load_ply` store those parameters in the layout of the original
3D Gaussian Splatting code (opacity as a logit, scales as logs, colour as the degree-0 SH coefficient), which
common 3DGS viewers read.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Gaussians", "activate", "save_ply", "load_ply", "SH_C0", "RAW_CHANNELS"]

logger = logging.getLogger(__name__)

# Degree-0 real spherical harmonic, 1 / (2 sqrt(pi)): rgb = 0.5 + SH_C0 * f_dc in the 3DGS colour model.
SH_C0 = 0.28209479177387814
# Raw channels per Gaussian predicted by the 3D model.
RAW_CHANNELS = 14

# Vertex properties we write, in order; all float32. Normals are zero (3DGS viewers expect the fields).
_PLY_PROPERTIES = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)  # fmt: skip
# Properties load_ply needs; any others (normals, f_rest_*, ...) are ignored.
_PLY_REQUIRED = tuple(name for name in _PLY_PROPERTIES if name not in ("nx", "ny", "nz"))
# PLY scalar types (both naming styles) -> little-endian numpy types.
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip
# Largest float32 below 1: opacities of exactly 1.0 are stored as its logit (~16.6) to stay finite.
_ONE_BELOW = 1.0 - 2.0**-24
_TINY32 = float(np.finfo(np.float32).tiny)
# Loaded quaternions farther than this from unit norm are normalised; our own (already unit to float32
# rounding, |norm - 1| < 1e-6) are kept bit for bit.
_UNIT_TOLERANCE = 1e-6


@dataclass
class Gaussians:
    """A batch of B sets of N 3D Gaussians, already activated (physical units)."""

    means: Tensor  # [B, N, 3] world positions
    scales: Tensor  # [B, N, 3] positive standard deviations along the local axes
    rotations: Tensor  # [B, N, 4] unit quaternions (w, x, y, z)
    opacities: Tensor  # [B, N] in (0, 1)
    colors: Tensor  # [B, N, 3] RGB in [0, 1]

    def __post_init__(self) -> None:
        if self.means.ndim != 3 or self.means.shape[-1] != 3:
            raise ValueError(f"Gaussians.means must be [B, N, 3], got {tuple(self.means.shape)}")
        B, N = self.means.shape[:2]
        expected = {
            "scales": (B, N, 3),
            "rotations": (B, N, 4),
            "opacities": (B, N),
            "colors": (B, N, 3),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Gaussians.{name} must be {list(shape)} to match means [B, N, 3], got {list(got)}")

    @property
    def batch_size(self) -> int:
        return self.means.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.means.shape[1]

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    def _map(self, fn) -> "Gaussians":
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> "Gaussians":
        """Move / cast every field like ``Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Gaussians":
        return self._map(Tensor.detach)

    def __getitem__(self, index: int | slice) -> "Gaussians":
        """Select samples of the batch; an integer gives a batch of one (B = 1), a slice a sub-batch."""
        if isinstance(index, int):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"sample {index} out of range for a batch of {self.batch_size}")
            index = slice(index % self.batch_size, index % self.batch_size + 1)
        if not isinstance(index, slice):
            raise TypeError(f"Gaussians can be indexed by an int or a slice over the batch, got {type(index)}")
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(items: Sequence["Gaussians"], dim: int = 1) -> "Gaussians":
        """Concatenate over the Gaussians (``dim=1``, same batch size) or over the batch (``dim=0``, same N)."""
        if dim not in (0, 1):
            raise ValueError(f"Gaussians.cat: dim must be 0 (batch) or 1 (Gaussians), got {dim}")
        if not items:
            raise ValueError("Gaussians.cat: nothing to concatenate")
        return Gaussians(**{f.name: torch.cat([getattr(g, f.name) for g in items], dim=dim) for f in fields(Gaussians)})


def activate(raw: Tensor) -> Gaussians:
    """Turn raw model output ``[B, N, 14]`` into Gaussians (the LGM activations, kept by Gen-3Diffusion).

    xyz: clamp(-1, 1) (objects live in the unit box); opacity: sigmoid; scale: 0.1 * softplus (0.069 at 0);
    rotation: normalised over the quaternion axis (w, x, y, z); rgb: 0.5 * tanh + 0.5.
    """
    if raw.ndim != 3 or raw.shape[-1] != RAW_CHANNELS:
        raise ValueError(f"activate: raw must be [B, N, {RAW_CHANNELS}], got {tuple(raw.shape)}")
    return Gaussians(
        means=raw[..., 0:3].clamp(-1.0, 1.0),
        opacities=torch.sigmoid(raw[..., 3]),
        scales=0.1 * F.softplus(raw[..., 4:7]),
        rotations=F.normalize(raw[..., 7:11], dim=-1),
        colors=0.5 * torch.tanh(raw[..., 11:14]) + 0.5,
    )


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write to a unique temporary file in the same folder, then rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_ply(gaussians: Gaussians, path: str | os.PathLike, min_opacity: float = 0.005) -> int:
    """Write one set of Gaussians (B = 1) as a binary little-endian 3DGS .ply; returns the number written.

    Gaussians with opacity < ``min_opacity`` are pruned. Stored as float32: opacity as its logit, scales as logs,
    colour as f_dc = (rgb - 0.5) / SH_C0, quaternions as rot_0..3 = w, x, y, z, zero normals. The inverse
    activations are evaluated in float64 and rounded once. Scales are clamped to the smallest normal float32 and
    opacities to [tiny, 1 - 2^-24] so that every stored value is finite.
    """
    if gaussians.batch_size != 1:
        raise ValueError(f"save_ply writes one sample; got a batch of {gaussians.batch_size} (use gaussians[b])")
    path = Path(path)
    # threshold in the Gaussians' own precision, so float32 opacities equal to float32(min_opacity) are kept
    keep = (gaussians.opacities[0] >= min_opacity).cpu()  # [N]
    g = gaussians.detach().to(device="cpu", dtype=torch.float64)
    opacity = g.opacities[0, keep].clamp(_TINY32, _ONE_BELOW)
    columns = {
        "means": g.means[0, keep],  # [M, 3]
        "normals": torch.zeros_like(g.means[0, keep]),
        "f_dc": (g.colors[0, keep] - 0.5) / SH_C0,
        "opacity": torch.logit(opacity)[:, None],  # [M, 1]
        "scale": torch.log(g.scales[0, keep].clamp_min(_TINY32)),
        "rot": g.rotations[0, keep],  # [M, 4]
    }
    table = torch.cat(list(columns.values()), dim=1).numpy().astype("<f4")  # [M, 17]
    header = "\n".join(
        ["ply", "format binary_little_endian 1.0", f"element vertex {table.shape[0]}"]
        + [f"property float {name}" for name in _PLY_PROPERTIES]
        + ["end_header"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (header + "\n").encode("ascii") + table.tobytes())
    logger.debug("wrote %d of %d Gaussians to %s", table.shape[0], gaussians.num_gaussians, path)
    return table.shape[0]


def _parse_header(path: Path, data: bytes) -> tuple[int, np.dtype, int]:
    """Return (vertex count, vertex record dtype, byte offset of the vertex data) of a binary little-endian PLY."""
    if not data.startswith(b"ply\n") and not data.startswith(b"ply\r\n"):
        raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
    end = data.find(b"\nend_header")
    if end < 0:
        raise ValueError(f"{path}: PLY header has no end_header line (truncated file?)")
    offset = data.find(b"\n", end + 1) + 1
    if offset == 0:
        raise ValueError(f"{path}: PLY header is truncated after end_header")
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    count, names, types, element = None, [], [], None
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] != "binary_little_endian":
                raise ValueError(
                    f"{path}: PLY format {' '.join(words[1:])!r} is not supported; need binary_little_endian"
                )
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise ValueError(f"{path}: malformed PLY element line {line!r}")
            if element is None and words[1] != "vertex":
                raise ValueError(f"{path}: the first PLY element must be 'vertex', got {words[1]!r}")
            element = words[1]
            if element == "vertex":
                count = int(words[2])
        elif words[0] == "property" and element == "vertex":
            if len(words) < 3:
                raise ValueError(f"{path}: malformed PLY property line {line!r}")
            if words[1] == "list":
                raise ValueError(f"{path}: list property {words[-1]!r} in the vertex element is not supported")
            if words[1] not in _PLY_TYPES:
                raise ValueError(f"{path}: unknown PLY type {words[1]!r} of property {words[2]!r}")
            names.append(words[2])
            types.append(_PLY_TYPES[words[1]])
    if not any(line.startswith("format") for line in lines):
        raise ValueError(f"{path}: PLY header has no format line")
    if count is None:
        raise ValueError(f"{path}: PLY file has no vertex element")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate vertex properties in {names}")
    missing = [name for name in _PLY_REQUIRED if name not in names]
    if missing:
        raise ValueError(f"{path}: missing vertex propert{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)}")
    return count, np.dtype(list(zip(names, types))), offset


def load_ply(path: str | os.PathLike) -> Gaussians:
    """Read a 3DGS .ply (binary little-endian) into Gaussians with B = 1, float32, on the CPU.

    Extra vertex properties (normals, ``f_rest_*``, ...) are ignored and may come in any order. Activations are
    undone in float64: opacity = sigmoid, scale = exp, rgb = clamp(0.5 + SH_C0 * f_dc, 0, 1). Quaternions that are
    not unit to float32 rounding (e.g. raw 3DGS training output) are normalised. Raises ValueError naming the file
    for a non-PLY, ASCII, big-endian or truncated file, and for a missing property.
    """
    path = Path(path)
    data = path.read_bytes()
    count, record, offset = _parse_header(path, data)
    if len(data) - offset < count * record.itemsize:
        raise ValueError(
            f"{path}: truncated PLY, {count} vertices need {count * record.itemsize} bytes after the header, "
            f"found {len(data) - offset}"
        )
    table = np.frombuffer(data, dtype=record, count=count, offset=offset)

    def column(*names: str) -> Tensor:
        return torch.from_numpy(np.stack([table[name].astype(np.float64) for name in names], axis=-1))

    rotations = column("rot_0", "rot_1", "rot_2", "rot_3")
    norm = rotations.norm(dim=-1, keepdim=True)
    off_unit = (norm - 1.0).abs() > _UNIT_TOLERANCE
    rotations = torch.where(off_unit, F.normalize(rotations, dim=-1), rotations)
    gaussians = Gaussians(
        means=column("x", "y", "z")[None],
        scales=column("scale_0", "scale_1", "scale_2").exp()[None],
        rotations=rotations[None],
        opacities=torch.sigmoid(column("opacity")[..., 0])[None],
        colors=(0.5 + SH_C0 * column("f_dc_0", "f_dc_1", "f_dc_2")).clamp(0.0, 1.0)[None],
    )
    return gaussians.to(torch.float32)
