"""The surface of a procedural object (``data/synthetic.py``) as an implicit function and a triangle mesh.

The ray caster renders the objects exactly, but the evaluation's geometry metrics (Chamfer, F-score) need a GT
mesh. Each unit primitive has a simple implicit function, negative inside and zero on its surface, in its local
frame; the object is their union (the minimum over parts), meshed by marching cubes on a regular grid.
"""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from torch import Tensor

from gen3diffusion.data.synthetic import PRIMITIVES, SyntheticObject

__all__ = ["implicit", "object_mesh"]


def implicit(obj: SyntheticObject, points: Tensor) -> Tensor:
    """[N, 3] world points -> [N]: negative inside the object, zero on its surface, positive outside.

    Per part, the unit shape's implicit function at the point's local coordinates (not a true distance: the part's
    linear map scales it), then the minimum over parts (the union)."""
    local = torch.einsum("pij,pnj->pni", torch.linalg.inv(obj.linear), points[None] - obj.centers[:, None])  # [P, N, 3]
    x, y, z = local.unbind(-1)
    radial = (x * x + z * z).sqrt()  # distance from the local y axis
    per_kind = {
        "box": local.abs().amax(-1) - 1,  # [-1, 1]^3
        "sphere": local.norm(dim=-1) - 1,
        "cylinder": torch.maximum(radial - 1, y.abs() - 1),  # radius 1 around y, |y| <= 1
        "cone": torch.maximum(radial - (1 - y) / 2, y.abs() - 1),  # apex (0, 1, 0), base radius 1 at y = -1
        "torus": ((radial - 1) ** 2 + y * y).sqrt() - obj.minor[:, None],  # major radius 1 around y
    }
    stacked = torch.stack([per_kind[name] for name in PRIMITIVES])  # [K, P, N]
    return stacked[obj.kinds, torch.arange(len(obj.kinds))].amin(0)  # [N]


@torch.no_grad()
def object_mesh(obj: SyntheticObject, resolution: int = 128, chunk: int = 2**18) -> trimesh.Trimesh:
    """Marching-cubes mesh of the object's surface on a ``resolution``^3 grid over its bounding box (plus a cell
    of margin), in world coordinates (y-up), faces wound outward."""
    from skimage.measure import marching_cubes

    obj = obj.to("cpu")
    lo, hi = obj.bounds()
    step = float((hi - lo).max()) / (resolution - 3)  # isotropic cells, one cell of margin on every side
    origin = lo - step
    counts = [int(np.ceil(float(e) / step)) + 3 for e in (hi - lo)]
    axes = [origin[i] + step * torch.arange(counts[i], dtype=torch.float32) for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [X*Y*Z, 3]
    values = torch.cat([implicit(obj, part) for part in grid.split(chunk)]).reshape(counts)
    verts, faces, _, _ = marching_cubes(values.numpy(), level=0.0, spacing=(step,) * 3, gradient_direction="descent")
    return trimesh.Trimesh(verts + origin.numpy(), faces, process=False)
