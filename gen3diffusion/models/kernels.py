"""Fused inference kernels for channels_last CUDA activations: GroupNorm (+ SiLU), the residual epilogue, the
sub-pixel upsampler's interleave, GEGLU's activation, and the im2col columns of small convolutions.

Every convolutional block of the three networks (MV UNet, VAE, 3D U-Net) runs GroupNorm -> SiLU -> conv, twice,
then adds its input. cuDNN's fast convolutions work in NHWC (``torch.channels_last``), but in eager PyTorch

* GroupNorm works in NCHW, so each norm costs two layout conversions plus separate norm and SiLU passes;
* every convolution adds its bias in a separate, broadcasting (so unvectorised) pass;
* the residual sum and its scale are further passes.

Here a block is written as ``conv_without_bias`` -> :func:`group_norm` with ``shift`` = that conv's bias (plus the
time embedding) -> ``conv_without_bias`` -> :func:`residual_add` with the second bias, so the biases ride along in
passes that happen anyway. The GroupNorm kernels read and write NHWC and apply the SiLU on the way out: three passes
over the activation (per-chunk statistics, a tiny merge per group, normalise) instead of about seven. Two more
passes that PyTorch runs unvectorised over strided views get one vectorised Triton pass each: the interleave of the
sub-pixel upsampling conv's four phases (plus its bias), and the MV UNet's GEGLU ``value * GELU(gate)``.

Two copies are not made at all: the U-Nets' up-path blocks read their input ``cat([x, skip])`` from its two parts
(the norm kernels read both, the 1x1 shortcut runs as two matrix products), and the VAE encoder's last residual block
before each downsampler writes the zero row and column that the downsampler pads. The convolutions of the deepest
levels, whose few output pixels leave cuDNN's implicit GEMM short of work, run as one matrix product over im2col
columns that one Triton pass writes.

Statistics are accumulated in float32 with Chan et al.'s pairwise merge of (count, mean, M2), so a large mean does
not cancel the variance (as a sum / sum-of-squares formula would); results match the reference ops to float32
rounding, followed by one rounding to the activation's dtype.

The kernels run only for inference (no autograd graph to record) on CUDA tensors in channels_last layout and outside
``torch.compile`` (inductor fuses the reference ops itself); everything else takes the same math in plain PyTorch
ops, so training and CPU runs compute what they computed before, up to the order of the additions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

__all__ = ["GroupNorm", "conv_without_bias", "fuse_vae_blocks", "geglu", "gemm_conv", "group_norm", "residual_add",
           "shortcut_without_bias", "split_pointwise_conv", "subpixel_upsample_conv", "subpixel_weight", "triton_geglu",
           "triton_group_norm", "triton_im2col", "triton_residual_add", "triton_subpixel_interleave", "upsample_conv"]

_STATS_BLOCK_R, _STATS_WARPS = 128, 4  # statistics: pixels per loop step of a program, warps per program
_TARGET_PROGRAMS = 1024  # statistics programs per call: enough to fill the GPU, few partials to merge
_NORM_BLOCK_R, _NORM_WARPS = 64, 4  # normalisation: pixels per program, warps per program
_BLOCK_FLAT = 2048  # elements per program of the residual kernel
_BLOCK_ROWS, _BLOCK_COLS = 16, 128  # rows x channels per program of the GEGLU, interleave and im2col kernels
# a residual block's convolutions with at most this many output pixels (the whole batch's) run as one GEMM over
# im2col columns (:func:`gemm_conv`) where the kernels apply; 0: never. At the U-Nets' deepest levels (10 frames of
# 4x4, the 3D U-Net's 5 views of 8x8) cuDNN's implicit GEMM makes too few output tiles to keep the GPU busy while it
# streams the weights. 320: where bench/bench_conv.py timed the GEMM faster on the H100 (docs/benchmarks.md)
GEMM_CONV_MAX_PIXELS = 320
# the up paths' residual blocks read their input cat([x, skip]) from its two parts where the kernels apply (the norm
# reads both, the 1x1 shortcut runs as two matrix products), instead of copying the concatenation first
SPLIT_CONCAT = True
# the VAE encoder's last residual block before each stride-2 downsampler writes its output with the zero row and
# column that the downsampler pads (bottom, right), so no padded copy is made
PAD_IN_RESIDUAL = True


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
               silu: bool = False, shift: Tensor | None = None, skip: Tensor | None = None) -> Tensor:
    """``F.group_norm(x + shift)`` (then ``F.silu`` when ``silu``), by the Triton kernels where they apply (module
    docstring). ``shift`` [C] or [N, C] is added per channel (and sample) before normalising: the bias of the
    convolution that produced ``x`` and the time embedding. ``skip``: normalise ``torch.cat([x, skip], 1)`` (a U-Net's
    up-path input); the kernels read both and no concatenated copy is made."""
    if skip is not None and not (SPLIT_CONCAT and x.dim() == 4 and _channels_last(skip)):
        x, skip = torch.cat([x, skip], dim=1), None  # then as any other input
    if weight is not None and bias is not None and _use_kernel(x, weight, bias, shift, skip):
        return triton_group_norm(x, num_groups, weight, bias, eps, silu, shift, skip)
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    if shift is not None:
        x = x + shift.reshape(-1 if shift.dim() == 2 else 1, x.shape[1], *([1] * (x.dim() - 2)))
    out = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(out) if silu else out


def residual_add(h: Tensor, bias: Tensor | None, skip: Tensor, scale: float = 1.0, pad: bool = False) -> Tensor:
    """``(h + bias + skip) * scale`` with ``bias`` [C] per channel: the end of a residual block whose last
    convolution ran without its bias (one Triton pass for same-layout channels_last CUDA tensors at inference).
    ``pad``: return it with a zero last row and column, [N, C, H + 1, W + 1] (``F.pad(out, (0, 1, 0, 1))``)."""
    if bias is not None and skip.shape == h.shape and skip.stride() == h.stride() and _use_kernel(h, bias, skip):
        if pad and h.dim() == 4 and PAD_IN_RESIDUAL:
            return triton_residual_add(h, bias, skip, scale, pad=True)
        out = triton_residual_add(h, bias, skip, scale)
    else:
        out = h + skip if bias is None else h + bias.reshape(-1, *([1] * (h.dim() - 2))) + skip
        out = out if scale == 1.0 else out * scale
    return F.pad(out, (0, 1, 0, 1)) if pad else out


def geglu(h: Tensor) -> Tensor:
    """GEGLU's activation ``value * F.gelu(gate)`` of ``h`` [..., 2D] = [value | gate] -> [..., D]. At inference on a
    contiguous CUDA tensor one Triton pass; in PyTorch ops the GELU and the product each make an unvectorised pass
    over the strided halves."""
    if h.is_contiguous() and _inference_on_cuda(h):
        return triton_geglu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def conv_without_bias(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` minus its bias, which the caller folds into the next :func:`group_norm` or :func:`residual_add`.
    On few pixels (:data:`GEMM_CONV_MAX_PIXELS`) a 1x1 or 3x3 conv runs as :func:`gemm_conv` where the kernels apply."""
    if (x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= GEMM_CONV_MAX_PIXELS and _is_same_size_conv(conv)
            and _use_kernel(x, conv.weight)):
        return gemm_conv(x, conv.weight)
    return conv._conv_forward(x, conv.weight, None)


