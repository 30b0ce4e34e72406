"""The 3D-GS diffusion model (paper Eq. 6 / Eq. 8): a time-conditioned LGM asymmetric U-Net that turns
[x0_hat | x_t | Plücker] views into pixel-aligned 3D Gaussians.

Module and parameter names follow the authors' checkpoint ``model_1.safetensors`` (``unet.*`` and ``conv.*``; the
manifest is ``reference/gen3d_gaussian_unet_keys.json``), so the released weights load strictly after dropping the
``lpips_loss.*`` tensors the authors saved with them. The same tree minus the time layers is LGM big, which
``init_from_lgm`` uses as an initialisation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from gen3diffusion.gaussians import Gaussians, activate
from gen3diffusion.models.kernels import (
    GroupNorm,
    conv_without_bias,
    residual_add,
    shortcut_without_bias,
    upsample_conv,
)
from gen3diffusion.models.loading import load_state_dict_strict, read_state_dict, resolve_file

if TYPE_CHECKING:
    from gen3diffusion.cameras import Cameras
    from gen3diffusion.render import RenderOutput

logger = logging.getLogger(__name__)

# residual and skip outputs are scaled by sqrt(0.5) so that a sum of two unit-variance branches stays unit-variance
SKIP_SCALE = math.sqrt(0.5)
# ImageNet statistics used to normalise both RGB slots of the input (as LGM does for its single RGB slot)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# prefix of the frozen LPIPS tensors the authors' training class saved inside model_1.safetensors
LPIPS_PREFIX = "lpips_loss."
# file name of the 3D model's weights in the authors' release (object and avatar weights alike)
OFFICIAL_WEIGHTS_NAME = "model_1.safetensors"


### building blocks


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep features, cosines first: diffusers' ``Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)``, which the authors' time embedding starts with. ``t`` [N] -> [N, dim] (float32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # [N, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal features (names as diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> + proj(t_emb) -> GN -> SiLU -> conv3x3, then (h + shortcut(x)) * sqrt(0.5).

    The time embedding is projected without a SiLU in front, as in the authors' ``ResnetBlock_cond``.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=1e-5, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=1e-5, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor, skip: Tensor | None = None) -> Tensor:  # x [BF, C, H, W], temb [BF, D]
        """``skip`` [BF, Cs, H, W]: the block's input is ``torch.cat([x, skip], 1)`` (the up path), which the norm
        and the shortcut read from its two parts (models.kernels)."""
        # the conv biases (and the time embedding) ride in the next norm / residual sum (models.kernels)
        h = conv_without_bias(self.conv1, self.norm1(x, skip=skip))
        h = conv_without_bias(self.conv2, self.norm2(h, shift=self.conv1.bias + self.time_emb_proj(temb)))
        residual, bias = shortcut_without_bias(self.shortcut, x, self.conv2.bias, skip)
        return residual_add(h, bias, residual, SKIP_SCALE)  # [BF, Cout, H, W]


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv (no bias) and a biased output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by attention_heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, C]
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, h, N, c/h]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, h, N, c/h]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiViewAttention(nn.Module):
    """GroupNorm, then self-attention over the pixels of all views of a sample at once, residual, * sqrt(0.5).

    There is no positional encoding: the Plücker rays in the input tell the network where each pixel looks.
    """

    def __init__(self, dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(groups, dim, eps=1e-5)
        self.attn = SelfAttention(dim, heads)

    def forward(self, x: Tensor, num_views: int) -> Tensor:  # [B*F, C, H, W]
        bf, c, h, w = x.shape
        tokens = self.norm(x).view(bf // num_views, num_views, c, h * w).permute(0, 1, 3, 2)  # [B, F, HW, C]
        tokens = self.attn(tokens.reshape(bf // num_views, num_views * h * w, c))  # [B, F*H*W, C]
        out = tokens.view(bf // num_views, num_views, h * w, c).permute(0, 1, 3, 2).reshape(bf, c, h, w)
        return (out + x) * SKIP_SCALE


class DownBlock(nn.Module):
    """``layers`` x [ResnetBlock -> (attention)], then an optional stride-2 conv; every output is a skip."""

    def __init__(self, cin: int, cout: int, layers: int, attention: bool, downsample: bool,
                 temb_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, temb_dim, groups) for i in range(layers))
        self.attns = nn.ModuleList(MultiViewAttention(cout, heads, groups) for _ in range(layers) if attention)
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor, temb: Tensor, num_views: int,
                first_net_done: bool = False) -> tuple[Tensor, list[Tensor]]:
        """``first_net_done``: ``x`` is already the first residual block's output (the per-view prefix of
        :meth:`GaussianUNet.encode_context_view` ends there); the block goes on from its first attention."""
        skips = []
        for i, net in enumerate(self.nets):
            if i > 0 or not first_net_done:
                x = net(x, temb)
            if self.attns:
                x = self.attns[i](x, num_views)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResnetBlock -> [(attention) -> ResnetBlock] at the lowest resolution."""

    def __init__(self, channels: int, attention: bool, temb_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(ResnetBlock(channels, channels, temb_dim, groups) for _ in range(2))
        self.attns = nn.ModuleList([MultiViewAttention(channels, heads, groups)] if attention else [])

    def forward(self, x: Tensor, temb: Tensor, num_views: int) -> Tensor:
        x = self.nets[0](x, temb)
        if self.attns:
            x = self.attns[0](x, num_views)
        return self.nets[1](x, temb)


def first_views(x: Tensor, num_views: int, keep: int) -> Tensor:
    """The first ``keep`` of the ``num_views`` consecutive views of each sample: [B*F, ...] -> [B*keep, ...].

    Keeps the memory format (a reshape of the strided slice would return NCHW)."""
    if keep == num_views:
        return x
    if x.shape[0] == num_views:  # one sample: a view, no copy
        return x[:keep]
    return torch.cat([x[i:i + keep] for i in range(0, x.shape[0], num_views)])


def append_view(x: Tensor, view: Tensor) -> Tensor:
    """Append one view to each sample: ``x`` [B*F, ...] and ``view`` [B, ...] -> [B*(F+1), ...], ``view``'s sample b
    last among sample b's views. Keeps ``x``'s memory format, as :func:`first_views` does (a concatenation of
    channels_last and contiguous tensors would be contiguous)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        view = view.contiguous(memory_format=torch.channels_last)
    b = view.shape[0]
    f = x.shape[0] // b
    return torch.cat([piece for i in range(b) for piece in (x[i * f:(i + 1) * f], view[i:i + 1])])


@dataclass
class ContextViewCache:
    """The context view's activations where the U-Net's per-view prefix ends (:meth:`GaussianUNet.encode_context_view`).

    Every layer before the first attention works on each view alone, and the context view's input (the clean image,
    zero rays, timestep 0) is the same at every sampling step; so the sampler computes its part of those layers once
    per call and the U-Net runs them on the target views only.
    """

    temb: Tensor  # [B, D] the context view's time embedding (timestep 0)
    hidden: Tensor  # [B, C, h, w] its input to the first attention layer
    skips: dict[int, Tensor]  # skip index -> [B, C_i, h_i, w_i]: the prefix skips that layers with attention read

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]


class UpBlock(nn.Module):
    """Per layer: concat a skip (last in, first out) -> ResnetBlock -> (attention); then optional nearest x2 + conv."""

    def __init__(self, cin: int, skip_channels: Sequence[int], cout: int, attention: bool, upsample: bool,
                 temb_dim: int, heads: int, groups: int) -> None:
        super().__init__()
        self.nets = nn.ModuleList(
            ResnetBlock((cin if i == 0 else cout) + cs, cout, temb_dim, groups) for i, cs in enumerate(skip_channels)
        )
        self.attns = nn.ModuleList(MultiViewAttention(cout, heads, groups) for _ in skip_channels if attention)
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, num_views: int,
                keep_views: int | None = None) -> Tensor:
        """``keep_views``: pass on only the first ``keep_views`` views of each sample (before the upsampling conv)."""
        for i, net in enumerate(self.nets):
            x = net(x, temb, skips[-1 - i])  # the input is cat([x, skip])
            if self.attns:
                x = self.attns[i](x, num_views)
        if keep_views is not None:
            x = first_views(x, num_views, keep_views)
        if self.upsample is not None:
            x = upsample_conv(self.upsample, x)  # nearest x2, then the conv
        return x


### the U-Net


def _checkpoint(module: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)


class GaussianUNet(nn.Module):
    """LGM's asymmetric U-Net with a timestep embedding added in every residual block.

    Down blocks halve the resolution between levels, up blocks double it; with fewer up than down blocks the output
    grid (the splat size) is coarser than the input (LGM big: 256 -> 128) and the highest-resolution skips go unused.
    Attention layers attend over all views of a sample jointly; the number of views comes from the caller.
    """

    def __init__(self, in_channels: int, out_channels: int, down_channels: Sequence[int],
                 down_attention: Sequence[bool], mid_attention: bool, up_channels: Sequence[int],
                 up_attention: Sequence[bool], layers_per_block: int, up_layers_per_block: int,
                 attention_heads: int, time_freq_dim: int, time_embed_dim: int, norm_num_groups: int) -> None:
        super().__init__()
        if len(down_channels) != len(down_attention) or len(up_channels) != len(up_attention):
            raise ValueError(
                f"down_channels {list(down_channels)} / down_attention {list(down_attention)} and up_channels "
                f"{list(up_channels)} / up_attention {list(up_attention)} must have matching lengths"
            )
        if not 0 < len(up_channels) <= len(down_channels):
            raise ValueError(f"need 1..{len(down_channels)} up blocks for {len(down_channels)} down blocks, "
                             f"got up_channels {list(up_channels)}")
        if time_freq_dim % 2:
            raise ValueError(f"time_freq_dim must be even, got {time_freq_dim}")
        self.time_freq_dim = time_freq_dim
        # diffusers' enable_gradient_checkpointing() flips this flag and may replace the function
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = _checkpoint
        g, hd, temb = norm_num_groups, attention_heads, time_embed_dim

        self.time_embedding = TimestepEmbedding(time_freq_dim, time_embed_dim)
        self.conv_in = nn.Conv2d(in_channels, down_channels[0], 3, padding=1)
        skip_stack = [down_channels[0]]  # channels of every skip tensor, in the order the down path produces them
        self.down_blocks = nn.ModuleList()
        cin = down_channels[0]
        for i, (cout, attn) in enumerate(zip(down_channels, down_attention)):
            last = i == len(down_channels) - 1
            self.down_blocks.append(DownBlock(cin, cout, layers_per_block, attn, not last, temb, hd, g))
            skip_stack += [cout] * (layers_per_block + (0 if last else 1))
            cin = cout
        self.mid_block = MidBlock(cin, mid_attention, temb, hd, g)
        self.up_blocks = nn.ModuleList()
        for i, (cout, attn) in enumerate(zip(up_channels, up_attention)):
            if len(skip_stack) < up_layers_per_block:
                raise ValueError(f"up block {i} needs {up_layers_per_block} skips, only {len(skip_stack)} left")
            skips = [skip_stack.pop() for _ in range(up_layers_per_block)]
            last = i == len(up_channels) - 1
            self.up_blocks.append(UpBlock(cin, skips, cout, attn, not last, temb, hd, g))
            cin = cout
        self.norm_out = GroupNorm(g, cin, eps=1e-5, silu=True)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)
        self.up_layers_per_block = up_layers_per_block
        # the last up block with attention trims the views before its upsampling conv; later blocks see K views
        # (-1: none has attention). Fixed by the architecture; computed here also because torch.compile of torch
        # 2.11 cannot trace max(..., default=) and would break the forward's graph into one per block
        attending = [i for i, attn in enumerate(up_attention) if attn]
        self.last_up_attention = attending[-1] if attending else -1
        # the per-view prefix (encode_context_view) ends at the first down block with attention (-1: none has);
        # of the skips it makes, those that up blocks with attention read need every view
        self.first_down_attention = next((i for i, attn in enumerate(down_attention) if attn), -1)
        num_skips = 1 + sum(len(block.nets) + (block.downsample is not None) for block in self.down_blocks)
        prefix_skips = 1 + (layers_per_block + 1) * max(self.first_down_attention, 0)
        attending_skips = range(num_skips - (self.last_up_attention + 1) * up_layers_per_block, num_skips)
        self.context_skip_indices = [i for i in attending_skips if i < prefix_skips]
        # output grid size / input size
        self.output_scale = 2.0 ** (len(up_channels) - len(down_channels))
        self.input_multiple = 2 ** (len(down_channels) - 1)

    def _run(self, block: nn.Module, *args) -> Tensor | tuple[Tensor, list[Tensor]]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _time_embedding(self, timesteps: Tensor) -> Tensor:
        feats = timestep_features(timesteps, self.time_freq_dim).to(self.time_embedding.linear_1.weight.dtype)
        return self.time_embedding(feats)  # [N, D]

    def _prefix(self, x: Tensor, temb: Tensor, num_views: int) -> tuple[Tensor, list[Tensor]]:
        """The per-view layers before the first attention: ``conv_in``, the down blocks without attention and the
        first residual block of the first one with (every down block if none has). Returns the output and the skips."""
        x = self.conv_in(x)
        skips = [x]
        k = self.first_down_attention
        for block in self.down_blocks[:k if k >= 0 else None]:
            x, block_skips = self._run(block, x, temb, num_views)
            skips += block_skips
        if k >= 0:
            x = self._run(self.down_blocks[k].nets[0], x, temb)
        return x, skips

    def encode_context_view(self, x: Tensor, timesteps: Tensor) -> ContextViewCache:
        """The per-view prefix (:meth:`_prefix`) of one view per sample, ``x`` [B, Cin, H, W] at ``timesteps`` [B],
        kept for :meth:`forward`'s ``context``: the sampler's context view, the same at every step."""
        if self.first_down_attention < 0:
            raise ValueError("this U-Net has no attention in its down path, so no per-view prefix to cache")
        temb = self._time_embedding(timesteps)  # [B, D]
        hidden, skips = self._prefix(x, temb, 1)
        return ContextViewCache(temb, hidden, {i: skips[i] for i in self.context_skip_indices})

    def forward(self, x: Tensor, timesteps: Tensor, num_views: int, keep_views: int | None = None,
                context: ContextViewCache | None = None) -> Tensor:
        """``x`` [B*F, Cin, H, W] (F views per sample, consecutive), ``timesteps`` [B*F] -> [B*K, Cout, S, S].

        ``keep_views`` = K <= F: only the first K views of each sample are wanted. The others still take part in
        every attention layer, but the layers after the last one (per-view convolutions and norms, most of the
        up path's work) run on the K views alone; the output is the same as slicing the full one. Default: all F.

        ``context``: the last view of each sample, run through the per-view prefix by :meth:`encode_context_view`.
        Then ``x`` and ``timesteps`` hold the first F - 1 views of each sample only, K <= F - 1, and the output is the
        same as with the last view in ``x``.
        """
        views_in = num_views - (context is not None)  # views per sample in x
        keep = views_in if keep_views is None else keep_views
        if not 0 < keep <= views_in:
            raise ValueError(f"keep_views must be in 1..{views_in} (the views per sample in x), got {keep_views}")
        temb = self._time_embedding(timesteps)  # [B*F', D]
        x, skips = self._prefix(x, temb, views_in)
        if context is not None:
            temb = append_view(temb, context.temb)  # [B*F, D]
            x = append_view(x, context.hidden)
            for i, view in context.skips.items():
                skips[i] = append_view(skips[i], view)
        k = self.first_down_attention
        if k >= 0:
            for i, block in enumerate(self.down_blocks[k:]):
                x, block_skips = self._run(block, x, temb, num_views, i == 0)
                skips += block_skips
        b = x.shape[0] // num_views  # samples
        x = self._run(self.mid_block, x, temb, num_views)
        last_attention = self.last_up_attention
        temb_kept = first_views(temb, num_views, keep)  # [B*K, D]
        if last_attention < 0:
            x = first_views(x, num_views, keep)
        for i, block in enumerate(self.up_blocks):
            block_skips = skips[-self.up_layers_per_block:]
            del skips[-self.up_layers_per_block:]
            if i < last_attention:
                x = self._run(block, x, block_skips, temb, num_views)
            elif i == last_attention:
                x = self._run(block, x, block_skips, temb, num_views, keep)
            else:  # per view: the kept views of each skip (the prefix's skips may lack the context view)
                block_skips = [first_views(skip, skip.shape[0] // b, keep) for skip in block_skips]
                x = self._run(block, x, block_skips, temb_kept, keep)
        return self.conv_out(self.norm_out(x))


### the 3D-GS diffusion model


class GaussianDiffusionModel(ModelMixin, ConfigMixin):
    """The 3D-GS diffusion model G(x0_hat, x_t, t, c): U-Net + 1x1 conv + Gaussian activations (paper Eq. 8).

    Each of the V target views enters as 12 channels [x0_hat RGB | x_t RGB | Plücker (o x d, d)] with both RGB slots
    ImageNet-normalised; the clean input image is appended as view V with itself in both RGB slots, zero rays and
    timestep 0, so that every attention layer can look at it. The U-Net predicts 14 channels per pixel of an S x S
    grid per view; the context view's pixels are dropped, the rest become V * S * S Gaussians, ordered view-major,
    then row, then column. With ``use_prior=False`` (the paper's ablation "w/o 2D prior", Eq. 6) the x0_hat slot is
    left out: 9 channels [x_t RGB | Plücker], the context view [image | zero rays].

    Args (the fields of ``GaussianUNetConfig``; defaults: the authors' model, LGM big plus time conditioning):
        in_channels: channels per view (12).
        out_channels: channels per output pixel (14: xyz, opacity, scale, rotation, rgb).
        down_channels, down_attention: width and multi-view attention of each down block.
        mid_attention: attention in the middle block.
        up_channels, up_attention: width and attention of each up block.
        layers_per_block, up_layers_per_block: residual blocks per down / up block (2 / 3).
        attention_heads: heads of every attention layer (16).
        time_freq_dim, time_embed_dim: sinusoidal feature width (64) and time-embedding width (256).
        norm_num_groups: GroupNorm groups (32).
        input_size: resolution of each input view (256); the splat grid is ``splat_size``.
        use_prior: read the MVD's one-step estimate x0_hat (Eq. 8; True) or not (Eq. 6; in_channels 9).
    """

    _supports_gradient_checkpointing = True
    # run the U-Net's layers after its last attention on the V target views only (the context view's output is
    # dropped anyway; same result, 6% fewer FLOPs at full size); False computes it, as the authors' code does
    trim_context_view: bool = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 12,
        out_channels: int = 14,
        down_channels: Sequence[int] = (64, 128, 256, 512, 1024, 1024),
        down_attention: Sequence[bool] = (False, False, False, True, True, True),
        mid_attention: bool = True,
        up_channels: Sequence[int] = (1024, 1024, 512, 256, 128),
        up_attention: Sequence[bool] = (True, True, True, False, False),
        layers_per_block: int = 2,
        up_layers_per_block: int = 3,
        attention_heads: int = 16,
        time_freq_dim: int = 64,
        time_embed_dim: int = 256,
        norm_num_groups: int = 32,
        input_size: int = 256,
        use_prior: bool = True,
    ) -> None:
        super().__init__()
        if in_channels != (12 if use_prior else 9):
            raise ValueError(f"in_channels must be {12 if use_prior else 9} with use_prior={use_prior} "
                             f"([x0 RGB | x_t RGB | Plücker 6] or [x_t RGB | Plücker 6]), got {in_channels}")
        if out_channels != 14:
            raise ValueError(f"out_channels must be 14 (xyz 3, opacity 1, scale 3, rotation 4, rgb 3), "
                             f"got {out_channels}")
        self.unet = GaussianUNet(
            in_channels, out_channels, down_channels, down_attention, mid_attention, up_channels, up_attention,
            layers_per_block, up_layers_per_block, attention_heads, time_freq_dim, time_embed_dim, norm_num_groups,
        )
        if input_size % self.unet.input_multiple:
            raise ValueError(f"input_size {input_size} must be a multiple of {self.unet.input_multiple} "
                             f"for {len(down_channels)} down blocks")
        # the authors keep LGM's extra 1x1 conv on the U-Net output
        self.conv = nn.Conv2d(out_channels, out_channels, 1)

    @property
    def splat_size(self) -> int:
        """Side S of each view's Gaussian grid (128 for the official model at 256 input)."""
        return int(self.config.input_size * self.unet.output_scale)

    @staticmethod
    def _normalize_rgb(rgb: Tensor) -> Tensor:
        """[..., 3, H, W] in [0, 1] (clamped) -> ImageNet-normalised.

        Per channel with Python scalars, not a mean/std tensor built here: copying one to the GPU would break CUDA
        graph capture (``diffusion/graphs.py``)."""
        rgb = rgb.clamp(0.0, 1.0)
        channels = [(rgb[..., c, :, :] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))]
        return torch.stack(channels, dim=-3)

    @property
    def can_cache_context_view(self) -> bool:
        """Whether :meth:`encode_context_view` applies: the U-Net has attention in its down path, and the context
        view's output is trimmed (the cache holds it only up to the first attention)."""
        return self.trim_context_view and self.unet.first_down_attention >= 0

    def _check_inputs(self, x0_hat: Tensor | None, x_t: Tensor, rays: Tensor, t: Tensor,
                      context: Tensor | ContextViewCache) -> None:
        if (x0_hat is None) == self.config.use_prior:
            raise ValueError("x0_hat is required with use_prior=True and must be None with use_prior=False")
        if x_t.ndim != 5 or x_t.shape[2] != 3:
            raise ValueError(f"x_t must be [B, V, 3, H, W], got {tuple(x_t.shape)}")
        b, v, _, h, w = x_t.shape
        size = self.config.input_size
        if (h, w) != (size, size):
            raise ValueError(f"views must be {size}x{size} (input_size), got {h}x{w}")
        expected = {"rays": (rays, (b, v, 6, h, w))}
        if isinstance(context, ContextViewCache):
            if context.batch_size != b:
                raise ValueError(f"the cached context view is for {context.batch_size} samples, x_t for {b}")
        else:
            expected["context"] = (context, (b, 3, h, w))
        if x0_hat is not None:
            expected["x0_hat"] = (x0_hat, (b, v, 3, h, w))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} to match x_t {tuple(x_t.shape)}, "
                                 f"got {tuple(tensor.shape)}")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
            raise ValueError(f"t must be [B={b}] or a scalar, got {tuple(t.shape)}")

    def _context_input(self, context: Tensor) -> Tensor:
        """The context view's U-Net input [B, 12, H, W]: the clean image in both RGB slots, zero rays (9 channels
        [image | zero rays] without the prior)."""
        ctx = self._normalize_rgb(context)  # [B, 3, H, W]
        slots = 2 if self.config.use_prior else 1
        return torch.cat([ctx] * slots + [ctx.new_zeros(ctx.shape[0], 6, *ctx.shape[2:])], dim=1)

    def build_input(self, x0_hat: Tensor | None, x_t: Tensor, rays: Tensor, t: Tensor,
                    context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The U-Net input: V target views plus the context view last, and one timestep per view (context: 0).

        Returns ``x`` [B*(V+1), 12, H, W] and ``timesteps`` [B*(V+1)] (float); with ``context=None`` the target views
        only, [B*V, 12, H, W] and [B*V] (the context view then comes from :meth:`encode_context_view`).
        """
        b, v = x_t.shape[:2]
        rgb = [x_t] if x0_hat is None else [x0_hat, x_t]
        views = torch.cat([*map(self._normalize_rgb, rgb), rays], dim=2)  # [B, V, 12 (9 without prior), H, W]
        t = t.to(device=views.device, dtype=torch.float32).expand(b)
        timesteps = t[:, None].expand(b, v)  # [B, V]
        if context is not None:
            views = torch.cat([views, self._context_input(context).to(views.dtype)[:, None]], dim=1)  # [B, V+1, ...]
            timesteps = torch.cat([timesteps, t.new_zeros(b, 1)], dim=1)
        return views.flatten(0, 1), timesteps.flatten()

    def encode_context_view(self, context: Tensor) -> ContextViewCache:
        """The context view's activations up to the U-Net's first attention, for :meth:`forward_raw` in place of
        ``context`` [B, 3, H, W] in [0, 1]: they depend on the image alone (timestep 0), so a sampling call computes
        them once rather than at every step (:attr:`can_cache_context_view`)."""
        if not self.can_cache_context_view:
            raise ValueError("the context view can be cached only with trim_context_view and attention in the "
                             "U-Net's down path")
        x = self._context_input(context).to(self.dtype)  # [B, 12, H, W]
        return self.unet.encode_context_view(x, x.new_zeros(x.shape[0], dtype=torch.float32))

    def forward_raw(self, x0_hat: Tensor | None, x_t: Tensor, rays: Tensor, t: Tensor,
                    context: Tensor | ContextViewCache) -> Tensor:
        """The 14 raw (pre-activation) channels of the target views' Gaussians, [B, V*S*S, 14] in float32.
        ``context``: the input image, or its cached activations (:meth:`encode_context_view`)."""
        self._check_inputs(x0_hat, x_t, rays, t, context)
        b, v = x_t.shape[:2]
        keep = v if self.trim_context_view else v + 1
        cache = context if isinstance(context, ContextViewCache) else None
        if cache is not None and not self.trim_context_view:
            raise ValueError("a cached context view needs trim_context_view (its output is not computed)")
        # [B*(V+1), 12, H, W], or [B*V, ...] with the context view cached
        x, timesteps = self.build_input(x0_hat, x_t, rays, t, None if cache is not None else context)
        out = self.conv(self.unet(x.to(self.dtype), timesteps, num_views=v + 1, keep_views=keep, context=cache))
        s = out.shape[-1]
        out = out.view(b, keep, out.shape[1], s, s)[:, :v]  # without the context view: [B, V, 14, S, S]
        return out.permute(0, 1, 3, 4, 2).reshape(b, v * s * s, out.shape[2]).float()  # [B, V*S*S, 14]

    def forward(self, x0_hat: Tensor | None,  # [B, V, 3, H, W] clean estimate in [0, 1] (None without prior)
                x_t: Tensor,            # [B, V, 3, H, W] decoded noisy views in [0, 1]
                rays: Tensor,           # [B, V, 6, H, W] Plücker maps of the V target cameras
                t: Tensor,              # [B] timesteps (the context view always gets 0)
                context: Tensor | ContextViewCache,  # [B, 3, H, W] clean input image in [0, 1], or its cache
                ) -> Gaussians:
        """Predict the V * S * S Gaussians of the target views (float32)."""
        return activate(self.forward_raw(x0_hat, x_t, rays, t, context))

    @staticmethod
    def render(gaussians: Gaussians, cameras: Cameras, **kwargs: Any) -> RenderOutput:
        """Render ``gaussians`` with the project renderer (``gen3diffusion.render.rasterize``; white background)."""
        from gen3diffusion.render import rasterize

        return rasterize(gaussians, cameras, **kwargs)


### initialisation from LGM big and loading of the authors' weights


@dataclass
class LGMInitReport:
    """What ``init_from_lgm`` did with each tensor."""

    loaded: list[str] = field(default_factory=list)  # copied unchanged from the LGM checkpoint
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how it was derived from the LGM tensor
    initialised: dict[str, str] = field(default_factory=dict)  # key -> how it was newly initialised
    mismatched: dict[str, str] = field(default_factory=dict)  # key -> "checkpoint shape vs model shape" (kept fresh)
    ignored: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for

    def summary(self) -> str:
        lines = [f"init from LGM: {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
                 f"{len(self.initialised)} newly initialised, {len(self.mismatched)} mis-shaped (kept fresh), "
                 f"{len(self.ignored)} ignored"]
        lines += [f"  adapted {k}: {how}" for k, how in self.adapted.items()]
        lines += [f"  mis-shaped {k}: {how}" for k, how in self.mismatched.items()]
        lines += [f"  ignored {k}" for k in self.ignored]
        new_kinds: dict[str, int] = {}
        for how in self.initialised.values():
            new_kinds[how] = new_kinds.get(how, 0) + 1
        lines += [f"  new ({n} tensors): {how}" for how, n in new_kinds.items()]
        return "\n".join(lines)


@torch.no_grad()
def init_from_lgm(model: GaussianDiffusionModel, lgm_state_dict: Mapping[str, Tensor]) -> LGMInitReport:
    """Initialise ``model`` from an original LGM big state dict so that, at init, it computes LGM's function of x0.

    - Every LGM tensor whose key and shape match is copied (all of the U-Net but ``conv_in``, and ``conv``).
    - ``unet.conv_in.weight`` grows from 9 to 12 input channels: LGM's RGB weights go to the x0_hat slot (0:3), its
      Plücker weights to the Plücker slot (6:12), and the new x_t slot (3:6) gets zeros. At init the model therefore
      ignores x_t and reconstructs from x0_hat exactly as LGM reconstructs from its clean views; since a conv weight's
      gradient depends on the input, not on the weight, the x_t weights still learn from the first step. (Splitting
      LGM's RGB weights between both slots would instead feed LGM a blend of a clean and a noisy image.)
    - Every ``time_emb_proj`` is zeroed, so the timestep adds nothing at init; the time MLP keeps its default init
      (its output only reaches the network through those zeroed projections, which get gradients at once).
    - Checkpoint keys the model lacks (e.g. ``lpips_loss.*``) are ignored and listed in the report.
    """
    report = LGMInitReport()
    own = model.state_dict()
    for key, target in own.items():
        source = lgm_state_dict.get(key)
        if source is not None and tuple(source.shape) == tuple(target.shape):
            target.copy_(source)
            report.loaded.append(key)
        elif key == "unet.conv_in.weight" and source is not None and _is_lgm_conv_in(source, target):
            target.zero_()
            target[:, 0:3] = source[:, 0:3]
            target[:, 6:12] = source[:, 3:9]
            report.adapted[key] = (f"{list(source.shape)} -> {list(target.shape)}: RGB -> x0_hat slot 0:3, "
                                   f"Plücker -> 6:12, x_t slot 3:6 = 0")
        elif source is not None:
            report.mismatched[key] = f"checkpoint {list(source.shape)} vs model {list(target.shape)}"
        elif ".time_emb_proj." in key:
            target.zero_()
            report.initialised[key] = "time_emb_proj zeroed (timestep has no effect at init)"
        else:
            report.initialised[key] = "default init"
    report.ignored = sorted(k for k in lgm_state_dict if k not in own)
    logger.info(report.summary())
    return report


def _is_lgm_conv_in(source: Tensor, target: Tensor) -> bool:
    return (source.ndim == 4 and source.shape[1] == 9 and target.shape[1] == 12
            and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:])


def drop_lpips_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without the frozen LPIPS tensors (``lpips_loss.*``) the authors saved in model_1.safetensors."""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(LPIPS_PREFIX)}
    dropped = len(state_dict) - len(kept)
    if dropped:
        logger.info("dropped %d %s* tensors (the authors' frozen LPIPS, not part of the model)", dropped, LPIPS_PREFIX)
    return kept


def load_official_weights(model: GaussianDiffusionModel, source: str | Path | Mapping[str, Tensor], *,
                          assign: bool = False, dtype: torch.dtype | None = None) -> None:
    """Load the authors' ``model_1.safetensors`` (a file, a folder or hub id holding it, or its state dict) strictly.

    The frozen LPIPS tensors the authors saved alongside the model are dropped with a log line; any other missing,
    unexpected or mis-shaped key raises ``StateDictMismatchError`` listing the keys with both shapes. ``assign``
    hands the tensors over instead of copying (for a model built on the meta device); ``dtype`` casts them first.
    """
    if isinstance(source, Mapping):
        name, state = "state dict", source
    else:
        file = resolve_file(source, OFFICIAL_WEIGHTS_NAME)
        name, state = str(file), read_state_dict(file)
    load_state_dict_strict(model, drop_lpips_keys(state), source=name, assign=assign, dtype=dtype)


def load_gaussian_model(source: str | Path, config: Mapping[str, object] | None = None, *,
                        torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> GaussianDiffusionModel:
    """The 3D-GS model with the authors' weights: built on the meta device (official size unless ``config`` gives
    constructor arguments) and filled strictly from ``model_1.safetensors`` (see ``load_official_weights``)."""
    with torch.device("meta"):
        model = GaussianDiffusionModel(**(config or {}))
    load_official_weights(model, source, assign=True, dtype=torch_dtype)
    return model.to(device).eval()
