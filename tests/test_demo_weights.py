"""The bundled demo weights (weights/demo): they load strictly into the sizes of configs/demo.yaml, and
scripts/sample.py with its defaults turns a held-out example into Gaussians whose renders match that object's
ground-truth views far better than random weights do."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gen3diffusion.cameras import Cameras, target_cameras
from gen3diffusion.config import GaussianUNetConfig, MVUNetConfig, SamplerConfig, resolve_preset, to_dict
from gen3diffusion.gaussians import load_ply
from gen3diffusion.models.gaussian_unet import GaussianDiffusionModel
from gen3diffusion.models.loading import find_weights_file, load_state_dict_strict, read_state_dict
from gen3diffusion.models.mv_unet import MultiViewUNet
from gen3diffusion.pipeline import DEFAULT_WEIGHTS, Gen3DiffusionPipeline
from gen3diffusion.preprocess import load_image, preprocess_image
from gen3diffusion.render import rasterize

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from make_examples import render_example  # noqa: E402
from tiny_weights import load_script  # noqa: E402

# trained demo: 15.5-17 dB on examples 0-3; random weights: 9.8-11.3 dB; an all-white image: ~10 dB
PSNR_THRESHOLD = 14.0
EXAMPLE = 3


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a - b).square().mean()))


def _render_psnr(gaussians, index: int, size: int) -> float:
    _, gt = render_example(index, size)  # [4, 3, size, size] ground-truth target views
    cams = Cameras.from_fovy(target_cameras(), 49.1, size, size)
    return _psnr(rasterize(gaussians, cams).rgb[0].clamp(0, 1), gt)


def test_bundled_weights_load_strictly_into_the_demo_config():
    demo = OmegaConf.load(resolve_preset("demo"))
    for folder, schema, cls, section in (("mv_unet", MVUNetConfig, MultiViewUNet, "mv_unet"),
                                         ("model_3d", GaussianUNetConfig, GaussianDiffusionModel, "gaussian_unet")):
        model = cls(**to_dict(OmegaConf.merge(OmegaConf.structured(schema), demo[section])))
        state = read_state_dict(find_weights_file(DEFAULT_WEIGHTS / folder))
        load_state_dict_strict(model, state, source=folder)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v for k, v in OmegaConf.to_container(demo.vae).items()})
    load_state_dict_strict(vae, read_state_dict(find_weights_file(DEFAULT_WEIGHTS / "vae")), source="vae")
    size = sum(p.stat().st_size for p in DEFAULT_WEIGHTS.rglob("*") if p.is_file())
    assert size <= 30 * 2**20


@pytest.mark.slow
def test_sample_script_with_bundled_weights_beats_random_weights(tmp_path):
    sample = load_script("sample")
    image = REPO / "examples" / f"synthetic_{EXAMPLE}.png"
    assert sample.main(["--image", str(image), "--output", str(tmp_path), "--no-recenter", "--no-mesh",
                        "--no-video", "--quiet"]) == 0
    gaussians = load_ply(tmp_path / f"synthetic_{EXAMPLE}" / "gaussians.ply")
    trained = _render_psnr(gaussians, EXAMPLE, 64)
    assert trained >= PSNR_THRESHOLD, f"bundled weights: {trained:.2f} dB"

    pipe = Gen3DiffusionPipeline.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    pipe.progress = False
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # same architecture, random weights of the trained weights' scale
        for model in (pipe.mv_unet, pipe.model_3d):
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.std().clamp(min=1e-3))
    x = preprocess_image(load_image(image), 0.45, pipe.image_size, recenter_object=False)
    out = pipe(x[None], seed=0, sampler_cfg=SamplerConfig(num_steps=10, render_size=2 * pipe.image_size))
    random = _render_psnr(out.gaussians, EXAMPLE, 64)
    assert random < PSNR_THRESHOLD, f"random weights: {random:.2f} dB"
