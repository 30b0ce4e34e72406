"""Conditioning: CLIP preprocessing, the penultimate CLIP layer, VAE scaling and batching, the prompt-embedding cache
and the classifier-free-guidance layout. Tiny random VAE / CLIP / text encoder built offline."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

from gen3diffusion.models.conditioning import (
    CLIP_MEAN,
    CLIP_STD,
    SD21_VAE_CONFIG,
    PromptConfig,
    build_conditioning,
    cfg_batch,
    clip_image_hidden,
    clip_preprocess,
    combine_cfg,
    encode_prompts,
    load_prompt_embeddings,
    read_prompt_embeddings,
    vae_decode,
    vae_encode,
)
from test_mv_unet import FRAMES, tiny_model
from tiny_weights import TINY_WIDTH, tiny_image_encoder, tiny_vae, write_tiny_text_parts


### prompts


def test_prompt_defaults_are_the_authors():
    prompts = PromptConfig()
    assert prompts.prompt == ", 3d asset photorealistic human scan"
    assert prompts.negative_prompt == (
        "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  obscure, unnatural colors, "
        "poor lighting, dull, and unclear."
    )


def test_prompt_cache_is_written_once_and_then_read_without_the_text_encoder(tmp_path, monkeypatch):
    write_tiny_text_parts(tmp_path / "parts")
    cache = tmp_path / "cache" / "prompts.safetensors"
    prompts = PromptConfig()
    made = load_prompt_embeddings(prompts, cache, tmp_path / "parts")
    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "parts" / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "parts" / "tokenizer")
    direct = encode_prompts(text_encoder, tokenizer, [prompts.negative_prompt, prompts.prompt])
    assert made.shape == (2, 77, TINY_WIDTH)
    torch.testing.assert_close(made, direct)  # (negative, positive) order
    assert not torch.equal(made[0], made[1])

    def no_text_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded although the cache holds these prompts")

    monkeypatch.setattr(CLIPTextModel, "from_pretrained", no_text_encoder)
    torch.testing.assert_close(load_prompt_embeddings(prompts, cache), made, rtol=0, atol=0)
    other = PromptConfig(prompt="a chair")
    assert read_prompt_embeddings(cache, other) is None  # stale for other prompts
    with pytest.raises(FileNotFoundError, match="text-encoder source"):
        load_prompt_embeddings(other, cache)


### CLIP image encoder


def test_clip_preprocess_normalises_and_keeps_corners():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 37, 23, generator=g) * 2 - 1
    pixels = clip_preprocess(image, size=224)
    assert pixels.shape == (2, 3, 224, 224)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    back = (pixels * std + mean) * 2 - 1  # undo the normalisation: the resized image in [-1, 1]
    # align_corners=True samples the corner pixels exactly (align_corners=False would blend them)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        torch.testing.assert_close(back[..., i, j], image[..., i, j], rtol=0, atol=1e-5)
    constant = clip_preprocess(torch.full((1, 3, 8, 8), 0.5), size=4)
    torch.testing.assert_close(constant, ((0.75 - mean) / std).expand(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.zeros(3, 8, 8))


def test_clip_image_hidden_is_the_penultimate_layer():
    full = tiny_image_encoder(layers=3)
    image = torch.rand(2, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        hidden = clip_image_hidden(full, image)
        encoder = getattr(full, "vision_model", full).encoder  # transformers < 5 nests the tower in vision_model
        encoder.layers = encoder.layers[:-1]  # drop the last layer
        truncated = full(pixel_values=clip_preprocess(image, 28)).last_hidden_state
    assert hidden.shape == (2, 1 + (28 // 14) ** 2, TINY_WIDTH)
    torch.testing.assert_close(hidden, truncated)


### VAE


def test_sd21_vae_config_has_the_sd_size():
    with torch.device("meta"):
        vae = AutoencoderKL(**SD21_VAE_CONFIG)
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == 83.65  # reference/lgm_imagedream.md 2.8
    assert vae.config.scaling_factor == 0.18215


def test_vae_encode_decode_scale_and_leading_dims():
    vae = tiny_vae()
    images = torch.rand(2, 3, 3, 32, 32) * 2 - 1  # [B, V, 3, H, W]
    with torch.no_grad():
        mean = vae_encode(vae, images, sample=False)
        flat = vae.encode(images.flatten(0, 1)).latent_dist
        decoded = vae_decode(vae, mean)
        reference = vae.decode(flat.mean).sample
        a = vae_encode(vae, images, torch.Generator().manual_seed(3))
        b = vae_encode(vae, images, torch.Generator().manual_seed(3))
        c = vae_encode(vae, images, torch.Generator().manual_seed(4))
    assert mean.shape == (2, 3, 4, 4, 4)
    torch.testing.assert_close(mean, (flat.mean * 0.18215).unflatten(0, (2, 3)))
    torch.testing.assert_close(decoded, reference.unflatten(0, (2, 3)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same generator seed, same sample
    assert not torch.equal(a, c) and not torch.equal(a, mean)
    # the sample is mean + std * noise: its deviation is bounded by the posterior std
    assert ((a - mean) / (flat.std * 0.18215).unflatten(0, (2, 3))).abs().max() < 6
    with pytest.raises(ValueError, match="images"):
        vae_encode(vae, torch.zeros(3, 32, 32))


### classifier-free guidance


def test_guided_conditioning_layout():
    unet = tiny_model()
    b, ctx = 2, unet.config.context_dim
    prompts = torch.randn(2, 77, ctx)
    clip_hidden, ip_img = torch.randn(b, 5, unet.config.ip_in_dim), torch.randn(b, 4, 8, 8)
    camera = torch.randn(FRAMES, 16)
    with torch.no_grad():
        cond = build_conditioning(unet, prompts, clip_hidden, ip_img, camera)
        zero_tokens = unet.encode_image_prompt(torch.zeros_like(clip_hidden))
        real_tokens = unet.encode_image_prompt(clip_hidden)
    n = b * FRAMES
    assert cond.context.shape == (2 * n, 77, ctx) and cond.ip_img.shape == (2 * b, 4, 8, 8)
    assert cond.num_frames == FRAMES and cond.guided
    torch.testing.assert_close(cond.context[:n], prompts[0].expand(n, -1, -1))  # negative prompt first
    torch.testing.assert_close(cond.context[n:], prompts[1].expand(n, -1, -1))
    torch.testing.assert_close(cond.ip_tokens[:n], zero_tokens.repeat_interleave(FRAMES, dim=0))
    torch.testing.assert_close(cond.ip_tokens[n:], real_tokens.repeat_interleave(FRAMES, dim=0))
    assert cond.ip_img[:b].abs().max() == 0
    torch.testing.assert_close(cond.ip_img[b:], ip_img)
    torch.testing.assert_close(cond.camera, camera.repeat(2 * b, 1))  # same cameras in both halves
    x, t = torch.randn(n, 4, 8, 8), torch.arange(n)
    x2, t2 = cfg_batch(x, t)
    assert torch.equal(x2[:n], x) and torch.equal(x2[n:], x) and torch.equal(t2, torch.cat([t, t]))


def test_guided_batch_equals_the_two_branches_run_apart():
    unet = tiny_model()
    b, scale = 2, 5.0
    prompts = torch.randn(2, 77, unet.config.context_dim)
    clip_hidden, ip_img = torch.randn(b, 5, unet.config.ip_in_dim), torch.randn(b, 4, 8, 8)
    camera = torch.randn(b, FRAMES, 16)
    x, t = torch.randn(b * FRAMES, 4, 8, 8), torch.full((b * FRAMES,), 500)
    with torch.no_grad():
        guided = build_conditioning(unet, prompts, clip_hidden, ip_img, camera)
        eps = combine_cfg(unet(*cfg_batch(x, t), **guided.unet_kwargs()), scale)
        cond = build_conditioning(unet, prompts, clip_hidden, ip_img, camera, guidance=False)
        uncond = build_conditioning(unet, prompts.flip(0), torch.zeros_like(clip_hidden), ip_img * 0, camera, False)
        eps_c, eps_u = unet(x, t, **cond.unet_kwargs()), unet(x, t, **uncond.unet_kwargs())
    assert not cond.guided and cond.context.shape[0] == b * FRAMES
    torch.testing.assert_close(eps, eps_u + scale * (eps_c - eps_u), rtol=1e-5, atol=1e-5)  # float32 batching


def test_combine_cfg_closed_form():
    eps_u, eps_c = torch.randn(6, 4), torch.randn(6, 4)
    both = torch.cat([eps_u, eps_c])
    torch.testing.assert_close(combine_cfg(both, 0.0), eps_u)
    torch.testing.assert_close(combine_cfg(both, 1.0), eps_c)
    torch.testing.assert_close(combine_cfg(both, 5.0), 5 * eps_c - 4 * eps_u)
    assert math.isclose(float(combine_cfg(torch.tensor([1.0, 3.0]), 2.5)), 6.0)
