"""Tiny random models saved in the real weight layouts, for tests of loading, sampling, evaluation and the app.

Sizes come from configs/tiny.yaml: 32 px images, 4 x 4 latents (the tiny VAE keeps SD's factor 8), 16 x 16 Gaussians
per view. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from gen3diffusion.config import GaussianUNetConfig, MVUNetConfig, resolve_preset, to_dict
from gen3diffusion.models.gaussian_unet import GaussianDiffusionModel
from gen3diffusion.models.mv_unet import MultiViewUNet

TINY_WIDTH = 32  # text / CLIP widths: configs/tiny.yaml mv_unet.context_dim and ip_in_dim
TINY_IMAGE_SIZE = 32


def tiny_section(name: str, schema: type) -> dict:
    return to_dict(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(resolve_preset("tiny"))[name]))


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere, including zero-initialised output layers (else whole branches vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model.eval()


def tiny_mv_unet(seed: int = 0, **overrides) -> MultiViewUNet:
    torch.manual_seed(seed)
    return randomize(MultiViewUNet(**{**tiny_section("mv_unet", MVUNetConfig), **overrides}), seed)


def tiny_model_3d(seed: int = 0, std: float = 0.05, use_prior: bool = True) -> GaussianDiffusionModel:
    """The tiny 3D model; ``use_prior=False``: the "w/o 2D prior" ablation's (9 input channels)."""
    torch.manual_seed(seed)
    config = {**tiny_section("gaussian_unet", GaussianUNetConfig), "use_prior": use_prior}
    config["in_channels"] = 12 if use_prior else 9
    return randomize(GaussianDiffusionModel(**config), seed, std)


def tiny_vae() -> AutoencoderKL:
    """Four levels like SD's VAE (so 32 px -> 4 x 4 latents, factor 8), 8 channels each."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, latent_channels=4,
        sample_size=32, scaling_factor=0.18215,
    ).eval()


def tiny_image_encoder(layers: int = 2) -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        image_size=28, patch_size=14, projection_dim=16,
    )
    return CLIPVisionModel(config).eval()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (as GPT-2 / CLIP map bytes to characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def write_tiny_text_parts(folder: Path) -> None:
    """``folder/tokenizer`` (a CLIP BPE tokenizer over single bytes, no merges) and ``folder/text_encoder``."""
    chars = _byte_alphabet()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "tokenizer").mkdir(parents=True)
    vocab_file, merges_file = folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TINY_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")


def write_port_folder(root: Path, unet: MultiViewUNet) -> Path:
    """A folder in the ImageDream diffusers-port layout made of tiny random parts."""
    unet.save_pretrained(root / "unet")
    tiny_vae().save_pretrained(root / "vae")
    tiny_image_encoder().save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(
        root / "feature_extractor"
    )
    write_tiny_text_parts(root)
    DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    ).save_pretrained(root / "scheduler")
    index = {"_class_name": "ImageDreamPipeline", "unet": ["mv_unet", "MultiViewUNetModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def write_official_folder(root: Path, seed: int = 0) -> Path:
    """The authors' release on top of the port layout: model.safetensors (MV UNet) and model_1.safetensors (3D
    model, with the frozen LPIPS tensors the authors also saved)."""
    write_port_folder(root, tiny_mv_unet(seed=seed + 100))  # base weights, overwritten below
    save_file({k: v.contiguous() for k, v in tiny_mv_unet(seed).state_dict().items()}, str(root / "model.safetensors"))
    state = {k: v.contiguous() for k, v in tiny_model_3d(seed).state_dict().items()}
    state["lpips_loss.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    save_file(state, str(root / "model_1.safetensors"))
    return root


def official_pipeline_kwargs() -> dict:
    """``Gen3DiffusionPipeline.from_pretrained`` arguments for a tiny official folder (it stores no 3D config)."""
    return dict(model_3d_config=tiny_section("gaussian_unet", GaussianUNetConfig))


def load_script(name: str, folder: str = "scripts"):
    """Import ``<folder>/<name>.py`` as a module (scripts/ and bench/ are not packages)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use_tiny_3d_config(monkeypatch) -> None:
    """The authors' layout stores no 3D-model config and scripts load the official size: point them at tiny."""
    from gen3diffusion.pipeline import Gen3DiffusionPipeline

    real = Gen3DiffusionPipeline.from_pretrained.__func__

    def from_pretrained(cls, source, **kw):
        return real(cls, source, **{**official_pipeline_kwargs(), **kw})

    monkeypatch.setattr(Gen3DiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
