"""The fused channels_last kernels (GroupNorm + SiLU + shift, the residual epilogue, the sub-pixel upsampling conv and
its interleaving pass, GEGLU, the im2col GEMM conv) against PyTorch's ops, and the switch of diffusers' VAE blocks to
them.

CPU: the module and the VAE swap leave every output and state-dict key as before; the kernels themselves run in
Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``, float32 on the CPU), including group widths that are
not powers of two, pixel counts that do not fill a tile and a mean far larger than the spread. GPU: the compiled
kernels in bfloat16 against float64 ``F.group_norm``, and a model that runs them gives what it gives without.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from gen3diffusion.models import kernels
from gen3diffusion.models.kernels import (
    GroupNorm,
    _cached_subpixel_weight,
    conv_without_bias,
    fuse_vae_blocks,
    geglu,
    gemm_conv,
    group_norm,
    residual_add,
    split_pointwise_conv,
    subpixel_upsample_conv,
    subpixel_weight,
    triton_group_norm,
    upsample_conv,
)

TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=32)
# (N, C, H, W, groups, offset): D = C / groups of 5 and 40 (not powers of two), pixel counts that leave partial
# tiles, a single column, and a mean 500 standard deviations away from 0 (a sum-of-squares variance would cancel)
SHAPES = [(2, 20, 5, 7, 4, 0.0), (1, 64, 16, 16, 32, 1000.0), (3, 128, 9, 11, 32, 3.0), (2, 96, 33, 1, 32, 0.0),
          (1, 320, 4, 4, 8, 0.0)]


@pytest.mark.parametrize("silu", [False, True])
def test_module_matches_group_norm_then_silu_on_cpu(silu):
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 12)
    torch.nn.init.normal_(ref.weight), torch.nn.init.normal_(ref.bias)
    fused = GroupNorm.from_module(ref, silu=silu)
    assert fused.weight is ref.weight and list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 12, 5, 5)
    expected = F.silu(ref(x)) if silu else ref(x)
    torch.testing.assert_close(fused(x), expected, atol=0, rtol=0)


def test_vae_swap_keeps_outputs_and_keys():
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).eval()
    keys = list(vae.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
        images = vae.decode(latents).sample
    # 10 resnets (encoder: 2 down + 2 mid; decoder: 2 mid + 2 x 2 up), 2 attention norms, 2 output norms, 1 upsampler,
    # 1 encoder down block with a downsampler
    assert fuse_vae_blocks(vae) == 10 + 2 + 2 + 1 + 1
    assert fuse_vae_blocks(vae) == 0
    assert type(vae.encoder.down_blocks[0]).__name__ == "_FusedDownEncoderBlock2D"
    assert list(vae.state_dict()) == keys
    assert not any(type(m) is torch.nn.GroupNorm for m in vae.modules())
    assert all(type(m).forward is not ResnetBlock2D.forward for m in vae.modules() if isinstance(m, ResnetBlock2D))
    with torch.no_grad():
        # float32, same math in another order of additions: a few ulp of the O(1) activations
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decode(latents).sample, images, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 4, 6), (1, 3, 3, 1, 1), (3, 8, 4, 7, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_subpixel_upsample_conv_is_upsample_then_conv(shape, with_bias):
    """In float64 the sub-pixel form equals nearest x2 + 3x3 conv to rounding, for odd sizes, a single pixel and
    either input layout; the output is channels_last."""
    n, ci, co, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, ci, h, w, dtype=torch.float64, generator=g)
    weight = torch.randn(co, ci, 3, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(co, dtype=torch.float64, generator=g) if with_bias else None
    ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        out = subpixel_upsample_conv(x.to(memory_format=layout), subpixel_weight(weight), bias)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_subpixel_weight_cache_follows_the_weight():
    """The cached phase kernels are made anew when the weight changes in place or is replaced."""
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    first = _cached_subpixel_weight(conv)
    assert _cached_subpixel_weight(conv) is first
    with torch.no_grad():
        conv.weight.mul_(2)
    torch.testing.assert_close(_cached_subpixel_weight(conv), subpixel_weight(conv.weight).detach())
    conv.weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3))
    torch.testing.assert_close(_cached_subpixel_weight(conv), subpixel_weight(conv.weight).detach())
    assert "_subpixel_cache" not in "".join(conv.state_dict())


def test_kernels_in_triton_interpreter():
    """The kernels, run by Triton's interpreter on the CPU, against float64 references (F.group_norm, F.conv2d)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import torch, torch.nn.functional as F
        from gen3diffusion.models.kernels import (gemm_conv, split_pointwise_conv, triton_geglu, triton_group_norm,
                                                  triton_im2col, triton_residual_add, triton_subpixel_interleave)
        torch.manual_seed(0)
        for N, C, H, W, G, offset in {SHAPES!r}:
            x = (torch.randn(N, C, H, W) * 2 + offset).to(memory_format=torch.channels_last)
            w, b = torch.randn(C), torch.randn(C)
            for silu in (False, True):
                y = triton_group_norm(x, G, w, b, 1e-5, silu)
                assert y.is_contiguous(memory_format=torch.channels_last)
                ref = F.group_norm(x.double(), G, w.double(), b.double(), 1e-5)
                ref = F.silu(ref) if silu else ref
                torch_err = (F.group_norm(x, G, w, b, 1e-5).double() - F.group_norm(x.double(), G, w.double(),
                             b.double(), 1e-5)).abs().max().item()
                err = (y.double() - ref).abs().max().item()
                # float32 rounding of the input dominates at offset 1000: no worse than PyTorch's own kernel there
                assert err <= max(1e-5, 2 * torch_err), (N, C, H, W, G, offset, silu, err, torch_err)
            for shift in (torch.randn(C) * 5, torch.randn(N, C) * 5):  # a conv bias; plus a time embedding
                y = triton_group_norm(x, G, w, b, 1e-5, True, shift)
                ref = F.silu(F.group_norm(x.double() + shift.double().reshape(-1, C, 1, 1), G, w.double(), b.double(),
                                          1e-5))
                assert (y.double() - ref).abs().max().item() <= max(1e-5, 2 * torch_err), (N, C, H, W, shift.shape)
            # the same norm of a concatenation read from its two parts (a U-Net's up path): split on a group
            # boundary, inside a group, and before the last channel
            for c1 in (C // G, C // 2 + 1, C - 1):
                shift = torch.randn(N, C)
                y = triton_group_norm(x[:, :c1].contiguous(memory_format=torch.channels_last), G, w, b, 1e-5, True,
                                      shift, x[:, c1:].contiguous(memory_format=torch.channels_last))
                assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
                ref = F.silu(F.group_norm(x.double() + shift.double()[:, :, None, None], G, w.double(), b.double(),
                                          1e-5))
                assert (y.double() - ref).abs().max().item() <= max(1e-5, 2 * torch_err), (N, C, c1)
            skip = torch.randn_like(x)
            out = triton_residual_add(x, w, skip, 0.5)
            assert out.stride() == x.stride()
            assert (out - (x + w[:, None, None] + skip) * 0.5).abs().max().item() <= 1e-6 * (1 + abs(offset))
            padded = triton_residual_add(x, w, skip, 0.5, pad=True)  # the encoder downsampler's zero row and column
            assert padded.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(padded, F.pad(out, (0, 1, 0, 1)))
        x = torch.randn(2, 50, 64).transpose(1, 2)  # [N, C, L] stored as [N, L, C], as in the VAE's attention
        y = triton_group_norm(x, 8, torch.ones(64), torch.zeros(64), 1e-6)
        assert y.stride() == x.stride()
        assert (y - F.group_norm(x, 8, eps=1e-6)).abs().max().item() < 1e-5
        h = torch.randn(3, 7, 2 * 200) * 3  # 21 rows, 200 channels: partial tiles both ways
        ref = h[..., :200].double() * F.gelu(h[..., 200:].double())
        assert (triton_geglu(h).double() - ref).abs().max().item() < 1e-5
        for n, co, hh, ww, with_bias in ((2, 8, 3, 5, True), (1, 130, 2, 9, True), (1, 16, 1, 1, False)):
            y = torch.randn(n, 4 * co, hh + 1, ww + 1).to(memory_format=torch.channels_last)
            bias = torch.randn(co) if with_bias else None
            out = triton_subpixel_interleave(y, bias)
            assert out.shape == (n, co, 2 * hh, 2 * ww) and out.is_contiguous(memory_format=torch.channels_last)
            ref = torch.empty(n, co, 2 * hh, 2 * ww)
            for a in (0, 1):
                for b in (0, 1):  # phase (a, b) of output pixel (i, j) is the window at (i + a, j + b)
                    k = 2 * a + b
                    ref[:, :, a::2, b::2] = y[:, k * co:(k + 1) * co, a:a + hh, b:b + ww]
            ref = ref + (bias[:, None, None] if with_bias else 0)
            assert (out - ref).abs().max().item() < 1e-6, (n, co, hh, ww)
        for n, ci, co, hh, ww in ((2, 20, 12, 4, 4), (1, 130, 7, 3, 5), (3, 8, 5, 1, 1), (1, 4, 3, 17, 2)):
            x = torch.randn(n, ci, hh, ww).to(memory_format=torch.channels_last)
            padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C]
            ref = torch.cat([padded[:, t // 3:t // 3 + hh, t % 3:t % 3 + ww] for t in range(9)], dim=-1)
            assert torch.equal(triton_im2col(x), ref.reshape(n * hh * ww, 9 * ci)), (n, ci, hh, ww)
            for k in (1, 3):
                weight = torch.randn(co, ci, k, k).to(memory_format=torch.channels_last)
                out = gemm_conv(x, weight)
                assert out.shape == (n, co, hh, ww) and out.is_contiguous(memory_format=torch.channels_last)
                ref = F.conv2d(x.double(), weight.double(), padding=k // 2)
                assert (out.double() - ref).abs().max().item() < 1e-4, (n, ci, co, hh, ww, k)
            skip = torch.randn(n, 6, hh, ww).to(memory_format=torch.channels_last)
            weight = torch.randn(co, ci + 6, 1, 1).to(memory_format=torch.channels_last)
            out = split_pointwise_conv(x, skip, weight)
            ref = F.conv2d(torch.cat([x, skip], 1).double(), weight.double())
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert (out.double() - ref).abs().max().item() < 1e-4, (n, ci, co, hh, ww)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_gemm_paths_count_the_flops_of_the_convolutions_they_replace():
    """bench_sample.py reports FLOPs counted by ``FlopCounterMode``: the GEMM form of a 3x3 conv and the split 1x1
    shortcut must count as many as ``F.conv2d`` (a product it cannot see, such as ``addmm_``, would drop out). The
    3x3 GEMM multiplies [N*H*W, 9 Ci] columns, which needs the im2col kernel; its count is the same product's."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 16, 3, 4).to(memory_format=torch.channels_last)
    skip = torch.randn(2, 8, 3, 4).to(memory_format=torch.channels_last)
    w1, w_skip = torch.randn(5, 16, 1, 1), torch.randn(5, 24, 1, 1)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    concatenated = torch.cat([x, skip], 1)
    assert flops(lambda: split_pointwise_conv(x, skip, w_skip)) == flops(lambda: F.conv2d(concatenated, w_skip))
    assert flops(lambda: gemm_conv(x, w1)) == flops(lambda: F.conv2d(x, w1))


def test_split_pointwise_conv_under_autocast():
    """Autocast casts neither in-place nor ``out=`` ops: the second product of the split 1x1 conv must follow the
    first one's dtype (bf16 activations, float32 weights), and match the concatenated conv to bf16 rounding."""
    x = torch.randn(2, 16, 3, 4).to(torch.bfloat16, memory_format=torch.channels_last)
    skip = torch.randn(2, 8, 3, 4).to(torch.bfloat16, memory_format=torch.channels_last)
    weight = torch.randn(5, 24, 1, 1).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = split_pointwise_conv(x, skip, weight)
    ref = F.conv2d(torch.cat([x, skip], 1).double(), weight.double())
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_kernel_rejects_nchw_and_bad_groups():
    pytest.importorskip("triton")
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="channels_last"):
        triton_group_norm(x, 4, torch.ones(8), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="num_groups=3"):
        triton_group_norm(x.to(memory_format=torch.channels_last), 3, torch.ones(8), torch.zeros(8), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 128, 256, 256, 32), (10, 320, 32, 32, 32), (10, 1280, 4, 4, 32),
                                   (5, 960, 16, 16, 32), (2, 512, 33, 17, 32)])
def test_kernels_bf16_on_gpu(shape):
    """The dispatching functions on channels_last bf16 (the kernels) against float64 references."""
    N, C, H, W, G = shape
    torch.manual_seed(0)
    x = (torch.randn(N, C, H, W, device="cuda") * 3 + 1).to(torch.bfloat16).to(memory_format=torch.channels_last)
    w, b = torch.randn(C, device="cuda", dtype=torch.bfloat16), torch.randn(C, device="cuda", dtype=torch.bfloat16)
    shift = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    for silu, s in ((False, None), (True, None), (True, shift), (False, shift[0])):
        y = group_norm(x, G, w, b, 1e-5, silu, s)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        x64 = x.double() if s is None else x.double() + s.double().reshape(-1, C, 1, 1)
        ref = F.group_norm(x64, G, w.double(), b.double(), 1e-5)
        ref = F.silu(ref) if silu else ref
        # one bf16 rounding of the output (8 bits of mantissa): relative 2^-8 of the value, plus float32 noise
        assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
    skip = torch.randn_like(x)
    out = residual_add(x, b, skip, 0.5)
    ref = (x.double() + b.double()[:, None, None] + skip.double()) * 0.5
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 128, 128, 256), (5, 1024, 8, 8, 1024), (10, 640, 16, 16, 640)])
def test_upsample_conv_bf16_on_gpu(shape):
    """The sub-pixel path (bf16, channels_last, CUDA) against float64 nearest x2 + conv: bf16 rounding only."""
    n, ci, h, w, co = shape
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(ci, co, 3, padding=1).cuda()
    x = torch.randn(n, ci, h, w, device="cuda")
    with torch.no_grad():
        ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(),
                       conv.bias.double(), padding=1)
        conv.to(torch.bfloat16, memory_format=torch.channels_last)
        out = upsample_conv(conv, x.to(torch.bfloat16, memory_format=torch.channels_last))
    assert getattr(conv, "_subpixel_cache", None) is not None  # the sub-pixel path ran
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.double() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(10, 1280, 1280, 4, 4, 3), (10, 2560, 1280, 4, 4, 1), (5, 2048, 1024, 8, 8, 3),
                                   (3, 20, 12, 5, 7, 3)])