def gemm_conv(x: Tensor, weight: Tensor) -> Tensor:
    """A stride-1 conv with zero padding that keeps the size (1x1 or 3x3, no bias) of a channels_last ``x``
    [N, Ci, H, W] as one matrix product: [N*H*W, 9 Ci] im2col columns (:func:`triton_im2col`; for 1x1, ``x`` itself)
    times the weight [Co, Ci, k, k] read as [Co, k*k*Ci]. Returns [N, Co, H, W] in channels_last memory."""
    n, ci, h, w = x.shape
    co, k = weight.shape[0], weight.shape[-1]
    # [N*H*W, k*k*Ci], tap-major; for 1x1 a view of the channels_last x
    cols = x.permute(0, 2, 3, 1).reshape(n * h * w, ci) if k == 1 else triton_im2col(x)
    out = cols @ weight.permute(0, 2, 3, 1).reshape(co, k * k * ci).t()  # [N*H*W, Co]
    return out.view(n, h, w, co).permute(0, 3, 1, 2)


def shortcut_without_bias(shortcut: nn.Module, x: Tensor, bias: Tensor,
                          skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A residual block's skip branch ``shortcut(x)`` and the bias to add at the block's end: ``bias`` (the last
    conv's) plus, when the shortcut is a convolution, its bias, which it then leaves out. ``skip``: the block's input
    is ``torch.cat([x, skip], 1)``; a 1x1 conv then runs as two matrix products where the kernels apply."""
    if (skip is not None and SPLIT_CONCAT and isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1)
            and shortcut.bias is not None and _use_kernel(x, skip, shortcut.weight) and _channels_last(skip)):
        return split_pointwise_conv(x, skip, shortcut.weight), bias + shortcut.bias
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    if isinstance(shortcut, nn.Conv2d) and shortcut.bias is not None:
        return conv_without_bias(shortcut, x), bias + shortcut.bias
    return shortcut(x), bias


def split_pointwise_conv(x: Tensor, skip: Tensor, weight: Tensor) -> Tensor:
    """A 1x1 conv without bias of ``torch.cat([x, skip], 1)`` ([N, C1, H, W] and [N, C2, H, W], channels_last) with
    ``weight`` [Co, C1 + C2, 1, 1], as ``x @ W1^T`` plus ``skip @ W2^T`` accumulated in place: no concatenated copy.
    The second product is ``addmm(..., out=)``: autocast casts neither that nor ``addmm_``, so it runs in the first
    one's dtype, and ``FlopCounterMode`` counts it, which it does not for ``addmm_``.
    Returns [N, Co, H, W] in channels_last memory."""
    n, c1, h, w = x.shape
    co = weight.shape[0]
    w2d = weight.reshape(co, -1)  # [Co, C1 + C2]
    out = x.permute(0, 2, 3, 1).reshape(-1, c1) @ w2d[:, :c1].t()  # [N*H*W, Co]
    skip2d = skip.permute(0, 2, 3, 1).reshape(-1, skip.shape[1])  # [N*H*W, C2]
    torch.addmm(out, skip2d.to(out.dtype), w2d[:, c1:].t().to(out.dtype), out=out)
    return out.view(n, h, w, co).permute(0, 3, 1, 2)


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))``: the upsampler of every U-Net and VAE decoder.

    Where the fused kernels apply (inference on CUDA channels_last) a 3x3 ``conv`` runs as its sub-pixel form
    (:func:`subpixel_upsample_conv`): 16 instead of 36 multiply-adds per input pixel and channel pair, and no
    upsampled copy of ``x``. Elsewhere it runs as written."""
    if conv.kernel_size == (3, 3) and _is_same_size_conv(conv) and _use_kernel(x, conv.weight, conv.bias):
        return subpixel_upsample_conv(x, _cached_subpixel_weight(conv), conv.bias)
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def subpixel_weight(weight: Tensor) -> Tensor:
    """A 3x3 kernel [Co, Ci, 3, 3] -> the 2x2 kernels [4 Co, Ci, 2, 2] of its four output phases after nearest 2x
    upsampling, phase (a, b) (output pixel (2i + a, 2j + b)) in channels a*2Co + b*Co ... (a*2 + b + 1)*Co.

    After upsampling, output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, which are input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1: two distinct input rows, each weighted by the sum of the
    kernel rows that land on it. The same holds for columns. Summed in at least float32, then cast to ``weight``'s
    dtype."""
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"weight: expected [Co, Ci, 3, 3], got {tuple(weight.shape)}")
    co, ci = weight.shape[:2]
    # taps[phase, r, k] = 1 where kernel row k reads input row r of the phase's 2-row window
    dtype = torch.promote_types(weight.dtype, torch.float32)
    taps = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=dtype, device=weight.device)
    phases = torch.einsum("ayk,bxl,oikl->aboiyx", taps, taps, weight.to(dtype))  # [2, 2, Co, Ci, 2, 2]
    return phases.reshape(4 * co, ci, 2, 2).to(weight.dtype)


