"""Geometry metrics between a predicted mesh and a ground-truth scan: Chamfer, P2S, normal consistency, F-score.

Published numbers for "the same" metric differ by factors of 2 (mean vs sum of the two Chamfer directions), 100
(x100 "cm" units), 2 again (unit cube vs [-1, 1] normalisation) and by squaring. Every such choice is a field of
:class:`GeometryMetricConfig`, and :meth:`GeometryMetricConfig.describe` is printed with the results. The defaults
follow the paper's text (normalise, then ICP, as SiTH and EscherNet) and the notes in
``reference/eval_protocol_weights_gsplat.md``: unit cube per mesh, similarity ICP, 100k area-weighted samples,
CD = mean of the two directional means (L2, not squared) x100, P2S from the prediction to the exact GT surface x100,
NC as SiTH, F-score at 0.01 (1% of the box side, Tatarchenko et al.).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import trimesh
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("unit_cube", "[-1,1]", "none")
# half the side of the box each normalisation fits the larger bounding-box side into
_HALF_SIDE = {"unit_cube": 0.5, "[-1,1]": 1.0}


@dataclass
class GeometryMetricConfig:
    """Conventions of the geometry metrics (the lead moves this into config.py)."""

    # surface samples per mesh: area-weighted, uniform within each triangle, from numpy's default_rng(seed)
    num_samples: int = 100_000
    seed: int = 0
    # "unit_cube": larger bbox side -> 1 centred at 0 ([-0.5, 0.5]); "[-1,1]": larger side -> 2; "none": mesh units
    normalization: str = "unit_cube"
    # whose bounding box normalises the prediction: "each" (its own, as EscherNet) or "gt" (the GT's, same frame)
    normalize_by: str = "each"
    # align the prediction to the GT by point-to-point ICP (paper: "perform ICP ... same as SiTH, EscherNet")
    icp: bool = True
    # estimate a uniform scale at each ICP step (Umeyama similarity, as trimesh.registration.icp used by SiTH)
    icp_scale: bool = True
    icp_iterations: int = 50
    # ICP stops once the mean nearest-neighbour distance improves by less than this (normalised units)
    icp_tolerance: float = 1e-7
    # samples of each mesh used by ICP (the first ones of the metric samples; they are i.i.d.)
    icp_num_points: int = 20_000
    # Chamfer: "mean" = (mean d(pred->gt) + mean d(gt->pred)) / 2 (EscherNet, ICON); "sum" = without / 2 (MVGBench)
    chamfer_reduction: str = "mean"
    # Chamfer of squared distances (as some point-cloud papers) instead of L2 distances
    chamfer_squared: bool = False
    # CD and P2S are multiplied by this; 100 reads as cm when the normalisation box is 1 m
    distance_scale: float = 100.0
    # P2S target: "surface" = exact distance to the triangles (open3d, else trimesh+rtree); "samples" = to the
    # nearest surface sample of the other mesh
    p2s_target: str = "surface"
    # P2S direction: "pred_to_gt" = predicted samples to the GT surface (SiTH's P-to-S); "gt_to_pred" (ICON's P2S)
    p2s_direction: str = "pred_to_gt"
    # F-score distance threshold in normalised units: 0.01 = 1% of the unit cube (use 0.02 for "[-1,1]")
    fscore_threshold: float = 0.01

    def validate(self) -> None:
        """Raise ValueError naming the first field with a value outside its choices."""
        choices = {"normalization": NORMALIZATIONS, "normalize_by": ("each", "gt"),
                   "chamfer_reduction": ("mean", "sum"), "p2s_target": ("surface", "samples"),
                   "p2s_direction": ("pred_to_gt", "gt_to_pred")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"geometry.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("num_samples", "icp_iterations", "icp_num_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"geometry.{name}={getattr(self, name)} must be >= 1")
        if self.fscore_threshold <= 0 or self.distance_scale <= 0:
            raise ValueError(f"geometry.fscore_threshold={self.fscore_threshold} and distance_scale="
                             f"{self.distance_scale} must be > 0")

    def describe(self) -> str:
        """One line per convention, to print beside the numbers."""
        icp = (f"{'similarity' if self.icp_scale else 'rigid'} point-to-point ICP, <= {self.icp_iterations} it, "
               f"{self.icp_num_points} pts" if self.icp else "none")
        power = "squared L2" if self.chamfer_squared else "L2 (not squared)"
        target = "exact surface" if self.p2s_target == "surface" else "nearest sample"
        half = "two directional means " + ("averaged (/2)" if self.chamfer_reduction == "mean" else "summed")
        return "\n".join([
            f"samples: {self.num_samples} area-weighted per mesh (seed {self.seed})",
            f"normalisation: {self.normalization} "
            f"(bbox of {'each mesh' if self.normalize_by == 'each' else 'the GT'})",
            f"alignment: {icp}",
            f"CD: {half}, {power}, x{self.distance_scale:g}",
            f"P2S: mean {self.p2s_direction.replace('_', ' ')} "
            f"{target} distance, x{self.distance_scale:g}",
            "NC: mean |cos| between each sample normal and its nearest neighbour's, both directions averaged",
            f"F-score: threshold {self.fscore_threshold:g} (normalised units, strict <), in [0, 1]",
        ])


@dataclass
class SimilarityTransform:
    """x -> scale * rotation @ x + translation."""

    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  # [3, 3], det +1
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  # [3]

    def apply(self, points: np.ndarray) -> np.ndarray:  # [N, 3] -> [N, 3]
        return self.scale * points @ self.rotation.T + self.translation

    @property
    def matrix(self) -> np.ndarray:  # [4, 4]
        out = np.eye(4)
        out[:3, :3] = self.scale * self.rotation
        out[:3, 3] = self.translation
        return out


@dataclass
class ICPResult:
    transform: SimilarityTransform  # maps the source onto the target
    mean_distance: float  # mean source -> target nearest-neighbour distance after alignment
    iterations: int


@dataclass
class GeometryMetrics:
    """Metric values (in the units ``config`` states) and the conventions that produced them."""

    chamfer: float
    p2s: float
    normal_consistency: float
    fscore: float
    precision: float
    recall: float
    config: GeometryMetricConfig
    alignment: ICPResult | None = None

    def as_dict(self) -> dict[str, float]:
        return {"chamfer": self.chamfer, "p2s": self.p2s, "normal_consistency": self.normal_consistency,
                "fscore": self.fscore, "precision": self.precision, "recall": self.recall}

    def __str__(self) -> str:
        values = ", ".join(f"{key} {value:.5g}" for key, value in self.as_dict().items())
        return f"{values}\n{self.config.describe()}"


def sample_surface(mesh: trimesh.Trimesh, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform samples of a triangle mesh and the normals of their faces: [N, 3], [N, 3]."""
    areas = np.asarray(mesh.area_faces, dtype=np.float64)  # [F]
    if len(areas) == 0 or areas.sum() <= 0:
        raise ValueError(f"mesh has no area to sample ({len(mesh.faces)} faces)")
    rng = np.random.default_rng(seed)
    faces = rng.choice(len(areas), size=count, p=areas / areas.sum())  # [N]
    r1, r2 = rng.random((2, count, 1))
    root = np.sqrt(r1)
    corners = np.asarray(mesh.triangles, dtype=np.float64)[faces]  # [N, 3 corners, 3]
    points = (1 - root) * corners[:, 0] + root * (1 - r2) * corners[:, 1] + root * r2 * corners[:, 2]
    return points, np.asarray(mesh.face_normals, dtype=np.float64)[faces]


