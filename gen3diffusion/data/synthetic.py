"""Procedural multi-view data that needs nothing from outside: random textured primitives, ray cast analytically.

An object is a union of 1-4 primitives (box, ellipsoid, cylinder, cone, torus), each a unit shape in its own local
frame placed by an affine map ``x_world = centre + linear @ x_local`` (rotation times per-axis size), with a
procedural texture (solid, stripes, checkers, gradient) in local coordinates. Its exact bounding box is rescaled to
the task's max extent (0.8 objects, 1.0 avatars) and centred, as the authors normalise their renders. Everything
about object ``i`` follows from ``(seed, i)``, so any worker renders the same object.

Rendering intersects every pixel's ray with each primitive in the primitive's local frame (the ray parameter ``t``
is the same in both frames because directions are mapped, not renormalised): closed forms for box, ellipsoid,
cylinder and cone; for the torus (a quartic) a fixed-step sign search on its exact signed distance inside the
bounding sphere, then bisection. Shading is Lambertian with a fixed world key light, a fill light and ambient, so
colours are view-independent and views of one object agree. Output is composited on white.

``python -m gen3diffusion.data.synthetic --output DIR --num-objects N`` writes objects in the folder format of
:mod:`gen3diffusion.data.multiview`.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from gen3diffusion.cameras import Cameras, get_rays, intrinsics_from_fovy, orbit_camera
from gen3diffusion.data import (
    RING_STEP_DEG,
    RING_VIEWS,
    DataConfig,
    assemble_sample,
    camera_mode,
    choose_ring_views,
    max_extent,
    sample_rng,
)

__all__ = [
    "SyntheticObject", "SyntheticRender", "SyntheticMultiViewDataset", "make_object", "render_object", "cast_rays",
    "rig_cameras", "write_synthetic_dataset", "main",
]  # fmt: skip

logger = logging.getLogger(__name__)

PRIMITIVES = ("box", "sphere", "cylinder", "cone", "torus")
TEXTURES = ("solid", "stripes", "checkers", "gradient")
KEY_LIGHT = F.normalize(torch.tensor([0.45, 0.75, 0.5]), dim=0)  # world direction towards the light
FILL_LIGHT = F.normalize(torch.tensor([-0.5, -0.3, -0.6]), dim=0)
AMBIENT, KEY_WEIGHT, FILL_WEIGHT = 0.45, 0.6, 0.2
TORUS_SAMPLES, TORUS_BISECTIONS = 64, 20  # sign search steps over the bounding-sphere chord, then bisection


@dataclass
class SyntheticObject:
    """A union of ``P`` textured unit primitives, each placed by ``x_world = centers + linear @ x_local``.

    Local unit shapes: box [-1, 1]^3; sphere |x| <= 1; cylinder x^2 + z^2 <= 1, |y| <= 1; cone with apex (0, 1, 0)
    and base radius 1 at y = -1; torus around the y axis with major radius 1 and tube radius ``minor``.
    """

    kinds: Tensor  # [P] int64 index into PRIMITIVES
    centers: Tensor  # [P, 3] world position of each local origin
    linear: Tensor  # [P, 3, 3] local -> world linear map (rotation @ diag(size))
    minor: Tensor  # [P] torus tube radius in local units (unused by other kinds)
    textures: Tensor  # [P] int64 index into TEXTURES
    color_a: Tensor  # [P, 3] RGB albedo in [0, 1]
    color_b: Tensor  # [P, 3] second albedo of stripes / checkers / gradients
    frequency: Tensor  # [P] texture cycles per local unit
    tex_axis: Tensor  # [P, 3] unit local direction of stripes and gradients

    def to(self, device: torch.device | str) -> SyntheticObject:
        return SyntheticObject(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Exact world bounding box ``(lo [3], hi [3])`` of the union (support functions of the unit shapes)."""
        A, c = self.linear, self.centers  # [P, 3, 3], [P, 3]
        row_norm = A.norm(dim=-1)  # [P, 3] half extent of A @ unit ball
        disk = (A[..., 0] ** 2 + A[..., 2] ** 2).sqrt()  # [P, 3] half extent of A @ unit xz disk
        axis = A[..., 1]  # [P, 3] image of the local y axis
        half = torch.stack(
            [A.abs().sum(-1), row_norm, axis.abs() + disk, disk, disk + self.minor[:, None] * row_norm], dim=1
        )  # [P, 5, 3] per kind; the cone's entry is its base disk only
        half = half[torch.arange(len(c)), self.kinds]  # [P, 3]
        is_cone = (self.kinds == PRIMITIVES.index("cone"))[:, None]
        base = torch.where(is_cone, c - axis, c)  # the cone's base disk is centred at local (0, -1, 0)
        lo, hi = base - half, base + half
        apex = c + axis
        lo = torch.where(is_cone, torch.minimum(lo, apex), lo)
        hi = torch.where(is_cone, torch.maximum(hi, apex), hi)
        return lo.min(0).values, hi.max(0).values


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix [3, 3] from a normalised Gaussian quaternion."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _random_color(rng: np.random.Generator) -> list[float]:
    """A saturated, not-too-bright colour, so every object stands out from the white background."""
    return list(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.35, 1.0), rng.uniform(0.45, 0.95)))