def subpixel_upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Nearest 2x upsampling then a 3x3 conv (padding 1), computed from ``x`` [N, Ci, H, W] by one 2x2 conv with the
    four phases' kernels (``weight`` [4 Co, Ci, 2, 2] from :func:`subpixel_weight`) and one interleaving pass that adds
    ``bias`` [Co] (a Triton kernel on CUDA without autograd). Returns [N, Co, 2H, 2W] in channels_last memory.

    With padding 1 the 2x2 conv has (H + 1) x (W + 1) positions; position (p, q) reads input rows p - 1, p and columns
    q - 1, q. Phase (a, b) of output pixel (i, j) is the window at (i + a, j + b)."""
    n, _, h, w = x.shape
    co = weight.shape[0] // 4
    y = F.conv2d(x, weight, None, padding=1).contiguous(memory_format=torch.channels_last)  # [N, 4Co, H+1, W+1]
    if _use_kernel(y, bias):
        return triton_subpixel_interleave(y, bias)
    s_n, s_h, s_w = y.stride(0), y.stride(2), y.stride(3)  # channels_last: s_w = 4 Co, s_h = (W + 1) * 4 Co
    # [N, H, 2 (a), W, 2 (b), Co] view of y: element (n, i, a, j, b, c) is y[n, (2a + b) Co + c, i + a, j + b]
    phases = y.as_strided((n, h, 2, w, 2, co), (s_n, s_h, s_h + 2 * co, s_w, s_w + co, 1))
    out = torch.empty((n, h, 2, w, 2, co), dtype=y.dtype, device=y.device)
    if bias is None:
        out.copy_(phases)
    else:
        torch.add(phases, bias.to(y.dtype), out=out)
    return out.view(n, 2 * h, 2 * w, co).permute(0, 3, 1, 2)  # [N, Co, 2H, 2W], channels_last


def _is_same_size_conv(conv: nn.Conv2d) -> bool:
    """A 1x1 or 3x3 convolution with stride 1 and zero padding that keeps the size, one group."""
    k = conv.kernel_size
    return (k in ((1, 1), (3, 3)) and conv.stride == (1, 1) and conv.padding == (k[0] // 2, k[1] // 2)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def _cached_subpixel_weight(conv: nn.Conv2d) -> Tensor:
    """:func:`subpixel_weight` of ``conv``, made once per weight tensor and version (kept on the module, outside its
    state dict; moving or updating the weight makes it anew)."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = getattr(conv, "_subpixel_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, subpixel_weight(weight).contiguous(memory_format=torch.channels_last))
        conv._subpixel_cache = cached
    return cached[1]


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` [N, C, *spatial] (2-D or 1-D spatial) stores its channels innermost, pixel after pixel."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 3 and x.transpose(1, 2).is_contiguous()


def _use_kernel(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the NHWC Triton path applies to ``x`` and the other inputs (None ones ignored): ``x`` channels_last,
    and :func:`_inference_on_cuda`."""
    return _channels_last(x) and _inference_on_cuda(x, *others)


def _inference_on_cuda(x: Tensor, *others: Tensor | None) -> bool:
    """Triton installed, ``x`` on CUDA, nothing for autograd to record, not inside ``torch.compile``."""
    tensors = [x, *(t for t in others if t is not None)]
    return (
        triton is not None
        and x.is_cuda
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
    )


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) that can apply the following SiLU itself."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = False) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.silu = silu

    def forward(self, x: Tensor, shift: Tensor | None = None, skip: Tensor | None = None) -> Tensor:
        """``skip``: normalise ``torch.cat([x, skip], 1)`` (see :func:`group_norm`)."""
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift, skip)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", silu=True" if self.silu else "")

    @classmethod
    def from_module(cls, norm: nn.GroupNorm, silu: bool = False) -> "GroupNorm":
        """A GroupNorm sharing ``norm``'s parameters (no copy)."""
        fused = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, silu)
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused


class _FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` as the VAE uses it (no time embedding, no resampling), with its conv biases
    folded into the fused GroupNorm and residual (module docstring). Only :func:`fuse_vae_blocks` makes these, by
    switching the class of an existing block: parameters, names and the math stay those of diffusers."""

    def forward(self, input_tensor: Tensor, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        return self.forward_fused(input_tensor)

    def forward_fused(self, x: Tensor, pad: bool = False) -> Tensor:
        """The block; ``pad``: its output with a zero last row and column (see :func:`residual_add`)."""
        h = conv_without_bias(self.conv1, self.norm1(x))
        h = conv_without_bias(self.conv2, self.dropout(self.norm2(h, shift=self.conv1.bias)))
        skip, bias = x, self.conv2.bias
        if self.conv_shortcut is not None:
            skip, bias = shortcut_without_bias(self.conv_shortcut, x, bias)
        return residual_add(h, bias, skip, 1.0 / self.output_scale_factor, pad)


class _FusedDownEncoderBlock2D(DownEncoderBlock2D):
    """diffusers' ``DownEncoderBlock2D`` of the VAE encoder (residual blocks, then a stride-2 conv that first pads one
    zero row and column at the bottom and right): its last residual block writes that padding itself
    (:func:`residual_add` with ``pad``). Only :func:`fuse_vae_blocks` makes these, when the block has that form."""

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs:
            return super().forward(hidden_states, *args, **kwargs)
        *first, last = self.resnets
        for resnet in first:
            hidden_states = resnet(hidden_states)
        return self.downsamplers[0].conv(last.forward_fused(hidden_states, pad=True))  # [N, C, H/2, W/2]


class _FusedUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` as the VAE decoder uses it (nearest x2, then a 3x3 conv), through
    :func:`upsample_conv`. Only :func:`fuse_vae_blocks` makes these, by switching the class of an existing module."""

    def forward(self, hidden_states: Tensor, output_size: int | None = None, *args, **kwargs) -> Tensor:
        if output_size is not None or args or kwargs:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        return upsample_conv(self.conv, hidden_states)


