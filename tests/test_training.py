"""Training (Algorithm 1): each stage learns, stage C's gradient path, exact resume, crash-safe checkpoints, the
NaN guard, the export layout and its round trip, the schedules. Tiny random models from configs/train_tiny.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch.utils.data import default_collate

from gen3diffusion.data import make_dataset
from gen3diffusion.training import checkpoint as ckpt
from gen3diffusion.training import loop
from gen3diffusion.training.build import build_parts, load_train_config
from gen3diffusion.training.loop import NonFiniteLossError, batch_generator, build_lr_scheduler, train
from gen3diffusion.training.steps import STAGES, train_step

CPU = torch.device("cpu")


def tiny_cfg(tmp_path: Path | None = None, *overrides: str):
    extra = [f"output_dir={tmp_path}"] if tmp_path is not None else []
    return load_train_config("train_tiny", [*extra, *overrides])


@pytest.fixture(scope="module")
def one_batch():
    cfg = tiny_cfg()
    return default_collate([make_dataset(cfg.data)[0]])


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


### each stage learns


@pytest.mark.parametrize("stage", ["mvd", pytest.param("model_3d", marks=pytest.mark.slow),
                                   pytest.param("joint", marks=pytest.mark.slow), "model_3d_without_prior"])
def test_stage_overfits_one_batch(stage, one_batch):
    """Fixed batch and fixed draws: 15 Adam steps on the stage's loss bring every loss it trains down (also for the
    3D model of the "w/o 2D prior" ablation, which reads x_t only)."""
    overrides = ["gaussian_unet.use_prior=false", "gaussian_unet.in_channels=9"] if stage.endswith("prior") else []
    stage = stage.removesuffix("_without_prior")
    cfg = tiny_cfg(None, f"train.stage={stage}", *overrides)
    parts = build_parts(cfg, CPU)
    params = [p for name in STAGES[stage] for p in parts.modules[name].parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    seen = []
    for _ in range(15):
        out = train_step(stage, parts.modules, parts.context, one_batch, batch_generator(0, 0))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        seen.append({k: float(v.detach()) for k, v in out.items()})
    terms = {"mvd": ["loss_mvd"], "model_3d": ["loss_3d"], "joint": ["loss_mvd", "loss_3d"]}[stage]
    for term in terms:
        first, last = seen[0][term], seen[-1][term]
        assert last < 0.7 * first, f"{stage}: {term} {first:.4f} -> {last:.4f}"


### stage C: the 3D loss reaches the MVD through x0~ unless detach_x0


@pytest.mark.parametrize("detach", [False, True])
def test_joint_3d_loss_reaches_mvd_through_x0(detach, one_batch):
    cfg = tiny_cfg(None, "train.stage=joint", f"train.detach_x0={detach}")
    parts = build_parts(cfg, CPU)
    out = train_step("joint", parts.modules, parts.context, one_batch, batch_generator(0, 0))
    out["loss_3d"].backward()
    grads = [p.grad for p in parts.mv_unet.out.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached is not detach
    assert all(p.grad is not None for p in parts.model_3d.parameters() if p.requires_grad)


def test_joint_stage_refuses_a_3d_model_without_prior(one_batch):
    cfg = tiny_cfg(None, "train.stage=joint", "gaussian_unet.use_prior=false", "gaussian_unet.in_channels=9")
    parts = build_parts(cfg, CPU)
    with pytest.raises(ValueError, match="use_prior"):
        train_step("joint", parts.modules, parts.context, one_batch, batch_generator(0, 0))


def test_mvd_step_layout(one_batch):
    """Input frame last with timestep 0 and the (undropped) input latent; the 4 targets share one t."""
    cfg = tiny_cfg(None, "train.stage=mvd", "train.cond_drop_prob=0.0", "train.sample_posterior=false")
    parts = build_parts(cfg, CPU)
    calls = {}
    unet = parts.mv_unet
    original = unet.forward

    def spy(x, timesteps, **kw):
        calls.update(x=x, timesteps=timesteps, **kw)
        return original(x, timesteps, **kw)

    unet.forward = spy
    train_step("mvd", parts.modules, parts.context, one_batch, batch_generator(0, 0))
    t = calls["timesteps"].view(1, 5)
    assert (t[:, 4] == 0).all() and (t[:, :4] == t[:, :1]).all() and 0 <= int(t[0, 0]) < 1000
    assert calls["num_frames"] == 5 and calls["camera"].shape == (5, 16)
    torch.testing.assert_close(calls["camera"], one_batch["mvd_cameras"][0])
    # the input latent is the VAE latent (posterior mean: sample_posterior=false) of the input image
    from gen3diffusion.models.conditioning import vae_encode

    latent = vae_encode(parts.context.vae, one_batch["input_image"] * 2 - 1, sample=False)
    torch.testing.assert_close(calls["ip_img"], latent)


def test_condition_dropout_uses_white_image(one_batch):
    """cond_drop_prob=1: the CLIP tokens and the input latent are those of an all-white image."""
    from gen3diffusion.models.conditioning import clip_image_hidden
    from gen3diffusion.training.steps import _condition

    parts = build_parts(tiny_cfg(None, "train.cond_drop_prob=1.0", "train.sample_posterior=false"), CPU)
    hidden, latent = _condition(parts.context, one_batch, batch_generator(0, 0))
    white = torch.ones_like(one_batch["input_image"])
    torch.testing.assert_close(hidden, clip_image_hidden(parts.context.image_encoder, white * 2 - 1))
    parts.context.cfg.cond_drop_prob = 0.0
    hidden_real, _ = _condition(parts.context, one_batch, batch_generator(0, 0))
    assert (hidden_real - hidden).abs().max() > 1e-4


### the loop: resume, interrupted checkpoint, NaN guard, export


@pytest.mark.slow
def test_resume_after_crash_in_save_matches_uninterrupted(tmp_path, monkeypatch):
    """A run killed while writing step 4's checkpoint leaves .tmp-step_4 and a loadable step_2; resuming from
    `latest` (= step_2) reproduces the uninterrupted run's losses of steps 3-4 and its final weights."""
    # 3 objects: the resumed run skips 2 batches of epoch 0, then crosses into epoch 1
    args = ["train.stage=joint", "train.max_steps=4", "checkpoint_every=2", "export=false", "data.num_objects=3"]
    full = train(tiny_cfg(tmp_path / "full", *args))

    crashed = tmp_path / "crashed"
    real_save = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kw):
        if output_dir.endswith("step_4"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt("killed while saving")
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(crashed, *args))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert (crashed / "checkpoints" / ".tmp-step_4").is_dir()
    assert ckpt.find_checkpoint(crashed, "latest").name == "step_2"

    resumed = train(tiny_cfg(crashed, *args), resume="latest")
    assert not (crashed / "checkpoints" / ".tmp-step_4").exists()
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert [r["step"] for r in history(crashed)] == [1, 2, 3, 4]  # the crashed run's steps 3-4 were replaced
    for a, b in zip(full.history[2:], resumed.history):
        for key in ("loss", "loss_mvd", "loss_3d"):
            assert abs(a[key] - b[key]) <= 1e-6, (key, a, b)
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_1.safetensors"):
        w_full = load_file(full.last_checkpoint / name)
        w_res = load_file(resumed.last_checkpoint / name)
        assert max((w_full[k] - w_res[k]).abs().max().item() for k in w_full) <= 1e-6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = loop.train_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss_mvd"] = out["loss_mvd"] * float("nan")
            out["loss"] = out["loss_mvd"]
        return out

    monkeypatch.setattr(loop, "train_step", poisoned)
    cfg = tiny_cfg(tmp_path, "train.stage=mvd", "train.max_steps=4", "checkpoint_every=2")
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite .*loss_mvd=nan"):
        train(cfg)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_2"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [r["step"] for r in history(tmp_path)] == [1, 2]