def normalization_transform(bounds: np.ndarray, mode: str) -> SimilarityTransform:
    """Translate the bounding box [2, 3] to the origin and scale its larger side to the ``mode`` box."""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalization {mode!r} unknown; use one of {NORMALIZATIONS}")
    if mode == "none":
        return SimilarityTransform()
    bounds = np.asarray(bounds, dtype=np.float64)
    extent = float((bounds[1] - bounds[0]).max())
    if extent <= 0:
        raise ValueError(f"degenerate bounding box {bounds.tolist()}")
    scale = 2.0 * _HALF_SIDE[mode] / extent
    return SimilarityTransform(scale=scale, translation=-scale * bounds.mean(axis=0))


def umeyama(source: np.ndarray, target: np.ndarray, with_scale: bool = True) -> SimilarityTransform:
    """Least-squares similarity (Umeyama 1991) mapping corresponding points source [N, 3] onto target [N, 3].

    Reflections are excluded (det R = +1), so a mirrored prediction is not silently "aligned".
    """
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    xs, xt = source - mu_s, target - mu_t
    u, d, vt = np.linalg.svd(xt.T @ xs / len(source))
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0
    rotation = (u * sign) @ vt
    variance = float((xs**2).sum() / len(source))
    scale = float((d * sign).sum() / variance) if with_scale else 1.0
    return SimilarityTransform(scale=scale, rotation=rotation, translation=mu_t - scale * rotation @ mu_s)