def _fusable_resnet(module: nn.Module) -> bool:
    """A diffusers ``ResnetBlock2D`` as the VAE uses it: no time embedding, no resampling, SiLU."""
    return (type(module) is ResnetBlock2D and module.time_emb_proj is None and module.upsample is None
            and module.downsample is None and isinstance(module.nonlinearity, nn.SiLU))


def _pads_then_convolves(module: nn.Module) -> bool:
    """A diffusers ``Downsample2D`` that pads (0, 1, 0, 1) and runs its stride-2 conv, nothing else."""
    return (type(module) is Downsample2D and module.use_conv and module.padding == 0 and module.norm is None
            and isinstance(module.conv, nn.Conv2d))


def fuse_vae_blocks(vae: nn.Module) -> int:
    """Switch a diffusers ``AutoencoderKL`` to the fused kernels in place; returns how many modules changed.

    Its residual blocks become :class:`_FusedResnetBlock2D` with :class:`GroupNorm` + SiLU norms, the encoder's and
    decoder's ``conv_norm_out`` absorbs ``conv_act``, the attention blocks' ``group_norm`` becomes a
    :class:`GroupNorm`, and the decoder's upsamplers run :func:`upsample_conv`. Parameters are shared and state-dict
    keys unchanged; calling it again changes nothing.
    """
    count = 0
    for module in vae.modules():
        if _fusable_resnet(module):
            module.__class__ = _FusedResnetBlock2D
            module.norm1 = GroupNorm.from_module(module.norm1, silu=True)
            module.norm2 = GroupNorm.from_module(module.norm2, silu=True)
        elif (type(module) is Upsample2D and module.use_conv and not module.use_conv_transpose and module.interpolate
              and module.norm is None and module.name == "conv"):
            module.__class__ = _FusedUpsample2D
        elif (type(module) is DownEncoderBlock2D and module.downsamplers is not None and len(module.downsamplers) == 1
              and _pads_then_convolves(module.downsamplers[0])
              and all(_fusable_resnet(resnet) or type(resnet) is _FusedResnetBlock2D for resnet in module.resnets)):
            module.__class__ = _FusedDownEncoderBlock2D
        elif isinstance(module, Attention) and type(module.group_norm) is nn.GroupNorm:
            module.group_norm = GroupNorm.from_module(module.group_norm)
        elif type(getattr(module, "conv_norm_out", None)) is nn.GroupNorm and isinstance(module.conv_act, nn.SiLU):
            module.conv_norm_out = GroupNorm.from_module(module.conv_norm_out, silu=True)
            module.conv_act = nn.Identity()
        else:
            continue
        count += 1
    return count


