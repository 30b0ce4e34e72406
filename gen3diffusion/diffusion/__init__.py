"""The equations of the method, without weights: training losses (``losses``) and the joint 2D/3D sampler
(``sampler``). Import the submodules directly; this package imports nothing on its own so that it stays cheap."""