def icp(source: np.ndarray, target: np.ndarray, iterations: int = 50, tolerance: float = 1e-7,
        with_scale: bool = True) -> ICPResult:
    """Point-to-point ICP from the identity: nearest neighbours (cKDTree) then an Umeyama fit, until converged.

    A local method: it recovers rotations of a few tens of degrees, not arbitrary poses; put both shapes in a common
    frame first (the evaluation rig does).
    """
    tree = cKDTree(target)
    transform = SimilarityTransform()
    previous = np.inf
    for step in range(1, iterations + 1):
        distances, index = tree.query(transform.apply(source))
        error = float(distances.mean())
        if previous - error < tolerance:
            return ICPResult(transform, error, step - 1)
        previous = error
        transform = umeyama(source, target[index], with_scale)
    return ICPResult(transform, float(tree.query(transform.apply(source))[0].mean()), iterations)


def nearest_neighbors(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, the nearest reference point for every query point: [N], [N]."""
    return cKDTree(reference).query(query, workers=-1)


def _chamfer(d_pg: np.ndarray, d_gp: np.ndarray, reduction: str, squared: bool) -> float:
    power = 2 if squared else 1
    total = float(np.mean(d_pg**power) + np.mean(d_gp**power))
    return total / 2 if reduction == "mean" else total


def _fscore(d_pg: np.ndarray, d_gp: np.ndarray, threshold: float) -> tuple[float, float, float]:
    precision, recall = float(np.mean(d_pg < threshold)), float(np.mean(d_gp < threshold))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return f, precision, recall


def chamfer_distance(pred: np.ndarray, gt: np.ndarray, reduction: str = "mean", squared: bool = False) -> float:
    """Chamfer distance of point sets [N, 3] and [M, 3] (unscaled): mean or sum of the two directional means."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chamfer reduction {reduction!r}; expected 'mean' or 'sum'")
    return _chamfer(nearest_neighbors(pred, gt)[0], nearest_neighbors(gt, pred)[0], reduction, squared)


