"""gen3diffusion: image -> 3D Gaussians by synchronising 2D multi-view diffusion with 3D Gaussian-splat diffusion.

Importing the package is cheap: heavy modules (diffusers, gsplat, open3d) load only where they are used.
"""

__version__ = "0.1.0"