def make_object(index: int, seed: int = 0, extent: float = 0.8) -> SyntheticObject:
    """Object ``index`` of the procedural set ``seed``, normalised to max bounding-box extent ``extent``, centred."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index, 0])
    parts: dict[str, list] = {f.name: [] for f in fields(SyntheticObject)}
    for _ in range(int(rng.integers(1, 5))):
        sizes = rng.uniform(0.12, 0.35) * rng.uniform(0.5, 1.6, size=3)
        axis = rng.normal(size=3)
        draws = {
            "kinds": int(rng.integers(len(PRIMITIVES))),
            "linear": _random_rotation(rng) @ np.diag(sizes),
            "centers": rng.uniform(-0.3, 0.3, size=3),
            "minor": rng.uniform(0.2, 0.45),
            "textures": int(rng.integers(len(TEXTURES))),
            "color_a": _random_color(rng),
            "color_b": _random_color(rng),
            "frequency": rng.uniform(1.0, 3.0),
            "tex_axis": axis / np.linalg.norm(axis),
        }
        for name, value in draws.items():
            parts[name].append(value)
    obj = SyntheticObject(
        **{
            name: torch.tensor(np.array(values), dtype=torch.int64 if name in ("kinds", "textures") else torch.float32)
            for name, values in parts.items()
        }
    )
    lo, hi = obj.bounds()
    scale = extent / (hi - lo).max()
    obj.linear = obj.linear * scale
    obj.centers = (obj.centers - (lo + hi) / 2) * scale
    return obj


### ray-primitive intersections in the local frame: (o [N, 3], d [N, 3], minor) -> (t [N], inf = miss; normal [N, 3])


def _nearest_root(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Both roots (t_near, t_far) of a t^2 + b t + c, inf where there is none."""
    disc = b * b - 4 * a * c
    sq = disc.clamp(min=0).sqrt()
    ok = (disc >= 0) & (a.abs() > 1e-12)
    inf = torch.full_like(a, math.inf)
    a_safe = torch.where(ok, a, torch.ones_like(a))
    r1, r2 = (-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)
    return torch.where(ok, torch.minimum(r1, r2), inf), torch.where(ok, torch.maximum(r1, r2), inf)


def _first_valid(*candidates: tuple[Tensor, Tensor]) -> Tensor:
    """Smallest positive t among (t, valid) candidates, inf where none."""
    best = None
    for t, valid in candidates:
        t = torch.where(valid & (t > 0), t, torch.full_like(t, math.inf))
        best = t if best is None else torch.minimum(best, t)
    return best


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return num / torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)


def _box(o: Tensor, d: Tensor, minor: float) -> tuple[Tensor, Tensor]:
    t1, t2 = _safe_div(-1 - o, d), _safe_div(1 - o, d)  # [N, 3] slab crossings
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    t = _first_valid((t_near, t_near <= t_far))
    normal = -F.one_hot(axis, 3).to(o.dtype) * torch.sign(d.gather(-1, axis[:, None]))
    return t, normal


