"""The implicit surface and GT mesh of procedural objects: the ray caster's hits lie on the zero level, inside is
negative, the mesh is closed and outward, and the dataset writer's mesh.glb reads back as eval_gso's GT mesh."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gen3diffusion.data import DataConfig
from gen3diffusion.data.synthetic import cast_rays, make_object, write_synthetic_dataset
from gen3diffusion.data.synthetic_mesh import implicit, object_mesh


def test_ray_hits_lie_on_the_zero_level_and_the_inside_is_negative():
    for index in range(6):  # all kinds of primitives appear among these
        obj = make_object(index, seed=1)
        g = torch.Generator().manual_seed(index)
        origins = torch.tensor([[0.0, 0.3, 1.5]]).expand(2000, 3)
        dirs = F.normalize(torch.randn(2000, 3, generator=g) * 0.25 + torch.tensor([0.0, -0.2, -1.0]), dim=-1)
        t, _, _ = cast_rays(obj, origins, dirs)
        hit = t.isfinite()
        assert hit.sum() > 100
        points = origins[hit] + t[hit, None] * dirs[hit]
        assert implicit(obj, points).abs().max() < 1e-3  # local units (about 10x world); the torus is bisected
        assert (implicit(obj, points + 0.01 * dirs[hit]) < 0).float().mean() > 0.95  # just past the hit: inside
        assert (implicit(obj, points - 0.01 * dirs[hit]) > 0).all()  # just before it: outside
        assert (implicit(obj, origins[:1]) > 0).all()


def test_mesh_is_closed_outward_and_fills_the_bounding_box():
    obj = make_object(1, seed=1)
    mesh = object_mesh(obj, resolution=64)
    lo, hi = (b.numpy() for b in obj.bounds())
    step = (hi - lo).max() / 61
    assert mesh.is_watertight and mesh.volume > 0
    assert np.abs(mesh.bounds - np.stack([lo, hi])).max() < 1.5 * step
    assert np.abs(implicit(obj, torch.tensor(mesh.vertices, dtype=torch.float32)).numpy()).max() < 2 * step


def test_dataset_writer_adds_a_gt_mesh_that_eval_reads(tmp_path):
    from gen3diffusion.eval.runner import load_mesh

    cfg = DataConfig(num_objects=1, seed=1, supersample=1)
    write_synthetic_dataset(cfg, tmp_path, resolution=16, num_spiral=0, mesh_resolution=48)
    mesh = load_mesh(tmp_path / "synthetic_000000" / "mesh.glb")  # glTF: read y-up, centred, max extent 0.8
    direct = object_mesh(make_object(0, seed=1), resolution=48)
    np.testing.assert_allclose(mesh.extents, direct.extents * 0.8 / direct.extents.max(), rtol=1e-5)  # same axes
    assert (tmp_path / "synthetic_000000" / "cameras.json").is_file()
