"""The training loop of Algorithm 1: a plain accelerate loop over one stage (A, B or C).

``train(cfg, resume)`` builds the models (from weights or randomly, see :class:`WeightsConfig`), the data, AdamW and
the learning-rate schedule, prepares them with accelerate (one or many processes, DDP), and runs optimizer updates
until ``train.max_steps``: bf16 autocast, gradient accumulation, gradient clipping, optional EMA, a NaN/inf guard,
tracker logging (TensorBoard by default), periodic validation sheets (PNG), atomic checkpoints, and at the end the
export of the models in the pipeline's layout (:mod:`gen3diffusion.training.checkpoint`).

Counting: a *step* is one optimizer update = ``gradient_accumulation_steps`` micro-batches on every process; the
global batch is ``batch_size * num_processes * gradient_accumulation_steps``. Micro-batch ``m`` of process ``p``
reads the ``m * P + p``-th batch of the (shared, seeded) sampler order and draws its randomness from a generator
seeded by ``(seed, m * P + p)``; so 2 processes x 1 micro-batch compute what 1 process x 2 accumulated micro-batches
compute, and a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from tqdm.auto import tqdm

from ..config import OptimConfig, TrainConfig
from ..data import make_dataset
from .build import TrainParts, build_parts
from .checkpoint import (
    CONFIG_NAME,
    EMA,
    checkpoint_step,
    config_differences,
    export_models,
    find_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .steps import STAGES, TrainContext, check_stage, train_step

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainResult", "batch_generator", "build_lr_scheduler", "build_optimizer", "train"]

# one JSON line per step: the step's mean losses over micro-batches and processes, lr, gradient norm
METRICS = "metrics.jsonl"
# batch index of the validation draws: far beyond any training batch index, so its draws are never reused
VALIDATION_STREAM = 2**62


### optimisation


def build_optimizer(groups: list[list[nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one parameter group per trained model, all with ``cfg``'s settings."""
    if len(cfg.betas) != 2:
        raise ValueError(f"optim betas must be two numbers, got {list(cfg.betas)}")
    return torch.optim.AdamW([{"params": g} for g in groups], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """The learning-rate schedule over ``total_steps`` updates: cosine to 0 after warmup (paper), OneCycle
    (authors' scripts) or constant after warmup."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=cfg.pct_start)
    warmup = max(cfg.warmup_steps, 0)

    def factor(step: int) -> float:  # step = updates done; the next update uses lr * factor(step)
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim schedule must be 'cosine', 'onecycle' or 'constant', got {cfg.schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteLossError(FloatingPointError):
    """A loss term or the gradient norm became NaN or infinite; the run stops without saving that state."""


def _check_finite(values: dict[str, Tensor], step: int, last_checkpoint: Path | None) -> None:
    bad = [k for k, v in values.items() if not torch.isfinite(v.detach()).all()]
    if bad:
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"step {step}: non-finite {', '.join(f'{k}={values[k].item()}' for k in bad)}; stopping without saving "
            f"this state ({kept}). Lower the learning rate or resume from that checkpoint."
        )


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of every random draw of one global batch index: independent of processes and resumes."""
    state = np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


### the run


@dataclass
class TrainResult:
    """What a finished run did: its last step, the per-step mean losses (all processes), and where it wrote."""

    step: int
    history: list[dict[str, float]]
    last_checkpoint: Path | None
    export_dir: Path | None


def train(cfg: DictConfig, resume: str | None = None) -> TrainResult:
    """Run the stage ``cfg.train.stage`` until ``cfg.train.max_steps`` updates (see the module docstring).

    ``resume``: "latest" or a ``step_<N>`` checkpoint folder; the run continues from its step with its model,
    optimizer, scheduler, RNG and EMA states. Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient.
    """
    run = _Run(cfg, resume)
    tcfg: TrainConfig = cfg.train
    bar = tqdm(total=tcfg.max_steps, initial=run.step, desc=f"train {tcfg.stage}",
               disable=not (run.accelerator.is_main_process and cfg.progress))
    sums: dict[str, Tensor] = {}
    while run.step < tcfg.max_steps:
        for batch in run.epoch_batches():
            losses, grad_norm = run.micro_step(batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            if run.accelerator.sync_gradients:
                run.end_step(sums, grad_norm)
                bar.update(1)
                if cfg.progress and run.step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{run.history[-1]['loss']:.4g}", lr=f"{run.history[-1]['lr']:.2e}")
                sums = {}
                if run.step >= tcfg.max_steps:
                    break
    bar.close()
    export_dir = run.export(Path(cfg.output_dir) / "export") if cfg.export else None
    run.accelerator.end_training()
    return TrainResult(run.step, run.history, run.last_checkpoint, export_dir)


class _Run:
    """The state of one training run: accelerator, prepared models / optimizer / data, step counters, EMA."""

    def __init__(self, cfg: DictConfig, resume: str | None) -> None:
        from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed

        tcfg: TrainConfig = cfg.train
        check_stage(tcfg.stage)
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        tracker = _tracker(cfg.tracker)
        self.accelerator = acc = Accelerator(
            mixed_precision=tcfg.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=tcfg.gradient_accumulation_steps, sync_with_dataloader=False),
            log_with=tracker,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tcfg.find_unused_parameters)],
        )
        set_seed(cfg.seed)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.out)

        self.parts = build_parts(cfg, acc.device)
        trained = {name: self.parts.modules[name] for name in STAGES[tcfg.stage]}
        self.ocfg: OptimConfig = tcfg.optim[tcfg.stage]
        optimizer = build_optimizer([list(m.parameters()) for m in trained.values()], self.ocfg)
        lr_scheduler = build_lr_scheduler(optimizer, self.ocfg, tcfg.max_steps)
        self.dataset = make_dataset(cfg.data)
        loader = DataLoader(self.dataset, batch_size=tcfg.batch_size, shuffle=True, drop_last=True,
                            num_workers=tcfg.num_workers, collate_fn=default_collate)
        prepared = acc.prepare(*trained.values(), optimizer, loader, lr_scheduler)
        self.models = dict(zip(trained, prepared[: len(trained)]))
        self.optimizer, self.loader, self.lr_scheduler = prepared[len(trained):]
        self.emas = {n: EMA(acc.unwrap_model(m), tcfg.ema_decay) for n, m in self.models.items()} \
            if tcfg.ema_decay else {}
        for ema in self.emas.values():
            acc.register_for_checkpointing(ema)

        self.step, self.last_checkpoint, self.history = 0, None, []
        if resume:
            self.last_checkpoint = find_checkpoint(self.out, resume)
            self.step = _resume(acc, self.last_checkpoint, cfg)
        self.micro = self.step * tcfg.gradient_accumulation_steps  # micro-batches done by every process
        self._report_start()
        self.tracked = tracker is not None
        if self.tracked:
            acc.init_trackers("gen3diffusion", config=_hparams(cfg))
        self.val_batch = _validation_batch(self.dataset, cfg.val_samples, acc.device) if cfg.validate_every else None

    def _report_start(self) -> None:
        tcfg, P = self.cfg.train, self.accelerator.num_processes
        accum = tcfg.gradient_accumulation_steps
        if len(self.loader) == 0:
            raise ValueError(f"{len(self.dataset)} samples give no full batch of {tcfg.batch_size} per process on "
                             f"{P} processes")
        self.accelerator.print(
            f"stage {tcfg.stage}: batch {tcfg.batch_size} per process x {P} processes x {accum} accumulation = "
            f"global batch {tcfg.batch_size * P * accum}; {len(self.dataset)} samples, {len(self.loader)} batches "
            f"per process per epoch; steps {self.step} -> {tcfg.max_steps}"
        )
        skipped = len(getattr(self.dataset, "skipped", {}))
        if skipped:
            logger.warning("%d objects skipped while building the dataset (names in the log above)", skipped)

    def epoch_batches(self):
        """The rest of the current epoch's batches (the sampler order is a function of seed and epoch)."""
        epoch, skip = divmod(self.micro, len(self.loader))
        self.loader.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader

    def micro_step(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Forward, NaN guard, backward; at the last micro-batch of a step also clip and update."""
        acc, stage = self.accelerator, self.cfg.train.stage
        generator = batch_generator(self.cfg.seed, self.micro * acc.num_processes + acc.process_index)
        grad_norm = None
        with acc.accumulate(*self.models.values()):
            with acc.autocast():
                losses = train_step(stage, self.models, self.parts.context, batch, generator)
            _check_finite(losses, self.step + 1, self.last_checkpoint)
            acc.backward(losses["loss"])
            if acc.sync_gradients and self.ocfg.max_grad_norm > 0:
                params = [p for m in self.models.values() for p in m.parameters()]
                grad_norm = acc.clip_grad_norm_(params, self.ocfg.max_grad_norm)
                _check_finite({"gradient norm": torch.as_tensor(grad_norm)}, self.step + 1, self.last_checkpoint)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        return losses, grad_norm

    def end_step(self, sums: dict[str, Tensor], grad_norm: Tensor | None) -> None:
        """After an update: schedule, EMA, metrics, validation, checkpoint."""
        acc, cfg = self.accelerator, self.cfg
        lr = self.optimizer.param_groups[0]["lr"]  # the learning rate of the update just made
        self.lr_scheduler.step()
        self.step += 1
        for name, ema in self.emas.items():
            ema.update(acc.unwrap_model(self.models[name]))
        record = _reduce_means(acc, sums, cfg.train.gradient_accumulation_steps)
        record.update(step=self.step, lr=lr)
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.history.append(record)
        _log(acc, self.out, record, cfg, self.tracked, self.dataset)
        if self.val_batch is not None and self.step % cfg.validate_every == 0:
            _validate(acc, cfg, self.models, self.emas, self.parts.context, self.val_batch, self.out, self.step)
        if self.step % cfg.checkpoint_every == 0 or self.step == cfg.train.max_steps:
            self.last_checkpoint = save_checkpoint(acc, self.out, self.step, cfg, cfg.keep_checkpoints)

    def export(self, folder: Path) -> Path:
        return _export(self.accelerator, self.cfg, self.parts, self.models, self.emas, folder)


def _tracker(name: str) -> str | None:
    if name == "none":
        return None
    if name == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            logger.warning("tracker=tensorboard but the tensorboard package is missing (pip install tensorboard); "
                           "logging to metrics.jsonl only")
            return None
    if name not in ("tensorboard", "wandb"):
        raise ValueError(f"tracker must be 'tensorboard', 'wandb' or 'none', got {name!r}")
    return name


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run config as flat scalars (what TensorBoard's hparams accept)."""
    from .checkpoint import _flatten

    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


### resume, logging, validation, export


def _resume(accelerator: Any, path: Path, cfg: DictConfig) -> int:
    """Load a checkpoint's state, warn about config differences, return its step."""
    step = checkpoint_step(path)
    saved = path / CONFIG_NAME
    if saved.is_file():
        diffs = config_differences(OmegaConf.load(saved), cfg)
        if diffs:
            logger.warning("resuming %s with a different config:\n  %s", path, "\n  ".join(diffs))
    else:
        logger.warning("%s has no %s; cannot compare configs", path, CONFIG_NAME)
    accelerator.load_state(str(path))
    if accelerator.is_main_process:
        _truncate_metrics(Path(cfg.output_dir) / METRICS, step)
    accelerator.print(f"resumed from {path} at step {step}")
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after ``step`` (logged by the interrupted run after its last checkpoint)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(f"{line}\n" for line in lines))