def fscore(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """F-score, precision (pred -> gt) and recall (gt -> pred) at ``threshold`` (Tatarchenko et al. 2019)."""
    return _fscore(nearest_neighbors(pred, gt)[0], nearest_neighbors(gt, pred)[0], threshold)


def normal_consistency(points_a: np.ndarray, normals_a: np.ndarray, points_b: np.ndarray,
                       normals_b: np.ndarray) -> float:
    """Mean |cos| between each point's normal and its nearest neighbour's in the other set, both ways averaged."""
    _, a_to_b = nearest_neighbors(points_a, points_b)
    _, b_to_a = nearest_neighbors(points_b, points_a)
    return _normal_consistency(normals_a, normals_b, a_to_b, b_to_a)


def _normal_consistency(normals_a: np.ndarray, normals_b: np.ndarray, a_to_b: np.ndarray, b_to_a: np.ndarray) -> float:
    cos_ab = np.abs(np.sum(normals_a * normals_b[a_to_b], axis=1))
    cos_ba = np.abs(np.sum(normals_b * normals_a[b_to_a], axis=1))
    return float((cos_ab.mean() + cos_ba.mean()) / 2)


def point_to_surface_distance(points: np.ndarray, mesh: trimesh.Trimesh) -> np.ndarray:
    """Exact distance [N] from points [N, 3] to the triangles of ``mesh``.

    Uses open3d's RaycastingScene (float32, about 1e-7 relative error) when installed, else
    ``trimesh.proximity.closest_point``, which needs the ``rtree`` package and is much slower.
    """
    try:
        import open3d as o3d
    except ImportError:
        logger.info("open3d not installed; point-to-surface distance through trimesh.proximity (needs rtree)")
        return trimesh.proximity.closest_point(mesh, points)[1]
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.asarray(mesh.vertices, dtype=np.float32)),
                        o3d.core.Tensor(np.asarray(mesh.faces, dtype=np.uint32)))
    return scene.compute_distance(o3d.core.Tensor(np.asarray(points, dtype=np.float32))).numpy().astype(np.float64)


def _transformed(mesh: trimesh.Trimesh, transform: SimilarityTransform) -> trimesh.Trimesh:
    out = mesh.copy()
    out.apply_transform(transform.matrix)
    return out


def evaluate_meshes(pred: trimesh.Trimesh, gt: trimesh.Trimesh,
                    config: GeometryMetricConfig | None = None) -> GeometryMetrics:
    """Normalise, sample, optionally align the prediction to the GT by ICP, and measure CD, P2S, NC and F-score."""
    config = config or GeometryMetricConfig()
    config.validate()
    for name, mesh in (("pred", pred), ("gt", gt)):
        if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
            raise ValueError(f"{name} must be a trimesh.Trimesh with faces, got {type(mesh).__name__}")
    # 1. normalise both meshes into the same box
    gt_norm = normalization_transform(gt.bounds, config.normalization)
    pred_norm = gt_norm if config.normalize_by == "gt" else normalization_transform(pred.bounds, config.normalization)
    gt, pred = _transformed(gt, gt_norm), _transformed(pred, pred_norm)
    # 2. sample both surfaces (the same random stream, so identical meshes give identical samples)
    gt_points, gt_normals = sample_surface(gt, config.num_samples, config.seed)  # [N, 3] each
    pred_points, pred_normals = sample_surface(pred, config.num_samples, config.seed)
    # 3. align the prediction to the GT
    alignment = None
    if config.icp:
        k = min(config.icp_num_points, config.num_samples)
        alignment = icp(pred_points[:k], gt_points[:k], config.icp_iterations, config.icp_tolerance, config.icp_scale)
        transform = alignment.transform
        pred_points, pred_normals = transform.apply(pred_points), pred_normals @ transform.rotation.T
        pred = _transformed(pred, transform)
    # 4. measure
    d_pg, i_pg = nearest_neighbors(pred_points, gt_points)  # [N]
    d_gp, i_gp = nearest_neighbors(gt_points, pred_points)
    if config.p2s_target == "samples":
        p2s = d_pg if config.p2s_direction == "pred_to_gt" else d_gp
    elif config.p2s_direction == "pred_to_gt":
        p2s = point_to_surface_distance(pred_points, gt)
    else:
        p2s = point_to_surface_distance(gt_points, pred)
    f, precision, recall = _fscore(d_pg, d_gp, config.fscore_threshold)
    return GeometryMetrics(
        chamfer=config.distance_scale * _chamfer(d_pg, d_gp, config.chamfer_reduction, config.chamfer_squared),
        p2s=config.distance_scale * float(p2s.mean()),
        normal_consistency=_normal_consistency(pred_normals, gt_normals, i_pg, i_gp),
        fscore=f, precision=precision, recall=recall, config=config, alignment=alignment,
    )