def _sphere(o: Tensor, d: Tensor, minor: float) -> tuple[Tensor, Tensor]:
    t_near, _ = _nearest_root((d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - 1)
    t = _first_valid((t_near, torch.isfinite(t_near)))
    return t, o + torch.nan_to_num(t, posinf=0.0)[:, None] * d


def _caps(o: Tensor, d: Tensor, heights: tuple[float, ...]) -> list[tuple[Tensor, Tensor]]:
    """Crossings of the planes y = h inside the unit disk, as (t, valid) candidates."""
    out = []
    for h in heights:
        t = _safe_div(h - o[:, 1], d[:, 1])
        x, z = o[:, 0] + t * d[:, 0], o[:, 2] + t * d[:, 2]
        out.append((t, x * x + z * z <= 1))
    return out


def _cylinder(o: Tensor, d: Tensor, minor: float) -> tuple[Tensor, Tensor]:
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2])
    t_side, _ = _nearest_root(a, b, o[:, 0] ** 2 + o[:, 2] ** 2 - 1)
    y_side = o[:, 1] + torch.nan_to_num(t_side, posinf=0.0) * d[:, 1]
    t = _first_valid((t_side, y_side.abs() <= 1), *_caps(o, d, (-1.0, 1.0)))
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    on_cap = (p[:, 1].abs() > 1 - 1e-4) & (p[:, 0] ** 2 + p[:, 2] ** 2 < 1 - 1e-4)
    side = p * torch.tensor([1.0, 0.0, 1.0], device=p.device)
    cap = torch.zeros_like(p)
    cap[:, 1] = torch.sign(p[:, 1])
    return t, torch.where(on_cap[:, None], cap, side)


def _cone(o: Tensor, d: Tensor, minor: float) -> tuple[Tensor, Tensor]:
    # side: x^2 + z^2 = k^2 (1 - y)^2 with k = 1/2, for -1 <= y <= 1
    k2, w = 0.25, 1 - o[:, 1]
    a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
    b = 2 * (o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2] + k2 * w * d[:, 1])
    c = o[:, 0] ** 2 + o[:, 2] ** 2 - k2 * w * w
    roots = _nearest_root(a, b, c)
    sides = [(r, (o[:, 1] + torch.nan_to_num(r, posinf=0.0) * d[:, 1]).abs() <= 1) for r in roots]
    t = _first_valid(*sides, *_caps(o, d, (-1.0,)))
    p = o + torch.nan_to_num(t, posinf=0.0)[:, None] * d
    on_base = p[:, 1] < -1 + 1e-4
    side = torch.stack([p[:, 0], k2 * (1 - p[:, 1]), p[:, 2]], dim=-1)
    base = torch.zeros_like(p)
    base[:, 1] = -1
    return t, torch.where(on_base[:, None], base, side)


def _torus_sdf(p: Tensor, minor: float) -> Tensor:
    ring = (p[:, 0] ** 2 + p[:, 2] ** 2).sqrt() - 1
    return (ring * ring + p[:, 1] ** 2).sqrt() - minor


