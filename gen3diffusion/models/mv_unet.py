"""ImageDream multi-view UNet: the SD-2.1 UNet with cross-view attention, a camera embedding and image-prompt tokens.

Module tree and parameter names follow LDM's openaimodel (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), so
the official ImageDream and Gen-3Diffusion files (``unet/`` of the ImageDream diffusers port, ``model.safetensors``)
load strictly; ``reference/imagedream_unet_keys.json`` lists every key. What differs from SD-2.1
(``reference/lgm_imagedream.md`` section 2.2):

* ``attn1`` attends over the tokens of all F frames of a sample at once, so the views see each other;
* ``camera_embed(camera)`` is added to the timestep embedding (one flattened 4x4 pose per frame);
* the Resampler ``image_embed`` turns CLIP ViT-H hidden states into ``ip_dim`` image-prompt tokens, which every
  ``attn2`` reads through its own keys and values (``to_k_ip``, ``to_v_ip``) beside the text tokens;
* the clean latent of the input image is written into the last frame of every sample at every call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .kernels import GroupNorm, conv_without_bias, geglu, residual_add, shortcut_without_bias, upsample_conv
from .loading import find_weights_file, load_state_dict_strict, read_state_dict, resolve_file, resolve_source

__all__ = ["MultiViewUNet", "load_mv_unet", "timestep_embedding"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos | sin] of (possibly fractional) timesteps, as openaimodel orders them.

    Frequency i of the dim // 2 is max_period^(-i / (dim // 2)); an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # [N, half]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))  # [N, dim]


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax attention (scale 1/sqrt(d)) by SDPA: [B, Lq, H*d], [B, Lk, H*d] -> [B, Lq, H*d]."""
    b, lq, inner = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, lq, inner)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer that closes a residual branch, as openaimodel does (the branch starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


### transformer


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when no context is given).

    With ``ip_dim`` > 0 the last ``ip_dim`` context tokens are image-prompt tokens: they get their own keys and values
    and their attention output is added with weight ``ip_weight`` (decoupled cross-attention, IP-Adapter).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None,
        heads: int,
        dim_head: int,
        ip_dim: int = 0,
        ip_weight: float = 1.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.ip_dim, self.ip_weight = heads, ip_dim, ip_weight
        if ip_dim > 0:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # openaimodel: (Linear, Dropout(0)) -> to_out.0

    def forward(self, x: Tensor, context: Tensor | ProjectedContext | None = None) -> Tensor:  # [B, L, C] -> same
        """Attend over ``context`` [B, T, Cc] (None: over ``x``), or over keys and values precomputed by
        :meth:`MultiViewUNet.project_context` (looked up by this module)."""
        if isinstance(context, dict):
            keys_values = context[self]
        else:
            keys_values = self.project(x if context is None else context)
        q = self.to_q(x)
        out = _attention(q, keys_values[0], keys_values[1], self.heads)
        if self.ip_dim:
            ip_out = _attention(q, keys_values[2], keys_values[3], self.heads)
            out = torch.add(out, ip_out, alpha=self.ip_weight)  # out + ip_weight * ip_out in one pass
        return self.to_out(out)

    def project(self, context: Tensor) -> tuple[Tensor, ...]:
        """Keys and values of the tokens [B, T, Cc]: (k, v), then (k_ip, v_ip) of the last ``ip_dim`` tokens."""
        if not self.ip_dim:
            return self.to_k(context), self.to_v(context)
        text, ip = context[:, : context.shape[1] - self.ip_dim], context[:, -self.ip_dim :]  # [B, 77, Cc], [B, ip, Cc]
        return self.to_k(text), self.to_v(text), self.to_k_ip(ip), self.to_v_ip(ip)


# every cross-attention's (k, v, k_ip, v_ip), each [B, T, inner], by module (MultiViewUNet.project_context)
ProjectedContext = dict[CrossAttention, tuple[Tensor, ...]]


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj(x))  # value * GELU(gate) of the two halves


