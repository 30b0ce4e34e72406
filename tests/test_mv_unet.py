"""MultiViewUNet: official key layout, the multi-view behaviours (input frame, cross-view attention), attention
numerics against a float64 softmax, save/load, gradient checkpointing. Tiny sizes from configs/tiny.yaml."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import reference_dir
from gen3diffusion.config import MVUNetConfig, resolve_preset, to_dict
from gen3diffusion.models.loading import StateDictMismatchError, load_state_dict_strict
from gen3diffusion.models.mv_unet import (
    CrossAttention,
    MultiViewTransformerBlock,
    MultiViewUNet,
    PerceiverAttention,
    timestep_embedding,
)

from tiny_weights import randomize

FRAMES = 5


def tiny_config(**overrides) -> dict:
    cfg = OmegaConf.merge(OmegaConf.structured(MVUNetConfig), OmegaConf.load(resolve_preset("tiny")).mv_unet)
    return {**to_dict(cfg), **overrides}


def tiny_model(seed: int = 0, **overrides) -> MultiViewUNet:
    torch.manual_seed(seed)
    return randomize(MultiViewUNet(**tiny_config(**overrides)), seed)


def make_inputs(cfg: dict, b: int, frames: int = FRAMES, size: int = 8, seed: int = 1, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = b * frames

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(
        x=rand(n, cfg["in_channels"], size, size),
        timesteps=torch.randint(0, 1000, (n,), generator=g),
        context=rand(n, 77, cfg["context_dim"]),
        camera=rand(n, cfg["camera_dim"]),
        ip_tokens=rand(n, cfg["ip_dim"], cfg["context_dim"]),
        ip_img=rand(b, cfg["in_channels"], size, size),
        num_frames=frames,
    )


def manifest() -> dict[str, list[int]]:
    ref = reference_dir()
    path = ref / "imagedream_unet_keys.json" if ref else None
    if path is None or not path.is_file():
        pytest.skip("reference/imagedream_unet_keys.json not found (set GEN3D_REFERENCE_DIR)")
    return json.loads(path.read_text())["keys"]


### structure


def test_constructor_arguments_are_the_config_fields():
    params = list(inspect.signature(MultiViewUNet.__init__).parameters)[1:]
    assert params == [f.name for f in dataclasses.fields(MVUNetConfig)]
    defaults = {k: v.default for k, v in inspect.signature(MultiViewUNet.__init__).parameters.items() if k != "self"}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == to_dict(MVUNetConfig())


def test_official_size_matches_the_key_manifest():
    keys = manifest()
    with torch.device("meta"):
        model = MultiViewUNet(**to_dict(MVUNetConfig()))
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(state) == set(keys), (sorted(set(state) - set(keys))[:5], sorted(set(keys) - set(state))[:5])
    assert state == keys
    assert sum(math.prod(s) for s in state.values()) == 941_672_900  # reference/README.md


def test_manifest_state_dict_loads_strictly_and_a_wrong_one_does_not():
    keys = manifest()
    with torch.device("meta"):
        model = MultiViewUNet(**to_dict(MVUNetConfig()))
        state = {k: torch.empty(shape) for k, shape in keys.items()}
    load_state_dict_strict(model, state, assign=True)
    assert model.input_blocks[1][1].transformer_blocks[0].attn2.to_k_ip.weight is not None
    state.pop("out.2.bias")
    state["input_blocks.0.0.weight"] = torch.empty(320, 3, 3, 3, device="meta")
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_strict(model, state, assign=True)
    assert err.value.missing == ["out.2.bias"]
    assert err.value.mismatched == [("input_blocks.0.0.weight", (320, 3, 3, 3), (320, 4, 3, 3))]


def test_inconsistent_architecture_raises():
    with pytest.raises(ValueError, match="norm_num_groups=7"):
        MultiViewUNet(**tiny_config(norm_num_groups=7))
    with pytest.raises(ValueError, match="attention_resolutions"):
        MultiViewUNet(**tiny_config(attention_resolutions=[8]))
    with pytest.raises(ValueError, match="num_head_channels=24"):
        MultiViewUNet(**tiny_config(num_head_channels=24))


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 6)  # half = 3: frequencies 1, 10000^(-1/3), 10000^(-2/3)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7)[:, -1].abs().max() == 0  # odd width: zero pad


### behaviour


@pytest.mark.parametrize("b", [1, 2])
def test_forward_shape_and_dtype(b):
    model = tiny_model()
    inputs = make_inputs(model.config, b)
    with torch.no_grad():
        eps = model(**inputs)
    assert eps.shape == (b * FRAMES, 4, 8, 8) and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()
    # a float64 model computes in float64 and hands back the caller's dtype
    with torch.no_grad():
        eps64 = model.to(torch.float64)(**inputs)
    assert eps64.dtype == torch.float32
    torch.testing.assert_close(eps64, eps, rtol=1e-4, atol=1e-4)  # float32 vs float64 round-off of ~40 layers


def test_last_frame_is_replaced_by_the_input_latent():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    x = inputs["x"].clone()
    other = dict(inputs, x=inputs["x"].clone())
    other["x"][FRAMES - 1 :: FRAMES] = torch.randn_like(other["x"][FRAMES - 1 :: FRAMES]) * 10  # last frame of each
    with torch.no_grad():
        eps_a, eps_b = model(**inputs), model(**other)
    torch.testing.assert_close(eps_a, eps_b, rtol=0, atol=0)
    torch.testing.assert_close(inputs["x"], x, rtol=0, atol=0)  # the caller's tensor is untouched
    # ...while the input latent itself does matter
    with torch.no_grad():
        eps_c = model(**dict(inputs, ip_img=inputs["ip_img"] + 1))
    assert (eps_c - eps_a).abs().max() > 1e-3


def test_frames_of_a_sample_attend_to_each_other_but_samples_stay_apart():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    changed = dict(inputs, x=inputs["x"].clone())
    changed["x"][FRAMES + 2] += 1.0  # frame 2 of sample 1
    with torch.no_grad():
        eps, eps_changed = model(**inputs), model(**changed)
    torch.testing.assert_close(eps_changed[:FRAMES], eps[:FRAMES], rtol=0, atol=1e-6)  # sample 0: untouched
    assert (eps_changed[FRAMES] - eps[FRAMES]).abs().max() > 1e-3  # frame 0 of sample 1 saw frame 2
    # per-frame ablation: with one frame per "sample" the views do not mix, so frame 0 would not change
    single = dict(inputs, num_frames=1, ip_img=inputs["x"])
    single_changed = dict(changed, num_frames=1, ip_img=changed["x"])
    with torch.no_grad():
        a, b = model(**single), model(**single_changed)
    torch.testing.assert_close(a[FRAMES], b[FRAMES], rtol=0, atol=1e-6)


def test_batch_of_two_equals_two_singles():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    with torch.no_grad():
        both = model(**inputs)
        singles = []
        for i in range(2):
            frames = slice(i * FRAMES, (i + 1) * FRAMES)
            one = {k: v[frames] if torch.is_tensor(v) and k != "ip_img" else v for k, v in inputs.items()}
            singles.append(model(**dict(one, ip_img=inputs["ip_img"][i : i + 1])))
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-5, atol=1e-5)  # float32 batched-BLAS round-off


def test_bad_input_shapes_raise():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    with pytest.raises(ValueError, match="num_frames=3"):
        model(**dict(inputs, num_frames=3))
    with pytest.raises(ValueError, match="ip_img"):
        model(**dict(inputs, ip_img=inputs["ip_img"][:1]))
    with pytest.raises(ValueError, match="context"):
        model(**dict(inputs, context=inputs["context"][..., :8]))
    with pytest.raises(ValueError, match="multiple of 4"):
        model(**make_inputs(model.config, b=1, size=6))


def test_projected_context_gives_the_same_noise():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    with torch.no_grad():
        projected = model.project_context(inputs["context"], inputs["ip_tokens"])
        eps_projected = model(**dict(inputs, context=projected, ip_tokens=None))
        eps = model(**inputs)
    assert len(projected) == len(model.cross_attentions) > 1
    assert all(len(kv) == 4 and kv[0].shape[:2] == (2 * FRAMES, 77) for kv in projected.values())
    torch.testing.assert_close(eps_projected, eps, rtol=0, atol=0)  # the same operations on the same numbers
    # the image-prompt tokens reach the projection: other tokens give other noise
    with torch.no_grad():
        other = model.project_context(inputs["context"], inputs["ip_tokens"] + 1)
        assert (model(**dict(inputs, context=other, ip_tokens=None)) - eps).abs().max() > 1e-3


def test_projected_context_that_does_not_fit_raises():
    model = tiny_model()
    inputs = make_inputs(model.config, b=2)
    projected = model.project_context(inputs["context"], inputs["ip_tokens"])
    with pytest.raises(ValueError, match="ip_tokens: pass None"):
        model(**dict(inputs, context=projected))
    with pytest.raises(ValueError, match="ip_tokens: None"):
        model(**dict(inputs, ip_tokens=None))
    with pytest.raises(ValueError, match="another model"):
        model(**dict(inputs, context=tiny_model().project_context(inputs["context"], inputs["ip_tokens"]),
                     ip_tokens=None))
    one = model.project_context(inputs["context"][:FRAMES], inputs["ip_tokens"][:FRAMES])
    with pytest.raises(ValueError, match=r"projected for \[5\] frames, x has 10"):
        model(**dict(inputs, context=one, ip_tokens=None))
    with pytest.raises(ValueError, match="ip_tokens"):
        model.project_context(inputs["context"], inputs["ip_tokens"][:, :1])


def test_forward_with_a_projected_context_traces_into_one_graph_for_torch_compile():
    model = tiny_model()
    inputs = make_inputs(model.config, b=1)
    with torch.no_grad():
        projected = model.project_context(inputs["context"], inputs["ip_tokens"])
        explained = torch._dynamo.explain(model)(**dict(inputs, context=projected, ip_tokens=None))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_encode_image_prompt_shape():
    model = tiny_model()
    tokens = model.encode_image_prompt(torch.randn(3, 5, model.config.ip_in_dim))
    assert tokens.shape == (3, model.config.ip_dim, model.config.context_dim)
    with pytest.raises(ValueError, match="clip_hidden"):
        model.encode_image_prompt(torch.randn(3, 5, 7))


### attention numerics: SDPA against an explicit float64 softmax


def naive_attention(q, k, v, heads, scale=None):
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    scale = d**-0.5 if scale is None else scale
    weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, lq, inner)


def test_decoupled_cross_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = randomize(CrossAttention(16, 12, heads=2, dim_head=8, ip_dim=3, ip_weight=0.7)).double()
    x, context = torch.randn(2, 10, 16, dtype=torch.float64), torch.randn(2, 7 + 3, 12, dtype=torch.float64)
    text, ip = context[:, :7], context[:, 7:]
    expected = naive_attention(attn.to_q(x), attn.to_k(text), attn.to_v(text), 2)
    expected = expected + 0.7 * naive_attention(attn.to_q(x), attn.to_k_ip(ip), attn.to_v_ip(ip), 2)
    torch.testing.assert_close(attn(x, context), attn.to_out(expected), rtol=1e-12, atol=1e-12)


def test_cross_view_self_attention_matches_naive_softmax_over_all_frames():
    torch.manual_seed(0)
    block = randomize(MultiViewTransformerBlock(16, 2, 8, context_dim=12, ip_dim=3, ip_weight=1.0)).double()
    frames, length = 3, 4
    x = torch.randn(2 * frames, length, 16, dtype=torch.float64)
    context = torch.randn(2 * frames, 10, 12, dtype=torch.float64)
    joint = block.norm1(x.reshape(2, frames * length, 16))
    a1 = block.attn1
    h = (a1.to_out(naive_attention(a1.to_q(joint), a1.to_k(joint), a1.to_v(joint), 2)) + x.reshape(2, -1, 16))
    h = h.reshape(2 * frames, length, 16)
    h = block.attn2(block.norm2(h), context) + h
    expected = block.ff(block.norm3(h)) + h
    torch.testing.assert_close(block(x, context, frames), expected, rtol=1e-12, atol=1e-12)


def test_perceiver_attention_matches_the_quarter_power_scaled_softmax():
    torch.manual_seed(0)
    attn = randomize(PerceiverAttention(16, heads=2, dim_head=8)).double()
    x, latents = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    xn, ln = attn.norm1(x), attn.norm2(latents)
    k, v = attn.to_kv(torch.cat([xn, ln], dim=1)).chunk(2, dim=-1)
    s = 8**-0.25  # the official code scales q and k by d^(-1/4) each
    q = attn.to_q(ln)
    expected = attn.to_out(naive_attention(q * s, k * s, v, 2, scale=1.0))
    torch.testing.assert_close(attn(x, latents), expected, rtol=1e-12, atol=1e-12)


### saving, checkpointing, devices


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "unet")
    loaded = MultiViewUNet.from_pretrained(tmp_path / "unet").eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config) == tiny_config()
    inputs = make_inputs(model.config, b=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    inputs = make_inputs(model.config, b=1)

    def grads():
        model.zero_grad()
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_on_gpu_matches_fp32():
    model = tiny_model().cuda()
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in make_inputs(model.config, b=2).items()}
    with torch.no_grad():
        ref = model(**inputs)
        out = model.to(torch.bfloat16)(**inputs)
    assert out.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: ~0.4% per op; measured error through the tiny net stays well under 5% of the scale
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