def _torus(o: Tensor, d: Tensor, minor: float) -> tuple[Tensor, Tensor]:
    """Entry point of the ray into the torus by sphere tracing with a minimum step, then bisection.

    The signed distance bounds every step, so the march never jumps over the surface except by the minimum step
    (1 / TORUS_SAMPLES of the chord through the bounding sphere), which may miss only chords thinner than that
    (rays grazing the tube within a sliver of the silhouette). Rays leave the loop once they enter or pass the
    sphere, so the work shrinks every iteration.
    """
    t = torch.full_like(o[:, 0], math.inf)
    normal = torch.zeros_like(o)
    t0, t1 = _nearest_root((d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - (1 + minor) ** 2)
    live = (torch.isfinite(t0) & (t1 > 0)).nonzero().squeeze(1)  # rays still marching
    t_cur, t_end = t0[live].clamp(min=0), t1[live]
    min_step = (t_end - t_cur) / TORUS_SAMPLES
    inv_speed = 1 / d[live].norm(dim=-1)  # local distance -> ray parameter
    hits, lows, highs = [live[:0]], [t_cur[:0]], [t_cur[:0]]
    while len(live) > 0:
        dist = _torus_sdf(o[live] + t_cur[:, None] * d[live], minor)
        inside = dist <= 0
        hits.append(live[inside])
        highs.append(t_cur[inside])
        lows.append((t_cur - min_step)[inside])
        step = torch.maximum(dist * inv_speed, min_step)
        keep = ~inside & (t_cur + step <= t_end + min_step)
        live, t_cur, t_end = live[keep], (t_cur + step)[keep], t_end[keep]
        min_step, inv_speed = min_step[keep], inv_speed[keep]
    idx, lo, hi = torch.cat(hits), torch.cat(lows), torch.cat(highs)
    oi, di = o[idx], d[idx]
    for _ in range(TORUS_BISECTIONS):
        mid = (lo + hi) / 2
        inside = _torus_sdf(oi + mid[:, None] * di, minor) <= 0
        lo, hi = torch.where(inside, lo, mid), torch.where(inside, mid, hi)
    p = oi + hi[:, None] * di
    core = p * torch.tensor([1.0, 0.0, 1.0], device=p.device)
    t[idx] = hi
    normal[idx] = p - F.normalize(core, dim=-1)
    return t, normal


_INTERSECT = {"box": _box, "sphere": _sphere, "cylinder": _cylinder, "cone": _cone, "torus": _torus}


def _albedo(p: Tensor, texture: str, color_a: Tensor, color_b: Tensor, frequency: float, axis: Tensor) -> Tensor:
    """Procedural colour [N, 3] at local points p [N, 3]."""
    if texture == "solid":
        return color_a.expand_as(p)
    if texture == "gradient":
        w = ((p @ axis + 1) / 2).clamp(0, 1)[:, None]
        return color_a * (1 - w) + color_b * w
    if texture == "stripes":
        parity = torch.floor(frequency * (p @ axis)).long() % 2
    else:  # checkers
        parity = torch.floor(frequency * p).long().sum(-1) % 2
    return torch.where(parity[:, None] == 0, color_a, color_b)


def cast_rays(obj: SyntheticObject, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest hit of world rays ``origins, dirs [N, 3]`` (unit dirs) with the object.

    Returns ``t [N]`` (world distance, inf where no hit), unit world ``normals [N, 3]`` and ``albedo [N, 3]``
    (zeros where no hit). Each primitive only sees the rays that cross its bounding sphere.
    """
    t_best = torch.full_like(origins[:, 0], math.inf)
    normals, albedo = torch.zeros_like(origins), torch.zeros_like(origins)
    A_inv = torch.linalg.inv(obj.linear)  # [P, 3, 3]
    radii = torch.linalg.matrix_norm(obj.linear, ord=2) * _local_radius(obj)  # [P] world bounding spheres
    for p, kind in enumerate(obj.kinds.tolist()):
        rel = origins - obj.centers[p]  # [N, 3]
        b = (rel * dirs).sum(-1)
        near = ((b * b - (rel * rel).sum(-1) + radii[p] ** 2 >= 0) & (b < 0)).nonzero().squeeze(1)
        if len(near) == 0:
            continue
        o_local = rel[near] @ A_inv[p].T  # [n, 3]
        d_local = dirs[near] @ A_inv[p].T
        t, n_local = _INTERSECT[PRIMITIVES[kind]](o_local, d_local, float(obj.minor[p]))
        closer = t < t_best[near]
        rays, t, n_local = near[closer], t[closer], n_local[closer]
        t_best[rays] = t
        normals[rays] = F.normalize(n_local @ A_inv[p], dim=-1)  # inverse-transpose map of normals
        hit_local = o_local[closer] + t[:, None] * d_local[closer]
        texture = TEXTURES[int(obj.textures[p])]
        albedo[rays] = _albedo(
            hit_local, texture, obj.color_a[p], obj.color_b[p], float(obj.frequency[p]), obj.tex_axis[p]
        )
    return t_best, normals, albedo


def _local_radius(obj: SyntheticObject) -> Tensor:
    """[P] radius of a ball around the local origin that holds each unit primitive."""
    per_kind = torch.tensor([math.sqrt(3), 1.0, math.sqrt(2), math.sqrt(2), 0.0], device=obj.minor.device)
    return torch.where(obj.kinds == PRIMITIVES.index("torus"), 1 + obj.minor, per_kind[obj.kinds])


@dataclass
class SyntheticRender:
    """Ray-cast views; leading dims ``...`` are the cameras' batch shape."""

    rgb: Tensor  # [..., 3, H, W] shaded colour composited on white, in [0, 1]
    mask: Tensor  # [..., 1, H, W] coverage (alpha): 1 on the object, fractional at supersampled edges
    depth: Tensor  # [..., 1, H, W] camera-space depth (distance along the optical axis), 0 where nothing is hit
    normals: Tensor | None  # [..., 3, H, W] unit world normals (0 off the object), if requested


def render_object(
    obj: SyntheticObject,
    cameras: Cameras,
    supersample: int = 1,
    with_normals: bool = False,
    max_rays: int = 1 << 21,
) -> SyntheticRender:
    """Render ``obj`` from ``cameras`` on the cameras' device; ``supersample`` s casts s x s rays per pixel.

    Views are processed in chunks of at most ``max_rays`` rays (one view at least) to bound memory. With
    supersampling, rgb and mask are box-filtered, depth and normals averaged over the covered sub-pixels.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    device, s = cameras.c2w.device, supersample
    obj = obj.to(device)
    batch, H, W = cameras.batch_shape, cameras.height, cameras.width
    c2w = cameras.c2w.reshape(-1, 4, 4).float()  # [V, 4, 4]
    K = cameras.K.reshape(-1, 3, 3).float() * torch.tensor([s, s, 1.0], device=device)[:, None]
    lights = torch.stack([KEY_LIGHT, FILL_LIGHT]).to(device)  # [2, 3]
    chunk = max(1, max_rays // (H * W * s * s))
    outputs = []
    for v in range(0, len(c2w), chunk):
        origins, dirs = get_rays(Cameras(c2w[v : v + chunk], K[v : v + chunk], W * s, H * s))  # [v, Hs, Ws, 3]
        t, normals, albedo = cast_rays(obj, origins.reshape(-1, 3), dirs.reshape(-1, 3))
        hit = torch.isfinite(t)[:, None].float()  # [N, 1]
        lambert = (normals @ lights.T).clamp(min=0)  # [N, 2]
        shade = AMBIENT + KEY_WEIGHT * lambert[:, :1] + FILL_WEIGHT * lambert[:, 1:]
        rgb = (albedo * shade).clamp(0, 1) * hit + (1 - hit)
        forward = -c2w[v : v + chunk, :3, 2]  # [v, 3] optical axes
        z = torch.nan_to_num(t, posinf=0.0).reshape(dirs.shape[:-1]) * (dirs * forward[:, None, None]).sum(-1)
        maps = torch.cat([rgb, hit, z.reshape(-1, 1) * hit, normals], dim=-1)  # [N, 8]
        outputs.append(maps.reshape(*dirs.shape[:-1], 8).permute(0, 3, 1, 2))  # [v, 8, Hs, Ws]
    maps = F.avg_pool2d(torch.cat(outputs), s) if s > 1 else torch.cat(outputs)  # [V, 8, H, W]
    coverage = maps[:, 3:4]
    depth = maps[:, 4:5] / coverage.clamp(min=1e-8)
    normals = F.normalize(maps[:, 5:8], dim=1) if with_normals else None
    unflat = lambda x: None if x is None else x.reshape(*batch, *x.shape[1:])  # noqa: E731
    return SyntheticRender(unflat(maps[:, :3]), unflat(coverage), unflat(depth), unflat(normals))


class SyntheticMultiViewDataset(Dataset):
    """Procedural objects rendered on the fly into the training sample of :func:`gen3diffusion.data.assemble_sample`.

    Relative cameras: the input azimuth is uniform in [0, 360) at elevation 0 (any angle, not only the 32-view
    ring), the 4 targets follow at +90 deg steps. Absolute cameras: ring azimuths 11.25 k as the authors' human set.
    Supervision views: ``num_sup_views`` orbit cameras at radius ``cfg.radius``, elevation uniform in
    ``cfg.elevation_range``, azimuth uniform. A sample depends on ``(cfg.seed, index, epoch)`` only; call
    :meth:`set_epoch` before each epoch for fresh cameras (objects stay fixed). Renders on ``cfg.device`` and returns
    tensors there (use ``num_workers=0`` with a CUDA device).
    """

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.num_objects < 1 or cfg.num_sup_views < 1 or cfg.image_size < 1 or cfg.sup_size < 1:
            raise ValueError(
                "data.num_objects, num_sup_views, image_size and sup_size must be >= 1, got "
                f"{cfg.num_objects}, {cfg.num_sup_views}, {cfg.image_size}, {cfg.sup_size}"
            )
        lo, hi = cfg.elevation_range
        if not -90 <= lo <= hi <= 90:
            raise ValueError(f"data.elevation_range must satisfy -90 <= lo <= hi <= 90, got {[lo, hi]}")
        self.cfg, self.mode, self.extent, self.epoch = cfg, camera_mode(cfg), max_extent(cfg), 0

    def __len__(self) -> int:
        return self.cfg.num_objects

    def set_epoch(self, epoch: int) -> None:
        """Draw new cameras for every object from now on (the objects themselves do not change)."""
        self.epoch = epoch

    def object(self, index: int) -> SyntheticObject:
        return make_object(index, self.cfg.seed, self.extent)

    def world_cameras(self, index: int) -> dict[str, Tensor]:
        """World poses (float64, on ``cfg.device``) drawn for sample ``index`` in the current epoch:
        ``targets [4, 4, 4]``, ``input [4, 4]`` and ``sup [S, 4, 4]``."""
        cfg, rng = self.cfg, sample_rng(self.cfg, index, self.epoch)
        if self.mode == "relative":
            input_az = rng.uniform(0.0, 360.0)
            azimuths = [input_az + 90.0 * k for k in range(4)] + [input_az]
        else:
            input_k, target_ks = choose_ring_views(cfg, rng)
            azimuths = [RING_STEP_DEG * k for k in target_ks] + [RING_STEP_DEG * input_k]
        sup_el = torch.from_numpy(rng.uniform(*cfg.elevation_range, size=cfg.num_sup_views))
        sup_az = torch.from_numpy(rng.uniform(0.0, 360.0, size=cfg.num_sup_views))
        ring = orbit_camera(0.0, torch.tensor(azimuths, dtype=torch.float64), cfg.radius, device=cfg.device)
        sup = orbit_camera(sup_el, sup_az, cfg.radius, device=cfg.device)
        return {"targets": ring[:4], "input": ring[4], "sup": sup}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic objects")
        cfg, poses, obj = self.cfg, self.world_cameras(index), self.object(index)
        ring = poses["targets"] if self.mode == "relative" else torch.cat([poses["targets"], poses["input"][None]])
        views = self.render(obj, Cameras.from_fovy(ring.float(), cfg.fovy, cfg.image_size)).rgb  # [4 or 5, 3, H, W]
        sup = self.render(obj, Cameras.from_fovy(poses["sup"].float(), cfg.fovy, cfg.sup_size))
        sup_K = intrinsics_from_fovy(cfg.fovy, cfg.sup_size, cfg.sup_size, device=cfg.device)
        return assemble_sample(
            cfg,
            object_id=f"synthetic_{index:06d}",
            input_image=views[-1] if self.mode == "absolute" else views[0],
            target_images=views[:4],
            target_c2w_world=poses["targets"],
            sup_images=sup.rgb,
            sup_masks=sup.mask,
            sup_c2w_world=poses["sup"],
            sup_K=sup_K.expand(cfg.num_sup_views, 3, 3),
        )

    def render(self, obj: SyntheticObject, cameras: Cameras) -> SyntheticRender:
        return render_object(obj, cameras, supersample=self.cfg.supersample)


### writing objects to disk


def rig_cameras(
    num_spiral: int = 32, elevation_range: tuple[float, float] = (-60.0, 60.0), radius: float = 1.5, turns: int = 4
) -> Tensor:
    """Render rig ``[num_spiral + 32, 4, 4]`` (float64): a spiral of ``num_spiral`` views climbing through
    ``elevation_range`` in ``turns`` turns, then the 32-view elevation-0 ring at azimuth 11.25 k (as the authors'
    rig: spiral first, ring last)."""
    el = torch.linspace(*elevation_range, num_spiral, dtype=torch.float64)
    az = torch.arange(num_spiral, dtype=torch.float64) * (360.0 * turns / max(num_spiral, 1))
    ring_az = torch.arange(RING_VIEWS, dtype=torch.float64) * RING_STEP_DEG
    spiral = orbit_camera(el, az, radius, dtype=torch.float64)
    ring = orbit_camera(0.0, ring_az, radius, dtype=torch.float64)
    return torch.cat([spiral, ring])


def write_synthetic_dataset(
    cfg: DataConfig, output: str | Path, resolution: int = 512, num_spiral: int = 32, overwrite: bool = False,
    mesh_resolution: int | None = None,
) -> int:
    """Render objects ``0 .. cfg.num_objects - 1`` with :func:`rig_cameras` into ``output/synthetic_{i:06d}/``.

    With ``mesh_resolution`` each folder also gets ``mesh.glb``, the surface by marching cubes on that grid
    (``data/synthetic_mesh.py``; y-up glTF, which ``scripts/eval_gso.py`` takes as the GT mesh).

    Uses ``cfg.seed``, ``cfg.task`` / ``max_extent``, ``radius``, ``fovy``, ``elevation_range``, ``supersample``
    and ``device``. Existing object folders are kept unless ``overwrite`` (so an interrupted run resumes).
    Returns the number of objects written.
    """
    from gen3diffusion.data.multiview import write_object

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    c2w = rig_cameras(num_spiral, tuple(cfg.elevation_range), cfg.radius).to(cfg.device)
    cameras = Cameras.from_fovy(c2w.float(), cfg.fovy, resolution)
    written = 0
    for index in range(cfg.num_objects):
        folder = output / f"synthetic_{index:06d}"
        if folder.exists() and not overwrite:
            continue
        out = render_object(make_object(index, cfg.seed, max_extent(cfg)), cameras, cfg.supersample)
        rgba = torch.cat([(out.rgb - (1 - out.mask)) / out.mask.clamp(min=1e-6), out.mask], dim=1)  # un-composite
        extra = {}
        if mesh_resolution:
            from gen3diffusion.data.synthetic_mesh import object_mesh

            extra["mesh.glb"] = object_mesh(make_object(index, cfg.seed, max_extent(cfg)), mesh_resolution).export(
                file_type="glb")
        write_object(folder, rgba.clamp(0, 1).cpu(), c2w.cpu(), cameras.K.cpu(), overwrite=overwrite,
                     extra_files=extra)
        written += 1
        logger.info("wrote %s (%d/%d)", folder.name, index + 1, cfg.num_objects)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write procedural multi-view objects in the folder format.")
    parser.add_argument("--output", required=True, help="dataset root; one sub-folder per object")
    parser.add_argument("--num-objects", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("objects", "avatars"), default="objects")
    parser.add_argument("--resolution", type=int, default=512, help="pixels per side of every view")
    parser.add_argument("--num-spiral", type=int, default=32, help="spiral views besides the 32-view ring")
    parser.add_argument("--supersample", type=int, default=2, help="rays per pixel per axis (antialiasing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mesh-resolution", type=int, default=None,
                        help="also write mesh.glb (marching cubes on this grid, e.g. 128): the GT for eval_gso.py")
    parser.add_argument("--overwrite", action="store_true", help="re-render objects whose folder exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = DataConfig(
        num_objects=args.num_objects, seed=args.seed, task=args.task, supersample=args.supersample, device=args.device
    )
    written = write_synthetic_dataset(cfg, args.output, args.resolution, args.num_spiral, args.overwrite,
                                      args.mesh_resolution)
    logger.info("%d objects written to %s", written, args.output)


if __name__ == "__main__":
    main()
