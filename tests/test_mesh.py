"""Mesh extraction: depth renders of a known shape fuse back into that shape; files load in trimesh."""

from __future__ import annotations

import numpy as np
import torch

from gen3diffusion.gaussians import Gaussians
from gen3diffusion.mesh import MeshConfig, extract_mesh, save_mesh


def sphere_of_gaussians(radius: float = 0.3, n: int = 3000) -> Gaussians:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True) * radius
    return Gaussians(
        means=d[None], scales=torch.full((1, n, 3), 0.02), rotations=torch.tensor([1.0, 0, 0, 0]).expand(1, n, 4),
        opacities=torch.full((1, n), 0.9), colors=torch.tensor([0.8, 0.2, 0.1]).expand(1, n, 3),
    )


def test_sphere_fuses_to_a_sphere(tmp_path):
    cfg = MeshConfig(num_views=12, resolution=64, voxels=96)
    mesh = extract_mesh(sphere_of_gaussians(0.3), cfg)
    r = np.linalg.norm(np.asarray(mesh.vertices), axis=1)
    # the splats are 2 cm wide around a 30 cm sphere, and the surface is their expected depth: within ~1.5 voxels
    assert abs(np.median(r) - 0.3) < 0.02 and r.max() < 0.36
    colors = np.asarray(mesh.vertex_colors)
    assert np.allclose(colors.mean(0), [0.8, 0.2, 0.1], atol=0.08)
    ply, glb = save_mesh(mesh, tmp_path / "mesh")
    import trimesh

    loaded = trimesh.load(glb, force="mesh")
    assert len(loaded.faces) == len(mesh.triangles) and ply.is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_only_the_largest_component_is_kept():
    a, b = sphere_of_gaussians(0.2), sphere_of_gaussians(0.05)
    b.means = b.means + torch.tensor([0.45, 0.0, 0.0])
    both = Gaussians.cat([a, b], dim=1)
    cfg = MeshConfig(num_views=12, resolution=64, voxels=96)
    verts = np.asarray(extract_mesh(both, cfg).vertices)
    assert verts[:, 0].max() < 0.3  # the small sphere at x = 0.45 was dropped