def test_gemm_conv_bf16_on_gpu(shape, monkeypatch):
    """The im2col GEMM conv (bf16, channels_last, CUDA) against float64 F.conv2d: bf16 rounding;
    and ``conv_without_bias`` takes it up to GEMM_CONV_MAX_PIXELS output pixels, cuDNN above."""
    n, ci, co, h, w, k = shape
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(ci, co, k, padding=k // 2).cuda().to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(n, ci, h, w, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    ref = F.conv2d(x.double(), conv.weight.double(), padding=k // 2)
    with torch.no_grad():
        out = gemm_conv(x, conv.weight)
        cudnn = F.conv2d(x, conv.weight, padding=k // 2)
        monkeypatch.setattr(kernels, "GEMM_CONV_MAX_PIXELS", n * h * w)
        assert torch.equal(conv_without_bias(conv, x), out)
        monkeypatch.setattr(kernels, "GEMM_CONV_MAX_PIXELS", n * h * w - 1)
        assert torch.equal(conv_without_bias(conv, x), cudnn)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    err, cudnn_err = ((y.double() - ref).norm() / ref.norm() for y in (out, cudnn))
    # bf16 rounding (cuBLAS may also reduce split-K partial sums in bf16): a wrong column order would give O(1)
    assert err < 1e-2, (err, cudnn_err)


@pytest.mark.gpu
@pytest.mark.parametrize("block", ["gaussian_unet", "mv_unet"])
def test_residual_block_reads_its_concatenated_input_in_parts_on_gpu(block, monkeypatch):
    """An up-path residual block (bf16, channels_last, CUDA) given x and skip apart gives what it gives on their
    concatenation, up to rounding, and the norm and the shortcut read the parts (no concatenated copy)."""
    from gen3diffusion.models import gaussian_unet, mv_unet

    torch.manual_seed(0)
    x = torch.randn(4, 256, 32, 32, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    skip = torch.randn(4, 128, 32, 32, device="cuda").to(torch.bfloat16, memory_format=torch.channels_last)
    emb = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    if block == "gaussian_unet":
        net = gaussian_unet.ResnetBlock(384, 256, 64, 32)
    else:
        net = mv_unet.ResBlock(384, 64, 256, 32)
        torch.nn.init.normal_(net.out_layers[3].weight, std=0.02)  # zero-initialised: give the branch some weight
    net = net.cuda().to(torch.bfloat16, memory_format=torch.channels_last).eval()
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda tensors, dim=0: cats.append(dim) or real_cat(tensors, dim))
    with torch.no_grad():
        parts = net(x, emb, skip)
        assert cats == []
        monkeypatch.setattr(kernels, "SPLIT_CONCAT", False)
        whole = net(x, emb, skip)
        assert cats == [1, 1]  # the norm's and the shortcut's concatenation
        ref = net.double()(real_cat([x, skip], 1).double().contiguous(), emb.double())  # NCHW: PyTorch's ops
    assert parts.is_contiguous(memory_format=torch.channels_last)
    err, whole_err = ((y.double() - ref).norm() / ref.norm() for y in (parts, whole))
    assert err <= 2 * whole_err + 1e-3, (err, whole_err)  # one more bf16 rounding, in the shortcut's first half


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 5120, 2560), (2, 320, 5120), (7, 3, 640)])
def test_geglu_bf16_on_gpu(shape):
    """The GEGLU kernel (bf16, CUDA) against float64 value * GELU(gate): one bf16 rounding of the output."""
    torch.manual_seed(0)
    h = (torch.randn(*shape, device="cuda") * 3).to(torch.bfloat16)
    out = geglu(h)
    value, gate = h.double().chunk(2, dim=-1)
    ref = value * F.gelu(gate)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()
    with torch.enable_grad():  # with autograd to record, the PyTorch ops run (and give the same values)
        h_grad = h.float().requires_grad_()
        torch.testing.assert_close(geglu(h_grad), ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_vae_with_kernels_matches_reference_on_gpu():
    """A channels_last bf16 VAE with the kernels against the same VAE in float32 through F.group_norm."""
    torch.manual_seed(0)
    vae32 = AutoencoderKL(**TINY_VAE).cuda().eval()
    vae16 = AutoencoderKL(**TINY_VAE).cuda().eval()
    vae16.load_state_dict(vae32.state_dict())
    vae16.to(torch.bfloat16, memory_format=torch.channels_last)
    assert fuse_vae_blocks(vae16) == 16
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        ref = vae32.decode(vae32.encode(x).latent_dist.mean).sample
        out = vae16.decode(vae16.encode(x.bfloat16()).latent_dist.mean).sample.float()
        mean = vae16.encode(x.bfloat16()).latent_dist.mean
        kernels.PAD_IN_RESIDUAL = False  # the encoder's downsampler pads a copy instead
        try:
            assert torch.equal(vae16.encode(x.bfloat16()).latent_dist.mean, mean)
        finally:
            kernels.PAD_IN_RESIDUAL = True
    assert (out - ref).norm() / ref.norm() < 0.02