def test_find_checkpoint_skips_partial_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_10", ".tmp-step_12", "notes"):
        (root / name).mkdir(parents=True)
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "step_10"
    assert ckpt.find_checkpoint(tmp_path, str(root / "step_2")).name == "step_2"
    assert [p.name for p in ckpt.remove_partial_checkpoints(tmp_path)] == [".tmp-step_12"]
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_10"]
    with pytest.raises(FileNotFoundError):
        ckpt.find_checkpoint(tmp_path / "empty", "latest")
    with pytest.raises(ValueError, match="step_<N>"):
        ckpt.checkpoint_step(root / "notes")


def test_config_differences_name_keys():
    a = load_train_config("train_tiny")
    b = load_train_config("train_tiny", ["train.optim.joint.lr=0.5", "seed=3"])
    assert ckpt.config_differences(a, b) == ["seed: 0 -> 3", "train.optim.joint.lr: 0.001 -> 0.5"]


@pytest.mark.slow
def test_export_layout_reloads_identically_and_initialises_training(tmp_path, one_batch):
    """The loop's export holds what the pipeline loads; every saved part reloads to identical outputs; a new run
    starts from it (weights.init_from)."""
    from diffusers import DDIMScheduler

    from gen3diffusion.models.conditioning import read_prompt_embeddings

    cfg = tiny_cfg(tmp_path / "run", "train.stage=model_3d", "train.max_steps=1", "train.ema_decay=0.5",
                   "validate_every=1")
    result = train(cfg)
    assert (tmp_path / "run" / "validation" / "step_0000001.png").is_file()
    assert (result.last_checkpoint / "custom_checkpoint_0.pkl").is_file()  # the EMA
    folder = result.export_dir
    for name in ("mv_unet", "model_3d", "vae", "image_encoder", "scheduler", "prompt_embeds.safetensors", "gen3d.yaml"):
        assert (folder / name).exists(), name

    parts = build_parts(cfg, CPU)  # fresh random models (same seed as the run's init)
    export = tmp_path / "export"
    ckpt.export_models(export, mv_unet=parts.mv_unet, model_3d=parts.model_3d, vae=parts.context.vae,
                       image_encoder=parts.context.image_encoder,
                       prompt_embeds=parts.context.prompt_embeds, prompts=cfg.prompts, config=cfg)
    again = build_parts(tiny_cfg(tmp_path / "run2", f"weights.init_from={export}"), CPU)
    with torch.no_grad():
        for stage in STAGES:
            a = train_step(stage, parts.modules, parts.context, one_batch, batch_generator(0, 1))
            b = train_step(stage, again.modules, again.context, one_batch, batch_generator(0, 1))
            for k in a:
                assert torch.equal(a[k], b[k]), (stage, k)
    embeds = read_prompt_embeddings(export / "prompt_embeds.safetensors", cfg.prompts)
    assert torch.equal(embeds, parts.context.prompt_embeds)
    scheduler = DDIMScheduler.from_pretrained(export / "scheduler")
    assert torch.equal(scheduler.alphas_cumprod, parts.context.scheduler.alphas_cumprod)
    gen3d = OmegaConf.load(export / "gen3d.yaml")
    assert gen3d.cameras == cfg.camera and gen3d.render == cfg.render and gen3d.prompts == cfg.prompts
    # the pipeline loads the export as it is, with the same weights
    from gen3diffusion.pipeline import Gen3DiffusionPipeline

    pipe = Gen3DiffusionPipeline.from_pretrained(export, device="cpu", dtype=torch.float32)
    for mine, theirs in ((parts.mv_unet, pipe.mv_unet), (parts.model_3d, pipe.model_3d), (parts.context.vae, pipe.vae),
                         (parts.context.image_encoder, pipe.image_encoder)):
        b = theirs.state_dict()
        assert all(torch.equal(v, b[k]) for k, v in mine.state_dict().items())
    assert torch.equal(pipe.prompt_embeds, parts.context.prompt_embeds)


