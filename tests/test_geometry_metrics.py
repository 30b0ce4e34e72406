"""Geometry metrics: exact values on hand-built point sets, ICP recovery of a known similarity, mesh self-checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from gen3diffusion.eval.geometry import (
    GeometryMetricConfig,
    SimilarityTransform,
    chamfer_distance,
    evaluate_meshes,
    fscore,
    icp,
    normal_consistency,
    normalization_transform,
    point_to_surface_distance,
    sample_surface,
    umeyama,
)

# small sample counts keep every test well under a second
FAST = GeometryMetricConfig(num_samples=4000, icp_num_points=2000)


def _asymmetric_mesh() -> trimesh.Trimesh:
    """A box with a sphere on one corner: no symmetry that ICP could confuse with the true pose."""
    box = trimesh.creation.box(extents=(0.8, 0.5, 0.3))
    knob = trimesh.creation.icosphere(subdivisions=2, radius=0.15)
    knob.apply_translation((0.4, 0.25, 0.15))
    return trimesh.util.concatenate([box, knob])


def _known_transform() -> SimilarityTransform:
    rotation = Rotation.from_rotvec(np.deg2rad(12.0) * np.array([1.0, 2.0, -1.0]) / np.sqrt(6.0)).as_matrix()
    return SimilarityTransform(scale=1.25, rotation=rotation, translation=np.array([0.05, -0.03, 0.02]))


### point-set metrics with exact values


# pred a = {(0,0,0), (1,0,0)}, gt b = {(0,0,0), (0,2,0)}: a->b distances (0, 1), b->a distances (0, 2)
A = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
B = np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])


@pytest.mark.parametrize("reduction,squared,expected", [
    ("mean", False, (0.5 + 1.0) / 2), ("sum", False, 0.5 + 1.0),
    ("mean", True, (0.5 + 2.0) / 2), ("sum", True, 0.5 + 2.0),
])
def test_chamfer_of_hand_built_points(reduction, squared, expected):
    assert chamfer_distance(A, B, reduction, squared) == pytest.approx(expected, abs=1e-12)
    assert chamfer_distance(A, A, reduction, squared) == 0.0


@pytest.mark.parametrize("threshold,expected", [
    (1.5, (2 / 3, 1.0, 0.5)),  # precision: a->b (0, 1) both < 1.5; recall: b->a (0, 2) one of two
    (0.5, (0.5, 0.5, 0.5)),
    (1.0, (0.5, 0.5, 0.5)),  # strict <: a distance equal to the threshold does not count
])
def test_fscore_of_hand_built_points(threshold, expected):
    assert fscore(A, B, threshold) == pytest.approx(expected, abs=1e-12)


def test_normal_consistency_exact():
    normals_a = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])  # a flipped normal still counts as consistent
    normals_b = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # a->b: both a points' nearest b is b0 -> |cos| (1, 1); b->a: b0 -> a0 (1), b1 -> a0 (0)
    assert normal_consistency(A, normals_a, B, normals_b) == pytest.approx((1.0 + 0.5) / 2)


### sampling, normalisation, alignment


def test_sample_surface_is_area_weighted_seeded_and_on_the_surface():
    mesh = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    points, normals = sample_surface(mesh, 20000, seed=3)
    again, _ = sample_surface(mesh, 20000, seed=3)
    np.testing.assert_array_equal(points, again)
    assert np.abs(point_to_surface_distance(points, mesh)).max() < 1e-6  # open3d works in float32
    top = normals[:, 2] > 0.5  # the top 2 x 1 face holds 2 of the box's area 2 * (2*1 + 2*0.5 + 1*0.5) = 7
    assert top.mean() == pytest.approx(2.0 / 7.0, abs=0.015)  # binomial std at N = 2e4 is 0.0032


@pytest.mark.parametrize("mode,half", [("unit_cube", 0.5), ("[-1,1]", 1.0)])
def test_normalization_fits_the_larger_side(mode, half):
    mesh = trimesh.creation.box(extents=(4.0, 2.0, 1.0))
    mesh.apply_translation((3.0, -1.0, 2.0))
    transform = normalization_transform(mesh.bounds, mode)
    moved = transform.apply(mesh.vertices)
    np.testing.assert_allclose(moved.max(axis=0)[0], half)
    np.testing.assert_allclose(moved.min(axis=0) + moved.max(axis=0), 0.0, atol=1e-12)


def test_umeyama_exact_correspondences():
    points = np.random.default_rng(0).normal(size=(50, 3))
    known = _known_transform()
    fit = umeyama(points, known.apply(points))
    np.testing.assert_allclose(fit.matrix, known.matrix, atol=1e-10)


def test_icp_recovers_rotation_translation_and_scale():
    points, _ = sample_surface(_asymmetric_mesh(), 3000, seed=0)
    known = _known_transform()
    result = icp(points, known.apply(points), iterations=100, tolerance=1e-12, with_scale=True)
    np.testing.assert_allclose(result.transform.rotation, known.rotation, atol=1e-6)
    np.testing.assert_allclose(result.transform.translation, known.translation, atol=1e-6)
    assert result.transform.scale == pytest.approx(known.scale, abs=1e-6)
    assert result.mean_distance < 1e-6


### meshes end to end


def test_mesh_against_itself_is_perfect():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    result = evaluate_meshes(mesh, mesh, FAST)
    assert result.chamfer == pytest.approx(0.0, abs=1e-9)
    assert result.p2s == pytest.approx(0.0, abs=1e-4)  # x100 of float32 surface distances
    assert result.normal_consistency == pytest.approx(1.0)
    assert (result.fscore, result.precision, result.recall) == (1.0, 1.0, 1.0)


def test_points_on_the_surface_have_zero_p2s_in_both_modes():
    mesh = _asymmetric_mesh()
    points, _ = sample_surface(mesh, 2000, seed=5)
    assert point_to_surface_distance(points, mesh).max() < 1e-6
    for target in ("surface", "samples"):
        config = dataclasses.replace(FAST, p2s_target=target, icp=False)
        assert evaluate_meshes(mesh, mesh, config).p2s == pytest.approx(0.0, abs=1e-4)


def test_icp_undoes_a_known_similarity_of_the_prediction():
    gt = _asymmetric_mesh()
    pred = gt.copy()
    pred.apply_transform(_known_transform().matrix)
    base = dataclasses.replace(FAST, normalize_by="gt", icp_iterations=100)
    aligned = evaluate_meshes(pred, gt, base)
    unaligned = evaluate_meshes(pred, gt, dataclasses.replace(base, icp=False))
    # independent-looking samples of one surface: CD ~ the mean sample spacing, well below the misalignment
    assert aligned.chamfer < 0.1 * unaligned.chamfer
    assert aligned.fscore > 0.95 > unaligned.fscore
    assert aligned.normal_consistency > 0.97
    assert aligned.alignment.transform.scale == pytest.approx(1 / 1.25, rel=1e-3)


def test_conventions_scale_as_documented():
    gt = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    pred = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    base = dataclasses.replace(FAST, icp=False, normalize_by="gt")
    mean = evaluate_meshes(pred, gt, base)
    summed = evaluate_meshes(pred, gt, dataclasses.replace(base, chamfer_reduction="sum"))
    unscaled = evaluate_meshes(pred, gt, dataclasses.replace(base, distance_scale=1.0))
    wide = evaluate_meshes(pred, gt, dataclasses.replace(base, normalization="[-1,1]", fscore_threshold=0.02))
    assert summed.chamfer == pytest.approx(2 * mean.chamfer)
    assert mean.chamfer == pytest.approx(100 * unscaled.chamfer)
    assert wide.chamfer == pytest.approx(2 * mean.chamfer)  # the [-1,1] box is twice the unit cube
    assert wide.fscore == pytest.approx(mean.fscore)  # 0.02 in [-1,1] is 0.01 in the unit cube
    # concentric spheres 0.05 apart (unit cube, radius 0.5 vs 0.45): P2S from the prediction is 0.05 x 100
    assert mean.p2s == pytest.approx(5.0, rel=0.02)  # 2% covers the polyhedral approximation of both spheres
    text = str(mean)
    for phrase in ("unit_cube", "x100", "two directional means averaged", "threshold 0.01", "pred to gt"):
        assert phrase in text


def test_config_rejects_unknown_conventions():
    with pytest.raises(ValueError, match="geometry.chamfer_reduction"):
        evaluate_meshes(_asymmetric_mesh(), _asymmetric_mesh(), dataclasses.replace(FAST, chamfer_reduction="avg"))
    with pytest.raises(ValueError, match="geometry.normalization"):
        dataclasses.replace(FAST, normalization="unit").validate()