class FeedForward(nn.Module):
    """GEGLU MLP of width 4 x dim. ``net.1`` is an empty slot (openaimodel's Dropout(0)) so ``net.2`` keeps its name."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MultiViewTransformerBlock(nn.Module):
    """Cross-view self-attention over all frames of a sample, then per-frame text + image-prompt attention, then MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ip_dim: int, ip_weight: float) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, ip_dim, ip_weight)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | ProjectedContext, num_frames: int) -> Tensor:  # x [B*F, L, C]
        n, length, c = x.shape
        joint = x.reshape(n // num_frames, num_frames * length, c)  # [B, F*L, C]: the frames' tokens side by side
        x = (self.attn1(self.norm1(joint)) + joint).reshape(n, length, c)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class MultiViewTransformer(nn.Module):
    """Feature map -> tokens (GroupNorm, Linear proj_in) -> transformer blocks -> Linear proj_out -> map, residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        ip_dim: int,
        ip_weight: float,
        groups: int,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            MultiViewTransformerBlock(inner, heads, dim_head, context_dim, ip_dim, ip_weight) for _ in range(depth)
        )
        self.proj_out = _zero(nn.Linear(inner, channels))

    def forward(self, x: Tensor, context: Tensor | ProjectedContext, num_frames: int) -> Tensor:  # [B*F, C, h, w]
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [B*F, h*w, inner]
        for block in self.transformer_blocks:
            tokens = block(tokens, context, num_frames)
        return self.proj_out(tokens).transpose(1, 2).reshape(n, c, h, w) + x


### convolutional parts


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-conv, plus a skip (1x1 conv when the width changes)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int) -> None:
        super().__init__()
        # the norms apply the SiLU themselves; the empty slots keep openaimodel's indices (SiLU at 1, Dropout(0) at
        # out_layers.2), so the convs stay at in_layers.2 and out_layers.3
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels, silu=True), nn.Identity(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels, silu=True),
            nn.Identity(),
            nn.Identity(),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor, skip: Tensor | None = None) -> Tensor:  # [N, C, h, w], [N, E]
        """``skip`` [N, Cs, h, w]: the block's input is ``torch.cat([x, skip], 1)`` (the output blocks), which the
        norm and the skip connection read from its two parts (models.kernels)."""
        # the conv biases (and the embedding) ride in the next norm / residual sum (models.kernels)
        norm1, _, conv1 = self.in_layers
        norm2, _, dropout, conv2 = self.out_layers
        h = conv_without_bias(conv1, norm1(x, skip=skip))
        h = conv_without_bias(conv2, dropout(norm2(h, shift=conv1.bias + self.emb_layers(emb))))
        residual, bias = shortcut_without_bias(self.skip_connection, x, conv2.bias, skip)
        return residual_add(h, bias, residual)


class Downsample(nn.Module):
    """Stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(self.conv, x)


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: layers run in order, each given what it needs."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor | ProjectedContext, num_frames: int, skip: Tensor | None = None
    ) -> Tensor:
        """``skip``: an output block's input is ``torch.cat([x, skip], 1)``, which its first layer, a ResBlock, reads
        from the two parts."""
        if skip is not None and not isinstance(self[0], ResBlock):
            x, skip = torch.cat([x, skip], dim=1), None
        for layer in self:
            if isinstance(layer, ResBlock):
                x, skip = layer(x, emb, skip), None
            elif isinstance(layer, MultiViewTransformer):
                x = layer(x, context, num_frames)
            else:
                x = layer(x)
        return x


### image-prompt Resampler