def _reduce_means(accelerator: Any, sums: dict[str, Tensor], accum: int) -> dict[str, float]:
    """Per-step means over the micro-batches of every process (one all-reduce)."""
    keys = sorted(sums)
    local = torch.stack([sums[k] for k in keys]).to(accelerator.device) / accum
    mean = accelerator.reduce(local, reduction="mean")
    return {k: float(v) for k, v in zip(keys, mean.tolist())}


def _log(accelerator: Any, out: Path, record: dict[str, float], cfg: DictConfig, tracked: bool,
         dataset: Any) -> None:
    """Main process: append the record to metrics.jsonl; every ``log_every`` steps also to the tracker."""
    if not accelerator.is_main_process:
        return
    step = int(record["step"])
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
    if step % cfg.log_every == 0 or step == cfg.train.max_steps:
        if tracked:
            scalars = {f"train/{k}": v for k, v in record.items() if k != "step"}
            scalars["data/skipped"] = len(getattr(dataset, "skipped", {}))
            accelerator.log(scalars, step=step)


def _validation_batch(dataset: Any, n: int, device: torch.device) -> dict[str, Any] | None:
    """The first ``n`` samples of epoch 0, collated and on ``device``."""
    if n < 1:
        return None
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    batch = default_collate([dataset[i] for i in range(min(n, len(dataset)))])
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def _validate(accelerator: Any, cfg: DictConfig, models: dict[str, nn.Module], emas: dict[str, EMA],
              ctx: TrainContext, batch: dict[str, Any], out: Path, step: int) -> None:
    """Main process: the stage's forward on the validation batch with fixed draws -> PNG sheet + logged losses.

    Rows per object: input + targets, decoded x_t, x0 (MVD estimate or VAE reconstruction), renders at the targets,
    supervision ground truth, supervision renders (the rows a stage has).
    """
    from contextlib import ExitStack

    from ..outputs import image_grid, save_png, to_uint8

    if not accelerator.is_main_process:
        return
    plain = {n: accelerator.unwrap_model(m) for n, m in models.items()}
    images: dict[str, Tensor] = {}
    with ExitStack() as stack:
        for n, ema in emas.items():
            stack.enter_context(ema.applied(plain[n]))
        modes = {n: m.training for n, m in plain.items()}
        for m in plain.values():
            m.eval()
        with accelerator.autocast():
            generator = batch_generator(cfg.seed, VALIDATION_STREAM)
            losses = train_step(cfg.train.stage, plain, ctx, batch, generator, images)
        for n, m in plain.items():
            m.train(modes[n])
    rows = []
    order = [("input", "target"), ("x_t",), ("x0",), ("target_render",), ("sup_gt",), ("sup_render",)]
    for b in range(batch["input_image"].shape[0]):
        for keys in order:
            row = [img for k in keys if k in images for img in to_uint8(images[k][b].clamp(0, 1))]
            if row:
                rows.append([None] * (1 if keys[0] != "input" else 0) + row)
    path = save_png(image_grid(rows), _mkdir(out / "validation") / f"step_{step:07d}.png")
    accelerator.log({f"val/{k}": float(v) for k, v in losses.items()}, step=step)
    logger.info("validation step %d: loss %.4g, sheet %s", step, float(losses["loss"]), path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export(accelerator: Any, cfg: DictConfig, parts: TrainParts, models: dict[str, nn.Module], emas: dict[str, EMA],
            folder: Path) -> Path:
    """Main process: the trained models (EMA weights when enabled) and the frozen parts in the pipeline layout."""
    from contextlib import ExitStack

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ctx = parts.context
        with ExitStack() as stack:
            for n, ema in emas.items():
                stack.enter_context(ema.applied(accelerator.unwrap_model(models[n])))
            export_models(folder, mv_unet=parts.mv_unet, model_3d=parts.model_3d,
                          vae=ctx.vae.to(torch.float32), image_encoder=ctx.image_encoder.to(torch.float32),
                          prompt_embeds=ctx.prompt_embeds, prompts=cfg.prompts, config=cfg)
    accelerator.wait_for_everyone()
    return folder
