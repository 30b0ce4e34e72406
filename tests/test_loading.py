"""Loading: strict state dicts with full mismatch reports, weight-file formats, local-or-hub sources, a folder in the
ImageDream port layout built from tiny random parts, the official weights on top of it, and the converter script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file
from torch import nn

from gen3diffusion.models.conditioning import (
    PromptConfig,
    build_conditioning,
    cfg_batch,
    combine_cfg,
    encode_condition_image,
    load_image_encoder,
    load_prompt_embeddings,
    load_vae,
    vae_decode,
)
from gen3diffusion.models.loading import (
    StateDictMismatchError,
    find_weights_file,
    load_state_dict_strict,
    read_state_dict,
    resolve_file,
    resolve_source,
)
from gen3diffusion.models.mv_unet import MultiViewUNet, load_mv_unet
from tiny_weights import write_port_folder
from test_mv_unet import FRAMES, make_inputs, randomize, tiny_config, tiny_model

REPO = Path(__file__).resolve().parent.parent

# unet/config.json of the ImageDream port carries exactly these (openaimodel) keys; values shrunk for the test
PORT_UNET_CONFIG = {
    "_class_name": "MultiViewUNetModel",
    "_diffusers_version": "0.25.0",
    "attention_resolutions": [2, 1],
    "camera_dim": 16,
    "channel_mult": [1, 2],
    "context_dim": 32,
    "image_size": 8,
    "in_channels": 4,
    "ip_dim": 4,
    "model_channels": 32,
    "num_head_channels": 16,
    "num_res_blocks": 1,
    "out_channels": 4,
    "transformer_depth": 1,
}


def outputs(model: MultiViewUNet) -> torch.Tensor:
    with torch.no_grad():
        return model(**make_inputs(model.config, b=1))


### strict loading


def test_mismatch_error_lists_missing_unexpected_and_misshaped_keys():
    model = nn.Sequential(nn.Linear(3, 2), nn.Conv2d(2, 4, 3))
    state = {
        "0.weight": torch.zeros(2, 3), "1.weight": torch.zeros(4, 2, 1, 1), "1.bias": torch.zeros(4),
        "2.scale": torch.zeros(7),
    }
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_strict(model, state, source="ckpt.safetensors")
    message = str(err.value)
    assert "ckpt.safetensors" in message and "1 missing, 1 unexpected, 1 mis-shaped" in message
    assert "0.bias [2]" in message and "2.scale [7]" in message
    assert "1.weight: file [4, 2, 1, 1] vs model [4, 2, 3, 3]" in message
    assert err.value.missing == ["0.bias"] and err.value.unexpected == ["2.scale"]
    assert model[0].weight.abs().sum() > 0  # nothing was loaded
    ok = {
        "0.weight": torch.ones(2, 3), "0.bias": torch.ones(2), "1.weight": torch.ones(4, 2, 3, 3),
        "1.bias": torch.ones(4), "lpips_loss.w": torch.ones(1),
    }
    load_state_dict_strict(model, ok, ignore_prefixes=["lpips_loss."], dtype=torch.float64)
    assert model[0].weight.dtype == torch.float32 and model[0].weight.sum() == 6  # copied into the module's dtype


def test_read_state_dict_formats(tmp_path):
    state = {"a": torch.arange(3.0), "b.c": torch.ones(2, 2)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    save_file({"a": state["a"]}, str(tmp_path / "s1.safetensors"))
    save_file({"b.c": state["b.c"]}, str(tmp_path / "s2.safetensors"))
    index = {"weight_map": {"a": "s1.safetensors", "b.c": "s2.safetensors"}}
    (tmp_path / "w.safetensors.index.json").write_text(json.dumps(index))
    for name in ("w.safetensors", "w.bin", "w.safetensors.index.json"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name
    torch.save({"model": state, "step": 3}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="not a flat state dict"):
        read_state_dict(tmp_path / "nested.pt")


def test_find_weights_file_prefers_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        find_weights_file(tmp_path)
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    save_file({}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert find_weights_file(tmp_path).name == "diffusion_pytorch_model.safetensors"


### sources


def test_resolve_source_uses_the_hub_only_for_ids_that_are_not_paths(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns=None, revision=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_source(tmp_path, allow_patterns=["unet/*"]) == tmp_path and calls == []
    assert resolve_source("owner/some-model", allow_patterns=["unet/*"]) == tmp_path
    assert calls == [("owner/some-model", ["unet/*"])]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_source(tmp_path / "missing" / "deeper")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_file("owner/some-model", "model.safetensors") == tmp_path / "model.safetensors"
    assert resolve_file(tmp_path, "model.safetensors") == tmp_path / "model.safetensors"

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="pass a local folder"):
        resolve_source("owner/other-model")


### the ImageDream port layout and the official weights


def test_port_unet_config_with_openaimodel_keys_loads(tmp_path):
    """The port's config.json has the official keys only: extra keys are ignored, our new fields take defaults."""
    config = {k: v for k, v in PORT_UNET_CONFIG.items() if not k.startswith("_")}
    torch.manual_seed(0)
    reference = randomize(MultiViewUNet(**config))
    folder = tmp_path / "port" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**PORT_UNET_CONFIG, "use_checkpoint": False}))
    save_file(reference.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    via_from_pretrained = MultiViewUNet.from_pretrained(tmp_path / "port", subfolder="unet")
    via_function = load_mv_unet(tmp_path / "port")
    assert via_function.config.norm_num_groups == 32 and via_function.config.ip_in_dim == 1280  # defaults
    expected = outputs(reference)
    torch.testing.assert_close(outputs(via_from_pretrained), expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs(via_function), expected, rtol=0, atol=0)


def test_port_folder_of_tiny_parts_loads_and_runs(tmp_path):
    unet_ref = tiny_model(seed=0)
    root = write_port_folder(tmp_path / "imagedream", unet_ref)
    unet = load_mv_unet(root)
    torch.testing.assert_close(outputs(unet), outputs(unet_ref), rtol=0, atol=0)
    vae, image_encoder = load_vae(root), load_image_encoder(root)
    prompts = load_prompt_embeddings(PromptConfig(), tmp_path / "prompts.safetensors", root)
    scheduler = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
    scheduler.set_timesteps(2)

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        clip_hidden, ip_img = encode_condition_image(image, vae, image_encoder, torch.Generator().manual_seed(0))
        cond = build_conditioning(unet, prompts, clip_hidden, ip_img, camera=torch.randn(FRAMES, 16))
        x = torch.randn(FRAMES, 4, 4, 4)
        t = scheduler.timesteps[0]
        eps = combine_cfg(unet(*cfg_batch(x, t.expand(FRAMES)), **cond.unet_kwargs()), 5.0)
        x0 = scheduler.step(eps, t, x).pred_original_sample
        views = vae_decode(vae, x0)
    assert clip_hidden.shape == (1, 5, 32) and ip_img.shape == (1, 4, 4, 4)
    assert int(t) == 501 and eps.shape == x.shape and views.shape == (FRAMES, 3, 32, 32)
    assert torch.isfinite(views).all()


def test_official_weights_load_on_top_of_the_port_folder(tmp_path):
    root = write_port_folder(tmp_path / "imagedream", tiny_model(seed=0))
    finetuned = tiny_model(seed=1)
    (tmp_path / "ckpt").mkdir()
    save_file(finetuned.state_dict(), str(tmp_path / "ckpt" / "model.safetensors"))
    expected = outputs(finetuned)
    for weights in (tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt"):
        torch.testing.assert_close(outputs(load_mv_unet(root, weights)), expected, rtol=0, atol=0)
    # a partial file replaces only its own tensors
    partial = {k: v for k, v in finetuned.state_dict().items() if k.startswith("time_embed.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    merged = load_mv_unet(root, tmp_path / "partial.safetensors").state_dict()
    base = tiny_model(seed=0).state_dict()
    assert all(torch.equal(merged[k], partial[k] if k in partial else base[k]) for k in base)


def test_weights_that_do_not_fit_raise_with_every_key(tmp_path):
    root = write_port_folder(tmp_path / "imagedream", tiny_model(seed=0))
    state = dict(tiny_model(seed=1).state_dict())
    state.pop("out.2.bias")
    state["camera_embed.0.weight"] = torch.zeros(128, 12)
    state["label_emb.0.weight"] = torch.zeros(3)
    save_file(state, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(StateDictMismatchError) as err:
        load_mv_unet(root)
    message = str(err.value)
    assert "out.2.bias [4]" in message and "label_emb.0.weight [3]" in message
    assert "camera_embed.0.weight: file [128, 12] vs model [128, 16]" in message
    with pytest.raises(StateDictMismatchError, match="out.2.bias"):  # diffusers' own loader would only warn
        MultiViewUNet.from_pretrained(root, subfolder="unet")
    save_file({"label_emb.0.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(StateDictMismatchError, match="label_emb"):
        load_mv_unet(tmp_path / "imagedream", tmp_path / "extra.safetensors")


def test_hub_id_resolves_through_snapshot_download(tmp_path, monkeypatch):
    root = write_port_folder(tmp_path / "imagedream", tiny_model(seed=0))
    patterns = []

    def fake_download(repo_id, allow_patterns=None, revision=None):
        patterns.append(allow_patterns)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    unet = load_mv_unet("someone/imagedream-tiny")
    torch.testing.assert_close(outputs(unet), outputs(tiny_model(seed=0)), rtol=0, atol=0)
    assert patterns == [["unet/*"]]


### converter script


def run_converter(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("convert_to_diffusers", REPO / "scripts" / "convert_to_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_converter_writes_a_diffusers_folder(tmp_path):
    root = write_port_folder(tmp_path / "imagedream", tiny_model(seed=0))
    finetuned = tiny_model(seed=1)
    save_file(finetuned.state_dict(), str(tmp_path / "model.safetensors"))
    out = tmp_path / "converted"
    weights = str(tmp_path / "model.safetensors")
    run_converter(["--base", str(root), "--weights", weights, "--out", str(out), "--copy-components"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in root.iterdir())
    loaded = MultiViewUNet.from_pretrained(out, subfolder="unet").eval()
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == tiny_config()
    torch.testing.assert_close(outputs(loaded), outputs(finetuned), rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        run_converter(["--base", str(root), "--out", str(out)])