### optimisation pieces


def test_cosine_schedule_warms_up_and_anneals_to_zero():
    from gen3diffusion.config import OptimConfig

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine"), total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_onecycle_preset_of_the_authors_scripts():
    cfg = load_train_config("official_scripts")
    o = cfg.train.optim
    assert (o.mvd.lr, o.model_3d.lr, o.joint.lr) == (1e-4, 1e-4, 3e-5)
    assert (o.mvd.max_grad_norm, o.model_3d.max_grad_norm, o.joint.max_grad_norm) == (0.5, 1.0, 0.5)
    assert list(o.joint.betas) == [0.9, 0.999] and o.joint.weight_decay == 0.01 and cfg.train.batch_size == 1
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(opt, o.joint, total_steps=1000)
    peak = []
    for _ in range(1000):
        peak.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(peak) == pytest.approx(3e-5) and peak.index(max(peak)) == 4  # pct_start 0.005 of 1000 steps


def test_paper_defaults():
    t = load_train_config().train
    o = t.optim.joint
    assert (o.weight_decay, list(o.betas), o.schedule, o.max_grad_norm) == (0.05, [0.9, 0.95], "cosine", 1.0)
    assert t.batch_size * t.gradient_accumulation_steps * 8 == 256 and t.cond_drop_prob == 0.2
    assert t.mixed_precision == "bf16" and not t.detach_x0 and t.render_targets


def test_mixed_precision_no_from_the_command_line():
    assert load_train_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision"):
        load_train_config(None, ["train.mixed_precision=fp64"])


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="trian"):
        load_train_config("train_tiny", ["train.trian=3"])
    with pytest.raises(ValueError, match="stage"):
        train(tiny_cfg(None, "train.stage=C"))


def test_ema_closed_form_and_swap():
    from gen3diffusion.training.checkpoint import EMA

    model = torch.nn.Linear(2, 1)
    start = model.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)
    with ema.applied(model):
        torch.testing.assert_close(model.weight.detach(), start + 0.1)
    torch.testing.assert_close(model.weight.detach(), start + 1.0)
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_loop_reports_skipped_objects(tmp_path, caplog):
    """A folder dataset with a broken object: the object is skipped (named by the dataset) and the loop reports
    the count, then trains on the rest."""
    from gen3diffusion.data import DataConfig
    from gen3diffusion.data.synthetic import write_synthetic_dataset

    root = tmp_path / "data"
    write_synthetic_dataset(DataConfig(num_objects=3, image_size=32), root, resolution=32, num_spiral=2)
    (root / "synthetic_000001" / "cameras.json").write_text("{broken")
    cfg = tiny_cfg(tmp_path / "run", "train.stage=mvd", "train.max_steps=1", "export=false", "data.kind=folder",
                   f"data.root={root}")
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert result.step == 1
    text = caplog.text
    assert "synthetic_000001" in text and "1 objects skipped" in text