def triton_group_norm(x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float,
                      silu: bool = False, shift: Tensor | None = None, skip: Tensor | None = None) -> Tensor:
    """GroupNorm (+ SiLU) of a channels_last ``x`` [N, C, H, W] (or [N, C, L] stored as [N, L, C]) plus ``shift``
    ([C] or [N, C], see :func:`group_norm`) by the Triton kernels; the output has ``x``'s layout. With ``skip``
    [N, C2, ...] (channels_last, same pixels) it normalises ``torch.cat([x, skip], 1)``: the kernels read channel c
    from ``x`` below ``x``'s width and from ``skip`` above."""
    if triton is None:
        raise RuntimeError("triton_group_norm needs the triton package")
    if not _channels_last(x):
        raise ValueError(f"x must be channels_last contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    C1 = x.shape[1]  # channels read from x
    if skip is not None:
        if x.dim() != 4 or not _channels_last(skip) or skip.shape[0] != x.shape[0] or skip.shape[2:] != x.shape[2:]:
            raise ValueError(f"skip must be channels_last [N, C2, H, W] with x's batch and pixels "
                             f"{tuple(x.shape[2:])}, got {tuple(skip.shape)} {skip.stride()}")
        x_shape = (x.shape[0], C1 + skip.shape[1], *x.shape[2:])
    else:
        x_shape = tuple(x.shape)
    N, C = x_shape[:2]
    if C % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {C} channels")
    HW, D = x[0, 0].numel(), C // num_groups
    if shift is not None and tuple(shift.shape) not in ((C,), (N, C)):
        raise ValueError(f"shift: expected [{C}] or [{N}, {C}], got {tuple(shift.shape)}")
    # per-channel shifts move only the channels' means: the chunk statistics ignore them, the merge and the
    # normalisation add them (row stride 0 broadcasts a [C] shift over the samples)
    has_shift, shift_row_stride = shift is not None, 0 if shift is None or shift.dim() == 1 else C
    shift = (weight if shift is None else shift).contiguous()  # any pointer when there is none
    block_c = min(64, triton.next_power_of_2(C))
    col_blocks = triton.cdiv(C, block_c)
    chunks_wanted = max(1, _TARGET_PROGRAMS // (N * col_blocks))
    rows_per_chunk = _STATS_BLOCK_R * triton.cdiv(triton.cdiv(HW, chunks_wanted), _STATS_BLOCK_R)
    chunks = triton.cdiv(HW, rows_per_chunk)

    two = skip is not None
    second = skip if two else x  # any pointer when there is none
    partial = torch.empty(2, N, chunks, C, device=x.device, dtype=torch.float32)  # per-channel (mean, M2) per chunk
    _chunk_stats_kernel[(chunks, N, col_blocks)](
        x, second, partial[0], partial[1], HW, C, C1, rows_per_chunk, chunks, BLOCK_R=_STATS_BLOCK_R,
        BLOCK_C=block_c, TWO=two, num_warps=_STATS_WARPS)
    stats = torch.empty(2, N, num_groups, device=x.device, dtype=torch.float32)  # (mean, rstd) per group
    _group_stats_kernel[(num_groups, N)](
        partial[0], partial[1], shift, stats[0], stats[1], HW, C, D, chunks, rows_per_chunk, shift_row_stride, eps,
        BLOCK_K=min(64, triton.next_power_of_2(chunks)), BLOCK_D=triton.next_power_of_2(D), SHIFT=has_shift)
    y = torch.empty_like(x) if not two else torch.empty(
        x_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)  # x's layout
    _normalize_kernel[(triton.cdiv(HW, _NORM_BLOCK_R), N, col_blocks)](
        x, second, y, weight, bias, shift, stats[0], stats[1], HW, C, C1, D, num_groups, shift_row_stride,
        BLOCK_R=_NORM_BLOCK_R, BLOCK_C=block_c, SILU=silu, SHIFT=has_shift, TWO=two, num_warps=_NORM_WARPS)
    return y


def triton_residual_add(h: Tensor, bias: Tensor, skip: Tensor, scale: float = 1.0, pad: bool = False) -> Tensor:
    """:func:`residual_add` by the Triton kernel, for channels_last ``h`` and ``skip`` of the same shape and strides;
    ``pad``: into [N, C, H + 1, W + 1] with a zero last row and column (4-D only)."""
    if triton is None:
        raise RuntimeError("triton_residual_add needs the triton package")
    if not _channels_last(h) or skip.shape != h.shape or skip.stride() != h.stride():
        raise ValueError(f"h and skip must be channels_last with the same shape and strides, got {tuple(h.shape)} "
                         f"{h.stride()} and {tuple(skip.shape)} {skip.stride()}")
    if tuple(bias.shape) != (h.shape[1],):
        raise ValueError(f"bias: expected [{h.shape[1]}], got {tuple(bias.shape)}")
    if pad:
        if h.dim() != 4:
            raise ValueError(f"pad needs [N, C, H, W], got {tuple(h.shape)}")
        n, c, hh, ww = h.shape
        out = torch.empty((n, c, hh + 1, ww + 1), dtype=h.dtype, device=h.device, memory_format=torch.channels_last)
        # one program per output row (sample, i) and block of its (W + 1) C elements
        _residual_pad_kernel[(n * (hh + 1), triton.cdiv((ww + 1) * c, _BLOCK_FLAT))](
            h, skip, bias, out, hh, ww, c, scale, BLOCK=_BLOCK_FLAT)
        return out
    out = torch.empty_like(h)
    _residual_kernel[(triton.cdiv(h.numel(), _BLOCK_FLAT),)](
        h, skip, bias, out, h.numel(), h.shape[1], scale, BLOCK=_BLOCK_FLAT)
    return out


def triton_geglu(h: Tensor) -> Tensor:
    """:func:`geglu` by the Triton kernel, for a contiguous ``h`` [..., 2D]."""
    if triton is None:
        raise RuntimeError("triton_geglu needs the triton package")
    if not h.is_contiguous() or h.shape[-1] % 2:
        raise ValueError(f"h must be contiguous with an even last dimension, got {tuple(h.shape)} {h.stride()}")
    d = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], d), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    rows = out.numel() // d
    _geglu_kernel[(triton.cdiv(rows, _BLOCK_ROWS), triton.cdiv(d, _BLOCK_COLS))](
        h, out, rows, d, BLOCK_R=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS)
    return out