class PerceiverAttention(nn.Module):
    """Learned latents attend to [image tokens ; latents] (LayerNorm on each, bias-free projections)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:  # [B, L, D], [B, Q, D] -> [B, Q, D]
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # [B, L+Q, inner] each
        return self.to_out(_attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    """Perceiver Resampler (IP-Adapter Plus): CLIP hidden states [B, L, in_dim] -> ``num_queries`` tokens [B, Q, dim].

    Each layer: latents += PerceiverAttention(x, latents); latents += LN-Linear-GELU-Linear MLP (width 4 x dim).
    """

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, dim_head: int, num_queries: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(in_dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, heads, dim_head),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, 4 * dim, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * dim, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)  # [B, L, dim]
        latents = self.latents.expand(x.shape[0], -1, -1)  # [B, Q, dim]
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


### the model


class MultiViewUNet(ModelMixin, ConfigMixin):
    """ImageDream's multi-view UNet (``MultiViewUNetModel`` of the official code), eps prediction on F frames.

    Arguments are the fields of ``config.MVUNetConfig`` (defaults: the official size, 941,672,900 parameters):
        image_size: latent resolution the model was trained at (32 for 256 px views; informative only).
        in_channels, out_channels: latent channels (4).
        model_channels: width of the first level; level i has ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multipliers, one per resolution level.
        attention_resolutions: downsampling factors (1, 2, 4, ...) whose residual blocks are followed by a
            transformer; the middle block always has one.
        num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
        num_head_channels: attention head width (heads = channels / head width).
        transformer_depth: transformer blocks per transformer.
        context_dim: width of the text tokens and of the image-prompt tokens.
        camera_dim: length of the camera vector of each frame (a flattened 4x4 pose: 16).
        ip_dim: number of image-prompt tokens made by the Resampler.
        ip_weight: weight of the image-prompt attention added to the text attention.
        ip_in_dim: width of the CLIP hidden states fed to the Resampler (ViT-H/14: 1280).
        resampler_depth, resampler_heads, resampler_dim_head: Resampler layers and attention shape (4, 12, 64).
        norm_num_groups: GroupNorm groups (32; tiny test models use fewer).
    Config files of the ImageDream diffusers port (``unet/config.json``: the openaimodel keys) load as they are;
    their unused keys are ignored and the fields they lack take these defaults.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_res_blocks: int = 2,
        num_head_channels: int = 64,
        transformer_depth: int = 1,
        context_dim: int = 1024,
        camera_dim: int = 16,
        ip_dim: int = 16,
        ip_weight: float = 1.0,
        ip_in_dim: int = 1280,
        resampler_depth: int = 4,
        resampler_heads: int = 12,
        resampler_dim_head: int = 64,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        _check_architecture(
            model_channels, channel_mult, attention_resolutions, num_res_blocks, num_head_channels, norm_num_groups,
            camera_dim, ip_dim,
        )
        emb_dim, groups = 4 * model_channels, norm_num_groups

        def transformer(ch: int) -> MultiViewTransformer:
            heads, depth = ch // num_head_channels, transformer_depth
            return MultiViewTransformer(ch, heads, num_head_channels, depth, context_dim, ip_dim, ip_weight, groups)

        self.image_embed = Resampler(
            ip_in_dim, context_dim, resampler_depth, resampler_heads, resampler_dim_head, num_queries=ip_dim
        )
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.camera_embed = nn.Sequential(nn.Linear(camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels, groups)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = UNetBlock(
            ResBlock(ch, emb_dim, ch, groups), transformer(ch), ResBlock(ch, emb_dim, ch, groups)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * model_channels, groups)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm(groups, ch, silu=True), nn.Identity(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )
        self.gradient_checkpointing = False
        # every transformer block's attn2 (the attentions over the text and image-prompt tokens), for project_context;
        # a plain tuple, so the modules stay registered only where they are
        self.cross_attentions = tuple(m.attn2 for m in self.modules() if isinstance(m, MultiViewTransformerBlock))

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
    ) -> MultiViewUNet:
        """A folder (or hub id) with ``config.json`` + weights, loaded strictly.

        Replaces diffusers' loader, which only warns about missing weights and leaves them on the meta device. Any
        mismatch raises ``StateDictMismatchError`` listing the keys; :func:`load_mv_unet` also adds the official
        Gen-3Diffusion weights on top.
        """
        dtype = torch_dtype or torch.float32
        return load_mv_unet(
            pretrained_model_name_or_path, subfolder=subfolder, torch_dtype=dtype, device=device, revision=revision
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the weights, in which every input is computed."""
        return self.time_embed[0].weight.dtype

    def encode_image_prompt(self, clip_hidden: Tensor) -> Tensor:
        """CLIP ViT-H penultimate hidden states [B, 257, ip_in_dim] -> image-prompt tokens [B, ip_dim, context_dim].

        The Resampler (``image_embed``). The tokens depend on the image only: compute them once per image, then repeat
        them per frame (``repeat_interleave(F, dim=0)``) for :meth:`forward`. The unconditional CFG branch feeds zeros
        here (its tokens are Resampler(0), not zero).
        """
        if clip_hidden.ndim != 3 or clip_hidden.shape[-1] != self.config.ip_in_dim:
            raise ValueError(f"clip_hidden: expected [B, L, {self.config.ip_in_dim}], got {tuple(clip_hidden.shape)}")
        return self.image_embed(clip_hidden.to(self.compute_dtype))

    def project_context(self, context: Tensor, ip_tokens: Tensor) -> ProjectedContext:
        """Every ``attn2``'s keys and values of the text tokens [N, 77, C] and image-prompt tokens [N, ip_dim, C].

        They depend on the conditioning only, so a sampler computes them once per call and passes them to
        :meth:`forward` as ``context`` (with ``ip_tokens=None``) instead of recomputing them at every step; the
        result is the same.
        """
        cfg = self.config
        if context.ndim != 3 or ip_tokens.shape != (context.shape[0], cfg.ip_dim, cfg.context_dim) or (
            context.shape[-1] != cfg.context_dim
        ):
            raise ValueError(
                f"context {list(context.shape)}, ip_tokens {list(ip_tokens.shape)}: expected [N, L, {cfg.context_dim}]"
                f" and [N, {cfg.ip_dim}, {cfg.context_dim}]"
            )
        tokens = torch.cat([context, ip_tokens], dim=1).to(self.compute_dtype)  # [N, 77 + ip_dim, C]
        return {attn: attn.project(tokens) for attn in self.cross_attentions}

    def forward(
        self,
        x: Tensor,  # [B*F, 4, h, w] noisy latents, F frames per sample (last = input frame)
        timesteps: Tensor,  # [B*F] (or a scalar for all)
        context: Tensor | ProjectedContext,  # [B*F, 77, context_dim] text tokens, or project_context's output
        camera: Tensor,  # [B*F, camera_dim]
        ip_tokens: Tensor | None,  # [B*F, ip_dim, context_dim] from encode_image_prompt, repeated per frame
        ip_img: Tensor,  # [B, 4, h, w] clean input latent, written into the last frame of each sample
        num_frames: int,
    ) -> Tensor:
        """Predict the noise of every frame [B*F, 4, h, w].

        The last frame of each sample is replaced by ``ip_img`` before anything else (on a copy: ``x`` is untouched),
        so its input noise never matters. Inputs are computed in the weights' dtype; the result has ``x``'s dtype.
        ``context`` may be :meth:`project_context`'s keys and values of the text and image-prompt tokens; then
        ``ip_tokens`` is None.
        """
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        self._check_inputs(x, timesteps, context, camera, ip_tokens, ip_img, num_frames)
        dtype = self.compute_dtype
        h = _with_input_frame(x, ip_img, num_frames).to(dtype)
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.camera_embed(camera.to(dtype))  # [B*F, 4 * model_channels]
        if isinstance(context, Tensor):
            context = torch.cat([context, ip_tokens], dim=1).to(dtype)  # [B*F, 77 + ip_dim, context_dim]

        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, num_frames)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, num_frames)
        for block in self.output_blocks:
            h = self._run(block, h, emb, context, num_frames, skips.pop())  # the block's input is cat([h, skip])
        return self.out(h).to(x.dtype)

    def _run(
        self, block: UNetBlock, h: Tensor, emb: Tensor, context: Tensor | ProjectedContext, num_frames: int,
        skip: Tensor | None = None,
    ) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, emb, context, num_frames, skip)
        return block(h, emb, context, num_frames, skip)

    def _check_inputs(
        self, x: Tensor, timesteps: Tensor, context: Tensor | ProjectedContext, camera: Tensor,
        ip_tokens: Tensor | None, ip_img: Tensor, num_frames: int,
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected [B*F, {cfg.in_channels}, h, w], got {tuple(x.shape)}")
        n = x.shape[0]
        if num_frames < 1 or n % num_frames:
            raise ValueError(f"x has {n} frames, not a multiple of num_frames={num_frames}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x: latent size {tuple(x.shape[2:])} is not a multiple of {factor} (the UNet's depth)")
        expected = {
            "timesteps": (n,),
            "camera": (n, cfg.camera_dim),
            "ip_img": (n // num_frames, cfg.in_channels, *x.shape[2:]),
        }
        given = {"timesteps": timesteps, "camera": camera, "ip_img": ip_img}
        if isinstance(context, Tensor):
            if ip_tokens is None:
                raise ValueError("ip_tokens: None, but context holds text tokens (None only with project_context's)")
            expected |= {"context": (n, None, cfg.context_dim), "ip_tokens": (n, cfg.ip_dim, cfg.context_dim)}
            given |= {"context": context, "ip_tokens": ip_tokens}
        else:
            self._check_projected_context(context, ip_tokens, n)
        for name, shape in expected.items():
            got = tuple(given[name].shape)
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                want = "[" + ", ".join("L" if s is None else str(s) for s in shape) + "]"
                context_note = f"x {list(x.shape)}, num_frames={num_frames}"
                raise ValueError(f"{name}: expected {want}, got {list(got)} ({context_note})")

    def _check_projected_context(self, context: ProjectedContext, ip_tokens: Tensor | None, n: int) -> None:
        if ip_tokens is not None:
            raise ValueError("ip_tokens: pass None with a projected context (project_context already holds them)")
        if context.keys() != set(self.cross_attentions):
            raise ValueError("context: these keys and values were projected by another model (project_context)")
        sizes = {kv.shape[0] for keys_values in context.values() for kv in keys_values}
        if sizes != {n}:
            raise ValueError(f"context: projected for {sorted(sizes)} frames, x has {n}")


def _with_input_frame(x: Tensor, ip_img: Tensor, num_frames: int) -> Tensor:
    """A copy of ``x`` [B*F, C, h, w] whose last frame of each sample is ``ip_img`` [B, C, h, w]."""
    n, c, h, w = x.shape
    frames = x.reshape(n // num_frames, num_frames, c, h, w)
    return torch.cat([frames[:, :-1], ip_img[:, None].to(x.dtype)], dim=1).reshape(n, c, h, w)


def _check_architecture(
    model_channels: int,
    channel_mult: Sequence[int],
    attention_resolutions: Sequence[int],
    num_res_blocks: int,
    num_head_channels: int,
    groups: int,
    camera_dim: int,
    ip_dim: int,
) -> None:
    if not channel_mult or num_res_blocks < 1:
        raise ValueError(f"channel_mult={list(channel_mult)} and num_res_blocks={num_res_blocks}: need >= 1 of each")
    if camera_dim < 1 or ip_dim < 1:
        raise ValueError(f"camera_dim={camera_dim}, ip_dim={ip_dim}: the ImageDream UNet needs both > 0")
    factors = [2**level for level in range(len(channel_mult))]
    if not set(attention_resolutions) <= set(factors):
        raise ValueError(f"attention_resolutions={list(attention_resolutions)}: each must be one of {factors}")
    widths = [model_channels] + [model_channels * m for m in channel_mult]
    if any(c % groups for c in widths):
        raise ValueError(f"norm_num_groups={groups} does not divide the widths {widths}")
    attended = [model_channels * m for m, f in zip(channel_mult, factors) if f in attention_resolutions]
    attended.append(model_channels * channel_mult[-1])  # middle block
    if any(c % num_head_channels for c in attended):
        raise ValueError(f"num_head_channels={num_head_channels} does not divide the attention widths {attended}")


### loading


def load_mv_unet(
    source: str | Path,
    weights: str | Path | None = None,
    *,
    subfolder: str | None = "unet",
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    weights_name: str = "model.safetensors",
    revision: str | None = None,
) -> MultiViewUNet:
    """The MV UNet from a diffusers folder (``config.json`` + weights), optionally overwritten by ``weights``.

    ``source``: a folder in the ImageDream port layout (``subfolder="unet"``), a bare UNet folder
    (``subfolder=None``) or a hub id (e.g. ``ashawkey/imagedream-ipmv-diffusers``). ``weights``: the official
    Gen-3Diffusion ``model.safetensors`` (bare UNet keys) as a file, a folder or a hub id holding ``weights_name``;
    its tensors replace the folder's, and the folder's weights are not even read when it holds every key. Every load
    is strict: a file that does not fit raises ``StateDictMismatchError`` listing the keys. ``revision`` applies to a
    hub ``source``.
    """
    root = resolve_source(source, allow_patterns=[f"{subfolder}/*"] if subfolder else None, revision=revision)
    folder = root / subfolder if subfolder else root
    with torch.device("meta"):
        model = MultiViewUNet.from_config(MultiViewUNet.load_config(folder))
    expected = model.state_dict().keys()
    state: dict[str, Tensor] = {}
    names = []
    if weights is not None:
        file = resolve_file(weights, weights_name)
        state, names = read_state_dict(file), [str(file)]
    if not expected <= state.keys():
        base_file = find_weights_file(folder)
        state = {**read_state_dict(base_file), **state}
        names.insert(0, str(base_file))
    load_state_dict_strict(model, state, source=" + ".join(names), assign=True, dtype=torch_dtype)
    return model.to(device).eval()