def triton_subpixel_interleave(y: Tensor, bias: Tensor | None) -> Tensor:
    """The interleaving pass of :func:`subpixel_upsample_conv` by the Triton kernel: the phases' 2x2 conv output
    ``y`` [N, 4 Co, H + 1, W + 1] (channels_last) -> [N, Co, 2H, 2W] (channels_last), plus ``bias`` [Co]."""
    if triton is None:
        raise RuntimeError("triton_subpixel_interleave needs the triton package")
    if not _channels_last(y) or y.shape[1] % 4:
        raise ValueError(f"y must be channels_last with 4 Co channels, got {tuple(y.shape)} {y.stride()}")
    n, co, h, w = y.shape[0], y.shape[1] // 4, y.shape[2] - 1, y.shape[3] - 1
    if bias is not None and tuple(bias.shape) != (co,):
        raise ValueError(f"bias: expected [{co}], got {tuple(bias.shape)}")
    out = torch.empty((n, co, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    # one program per output row (sample, 2i + a), block of its 2W pixels and block of channels
    grid = (n * 2 * h, triton.cdiv(2 * w, _BLOCK_ROWS), triton.cdiv(co, _BLOCK_COLS))
    _interleave_kernel[grid](y, y if bias is None else bias, out, h, w, co, BLOCK_P=_BLOCK_ROWS,
                             BLOCK_C=_BLOCK_COLS, BIAS=bias is not None)
    return out


def triton_im2col(x: Tensor) -> Tensor:
    """The columns of a 3x3 conv with padding 1 of a channels_last ``x`` [N, C, H, W] by one Triton pass:
    [N*H*W, 9 C], row (n, i, j), column t*C + c = x[n, c, i + t // 3 - 1, j + t % 3 - 1] (0 outside the image)."""
    if triton is None:
        raise RuntimeError("triton_im2col needs the triton package")
    if not _channels_last(x) or x.dim() != 4:
        raise ValueError(f"x must be channels_last [N, C, H, W], got {tuple(x.shape)} {x.stride()}")
    n, c, h, w = x.shape
    cols = torch.empty((n * h * w, 9 * c), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n * h * w, _BLOCK_ROWS), 9, triton.cdiv(c, _BLOCK_COLS))
    _im2col_kernel[grid](x, cols, n * h * w, h, w, c, BLOCK_P=_BLOCK_ROWS, BLOCK_C=_BLOCK_COLS)
    return cols


if triton is not None:

    @triton.jit
    def _merge(count, mean, m2, count_b, mean_b, m2_b):
        """Chan et al.'s merge of two (count, mean, M2) summaries into one."""
        total = count + count_b
        delta = mean_b - mean
        return total, mean + delta * (count_b / total), m2 + m2_b + delta * delta * (count * count_b / total)

    @triton.jit
    def _load_tile(x_ptr, x2_ptr, n, rows, cols, ok, HW, C, C1, TWO: tl.constexpr):
        """The [rows, cols] tile of sample n of x (C channels), or with TWO of cat([x, x2], channels) (x: the first
        C1 channels, x2: the other C - C1), as float32 (0 outside ``ok``)."""
        if TWO:
            first = (cols < C1)[None, :]
            a = tl.load(x_ptr + n.to(tl.int64) * HW * C1 + rows[:, None] * C1 + cols[None, :], mask=ok & first,
                        other=0.0)
            b = tl.load(x2_ptr + n.to(tl.int64) * HW * (C - C1) + rows[:, None] * (C - C1) + (cols - C1)[None, :],
                        mask=ok & ~first, other=0.0)
            return a.to(tl.float32) + b.to(tl.float32)
        return tl.load(x_ptr + n.to(tl.int64) * HW * C + rows[:, None] * C + cols[None, :], mask=ok,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _chunk_stats_kernel(x_ptr, x2_ptr, mean_ptr, m2_ptr, HW, C, C1, rows_per_chunk, num_chunks,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, TWO: tl.constexpr):
        """Per-channel mean and M2 (sum of squared deviations) of ``rows_per_chunk`` pixels of one sample."""
        chunk, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        count = tl.zeros([BLOCK_C], tl.float32)
        mean = tl.zeros([BLOCK_C], tl.float32)
        m2 = tl.zeros([BLOCK_C], tl.float32)
        start = chunk * rows_per_chunk
        for r0 in range(start, tl.minimum(start + rows_per_chunk, HW), BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < HW
            ok = row_ok[:, None] & col_ok[None, :]
            x = _load_tile(x_ptr, x2_ptr, n, rows, cols, ok, HW, C, C1, TWO)
            n_b = tl.sum(row_ok.to(tl.float32), axis=0)
            mean_b = tl.sum(x, axis=0) / n_b
            dev = tl.where(ok, x - mean_b[None, :], 0.0)
            count, mean, m2 = _merge(count, mean, m2, n_b, mean_b, tl.sum(dev * dev, axis=0))
        out = (n * num_chunks + chunk) * C + cols
        tl.store(mean_ptr + out, mean, mask=col_ok)
        tl.store(m2_ptr + out, m2, mask=col_ok)

    @triton.jit
    def _group_stats_kernel(mean_ptr, m2_ptr, shift_ptr, group_mean_ptr, group_rstd_ptr, HW, C, D, num_chunks,
                            rows_per_chunk, shift_row_stride, eps,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SHIFT: tl.constexpr):
        """Merge the chunks' per-channel (mean, M2), each channel's mean moved by its shift, over the D channels of
        one group: the group's mean and 1/sqrt(var + eps)."""
        g, n, G = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
        ds = tl.arange(0, BLOCK_D)
        d_ok = ds < D
        cols = g * D + ds
        if SHIFT:
            shift = tl.load(shift_ptr + n * shift_row_stride + cols, mask=d_ok, other=0.0).to(tl.float32)
        else:
            shift = tl.zeros([BLOCK_D], tl.float32)
        zero = tl.sum(tl.zeros([BLOCK_D], tl.float32), axis=0)
        count, mean, m2 = zero, zero, zero
        for k0 in range(0, num_chunks, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < num_chunks
            ok = k_ok[:, None] & d_ok[None, :]
            idx = (n * num_chunks + ks[:, None]) * C + cols[None, :]
            mean_c = tl.load(mean_ptr + idx, mask=ok, other=0.0) + shift[None, :]
            m2_c = tl.load(m2_ptr + idx, mask=ok, other=0.0)
            rows = tl.where(k_ok, tl.minimum(HW - ks * rows_per_chunk, rows_per_chunk), 0).to(tl.float32)
            weight = tl.where(ok, rows[:, None], 0.0)  # elements behind each (chunk, channel) entry
            n_b = tl.sum(tl.sum(weight, axis=1), axis=0)
            mean_b = tl.sum(tl.sum(weight * mean_c, axis=1), axis=0) / n_b
            dev = tl.where(ok, mean_c - mean_b, 0.0)
            m2_b = tl.sum(tl.sum(m2_c + weight * dev * dev, axis=1), axis=0)
            count, mean, m2 = _merge(count, mean, m2, n_b, mean_b, m2_b)
        tl.store(group_mean_ptr + n * G + g, mean)
        tl.store(group_rstd_ptr + n * G + g, 1.0 / tl.sqrt(m2 / count + eps))

    @triton.jit
    def _normalize_kernel(x_ptr, x2_ptr, y_ptr, w_ptr, b_ptr, shift_ptr, group_mean_ptr, group_rstd_ptr, HW, C, C1,
                          D, G, shift_row_stride, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr,
                          SHIFT: tl.constexpr, TWO: tl.constexpr):
        """y = (x + shift - mean) * rstd * weight + bias, then SiLU if asked, for a tile of pixels x channels."""
        rb, n, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        ok = (rows < HW)[:, None] & col_ok[None, :]
        groups = n * G + cols // D
        scale = tl.load(group_rstd_ptr + groups, mask=col_ok, other=0.0) * \
            tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        mean = tl.load(group_mean_ptr + groups, mask=col_ok, other=0.0)
        if SHIFT:
            mean -= tl.load(shift_ptr + n * shift_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
        offset = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) - mean * scale
        offsets = n.to(tl.int64) * HW * C + rows[:, None] * C + cols[None, :]
        y = _load_tile(x_ptr, x2_ptr, n, rows, cols, ok, HW, C, C1, TWO) * scale[None, :] + offset[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _residual_kernel(h_ptr, skip_ptr, bias_ptr, out_ptr, numel, C, scale, BLOCK: tl.constexpr):
        """out = (h + bias + skip) * scale over flat channels-innermost memory (channel = index % C)."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offsets < numel
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        skip = tl.load(skip_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offsets % C, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, ((h + bias + skip) * scale).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _residual_pad_kernel(h_ptr, skip_ptr, bias_ptr, out_ptr, H, W, C, scale, BLOCK: tl.constexpr):
        """Row i of sample n of out [N, H + 1, W + 1, C]: (h + bias + skip) * scale for i < H and the first W C
        elements (pixels j < W), 0 in the last row and the last pixel of each row."""
        row = tl.program_id(0)
        n, i = row // (H + 1), row % (H + 1)
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # element of the output row
        inside = (e < W * C) & (i < H)
        src = (n.to(tl.int64) * H + i) * W * C + e
        h = tl.load(h_ptr + src, mask=inside, other=0.0).to(tl.float32)
        skip = tl.load(skip_ptr + src, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + e % C, mask=inside, other=0.0).to(tl.float32)
        value = tl.where(inside, (h + bias + skip) * scale, 0.0)
        tl.store(out_ptr + row.to(tl.int64) * (W + 1) * C + e, value.to(out_ptr.dtype.element_ty), mask=e < (W + 1) * C)

    @triton.jit
    def _geglu_kernel(h_ptr, out_ptr, rows, D, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[r, c] = h[r, c] * GELU(h[r, D + c]) (exact, erf form), for a tile of rows x channels."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (r < rows)[:, None] & (c < D)[None, :]
        src = r.to(tl.int64)[:, None] * (2 * D) + c[None, :]
        value = tl.load(h_ptr + src, mask=ok, other=0.0).to(tl.float32)
        gate = tl.load(h_ptr + src + D, mask=ok, other=0.0).to(tl.float32)
        y = value * gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        tl.store(out_ptr + r.to(tl.int64)[:, None] * D + c[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _interleave_kernel(y_ptr, bias_ptr, out_ptr, H, W, Co, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                           BIAS: tl.constexpr):
        """Output row 2i + a of sample n, pixels 2j + b: y[n, i + a, j + b, (2a + b) Co + c] (+ bias[c])."""
        row, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, r = row // (2 * H), row % (2 * H)
        i, a = r // 2, r % 2
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)  # output pixel 2j + b of the row
        j, b = p // 2, p % 2
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (p < 2 * W)[:, None] & (c < Co)[None, :]
        in_row = (n.to(tl.int64) * (H + 1) + i + a) * (W + 1)  # pixel index of (n, i + a, 0) in y
        src = (in_row + j + b).to(tl.int64)[:, None] * (4 * Co) + ((2 * a + b) * Co)[:, None] + c[None, :]
        x = tl.load(y_ptr + src, mask=ok, other=0.0)
        if BIAS:
            x = x.to(tl.float32) + tl.load(bias_ptr + c, mask=c < Co, other=0.0).to(tl.float32)[None, :]
        dst = (row.to(tl.int64) * (2 * W) + p)[:, None] * Co + c[None, :]
        tl.store(out_ptr + dst, x.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _im2col_kernel(x_ptr, cols_ptr, P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """cols[p, t C + c] = x[n, i + dy, j + dx, c] (0 outside) for pixel p = (n, i, j), tap t = 3 (dy+1) + dx+1."""
        pb, t, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        i = (p // W) % H + t // 3 - 1
        j = p % W + t % 3 - 1
        p_ok = p < P
        inside = p_ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)
        c_ok = c < C
        src = (p + (t // 3 - 1) * W + (t % 3 - 1)).to(tl.int64)[:, None] * C + c[None, :]  # pixel (n, i, j) of x
        v = tl.load(x_ptr + src, mask=inside[:, None] & c_ok[None, :], other=0.0)
        dst = p.to(tl.int64)[:, None] * (9 * C) + (t * C + c)[None, :]
        tl.store(cols_ptr + dst, v, mask=p_ok[:, None] & c_ok[None, :])
